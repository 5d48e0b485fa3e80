"""Per-caption flags on small hand-made output folders (written through the csv module)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.data.labels import load_attribute_labels
from pipeline.errors import InputError
from pipeline.ledger.outputs import ATTRIBUTE_ROW_COLUMNS, CAPTION_COLUMNS, ERROR_COLUMNS
from pipeline.review.flags import (
    FLAG_NAMES,
    CaptionItem,
    ErrorItem,
    Flag,
    compute_flags,
    length_band,
    load_items,
    person_and_camera,
)

MARKET = Path(__file__).parent / "data" / "market_attribute.mat"
ATTRIBUTE_FIELDS = ["gender", "hat", "backpack", "bag", "handbag", "upper_color", "lower_color", "upper", "lower"]


def _write(path: Path, header: list[str], rows: list[dict[str, object]], bom: bool = False) -> None:
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, lineterminator="\r\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in header})


def caption(image_id: str, text: str, prompt: str = "base", index: int = 0, **extra: object) -> dict[str, object]:
    return {"image_id": image_id, "prompt": "Describe the person.", "caption": text, "timestamp": "2026-01-01T00:00:00Z",
            "model": "gpt-4o-mini", "prompt_tokens": 100, "completion_tokens": 30, "cost_usd": "0.0000330",
            "prompt_name": prompt, "caption_index": index, "attempts": 1, "latency_s": "0.500", "prompt_hash": "h",
            **extra}


def answer(image_id: str, prompt: str = "attributes", **fields: str) -> dict[str, object]:
    return {"image_id": image_id, "prompt_name": prompt, "timestamp": "2026-01-01T00:00:00Z", "model": "gpt-4o-mini",
            "prompt_tokens": 120, "completion_tokens": 40, "cost_usd": "0.0000420", "caption_index": 0,
            "prompt_hash": "h", **fields}


def folder(tmp_path: Path, captions: list[dict[str, object]], answers: list[dict[str, object]] = (),
           errors: list[dict[str, object]] = ()) -> Path:  # type: ignore[assignment]
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    _write(out / "captions_all.csv", CAPTION_COLUMNS, captions, bom=True)  # a folder started with --excel
    if answers:
        _write(out / "attributes.csv", ATTRIBUTE_ROW_COLUMNS + ATTRIBUTE_FIELDS, list(answers))
    if errors:
        _write(out / "errors.csv", ERROR_COLUMNS, list(errors))
    return out


def names(flags: dict, key: tuple[str, str, int]) -> list[str]:
    return [f.name for f in flags.get(key, [])]


# Person 0002 of Market-1501 is labelled: red upper, blue lower, short sleeves, shorts, male, no bags.
CONSISTENT = [
    caption("bounding_box_train/0002_c1s1_000451_03.jpg", "A man in a red t-shirt and blue shorts walks along the street."),
    caption("bounding_box_train/0002_c2s1_000301_01.jpg", "A man wearing a red short-sleeved shirt and blue shorts."),
    caption("query/0002_c3s1_000551_01.jpg", "A young man in a red top and blue shorts, with short hair."),
]


def test_no_flags_on_consistent_captions(tmp_path: Path) -> None:
    out = folder(tmp_path, CONSISTENT, [answer("query/0002_c3s1_000551_01.jpg", gender="male", backpack="no",
                                               bag="no", handbag="no", hat="no", upper_color="red",
                                               lower_color="blue", upper="red t-shirt", lower="blue shorts")])
    items, errors = load_items(out)
    assert errors == [] and len(items) == 4
    assert compute_flags(items, load_attribute_labels(MARKET)) == {}


def test_items_carry_what_the_folder_says(tmp_path: Path) -> None:
    text = 'He wears a "red" coat,\nand 蓝色 jeans.'
    out = folder(tmp_path, [caption("bounding_box_test/0007_c4s2_000100_02.jpg", text, index=1)],
                 [answer("bounding_box_test/0007_c4s2_000100_02.jpg", gender="male", hat="no", upper_color="red")],
                 [{"image_id": "x/0009_c1s1_000001_01.jpg", "reason": "refusal", "detail": "refused", "attempts": 2,
                   "timestamp": "t", "prompt_name": "base", "caption_index": 0, "cost_usd": "0.0001"}])
    items, errors = load_items(out)
    cap = next(i for i in items if i.kind == "caption")
    assert (cap.text, cap.caption_index, cap.person_id, cap.camera) == (text, 1, "0007", "4")
    assert (cap.model, cap.prompt_tokens, cap.completion_tokens, cap.cost_usd) == ("gpt-4o-mini", 100, 30, 3.3e-05)
    ans = next(i for i in items if i.kind == "attributes")
    assert ans.fields is not None and ans.fields["upper_color"] == "red" and ans.fields["hat"] == "no"
    assert json.loads(ans.text)["gender"] == "male" and ans.prompt_name == "attributes"
    assert errors == [ErrorItem("x/0009_c1s1_000001_01.jpg", "base", 0, "refusal", "refused", 0.0001)]
    # a prompt filter, and a prompt the folder never saw
    assert [i.kind for i in load_items(out, ["attributes"])[0]] == ["attributes"]
    with pytest.raises(InputError, match="no answers for prompt 'bse'.*it has: attributes, base"):
        load_items(out, ["bse"])
    with pytest.raises(InputError, match="does not exist"):
        load_items(tmp_path / "nowhere")


def test_reruns_keep_the_last_usable_row_and_drop_answered_errors(tmp_path: Path) -> None:
    image = "q/0002_c1s1_000451_03.jpg"
    out = folder(tmp_path, [
        caption(image, "A man in a red shirt."),
        caption(image, "I'm sorry, I can't help with that."),  # a later refusal never hides the caption
        caption("q/0003_c1s1_000001_01.jpg", "Sorry, I cannot describe people."),
        caption("q/0003_c1s1_000001_01.jpg", "A woman in a green dress."),
    ], errors=[{"image_id": image, "reason": "timeout", "detail": "", "attempts": 3, "timestamp": "t",
                "prompt_name": "base", "caption_index": 0}])
    items, errors = load_items(out)
    assert [i.text for i in items] == ["A man in a red shirt.", "A woman in a green dress."]
    assert errors == []  # the slot was answered later


def test_a_torn_tail_is_skipped_and_left_alone(tmp_path: Path) -> None:
    out = folder(tmp_path, CONSISTENT)
    path = out / "captions_all.csv"
    path.write_bytes(path.read_bytes() + b'query/0002_c4s1_000001_01.jpg,p,"A man in a red')  # a killed writer
    before = path.read_bytes()
    items, _ = load_items(out)
    assert [i.image_id for i in items] == sorted(r["image_id"] for r in CONSISTENT)  # type: ignore[type-var]
    assert path.read_bytes() == before  # reading never repairs: that is the run's job


def test_refusal_and_empty(tmp_path: Path) -> None:
    out = folder(tmp_path, [caption("a/0005_c1s1_000001_01.jpg", "I'm sorry, but I can't help with identifying people."),
                            caption("a/0006_c1s1_000001_01.jpg", " … "),
                            caption("a/0008_c1s1_000001_01.jpg", "A man in a black jacket and grey trousers.")])
    flags = compute_flags(load_items(out)[0])
    assert flags[("a/0005_c1s1_000001_01.jpg", "base", 0)] == [Flag("refusal", "looks like a refusal or apology")]
    assert flags[("a/0006_c1s1_000001_01.jpg", "base", 0)][0] == Flag("refusal", "empty answer")
    assert ("a/0008_c1s1_000001_01.jpg", "base", 0) not in flags


def test_length_outliers_within_a_prompt(tmp_path: Path) -> None:
    base = "A man in a {} jacket and dark trousers walks past a shop window with a bag."  # 17 words
    colours = ["red", "blue", "green", "black", "white", "gray", "brown", "purple", "yellow"]
    rows = [caption(f"a/{i + 10:04d}_c1s1_000001_01.jpg", base.format(c)) for i, c in enumerate(colours)]
    rows.append(caption("a/0100_c1s1_000001_01.jpg", "A man."))  # 2 words
    rows.append(caption("a/0101_c1s1_000001_01.jpg", " ".join([base.format("red")] * 4)))  # 68 words
    # a second prompt with long captions: its own band, not base's
    rows += [caption(f"a/{i + 10:04d}_c1s1_000001_01.jpg", " ".join([base.format(c)] * 4), prompt="long")
             for i, c in enumerate(colours)]
    flags = compute_flags(load_items(folder(tmp_path, rows))[0])
    assert flags[("a/0100_c1s1_000001_01.jpg", "base", 0)] == [Flag("length_outlier", "2 words (fewer than 4)")]
    long_flag = flags[("a/0101_c1s1_000001_01.jpg", "base", 0)]
    assert [f.name for f in long_flag] == ["length_outlier"] and long_flag[0].detail.startswith("68 words; ")
    assert not any("length_outlier" in names(flags, k) for k in flags if k[1] == "long")
    assert length_band([10] * 7) is None  # too few captions to say
    low, high = length_band([10] * 8)  # type: ignore[misc]
    assert (low, high) == (7.0, 13.0)  # the spread is at least 10 % of the median


def test_identity_conflict_across_cameras(tmp_path: Path) -> None:
    rows = [
        caption("bounding_box_train/0042_c1s1_000001_01.jpg", "A man in a red jacket and black trousers."),
        caption("bounding_box_train/0042_c3s1_000001_01.jpg", "A man in a black coat and black trousers."),
        caption("bounding_box_train/0042_c5s1_000001_01.jpg", "A man wearing a black jacket and dark jeans."),
        caption("bounding_box_train/0042_c6s1_000001_01.jpg", "A woman in a black jacket and black shorts."),
        # the same person under another prompt is judged on its own
        caption("bounding_box_train/0042_c1s1_000001_01.jpg", "A man in a red jacket.", prompt="short"),
        caption("bounding_box_train/0042_c3s1_000001_01.jpg", "A man in a red coat.", prompt="short"),
        # junk ids are not persons
        caption("bounding_box_test/-1_c1s1_000001_01.jpg", "A man in a red shirt."),
        caption("bounding_box_test/-1_c2s1_000001_01.jpg", "A man in a blue shirt."),
    ]
    flags = compute_flags(load_items(folder(tmp_path, rows))[0])
    red = flags[("bounding_box_train/0042_c1s1_000001_01.jpg", "base", 0)]
    assert red == [Flag("identity_conflict",
                        "upper colour red here; black in 3 of 3 other images of person 0042 (cameras 3, 5, 6)")]
    odd = flags[("bounding_box_train/0042_c6s1_000001_01.jpg", "base", 0)]
    assert [f.detail.split(" here")[0] for f in odd] == ["lower length short", "gender female"]  # shorts are pants
    assert odd[1].detail == "gender female here; male in 3 of 3 other images of person 0042 (cameras 1, 3, 5)"
    assert ("bounding_box_train/0042_c3s1_000001_01.jpg", "base", 0) not in flags
    assert ("bounding_box_train/0042_c5s1_000001_01.jpg", "base", 0) not in flags
    assert not any(k[1] == "short" or k[0].startswith("bounding_box_test/") for k in flags)


def test_a_split_identity_flags_both_sides(tmp_path: Path) -> None:
    rows = [caption("q/0050_c1s1_000001_01.jpg", "A woman in a pink skirt."),
            caption("q/0050_c2s1_000001_01.jpg", "A woman in a white skirt.")]
    flags = compute_flags(load_items(folder(tmp_path, rows))[0])
    assert names(flags, ("q/0050_c1s1_000001_01.jpg", "base", 0)) == ["identity_conflict"]
    assert flags[("q/0050_c2s1_000001_01.jpg", "base", 0)][0].detail == (
        "lower colour white here; pink in 1 of 1 other image of person 0050 (camera 1)")


def test_caption_against_structured_answer(tmp_path: Path) -> None:
    image = "q/0060_c1s1_000001_01.jpg"
    rows = [caption(image, "A man in a blue shirt and black trousers, carrying a backpack."),
            caption(image, "A man with a bag, in a blue shirt.", index=1)]  # a generic bag: any bag agrees
    answers = [answer(image, gender="male", backpack="no", bag="no", handbag="yes", hat="no",
                      upper_color="blue", lower_color="gray", upper="blue shirt", lower="gray trousers")]
    flags = compute_flags(load_items(folder(tmp_path, rows, answers))[0])
    assert flags[(image, "base", 0)] == [Flag(
        "attributes_disagree",
        "lower colour: black here, gray in the answer of attributes; backpack: yes here, no in the answer of attributes")]
    assert (image, "base", 1) not in flags
    assert flags[(image, "attributes", 0)] == [Flag(
        "attributes_disagree",
        "lower colour: gray here, black in caption base #0; backpack: no here, yes in caption base #0")]


def test_against_the_dataset_labels(tmp_path: Path) -> None:
    labels = load_attribute_labels(MARKET)
    rows = [caption("bounding_box_train/0002_c1s1_000451_03.jpg",
                    "A woman in a red t-shirt and black trousers, carrying a backpack."),
            caption("bounding_box_train/9999_c1s1_000001_01.jpg", "A woman in a green dress.")]  # not labelled
    items = load_items(folder(tmp_path, rows, [answer("bounding_box_train/0002_c1s1_000451_03.jpg",
                                                      gender="male", upper_color="red", lower_color="blue",
                                                      backpack="no", bag="no", handbag="no", hat="no")]))[0]
    flags = compute_flags(items, labels)
    flagged = flags[("bounding_box_train/0002_c1s1_000451_03.jpg", "base", 0)]
    assert [f.name for f in flagged] == ["attributes_disagree", "labels_disagree"]
    assert flagged[1].detail == (
        "lower colour: black here, blue in the labels of person 0002; gender: female here, male in the labels of "
        "person 0002; lower length: long here, short in the labels of person 0002; backpack: yes here, no in the "
        "labels of person 0002")
    assert "labels_disagree" not in names(flags, ("bounding_box_train/0002_c1s1_000451_03.jpg", "attributes", 0))
    assert ("bounding_box_train/9999_c1s1_000001_01.jpg", "base", 0) not in flags
    assert "labels_disagree" not in {f.name for fl in compute_flags(items).values() for f in fl}  # no labels given


@pytest.mark.parametrize("image_id, expected", [
    ("bounding_box_train/0002_c1s1_000451_03.jpg", ("0002", "1")),
    ("bounding_box_test/0000_c6s2_000001_01.jpg", (None, "6")),  # a distractor
    ("query\\1501_c6s4_001877_00.jpg", ("1501", "6")),
    ("bounding_box_train/0001_c2_f0046182.jpg", ("0001", "2")),  # Duke
    ("train/0000/0000_000_01_0303morning_0015_0.jpg", ("0000", "1")),  # MSMT17
    ("images_detected/1_001_1_01.png", ("1001", "1")),  # CUHK03
    ("holiday/IMG_0001.jpg", (None, None)),
])
def test_person_and_camera(image_id: str, expected: tuple[str | None, str | None]) -> None:
    assert person_and_camera(image_id) == expected


def test_records_and_names() -> None:
    assert FLAG_NAMES == ("refusal", "length_outlier", "identity_conflict", "attributes_disagree", "labels_disagree")
    item = CaptionItem("a.jpg", "base", 0, "m", "caption", "A man.", None, None, None)
    assert item.key == ("a.jpg", "base", 0) and item.cost_usd is None
    assert compute_flags([]) == {}
