"""Exports, checked by loading them the way the training code does (IRRA's dataset classes' fields)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.errors import InputError
from pipeline.export import (
    TRAINING_FILE_NAMES,
    EXPORT_FORMATS,
    build_export,
    carve_val,
    default_export_path,
    export_folder,
    run_export,
    split_group,
    tokenize,
    write_export,
)
from pipeline.ledger.outputs import CAPTION_COLUMNS, CAPTIONS_ALL, MANIFEST, caption_record, write_csv_atomic
from pipeline.records import CaptionRow, IndexEntry


# --- a small Market-like index with the awkward cases -----------------------------------------------

def entry(image_id: str, pid: int | None, split: str | None, camid: int | None = 1, junk: bool = False) -> IndexEntry:
    return IndexEntry(image_id=image_id, path=Path("/data") / image_id, pid=pid, camid=camid, split=split, junk=junk)


ENTRIES = [
    entry("bounding_box_train/0002_c1_a.jpg", 2, "train"),
    entry("bounding_box_train/0002_c2_b.jpg", 2, "train", camid=2),
    entry("bounding_box_train/0007_c1_a.jpg", 7, "train"),
    entry("bounding_box_train/0007_c3_nocap.jpg", 7, "train"),  # no caption: left out
    entry("bounding_box_train/0009_c1_a.jpg", 9, "train"),
    entry("bounding_box_train/0011_c1_a.jpg", 11, "val"),  # a dataset val image joins train
    entry("bounding_box_train/0013_c1_refused.jpg", 13, "train"),  # only a refusal: left out
    entry("query/0002_c4_q.jpg", 2, "query"),  # test pid 2 is another person than train pid 2 (MSMT17)
    entry("query/0005_c1_q.jpg", 5, "query"),
    entry("bounding_box_test/0002_c5_g.jpg", 2, "gallery"),
    entry("bounding_box_test/0005_c2_g.jpg", 5, "gallery"),
    entry("bounding_box_test/0000_c1_distractor.jpg", 0, "gallery", junk=True),
    entry("bounding_box_test/-1_c1_junk.jpg", -1, "gallery", junk=True),
    entry("extra/0020_nosplit.jpg", 20, None),  # no split: train
    entry("extra/unknown_person.jpg", None, None),  # no pid: jsonl only
]


def cap(image_id: str, text: str, prompt: str = "base", index: int = 0) -> CaptionRow:
    return CaptionRow(image_id=image_id, prompt="p", caption=text, timestamp="t", prompt_name=prompt, caption_index=index)


CAPTIONS = [
    cap("bounding_box_train/0002_c1_a.jpg", "A man in a red T-shirt, black shorts."),
    cap("bounding_box_train/0002_c1_a.jpg", "The man's shirt is red.", prompt="templated", index=1),
    cap("bounding_box_train/0002_c1_a.jpg", "He wears\nred and black.", prompt="templated", index=0),
    cap("bounding_box_train/0002_c2_b.jpg", "A man with a grey backpack."),
    cap("bounding_box_train/0007_c1_a.jpg", "一个穿白色上衣的女人。"),
    cap("bounding_box_train/0009_c1_a.jpg", "A woman in a long dress."),
    cap("bounding_box_train/0009_c1_a.jpg", "   ", index=1),  # empty: dropped
    cap("bounding_box_train/0009_c1_a.jpg", "I'm sorry, I can't help with that."),  # rerun refusal: keeps the caption
    cap("bounding_box_train/0009_c1_a.jpg", '{"gender": "female"}', prompt="attributes"),  # structured: dropped
    cap("bounding_box_train/0011_c1_a.jpg", "A boy in blue."),
    cap("bounding_box_train/0013_c1_refused.jpg", "I'm sorry, I can't help with that."),
    cap("query/0002_c4_q.jpg", "A person in green."),
    cap("query/0005_c1_q.jpg", "A woman in pink."),
    cap("bounding_box_test/0002_c5_g.jpg", "A person in green pants."),
    cap("bounding_box_test/0005_c2_g.jpg", "A woman in a pink coat."),
    cap("bounding_box_test/0000_c1_distractor.jpg", "Part of a car."),
    cap("bounding_box_test/-1_c1_junk.jpg", "A blurry figure."),
    cap("extra/0020_nosplit.jpg", "A man with an umbrella."),
    cap("extra/unknown_person.jpg", "A child."),
    cap("not/in/index.jpg", "Someone."),
]

TRAIN_IMAGES = {
    "bounding_box_train/0002_c1_a.jpg": 3,
    "bounding_box_train/0002_c2_b.jpg": 1,
    "bounding_box_train/0007_c1_a.jpg": 1,
    "bounding_box_train/0009_c1_a.jpg": 1,
    "bounding_box_train/0011_c1_a.jpg": 1,
    "extra/0020_nosplit.jpg": 1,
}
TEST_IMAGES = {
    "query/0002_c4_q.jpg": 1,
    "query/0005_c1_q.jpg": 1,
    "bounding_box_test/0002_c5_g.jpg": 1,
    "bounding_box_test/0005_c2_g.jpg": 1,
}


# --- loaders written from IRRA's dataset classes ------------------------------------------------------

def irra_load(path: Path, path_key: str, train_id_offset: int) -> dict:
    """IRRA: split == 'train' / 'test' / anything else is val; train pid = id - offset, asserted contiguous
    from 0; one (pid, image_id, img_path, caption) tuple per train caption; test/val as parallel lists."""
    annos = json.loads(path.read_text(encoding="utf-8"))
    parts: dict[str, list[dict]] = {"train": [], "test": [], "val": []}
    for anno in annos:
        parts[anno["split"] if anno["split"] in ("train", "test") else "val"].append(anno)
    train = []
    pids = set()
    for image_id, anno in enumerate(parts["train"]):
        pid = int(anno["id"]) - train_id_offset
        pids.add(pid)
        for caption in anno["captions"]:
            train.append((pid, image_id, anno[path_key], caption))
    assert sorted(pids) == list(range(len(pids))), "train pids must be contiguous from 0"
    evals = {}
    for split in ("test", "val"):
        d = {"image_pids": [], "img_paths": [], "caption_pids": [], "captions": []}
        for anno in parts[split]:
            d["image_pids"].append(int(anno["id"]))
            d["img_paths"].append(anno[path_key])
            for caption in anno["captions"]:
                d["captions"].append(caption)
                d["caption_pids"].append(int(anno["id"]))
        evals[split] = d
    return {"train": train, "train_pids": pids, **evals, "annos": annos}


def captions_per_path(train: list[tuple]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for _, _, img_path, _ in train:
        counts[img_path] += 1
    return dict(counts)


def export_file(tmp_path: Path, fmt: str, **kwargs: object) -> Path:
    records = build_export(fmt, CAPTIONS, ENTRIES, **kwargs)  # type: ignore[arg-type]
    path = tmp_path / TRAINING_FILE_NAMES[fmt]
    write_export(records, fmt, path)
    return path


# --- tests ---------------------------------------------------------------------------------------------

def test_cuhk_pedes_as_irra_reads_it(tmp_path: Path) -> None:
    data = irra_load(export_file(tmp_path, "cuhk-pedes"), "file_path", train_id_offset=1)
    assert captions_per_path(data["train"]) == TRAIN_IMAGES
    assert len(data["train_pids"]) == 5  # persons 2, 7, 9, 11 (dataset val joins train), 20 (no split)
    assert dict(zip(data["test"]["img_paths"], [1] * 4)) == TEST_IMAGES
    assert len(data["test"]["captions"]) == 4 and data["val"]["img_paths"] == []
    # test persons continue after train ids (1-based: train 1..5, test 6..)
    assert sorted(set(data["test"]["image_pids"])) == [6, 7]
    by_path = dict(zip(data["test"]["img_paths"], data["test"]["image_pids"]))
    assert by_path["query/0002_c4_q.jpg"] == by_path["bounding_box_test/0002_c5_g.jpg"]
    assert by_path["query/0002_c4_q.jpg"] != by_path["query/0005_c1_q.jpg"]
    # train pid 2's two images share one id; test pid 2 is another id
    train_ids = {p: pid for pid, _, p, _ in data["train"]}
    assert train_ids["bounding_box_train/0002_c1_a.jpg"] == train_ids["bounding_box_train/0002_c2_b.jpg"] == 0
    for anno in data["annos"]:
        assert set(anno) == {"split", "captions", "file_path", "processed_tokens", "id"}
        assert len(anno["processed_tokens"]) == len(anno["captions"])


def test_captions_are_cleaned_ordered_and_filtered(tmp_path: Path) -> None:
    records = build_export("cuhk-pedes", CAPTIONS, ENTRIES)
    first = next(r for r in records if r["file_path"] == "bounding_box_train/0002_c1_a.jpg")
    # prompt name, then caption index; newlines collapsed
    assert first["captions"] == ["A man in a red T-shirt, black shorts.", "He wears red and black.", "The man's shirt is red."]
    assert first["processed_tokens"][0] == ["a", "man", "in", "a", "red", "t", "shirt", "black", "shorts"]
    paths = {r["file_path"] for r in records}
    for left_out in ("bounding_box_train/0007_c3_nocap.jpg", "bounding_box_train/0013_c1_refused.jpg",
                     "bounding_box_test/0000_c1_distractor.jpg", "bounding_box_test/-1_c1_junk.jpg",
                     "extra/unknown_person.jpg", "not/in/index.jpg"):
        assert left_out not in paths
    all_captions = [c for r in records for c in r["captions"]]
    assert not any(c.strip() == "" or c.startswith("{") or "sorry" in c for c in all_captions)
    assert [r["split"] for r in records] == sorted((r["split"] for r in records), key=["train", "val", "test"].index)


def test_icfg_pedes_ids_from_zero_train_test_only(tmp_path: Path) -> None:
    path = export_file(tmp_path, "icfg-pedes")
    data = irra_load(path, "file_path", train_id_offset=0)
    assert captions_per_path(data["train"]) == TRAIN_IMAGES
    assert {a["split"] for a in data["annos"]} == {"train", "test"}
    assert sorted(set(data["test"]["image_pids"])) == [5, 6]
    with pytest.raises(InputError, match="train and test"):
        build_export("icfg-pedes", CAPTIONS, ENTRIES, val_from_train=0.3)


def test_rstpreid_fields_and_ids(tmp_path: Path) -> None:
    path = export_file(tmp_path, "rstpreid", val_from_train=0.4, seed=3)
    data = irra_load(path, "img_path", train_id_offset=0)
    for anno in data["annos"]:
        assert set(anno) == {"id", "img_path", "captions", "split"}
    val_ids = set(data["val"]["image_pids"])
    train_ids = data["train_pids"]
    test_ids = set(data["test"]["image_pids"])
    n_train = len(train_ids)
    assert len(val_ids) == 2  # round(0.4 * 5 persons)
    assert sorted(val_ids) == list(range(n_train, n_train + 2))
    assert sorted(test_ids) == list(range(n_train + 2, n_train + 4))


def test_val_from_train_splits_by_person(tmp_path: Path) -> None:
    entries = [entry(f"train/{pid:04d}_c{c}.jpg", pid, "train") for pid in range(1, 41) for c in (1, 2, 3)]
    captions = [cap(e.image_id, f"A person number {e.pid}.") for e in entries]
    records = build_export("cuhk-pedes", captions, entries, val_from_train=0.25, seed=7)
    write_export(records, "cuhk-pedes", tmp_path / "reid_raw.json")
    data = irra_load(tmp_path / "reid_raw.json", "file_path", train_id_offset=1)
    source_pid = {e.image_id: e.pid for e in entries}
    train_src = {source_pid[p] for _, _, p, _ in data["train"]}
    val_src = {source_pid[p] for p in data["val"]["img_paths"]}
    assert len(val_src) == 10 and len(train_src) == 30
    assert not train_src & val_src
    assert len(data["val"]["img_paths"]) == 30  # all 3 images of each val person
    # deterministic; a different seed picks other persons
    assert build_export("cuhk-pedes", captions, entries, val_from_train=0.25, seed=7) == records
    other = build_export("cuhk-pedes", captions, entries, val_from_train=0.25, seed=8)
    assert {source_pid[r["file_path"]] for r in other if r["split"] == "val"} != val_src
    # input order does not change the choice
    shuffled = build_export("cuhk-pedes", captions[::-1], entries, val_from_train=0.25, seed=7)
    assert shuffled == records


def test_carve_val_bounds() -> None:
    assert carve_val([1, 2, 3], 0.0) == set()
    assert carve_val([1], 0.5) == set()
    assert len(carve_val([1, 2, 3], 0.01)) == 1  # at least one
    assert len(carve_val([1, 2, 3], 0.99)) == 2  # never all
    with pytest.raises(InputError, match="fraction"):
        build_export("cuhk-pedes", CAPTIONS, ENTRIES, val_from_train=1.0)


def test_jsonl_keeps_everything_with_provenance(tmp_path: Path) -> None:
    attributes = [
        {"image_id": "bounding_box_train/0009_c1_a.jpg", "prompt_name": "attributes", "timestamp": "t", "model": "m",
         "prompt_tokens": "1", "completion_tokens": "2", "cost_usd": "0", "gender": "female", "hat": "no"},
        {"image_id": "bounding_box_train/0007_c3_nocap.jpg", "prompt_name": "attributes", "timestamp": "t",
         "model": "m", "prompt_tokens": "1", "completion_tokens": "2", "cost_usd": "0", "gender": "male", "hat": "yes"},
    ]
    records = build_export("jsonl", CAPTIONS, ENTRIES, attributes, val_from_train=0.0)
    path = tmp_path / "captions.jsonl"
    write_export(records, "jsonl", path)
    raw = path.read_text(encoding="utf-8")
    assert "一个穿白色上衣的女人" in raw  # ensure_ascii=False
    lines = [json.loads(line) for line in raw.splitlines()]
    by_id = {r["image_id"]: r for r in lines}
    assert "bounding_box_test/-1_c1_junk.jpg" in by_id and by_id["bounding_box_test/-1_c1_junk.jpg"]["junk"]
    assert by_id["extra/unknown_person.jpg"]["pid"] is None and by_id["extra/unknown_person.jpg"]["junk"]
    assert "bounding_box_train/0013_c1_refused.jpg" not in by_id and "not/in/index.jpg" not in by_id
    # an image with attributes but no caption is kept
    assert by_id["bounding_box_train/0007_c3_nocap.jpg"]["captions"] == []
    first = by_id["bounding_box_train/0002_c1_a.jpg"]
    assert first["captions"][1] == {"prompt_name": "templated", "caption_index": 0, "caption": "He wears red and black."}
    assert (first["pid"], first["camid"], first["split"], first["dataset_split"]) == (2, 1, "train", "train")
    assert by_id["bounding_box_train/0011_c1_a.jpg"]["split"] == "train"
    assert by_id["bounding_box_train/0011_c1_a.jpg"]["dataset_split"] == "val"
    assert by_id["query/0002_c4_q.jpg"]["split"] == "test"
    assert by_id["extra/0020_nosplit.jpg"]["split"] == "train"
    nine = by_id["bounding_box_train/0009_c1_a.jpg"]
    assert nine["attributes"] == {"attributes": {"gender": "female", "hat": "no"}}
    assert [c["caption"] for c in nine["captions"]] == ["A woman in a long dress."]


def test_jsonl_split_matches_id_formats_with_val() -> None:
    jsonl = build_export("jsonl", CAPTIONS, ENTRIES, val_from_train=0.4, seed=3)
    cuhk = build_export("cuhk-pedes", CAPTIONS, ENTRIES, val_from_train=0.4, seed=3)
    split_j = {r["image_id"]: r["split"] for r in jsonl}
    for r in cuhk:
        assert split_j[r["file_path"]] == r["split"]


def test_duplicate_key_keeps_last_usable_row() -> None:
    rows = [cap("bounding_box_train/0002_c1_a.jpg", "old"), cap("bounding_box_train/0002_c1_a.jpg", "new")]
    [record] = build_export("rstpreid", rows, ENTRIES)
    assert record["captions"] == ["new"]


def test_run_export_counts() -> None:
    result = run_export("cuhk-pedes", CAPTIONS, ENTRIES)
    assert result.persons == {"train": 5, "test": 2}
    assert result.no_person == 3  # distractor, junk, no pid
    assert result.no_caption == 2  # nocap, refused
    assert result.not_in_index == 1
    assert result.captions == sum(TRAIN_IMAGES.values()) + sum(TEST_IMAGES.values())


def test_unknown_format_and_split() -> None:
    with pytest.raises(InputError) as err:
        build_export("coco", CAPTIONS, ENTRIES)
    assert all(f in str(err.value) for f in EXPORT_FORMATS)
    with pytest.raises(InputError):
        write_export([], "coco", Path("x.json"))
    with pytest.raises(InputError, match="unknown split 'holdout'"):
        build_export("cuhk-pedes", CAPTIONS, [entry("a.jpg", 1, "holdout")])
    assert split_group("Gallery") == "test" and split_group(None) == "train" and split_group("val") == "train"


def test_empty_inputs_give_empty_exports(tmp_path: Path) -> None:
    for fmt in EXPORT_FORMATS:
        assert build_export(fmt, [], ENTRIES) == []
        write_export([], fmt, tmp_path / fmt)
    assert json.loads((tmp_path / "cuhk-pedes").read_text(encoding="utf-8")) == []
    assert (tmp_path / "jsonl").read_text(encoding="utf-8") == ""


def test_tokenize_and_default_path(tmp_path: Path) -> None:
    assert tokenize("A woman's long-sleeved, WHITE shirt!") == ["a", "woman's", "long", "sleeved", "white", "shirt"]
    assert tokenize("穿白色T恤") == ["穿", "白", "色", "t", "恤"]
    assert default_export_path(tmp_path, "rstpreid") == tmp_path / "export_rstpreid.json"
    assert default_export_path(tmp_path, "jsonl") == tmp_path / "export_jsonl.jsonl"


def write_run_folder(out: Path) -> None:
    write_csv_atomic(out / CAPTIONS_ALL, CAPTION_COLUMNS, [caption_record(r) for r in CAPTIONS])
    (out / MANIFEST).write_text(json.dumps({"index": "index.json"}), encoding="utf-8")


def test_export_folder_reads_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run_folder(tmp_path)
    (tmp_path / "index.json").write_text("{}", encoding="utf-8")
    seen: list[Path] = []

    def fake_load_index(path: Path, root: Path | None = None, **_: object) -> SimpleNamespace:
        seen.append(Path(path))
        return SimpleNamespace(entries=ENTRIES)

    monkeypatch.setattr("pipeline.export.load_index", fake_load_index)
    path, count = export_folder(tmp_path, "cuhk-pedes", val_from_train=0.4, seed=3)
    assert seen == [tmp_path / "index.json"]
    assert path == tmp_path / "export_cuhk_pedes.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    assert count == len(records) == len(build_export("cuhk-pedes", CAPTIONS, ENTRIES, val_from_train=0.4, seed=3))
    assert records == build_export("cuhk-pedes", CAPTIONS, ENTRIES, val_from_train=0.4, seed=3)
    target = tmp_path / "elsewhere" / "data.jsonl"
    assert export_folder(tmp_path, "jsonl", target)[0] == target and target.is_file()


def test_export_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no usable captions"):
        export_folder(tmp_path, "jsonl")
    write_csv_atomic(tmp_path / CAPTIONS_ALL, CAPTION_COLUMNS, [caption_record(r) for r in CAPTIONS])
    with pytest.raises(InputError, match="no index recorded"):
        export_folder(tmp_path, "jsonl")
    with pytest.raises(InputError, match="choose one of"):
        export_folder(tmp_path, "csv")
