"""The index held compactly (issue 12): parallel arrays instead of an `IndexEntry` with a `Path` per image,
paths derived from root + relative path, positions answered by the index, and our own JSON layout read
one line at a time (with the general reader behind it for everything else)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.data.index import (
    IndexEntries,
    build_index,
    image_ids,
    index_positions,
    load_index,
    write_index,
)
from pipeline.errors import IndexFormatError
from pipeline.records import IndexEntry, Prompt
from pipeline.run.dispatch import count_work, plan_jobs
from pipeline.testing import synth


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_entries_made_on_demand_hold_every_field(tmp_path: Path) -> None:
    root = os.path.abspath(tmp_path)
    e = IndexEntries(root)
    e.add("query/0001_c1s1_000001_00.jpg", "query/0001_c1s1_000001_00.jpg", 1, 1, "query")
    e.add("person-7", "crops/a.jpg", None, None, None, False, {"caption_hint": "red coat"})
    e.add("bounding_box_test/-1_c2s1_000002_00.jpg", "bounding_box_test/-1_c2s1_000002_00.jpg", -1, 2,
          "gallery", True)
    e.add("big", "big", 2**40, -(2**35), "query")  # widens the int arrays, keeps the values before
    assert len(e) == 4 and bool(e)
    first, second, third, fourth = e
    assert first == IndexEntry("query/0001_c1s1_000001_00.jpg", Path(root) / "query" / "0001_c1s1_000001_00.jpg",
                               1, 1, "query", 0, False)
    assert second.path == Path(root) / "crops" / "a.jpg" and second.image_id == "person-7"
    assert (second.pid, second.camid, second.split, second.position) == (None, None, None, 1)
    assert second.extra == {"caption_hint": "red coat"} and first.extra is None
    assert (third.pid, third.camid, third.junk, third.position) == (-1, 2, True, 2)
    assert (fourth.pid, fourth.camid) == (2**40, -(2**35)) and first.pid == 1
    assert e[-1] == fourth and e[1:3] == [second, third] and e == [first, second, third, fourth]
    with pytest.raises(IndexError):
        e[4]
    assert first.split is fourth.split  # one string per split, not one per image
    assert list(e.paths()) == [os.path.join(root, "query", "0001_c1s1_000001_00.jpg"),
                               os.path.join(root, "crops", "a.jpg"),
                               os.path.join(root, "bounding_box_test", "-1_c2s1_000002_00.jpg"),
                               os.path.join(root, "big")]
    assert list(e.paths()) == list(e.paths())  # re-iterable
    assert image_ids(e) == [x.image_id for x in e] == image_ids([first, second, third, fourth])


@pytest.mark.parametrize("ids", [["a.jpg", "b.jpg", "c.jpg"], ["c.jpg", "a.jpg", "b.jpg"]])
def test_positions_are_answered_by_the_index(tmp_path: Path, ids: list[str]) -> None:
    e = IndexEntries(os.path.abspath(tmp_path))
    for i in ids:
        e.add(i, i, None, None, None)
    assert e.is_sorted() == (ids == sorted(ids))
    positions = index_positions(e)
    assert dict(positions) == {i: n for n, i in enumerate(ids)}
    assert positions.get("zzz.jpg") is None and "zzz.jpg" not in positions and "a.jpg" in positions
    assert positions["b.jpg"] == ids.index("b.jpg") and max(positions.values()) == 2 and len(positions) == 3
    with pytest.raises(KeyError):
        positions["nope"]
    plain = index_positions(list(e))  # a subset list: a plain dict
    assert plain == dict(positions)


def test_windows_style_relative_paths_derive_the_right_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    img = touch(root / "query" / "0001_c1s1_000001_00.jpg")
    index = tmp_path / "list.txt"
    index.write_text("query\\0001_c1s1_000001_00.jpg\r\n", encoding="utf-8")
    loaded = load_index(index, root=root)
    (entry,) = loaded.entries
    assert entry.image_id == "query/0001_c1s1_000001_00.jpg"
    assert entry.path == Path(os.path.abspath(img)) and entry.path.is_file()
    assert (entry.pid, entry.camid, entry.split) == (1, 1, "query")


def test_own_json_index_with_windows_paths_and_ids_apart_from_paths(tmp_path: Path) -> None:
    root = tmp_path / "data"
    a = touch(root / "cam1" / "a.jpg")
    b = touch(root / "cam2" / "b.jpg")
    index = {"root": str(root), "dataset": "folder", "images": [
        {"image_id": "id-a", "path": "cam1\\a.jpg", "pid": 3, "camid": 1, "split": "query"},
        {"image_id": "id-b", "path": "cam2/b.jpg", "pid": None, "camid": None, "split": None, "junk": True},
    ]}
    out = tmp_path / "index.json"
    write_index(index, out)
    loaded = load_index(out)
    assert [e.image_id for e in loaded.entries] == ["id-a", "id-b"]
    assert [e.path for e in loaded.entries] == [Path(os.path.abspath(a)), Path(os.path.abspath(b))]
    assert loaded.entries[1].junk and loaded.entries[1].pid is None


def test_object_index_keeps_ids_paths_and_extra_fields(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    touch(root / "p1" / "x.jpg")
    touch(root / "p2" / "y.jpg")
    objs = [{"path": str(root / "p1" / "x.jpg"), "image_id": "x-1", "pid": 1, "note": "n1"},
            {"path": str(root / "p2" / "y.jpg"), "image_id": "y-2", "camid": "c4"}]
    idx = tmp_path / "objs.json"
    idx.write_text(json.dumps(objs), encoding="utf-8")
    loaded = load_index(idx)
    x, y = loaded.entries
    assert (x.image_id, x.pid, x.extra) == ("x-1", 1, {"note": "n1"})
    assert (y.image_id, y.camid, y.extra) == ("y-2", 4, None)
    assert x.path == loaded.root / "p1" / "x.jpg" and y.path == loaded.root / "p2" / "y.jpg"


def test_streamed_and_general_json_readers_agree(tmp_path: Path) -> None:
    root = tmp_path / "data"
    synth.make_market_tree(root)
    index = build_index(root)
    streamed = tmp_path / "a" / "index.json"
    write_index(index, streamed)
    general = tmp_path / "b" / "index.json"
    general.parent.mkdir()
    general.write_text(json.dumps(index, indent=2), encoding="utf-8")  # not our layout: read whole
    one, two = load_index(streamed), load_index(general)
    assert one.entries == two.entries and len(one.entries) == len(index["images"])
    assert (one.root, one.dataset) == (two.root, two.dataset)


def test_write_index_streams_a_generator(tmp_path: Path) -> None:
    seen: list[int] = []
    images = ({"image_id": f"{i:05d}.jpg", "path": f"{i:05d}.jpg"} for i in range(20_000))
    out = tmp_path / "index.json"
    count = write_index({"root": str(tmp_path), "dataset": "folder", "images": images}, out, progress=seen.append)
    assert count == 20_000 and seen == [10_000, 20_000]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert len(data["images"]) == 20_000 and data["images"][0] == {"image_id": "00000.jpg", "path": "00000.jpg"}
    empty = tmp_path / "empty.json"
    assert write_index({"root": str(tmp_path), "images": iter(())}, empty) == 0
    assert json.loads(empty.read_text(encoding="utf-8")) == {"root": str(tmp_path), "images": []}


@pytest.mark.parametrize("text, message", [
    ('{\n  "root": ".",\n  "images": [\n    {"image_id": "a", "path": "a"}\n    {"image_id": "b", "path": "b"}\n  ]\n}\n',
     "malformed JSON at line 5"),
    ('{\n  "root": ".",\n  "images": [\n    {"image_id": "a", "path": "a"},\n  ]\n}\n', "malformed JSON"),
    ('{\n  "root": ".",\n  "images": [\n  ]\n}\n', "has no images"),
])
def test_broken_own_layout_falls_back_to_the_general_reader(tmp_path: Path, text: str, message: str) -> None:
    idx = tmp_path / "index.json"
    idx.write_text(text, encoding="utf-8")
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert message in str(exc.value)


def test_plan_skips_done_images_by_id(tmp_path: Path) -> None:
    e = IndexEntries(os.path.abspath(tmp_path))
    for i in range(5):
        e.add(f"{i}.jpg", f"{i}.jpg", None, None, None)
    prompt = Prompt("base", "describe")
    done = {(f"{i}.jpg", "base", 0) for i in (0, 1, 3)}
    jobs = list(plan_jobs(e, [prompt], 1, done))
    assert [(j.entry.image_id, j.entry.position, j.indices) for j in jobs] == [("2.jpg", 2, (0,)), ("4.jpg", 4, (0,))]
    assert jobs[0].entry.path == Path(os.path.abspath(tmp_path)) / "2.jpg"
    assert count_work(e, [prompt], 1, done | {("other.jpg", "base", 0)}) == (5, 3)


def test_symlink_check_finds_links_at_the_root_and_below(tmp_path: Path) -> None:
    if not hasattr(os, "symlink"):
        pytest.skip("no symlinks")
    root = tmp_path / "data"
    touch(root / "a.jpg")
    touch(root / "sub" / "b.jpg")
    secret = touch(tmp_path / "secret.jpg")
    for link in (root / "c.jpg", root / "sub" / "d.jpg"):
        try:
            link.symlink_to(secret)
        except OSError:
            pytest.skip("cannot make symlinks here")
    for name in ("c.jpg", "sub/d.jpg"):
        idx = tmp_path / "list.txt"
        idx.write_text(f"a.jpg\nsub/b.jpg\n{name}\n", encoding="utf-8")
        with pytest.raises(Exception) as exc:
            load_index(idx, root=root)
        assert "is a symlink to" in str(exc.value) and name.rpartition("/")[2] in str(exc.value)
        assert len(load_index(idx, root=root, follow_symlinks=True).entries) == 3


def test_scan_reports_files_listed_and_prepare_writes_what_build_gives(tmp_path: Path, cli) -> None:
    from pipeline.data.index import scan_index

    root = tmp_path / "data"
    synth.make_market_tree(root)
    seen: list[int] = []
    _, dataset, images = scan_index(root, progress=seen.append)
    assert dataset == "market1501" and seen and seen == sorted(seen) and seen[-1] >= len(images)
    out = tmp_path / "index.json"
    res = cli("prepare", "--root", root, "--out", out)
    assert res.code == 0, res.err
    assert json.loads(out.read_text(encoding="utf-8")) == build_index(root)
