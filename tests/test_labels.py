"""Dataset attribute labels: the real Market-1501 file, a DukeMTMC-layout file, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipeline.data.labels import (
    ATTRIBUTE_FIELDS,
    LAYOUT_FIELDS,
    AttributeLabels,
    Mentions,
    agreement,
    load_attribute_labels,
)
from pipeline.errors import InputError
from pipeline.review.wording import mentions, mentions_from_fields

MARKET = Path(__file__).parent / "data" / "market_attribute.mat"
UP = ("black", "white", "red", "purple", "yellow", "gray", "blue", "green")
DOWN = ("black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown")


@pytest.fixture(scope="module")
def market() -> AttributeLabels:
    return load_attribute_labels(MARKET)


def _raw(split: str) -> dict[str, object]:
    """The Market file read straight with scipy, by field name: the reference for the mapping."""
    root = scipy.io.loadmat(str(MARKET))["market_attribute"][0, 0][split][0, 0]
    ids = [str(c[0]) for c in root["image_index"].ravel()]
    return {"ids": ids, **{name: root[name].ravel() for name in root.dtype.names if name != "image_index"}}


def test_market_counts(market: AttributeLabels) -> None:
    assert market.layout == "market1501" and len(market) == 1501  # 751 train + 750 test identities
    assert sum(1 for s in market.splits.values() if s == "train") == 751
    assert market.fields == LAYOUT_FIELDS["market1501"] and set(market.fields) <= set(ATTRIBUTE_FIELDS)
    assert market.for_person("0000") is None and market.for_person(None) is None
    assert market.for_person("0002") == market.for_person("2") == market.for_person(2)


def test_market_known_persons(market: AttributeLabels) -> None:
    # person 0002 (train): a teenage man with short hair, short sleeves and shorts, red top, blue lower
    assert market.for_person("0002") == Mentions(
        upper_colours=frozenset({"red"}), lower_colours=frozenset({"blue"}), bag=False, backpack=False,
        handbag=False, hat=False, gender="male", hair="short", sleeve="short", lower_length="short",
        lower_type="pants", age="teenager",
    )
    # person 0001 (test split): a teenage woman with long hair in a short white dress, no bags
    one = market.for_person("0001")
    assert one is not None and market.splits["1"] == "test"
    assert (one.upper_colours, one.lower_colours) == ({"white"}, {"white"})
    assert (one.lower_type, one.lower_length) == ("dress", "short")
    assert (one.gender, one.hair, one.sleeve, one.backpack) == ("female", "long", "short", False)
    last = market.for_person("1501")  # the last id; a backpack this time
    assert last is not None and last.backpack is True and last.lower_type == "pants"


@pytest.mark.parametrize("split", ["train", "test"])
def test_market_mapping_matches_the_raw_codes(market: AttributeLabels, split: str) -> None:
    """Every person of the split, against the file read straight with scipy (the fields are in another
    order in the test part, so a mapping by position would fail here)."""
    raw = _raw(split)
    for position, pid in enumerate(raw["ids"]):  # type: ignore[arg-type]
        m = market.for_person(pid)
        assert m is not None and market.splits[str(int(pid))] == split

        def code(name: str) -> int:
            return int(raw[name][position])  # type: ignore[index]

        assert m.gender == ("male" if code("gender") == 1 else "female")
        assert m.hair == ("short" if code("hair") == 1 else "long")
        assert m.sleeve == ("long" if code("up") == 1 else "short")
        assert m.lower_length == ("long" if code("down") == 1 else "short")
        assert m.lower_type == ("dress" if code("clothes") == 1 else "pants")
        assert m.age == ("young", "teenager", "adult", "old")[code("age") - 1]
        for item in ("hat", "backpack", "bag", "handbag"):
            assert getattr(m, item) is (code(item) == 2)
        assert m.upper_colours == {c for c in UP if code(f"up{c}") == 2}
        assert m.lower_colours == {c for c in DOWN if code(f"down{c}") == 2}


def test_agreement_with_a_caption_and_an_answer(market: AttributeLabels) -> None:
    truth = market.for_person("0002")
    assert truth is not None
    caption = mentions("A man in a red t-shirt and blue jeans, carrying a backpack.")
    assert agreement(caption, truth) == {"upper_colour": True, "lower_colour": True, "gender": True,
                                         "lower_length": False, "lower_type": True, "backpack": False}
    answer = mentions_from_fields({"upper_color": "red", "lower_color": "black", "gender": "male", "hat": "no"})
    assert agreement(answer, truth) == {"upper_colour": True, "lower_colour": False, "gender": True, "hat": True}
    assert agreement(Mentions(), truth) == {}


def _duke_split(ids: list[str], rows: list[dict[str, int]]) -> dict[str, object]:
    fields: dict[str, object] = {}
    names = ["backpack", "bag", "handbag", "boots", "gender", "hat", "shoes", "top"]
    names += [f"up{c}" for c in ("black", "white", "red", "purple", "gray", "blue", "green", "brown")]
    names += [f"down{c}" for c in ("black", "white", "red", "gray", "blue", "green", "brown")]
    assert len(names) == 23
    for name in names:
        fields[name] = np.array([[r.get(name, 1) for r in rows]], dtype=np.uint8)
    cells = np.empty((1, len(ids)), dtype=object)
    for i, pid in enumerate(ids):
        cells[0, i] = pid
    fields["image_index"] = cells
    return fields


def test_duke_layout(tmp_path: Path) -> None:
    path = tmp_path / "duke_attribute.mat"
    train = _duke_split(["0001", "0005"], [
        {"gender": 2, "top": 2, "boots": 2, "shoes": 1, "upbrown": 2, "downred": 2, "handbag": 2},
        {"gender": 1, "top": 1, "shoes": 2, "upblue": 2, "downblack": 2, "backpack": 2, "hat": 2},
    ])
    test = _duke_split(["0019"], [{"gender": 1, "upgray": 2}])  # no lower colour marked: not stated
    scipy.io.savemat(str(path), {"duke_attribute": {"train": train, "test": test}})
    labels = load_attribute_labels(path)
    assert labels.layout == "dukemtmc" and len(labels) == 3 and labels.fields == LAYOUT_FIELDS["dukemtmc"]
    assert labels.for_person("0001") == Mentions(
        upper_colours=frozenset({"brown"}), lower_colours=frozenset({"red"}), bag=False, backpack=False,
        handbag=True, hat=False, boots=True, gender="female", top_length="long", shoes="dark",
    )
    five = labels.for_person("5")
    assert five is not None and (five.top_length, five.shoes, five.backpack, five.hat) == ("short", "light", True, True)
    nineteen = labels.for_person("0019")
    assert nineteen is not None and nineteen.lower_colours == frozenset() and labels.splits["19"] == "test"
    caption = mentions("A woman in a brown coat and red trousers, with a handbag and boots.")
    assert agreement(caption, labels.for_person("1"), labels.fields) == {  # type: ignore[arg-type]
        "upper_colour": True, "lower_colour": True, "gender": True, "handbag": True, "boots": True}


def _one_line_error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        load_attribute_labels(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_files(tmp_path: Path) -> None:
    assert "does not exist" in _one_line_error(tmp_path / "missing.mat")
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"this is not a MATLAB file\n" * 20)
    assert "not a MATLAB attribute file" in _one_line_error(junk)
    other = tmp_path / "other.mat"
    scipy.io.savemat(str(other), {"x": np.arange(3)})
    assert "no market_attribute or duke_attribute" in _one_line_error(other)
    wrong = tmp_path / "wrong.mat"
    scipy.io.savemat(str(wrong), {"market_attribute": {"train": {"gender": np.array([[1, 2]]),
                                                                 "image_index": np.array([["0001", "0002"]])}}})
    assert "no hat, backpack, bag, handbag field" in _one_line_error(wrong)
    bad_code = tmp_path / "bad_code.mat"
    split = _duke_split(["0001"], [{"gender": 7}])
    scipy.io.savemat(str(bad_code), {"duke_attribute": {"train": split, "test": split}})
    assert "field gender holds 7" in _one_line_error(bad_code)
