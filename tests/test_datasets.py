"""File-name parsers and layout detection, on names from the real sets and trees drawn by synth.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.datasets import (
    ParsedName,
    check_splits,
    dataset_base,
    detect_dataset,
    is_duke_name,
    is_image_name,
    is_market_name,
    normalise_dataset_name,
    parse_cuhk03_name,
    parse_duke_name,
    parse_market_name,
    parse_msmt_list_line,
    parse_msmt_name,
    parse_reid_name,
    parse_reid_name_styled,
    scan_dataset,
    split_from_parts,
)
from pipeline.errors import InputError
from pipeline.testing import synth


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# --------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0002_c1s1_000451_03.jpg", ParsedName(2, 1, False)),
        ("1501_c6s4_001877_02.jpg", ParsedName(1501, 6, False)),
        ("-1_c3s2_012345_01.jpg", ParsedName(-1, 3, True)),  # junk
        ("0000_c6s4_002202_02.jpg", ParsedName(0, 6, True)),  # distractor
        ("0001_c1s1_001051_00.jpg", ParsedName(1, 1, False)),  # gt_bbox style
        ("Thumbs.db", None),
        ("person.jpg", None),
        ("c1s1_000451.jpg", None),
    ],
)
def test_parse_market_name(name: str, expected: ParsedName | None) -> None:
    assert parse_market_name(name) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0001_c2_f0046182.jpg", ParsedName(1, 2, False)),
        ("7140_c8_f0134570.jpg", ParsedName(7140, 8, False)),
        ("0000_c1_f0000001.jpg", ParsedName(0, 1, False)),  # Duke has no junk ids
        ("readme.txt", None),
    ],
)
def test_parse_duke_name(name: str, expected: ParsedName | None) -> None:
    assert parse_duke_name(name) == expected


@pytest.mark.parametrize(
    "name, market, duke",
    [
        ("0002_c1s1_000451_03.jpg", True, False),
        ("0001_c2_f0046182.jpg", False, True),
        ("0001_c1_1.png", False, False),  # CUHK03-NP
        ("x.jpg", False, False),
    ],
)
def test_market_vs_duke_names(name: str, market: bool, duke: bool) -> None:
    assert is_market_name(name) is market
    assert is_duke_name(name) is duke


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0002_c1s1_000451_03.jpg", (ParsedName(2, 1, False), "market1501")),
        ("-1_c1s1_000401_03.jpg", (ParsedName(-1, 1, True), "market1501")),
        ("0001_c2_f0046182.jpg", (ParsedName(1, 2, False), "dukemtmc")),
        ("0003_c1_2.png", (ParsedName(3, 1, False), None)),
        ("crop.png", None),
    ],
)
def test_parse_reid_name_styled(name: str, expected: tuple | None) -> None:
    assert parse_reid_name_styled(name) == expected
    assert parse_reid_name(name) == (expected[0] if expected else None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0000_000_01_0303morning_0015_0.jpg", ParsedName(0, 1, False)),
        ("0312_009_14_0113afternoon_1003_1.jpg", ParsedName(312, 14, False)),
        ("1040_017_15_0303noon_0853_2.jpg", ParsedName(1040, 15, False)),
        ("0002_c1s1_000451_03.jpg", None),
    ],
)
def test_parse_msmt_name(name: str, expected: ParsedName | None) -> None:
    assert parse_msmt_name(name) == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        ("0000/0000_000_01_0303morning_0015_0.jpg 0", ("0000/0000_000_01_0303morning_0015_0.jpg", 0, 1)),
        ("0312/0312_009_14_0113afternoon_1003_1.jpg 312\r\n",
         ("0312/0312_009_14_0113afternoon_1003_1.jpg", 312, 14)),
        ("0005\\0005_001_03_0302noon_0100_0.jpg\t5", ("0005/0005_001_03_0302noon_0100_0.jpg", 5, 3)),
        ("0007/0007_002_04_0302noon_0100_0.jpg", ("0007/0007_002_04_0302noon_0100_0.jpg", 7, 4)),  # pid from name
        ("0008/0008_002_04_0302noon_0100_0.jpg x", ("0008/0008_002_04_0302noon_0100_0.jpg", 8, 4)),
        ("odd/name.jpg 3", ("odd/name.jpg", 3, None)),
        ("   ", None),
        ("", None),
    ],
)
def test_parse_msmt_list_line(line: str, expected: tuple | None) -> None:
    assert parse_msmt_list_line(line) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("1_001_1_01.png", ParsedName(1001, 1, False)),
        ("1_001_2_06.png", ParsedName(1001, 2, False)),
        ("3_007_1_05.png", ParsedName(3007, 5, False)),
        ("5_120_2_10.png", ParsedName(5120, 10, False)),
        ("1_001_1.png", None),
        ("0001_c1_1.png", None),
    ],
)
def test_parse_cuhk03_name(name: str, expected: ParsedName | None) -> None:
    assert parse_cuhk03_name(name) == expected


def test_cuhk03_pid_is_unique_per_pair_and_person() -> None:
    pids = {parse_cuhk03_name(f"{pair}_{person:03d}_1_01.png").pid for pair in range(1, 6) for person in range(1, 200)}
    assert len(pids) == 5 * 199


@pytest.mark.parametrize(
    "folders, split",
    [
        (["bounding_box_train"], "train"),
        (["Market-1501-v15.09.15", "bounding_box_test"], "gallery"),
        (["query"], "query"),
        (["gt_bbox"], "gt_bbox"),
        (["train", "0000"], "train"),
        (["mask_test_v2", "0001"], "test"),
        (["cuhk03-np", "detected", "query"], "query"),
        (["crops", "a"], None),
        ([], None),
    ],
)
def test_split_from_parts(folders: list[str], split: str | None) -> None:
    assert split_from_parts(folders) == split


@pytest.mark.parametrize(
    "name, ok",
    [
        ("a.jpg", True), ("a.JPG", True), ("a.jpeg", True), ("a.png", True), ("a.webp", True),
        ("a.bmp", True), ("a.gif", True), ("a.tif", True), ("a.TIFF", True),
        ("Thumbs.db", False), ("notes.txt", False), (".DS_Store", False), ("._0002_c1s1_000451_03.jpg", False),
        ("jpg", False), (".jpg", False),
    ],
)
def test_is_image_name(name: str, ok: bool) -> None:
    assert is_image_name(name) is ok


@pytest.mark.parametrize(
    "given, canonical",
    [
        ("auto", "auto"), ("market1501", "market1501"), ("market", "market1501"), ("Market-1501", "market1501"),
        ("market_1501", "market1501"), ("dukemtmc", "dukemtmc"), ("duke", "dukemtmc"),
        ("DukeMTMC-reID", "dukemtmc"), ("msmt17", "msmt17"), ("MSMT17_V2", "msmt17"), ("cuhk03", "cuhk03"),
        ("cuhk03-np", "cuhk03"), ("folder", "folder"), (" FOLDER ", "folder"),
    ],
)
def test_normalise_dataset_name(given: str, canonical: str) -> None:
    assert normalise_dataset_name(given) == canonical


def test_unknown_dataset_name_is_one_line() -> None:
    with pytest.raises(InputError) as exc:
        normalise_dataset_name("viper")
    assert one_line(exc) == "unknown dataset 'viper'; use one of: auto, market1501, dukemtmc, msmt17, cuhk03, folder"


def test_check_splits() -> None:
    assert check_splits(None) is None
    assert check_splits({"train", "query"}) == frozenset({"train", "query"})
    with pytest.raises(InputError) as exc:
        check_splits({"train", "probe"})
    assert "unknown split 'probe'" in one_line(exc)


# --------------------------------------------------------------------------------------------- detection


def _make(kind: str, root: Path) -> None:
    makers = {
        "market": lambda: synth.make_market_tree(root),
        "market_top": lambda: synth.make_market_tree(root, top_folder="Market-1501-v15.09.15"),
        "duke": lambda: synth.make_duke_tree(root),
        "msmt_v1_lists": lambda: synth.make_msmt_tree(root),
        "msmt_v1_walk": lambda: synth.make_msmt_tree(root, with_lists=False),
        "msmt_v2_lists": lambda: synth.make_msmt_tree(root, v2=True),
        "msmt_v2_walk": lambda: synth.make_msmt_tree(root, with_lists=False, v2=True),
        "cuhk03": lambda: synth.make_cuhk03_tree(root),
        "cuhk03_np": lambda: synth.make_cuhk03_tree(root, np_layout=True),
        "folder": lambda: synth.make_folder_tree(root),
    }
    makers[kind]()


@pytest.mark.parametrize(
    "kind, dataset",
    [
        ("market", "market1501"), ("market_top", "market1501"), ("duke", "dukemtmc"),
        ("msmt_v1_lists", "msmt17"), ("msmt_v1_walk", "msmt17"), ("msmt_v2_lists", "msmt17"),
        ("msmt_v2_walk", "msmt17"), ("cuhk03", "cuhk03"), ("cuhk03_np", "cuhk03"), ("folder", "folder"),
    ],
)
def test_detect_dataset(tmp_path: Path, kind: str, dataset: str) -> None:
    _make(kind, tmp_path)
    assert detect_dataset(tmp_path) == dataset


def test_top_folder_is_descended(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path, top_folder="Market-1501-v15.09.15")
    assert dataset_base(tmp_path) == tmp_path / "Market-1501-v15.09.15"


def test_plain_train_test_folders_are_not_msmt(tmp_path: Path) -> None:
    for split in ("train", "test"):
        synth.make_crop(tmp_path / split / "cat" / "a.jpg", upper=synth.PALETTE["red"], lower=synth.PALETTE["blue"])
    assert detect_dataset(tmp_path) == "folder"


def test_plain_query_gallery_folders_are_not_market(tmp_path: Path) -> None:
    for split in ("train", "query", "gallery"):
        synth.make_crop(tmp_path / split / "a.jpg", upper=synth.PALETTE["red"], lower=synth.PALETTE["blue"])
    assert detect_dataset(tmp_path) == "folder"
    images = scan_dataset(tmp_path, "folder")
    assert [(im.image_id, im.split) for im in images] == [
        ("gallery/a.jpg", "gallery"), ("query/a.jpg", "query"), ("train/a.jpg", "train")]


def test_market_layout_with_unknown_names_is_still_market(tmp_path: Path) -> None:
    synth.make_crop(tmp_path / "bounding_box_train" / "x.jpg", upper=(1, 2, 3), lower=(4, 5, 6))
    assert detect_dataset(tmp_path) == "market1501"


def test_empty_folder_is_folder(tmp_path: Path) -> None:
    assert detect_dataset(tmp_path) == "folder"


# --------------------------------------------------------------------------------------------- scanning


def test_scan_market_junk_strays_and_unparsed(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path, n_ids=2, per_split=1)
    (tmp_path / "bounding_box_train" / "Thumbs.db").write_bytes(b"\0\1")
    (tmp_path / "query" / "notes.txt").write_text("stray", encoding="utf-8")
    (tmp_path / "query" / "._0001_c1s1_000107_01.jpg").write_bytes(b"resource fork")
    synth.make_crop(tmp_path / "query" / "renamed.jpg", upper=(9, 9, 9), lower=(200, 0, 0))
    images = scan_dataset(tmp_path, "market1501")
    ids = [im.image_id for im in images]
    assert ids == sorted(ids)
    assert not any(i.endswith((".db", ".txt")) or "/._" in i for i in ids)
    by_id = {im.image_id: im for im in images}
    assert by_id["query/renamed.jpg"].pid is None and by_id["query/renamed.jpg"].split == "query"
    junk = {im.image_id: im.pid for im in images if im.junk}
    assert junk == {"bounding_box_test/-1_c1s1_000401_03.jpg": -1, "bounding_box_test/0000_c3s1_000551_01.jpg": 0}
    assert {im.split for im in images} == {"train", "query", "gallery"}


def test_scan_market_gt_bbox_only_when_asked(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path, n_ids=1, per_split=1, with_junk=False)
    synth.make_crop(tmp_path / "gt_bbox" / "0001_c1s1_001051_00.jpg", upper=(0, 0, 0), lower=(1, 1, 1))
    assert all(im.split != "gt_bbox" for im in scan_dataset(tmp_path, "market1501"))
    only = scan_dataset(tmp_path, "market1501", {"gt_bbox"})
    assert [(im.image_id, im.pid, im.camid) for im in only] == [("gt_bbox/0001_c1s1_001051_00.jpg", 1, 1)]


def test_scan_duke(tmp_path: Path) -> None:
    synth.make_duke_tree(tmp_path, n_ids=2, per_split=1)
    images = scan_dataset(tmp_path, "dukemtmc")
    assert len(images) == 2 + 2 + 2
    assert all(im.pid is not None and 1 <= im.camid <= 8 and not im.junk for im in images)


def test_scan_msmt_with_lists(tmp_path: Path) -> None:
    synth.make_msmt_tree(tmp_path, n_ids=2, per_id=3)
    images = scan_dataset(tmp_path, "msmt17")
    splits = {im.image_id: im.split for im in images}
    assert sorted(set(splits.values())) == ["gallery", "query", "train", "val"]
    assert splits["train/0000/0000_000_01_0303morning_0015_0.jpg"] == "train"
    assert splits["train/0000/0000_002_03_0303afternoon_0095_0.jpg"] == "val"
    assert splits["test/0001/0001_000_02_0303morning_0015_0.jpg"] == "query"
    assert all(im.image_id.startswith("test/") for im in images if im.split in ("query", "gallery"))
    val = scan_dataset(tmp_path, "msmt17", {"val"})
    assert len(val) == 2 and all(im.split == "val" for im in val)


def test_scan_msmt_without_lists_uses_train_and_test(tmp_path: Path) -> None:
    synth.make_msmt_tree(tmp_path, with_lists=False, v2=True, n_ids=2, per_id=2)
    images = scan_dataset(tmp_path, "msmt17")
    assert {im.split for im in images} == {"train", "test"}
    assert {im.image_id.split("/")[0] for im in images} == {"mask_train_v2", "mask_test_v2"}
    assert all(im.pid is not None and im.camid is not None for im in images)


def test_scan_cuhk03_converted_has_no_split(tmp_path: Path) -> None:
    synth.make_cuhk03_tree(tmp_path, pairs=2, persons=2, images=1)
    images = scan_dataset(tmp_path, "cuhk03")
    assert len(images) == 2 * 2 * 2 * 2  # kinds x pairs x persons x views
    assert {im.split for im in images} == {None}
    assert {im.image_id.split("/")[0] for im in images} == {"images_detected", "images_labeled"}
    assert scan_dataset(tmp_path, "cuhk03", {"train"}) == []


def test_scan_cuhk03_np_layout_wins(tmp_path: Path) -> None:
    synth.make_cuhk03_tree(tmp_path, np_layout=True)
    images = scan_dataset(tmp_path, "cuhk03")
    assert all(im.image_id.startswith("cuhk03-np/") for im in images)
    assert {im.split for im in images} == {"train", "query", "gallery"}
    assert {im.image_id.split("/")[1] for im in images} == {"detected", "labeled"}


def test_scan_folder_recursive(tmp_path: Path) -> None:
    paths = synth.make_folder_tree(tmp_path)
    (tmp_path / "sub" / "notes.txt").write_text("x", encoding="utf-8")
    images = scan_dataset(tmp_path, "folder")
    assert [im.image_id for im in images] == sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert all(im.pid is None and im.camid is None and im.split is None for im in images)


@pytest.mark.parametrize("dataset, what", [("market1501", "Market-1501"), ("dukemtmc", "DukeMTMC-reID"),
                                           ("msmt17", "MSMT17"), ("cuhk03", "CUHK03")])
def test_named_dataset_on_wrong_layout(tmp_path: Path, dataset: str, what: str) -> None:
    synth.make_folder_tree(tmp_path)
    with pytest.raises(InputError) as exc:
        scan_dataset(tmp_path, dataset)
    assert one_line(exc).startswith(f"no {what} folders")
