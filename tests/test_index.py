"""Index build / write / load round trips, the three index forms, and every validation error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, IndexFormatError, InputError
from pipeline.data.index import LoadedIndex, build_index, load_index, write_index
from pipeline.testing import synth


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


MAKERS = {
    "market1501": synth.make_market_tree,
    "dukemtmc": synth.make_duke_tree,
    "msmt17": synth.make_msmt_tree,
    "cuhk03": synth.make_cuhk03_tree,
    "folder": synth.make_folder_tree,
}


# --------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dataset", sorted(MAKERS))
def test_round_trip(tmp_path: Path, dataset: str) -> None:
    root = tmp_path / "data"
    MAKERS[dataset](root)
    index = build_index(root)
    assert index["dataset"] == dataset
    assert index["root"] == str(root.resolve())
    ids = [im["image_id"] for im in index["images"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for im in index["images"]:
        assert im["path"] == im["image_id"] and "\\" not in im["image_id"]
        assert set(im) <= {"image_id", "path", "pid", "camid", "split", "junk"}
        assert im.get("junk", True) is True  # present only when true

    out = tmp_path / "out" / "deeper" / "index.json"
    write_index(index, out)
    assert json.loads(out.read_text(encoding="utf-8")) == index
    assert [p.name for p in out.parent.iterdir()] == ["index.json"]  # no temp file left

    loaded = load_index(out)
    assert isinstance(loaded, LoadedIndex)
    assert loaded.root == root.resolve() and loaded.dataset == dataset and loaded.source == out
    assert [e.image_id for e in loaded.entries] == ids
    assert [e.position for e in loaded.entries] == list(range(len(ids)))
    for entry, im in zip(loaded.entries, index["images"]):
        assert entry.path == root.resolve() / im["image_id"] and entry.path.is_file()
        assert (entry.pid, entry.camid, entry.split, entry.junk) == (
            im["pid"], im["camid"], im["split"], im.get("junk", False))


def test_market_index_content(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path, n_ids=2, per_split=1)
    images = {im["image_id"]: im for im in build_index(tmp_path, "market")["images"]}
    assert images["bounding_box_test/-1_c1s1_000401_03.jpg"] == {
        "image_id": "bounding_box_test/-1_c1s1_000401_03.jpg", "path": "bounding_box_test/-1_c1s1_000401_03.jpg",
        "pid": -1, "camid": 1, "split": "gallery", "junk": True}
    assert images["bounding_box_train/0002_c6s1_000200_01.jpg"] == {
        "image_id": "bounding_box_train/0002_c6s1_000200_01.jpg",
        "path": "bounding_box_train/0002_c6s1_000200_01.jpg", "pid": 2, "camid": 6, "split": "train"}


def test_top_folder_ids_keep_it(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path, n_ids=1, per_split=1, with_junk=False, top_folder="Market-1501-v15.09.15")
    index = build_index(tmp_path)
    assert all(im["image_id"].startswith("Market-1501-v15.09.15/") for im in index["images"])


def test_splits_filter_and_skip_junk(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path, n_ids=2, per_split=2)
    everything = build_index(tmp_path)["images"]
    assert len(everything) == 4 + 2 + 4 + 2
    query = build_index(tmp_path, splits={"query"})["images"]
    assert {im["split"] for im in query} == {"query"} and len(query) == 2
    gallery = build_index(tmp_path, splits={"gallery"}, skip_junk=True)["images"]
    assert len(gallery) == 4 and not any(im.get("junk") for im in gallery)
    assert len(build_index(tmp_path, skip_junk=True)["images"]) == len(everything) - 2


def test_dataset_given_explicitly(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path, n_ids=1, per_split=1, with_junk=False)
    index = build_index(tmp_path, dataset="folder")
    assert index["dataset"] == "folder"
    assert all(im["pid"] is None for im in index["images"])


def test_build_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as exc:
        build_index(missing)
    assert one_line(exc) == f"dataset root not found: {missing}"

    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    with pytest.raises(InputError) as exc:
        build_index(a_file)
    assert one_line(exc) == f"dataset root is not a folder: {a_file}"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(InputError) as exc:
        build_index(empty)
    assert one_line(exc) == f"no images found under {empty} (read as folder)"

    with pytest.raises(InputError) as exc:
        build_index(empty, dataset="viper")
    assert one_line(exc).startswith("unknown dataset 'viper'")

    with pytest.raises(InputError) as exc:
        build_index(empty, splits={"probe"})
    assert one_line(exc).startswith("unknown split 'probe'")

    synth.make_cuhk03_tree(tmp_path / "cuhk", pairs=1, persons=1, images=1)
    with pytest.raises(InputError) as exc:
        build_index(tmp_path / "cuhk", splits={"train"})
    assert one_line(exc) == f"no images found in splits train under {tmp_path / 'cuhk'} (read as cuhk03)"


def test_write_index_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be", encoding="utf-8")
    out = blocker / "index.json"
    with pytest.raises(ConfigError) as exc:
        write_index({"root": "x", "dataset": "folder", "images": []}, out)
    assert one_line(exc).startswith(f"cannot write index {out}: ")


def test_write_index_is_utf8_and_replaces(tmp_path: Path) -> None:
    out = tmp_path / "index.json"
    out.write_text("old", encoding="utf-8")
    index = {"root": str(tmp_path), "dataset": "folder",
             "images": [{"image_id": "café/é.jpg", "path": "café/é.jpg", "pid": None, "camid": None, "split": None}]}
    write_index(index, out)
    text = out.read_text(encoding="utf-8")
    assert "café/é.jpg" in text and json.loads(text) == index


def test_root_override_after_moving(tmp_path: Path) -> None:
    synth.make_duke_tree(tmp_path / "a", n_ids=1, per_split=1)
    out = tmp_path / "index.json"
    write_index(build_index(tmp_path / "a"), out)
    (tmp_path / "a").rename(tmp_path / "b")
    with pytest.raises(IndexFormatError) as exc:
        load_index(out)
    assert one_line(exc) == (f"image root {(tmp_path / 'a').resolve()} (from index of index {out}) "
                             "is not a folder; pass --root to point at the images")
    loaded = load_index(out, root=tmp_path / "b")
    assert all(e.path.is_file() for e in loaded.entries)


def test_json_index_without_root_uses_its_folder(tmp_path: Path) -> None:
    idx = tmp_path / "index.json"
    idx.write_text(json.dumps({"images": [{"image_id": "x.jpg", "path": "x.jpg"}]}), encoding="utf-8")
    loaded = load_index(idx)
    assert loaded.root == Path(os.path.abspath(tmp_path)) and loaded.dataset == "folder"
    assert loaded.entries[0].path == loaded.root / "x.jpg"


def test_missing_images_are_not_an_index_error(tmp_path: Path) -> None:
    idx = tmp_path / "list.txt"
    idx.write_text("query/0001_c1s1_000107_01.jpg\n", encoding="utf-8")
    loaded = load_index(idx)
    assert not loaded.entries[0].path.exists()


# --------------------------------------------------------------------------------------------- list forms


def test_json_list_of_paths(tmp_path: Path) -> None:
    synth.make_market_tree(tmp_path / "m", n_ids=1, per_split=1, with_junk=True)
    idx = tmp_path / "m" / "list.json"
    idx.write_text(json.dumps(["query/0001_c2s1_000107_01.jpg", "bounding_box_test/-1_c1s1_000401_03.jpg",
                               "bounding_box_train/0002_c6s1_000200_01.jpg"]), encoding="utf-8")
    loaded = load_index(idx)
    assert loaded.dataset == "market1501" and loaded.root == Path(os.path.abspath(tmp_path / "m"))
    got = [(e.image_id, e.pid, e.camid, e.split, e.junk, e.position) for e in loaded.entries]
    assert got == [  # file order is kept: the index order is the user's
        ("query/0001_c2s1_000107_01.jpg", 1, 2, "query", False, 0),
        ("bounding_box_test/-1_c1s1_000401_03.jpg", -1, 1, "gallery", True, 1),
        ("bounding_box_train/0002_c6s1_000200_01.jpg", 2, 6, "train", False, 2),
    ]
    assert all(e.path.is_file() for e in loaded.entries)


def test_text_list_with_bom_crlf_comments_and_backslashes(tmp_path: Path) -> None:
    idx = tmp_path / "list.txt"
    idx.write_bytes("\ufeff# my crops\r\n\r\nquery\\0001_c2_f0046182.jpg\r\n  sub/b.png  \r\n# end\r\n".encode())
    loaded = load_index(idx)
    assert [(e.image_id, e.pid, e.camid, e.split) for e in loaded.entries] == [
        ("query/0001_c2_f0046182.jpg", 1, 2, "query"), ("sub/b.png", None, None, None)]
    assert loaded.dataset == "dukemtmc"
    assert loaded.entries[0].path == loaded.root / "query" / "0001_c2_f0046182.jpg"


def test_relative_paths_against_given_root(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    idx = tmp_path / "lists" / "list.txt"
    idx.parent.mkdir()
    idx.write_text("a/x.jpg\n./b/y.jpg\nc/../z.jpg\n", encoding="utf-8")
    loaded = load_index(idx, root=tmp_path / "images")
    assert loaded.root == Path(os.path.abspath(tmp_path / "images"))
    assert [e.image_id for e in loaded.entries] == ["a/x.jpg", "b/y.jpg", "z.jpg"]
    assert [e.path for e in loaded.entries] == [loaded.root / "a" / "x.jpg", loaded.root / "b" / "y.jpg",
                                                loaded.root / "z.jpg"]


def test_absolute_paths_root_is_common_parent(tmp_path: Path) -> None:
    data = Path(os.path.abspath(tmp_path / "data"))
    idx = tmp_path / "elsewhere" / "list.txt"
    idx.parent.mkdir()
    idx.write_text(f"{data / 'query' / 'a.jpg'}\n{data / 'bounding_box_train' / 'b.jpg'}\n", encoding="utf-8")
    loaded = load_index(idx)
    assert loaded.root == data
    assert [(e.image_id, e.split) for e in loaded.entries] == [("query/a.jpg", "query"),
                                                               ("bounding_box_train/b.jpg", "train")]


def test_single_absolute_path_root_is_its_folder(tmp_path: Path) -> None:
    img = Path(os.path.abspath(tmp_path / "crops" / "one.jpg"))
    idx = tmp_path / "list.json"
    idx.write_text(json.dumps([str(img)]), encoding="utf-8")
    loaded = load_index(idx)
    assert loaded.root == img.parent and loaded.entries[0].image_id == "one.jpg"


def test_absolute_paths_inside_given_root(tmp_path: Path) -> None:
    root = Path(os.path.abspath(tmp_path / "data"))
    root.mkdir()
    idx = tmp_path / "list.txt"
    idx.write_text(f"{root / 'q' / 'a.jpg'}\nq/b.jpg\n", encoding="utf-8")
    loaded = load_index(idx, root=root)
    assert [e.image_id for e in loaded.entries] == ["q/a.jpg", "q/b.jpg"]


def test_large_plain_list_loads(tmp_path: Path) -> None:
    n = 200_000
    idx = tmp_path / "big.json"
    idx.write_text(json.dumps([f"bounding_box_test/{i % 1500:04d}_c{i % 6 + 1}s1_{i:06d}_01.jpg" for i in range(n)]),
                   encoding="utf-8")
    loaded = load_index(idx)
    assert len(loaded.entries) == n
    last = loaded.entries[-1]
    assert last.position == n - 1 and last.split == "gallery" and last.pid == (n - 1) % 1500
    assert last.path == loaded.root / "bounding_box_test" / last.image_id.split("/")[1]


# --------------------------------------------------------------------------------------------- validation


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _images(*items: object) -> str:
    return json.dumps({"root": ".", "dataset": "folder", "images": list(items)})


def test_missing_index_file(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError) as exc:
        load_index(tmp_path / "none.json")
    assert one_line(exc) == f"index file not found: {tmp_path / 'none.json'}"


def test_index_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError) as exc:
        load_index(tmp_path)
    assert one_line(exc) == f"index {tmp_path} is a folder, not a file"


def test_not_utf8(tmp_path: Path) -> None:
    idx = tmp_path / "list.txt"
    idx.write_bytes(b"a.jpg\n\xff\xfe\x00bad\n")
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx} is not UTF-8 text (bad byte at offset 6)"


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    idx = _write(tmp_path / "index.json", '{\n  "images": [\n    {"image_id": "a.jpg",, "path": "a.jpg"}\n  ]\n}\n')
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx}: malformed JSON at line 3:26: Expecting property name enclosed in double quotes"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"root": "."}', "no 'images' list (expected {\"root\", \"dataset\", \"images\"})"),
        ('{"images": {"a": 1}}', "'images' must be a list, got an object"),
        ('{"images": [], "root": 3}', "'root' must be a string, got a number"),
        ('{"images": [], "dataset": 3}', "'dataset' must be a string, got a number"),
        (_images("a.jpg"), "images[0] is a string, expected an object"),
        (_images({"path": "a.jpg"}), "images[0] has no 'image_id' string"),
        (_images({"image_id": "a.jpg", "path": "a.jpg"}, {"image_id": "", "path": "b.jpg"}),
         "images[1] has no 'image_id' string"),
        (_images({"image_id": "a.jpg"}), "images[0] ('a.jpg') has no 'path' string"),
        (_images({"image_id": "a.jpg", "path": "a.jpg", "pid": "7"}),
         "images[0] ('a.jpg'): 'pid' must be an integer or null, got '7'"),
        (_images({"image_id": "a.jpg", "path": "a.jpg", "camid": 1.5}),
         "images[0] ('a.jpg'): 'camid' must be an integer or null, got 1.5"),
        (_images({"image_id": "a.jpg", "path": "a.jpg", "pid": True}),
         "images[0] ('a.jpg'): 'pid' must be an integer or null, got True"),
        (_images({"image_id": "a.jpg", "path": "a.jpg", "split": 1}),
         "images[0] ('a.jpg'): 'split' must be a string or null, got a number"),
        (_images({"image_id": "a.jpg", "path": "a.jpg", "junk": "yes"}),
         "images[0] ('a.jpg'): 'junk' must be true or false, got a string"),
        ('[1, "a.jpg"]', "item 0 is a number, expected a path string"),
    ],
)
def test_wrong_shape(tmp_path: Path, text: str, message: str) -> None:
    idx = _write(tmp_path / "index.json", text)
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx}: {message}"


def test_duplicate_image_id_json(tmp_path: Path) -> None:
    idx = _write(tmp_path / "index.json", _images(*[{"image_id": "a.jpg", "path": "a.jpg"}] * 3,
                                                  {"image_id": "b.jpg", "path": "b.jpg"}))
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx}: duplicate image_id 'a.jpg' (3 times)"


def test_duplicate_image_id_text_after_normalising(tmp_path: Path) -> None:
    idx = _write(tmp_path / "list.txt", "q/a.jpg\nq/b.jpg\n./q/a.jpg\n")
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx}: duplicate image_id 'q/a.jpg' (2 times)"


def test_dotdot_escape_json(tmp_path: Path) -> None:
    idx = _write(tmp_path / "index.json", _images({"image_id": "a.jpg", "path": "../secret/a.jpg"}))
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    root = os.path.abspath(tmp_path)
    assert one_line(exc) == f"index {idx}: images[0] ('a.jpg'): path '../secret/a.jpg' is outside the image root {root}"


def test_dotdot_escape_text_with_backslashes(tmp_path: Path) -> None:
    idx = _write(tmp_path / "list.txt", "a.jpg\nsub\\..\\..\\b.jpg\n")
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    root = os.path.abspath(tmp_path)
    assert one_line(exc) == f"index {idx} line 2: path 'sub\\\\..\\\\..\\\\b.jpg' is outside the image root {root}"


def test_absolute_path_outside_given_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    other = os.path.abspath(tmp_path / "other" / "x.jpg")
    idx = _write(tmp_path / "list.json", json.dumps(["ok.jpg", other]))
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx, root=root)
    assert one_line(exc) == f"index {idx} item 1: path {other!r} is outside the image root {os.path.abspath(root)}"


def test_sibling_with_common_prefix_is_outside(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    idx = _write(tmp_path / "list.txt", f"{os.path.abspath(tmp_path / 'data2' / 'x.jpg')}\n")
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx, root=root)
    assert "is outside the image root" in one_line(exc)


def test_given_root_must_exist(tmp_path: Path) -> None:
    idx = _write(tmp_path / "list.txt", "a.jpg\n")
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx, root=tmp_path / "nope")
    assert one_line(exc) == f"image root {os.path.abspath(tmp_path / 'nope')} (from --root of index {idx}) is not a folder"


@pytest.mark.parametrize("name, text", [
    ("index.json", _images()),
    ("list.json", "[]"),
    ("list.json", '["", "  "]'),
    ("list.txt", ""),
    ("list.txt", "# only a comment\n\n   \n"),
])
def test_empty_index(tmp_path: Path, name: str, text: str) -> None:
    idx = _write(tmp_path / name, text)
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx} has no images"


def test_format_errors_are_input_errors() -> None:
    assert issubclass(IndexFormatError, InputError)
