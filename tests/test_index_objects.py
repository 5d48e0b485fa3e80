"""Indexes of objects, as the users' own prepare scripts write them (a JSON list or JSONL).

The seed's `prepare_data.py` writes `outputs/runs/index_batch.json`, a list of
`{"image_id": "<file name>", "path": "./data/market1501/query/<file>", "split": "query"}` with paths relative to
the folder the command runs in. These tests build that project layout in a temporary folder and run from it
(`monkeypatch.chdir`, undone after each test, since all tests share one process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import rows
from pipeline.data.index import finds_files, load_index, sample_positions
from pipeline.errors import IndexFormatError, InputError
from pipeline.testing import synth
from pipeline.testing.loopback import expected_caption
from test_run import run_args

INDEX = Path("outputs/runs/index_batch.json")


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def seed_project(proj: Path, n_ids: int = 3) -> list[str]:
    """A project folder like the seed's: data/market1501/{bounding_box_train,query,bounding_box_test}.
    Returns the query file names, sorted."""
    synth.make_market_tree(proj / "data" / "market1501", n_ids=n_ids, per_split=1, with_junk=True)
    (proj / "outputs" / "runs").mkdir(parents=True)
    return sorted(p.name for p in (proj / "data" / "market1501" / "query").iterdir())


def seed_objects(names: list[str], split: str = "query", folder: str = "query") -> list[dict]:
    """Exactly what the seed's prepare_data.py writes."""
    return [{"image_id": n, "path": f"./data/market1501/{folder}/{n}", "split": split} for n in names]


def write_json(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, objects: list[dict], *, bom: bool = False, crlf: bool = False) -> Path:
    """One object per line, a blank line in the middle (their loader skips them)."""
    lines = [json.dumps(o, ensure_ascii=False) for o in objects]
    lines.insert(len(lines) // 2, "   ")
    nl = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + nl.join(lines) + nl
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The seed's project folder, made the current folder for the test."""
    proj = tmp_path / "proj"
    names = seed_project(proj)
    monkeypatch.chdir(proj)
    return proj, names


# --------------------------------------------------------------------------------------------- pure parts


def test_sample_positions_are_few_deterministic_and_spread() -> None:
    assert sample_positions(0) == []
    assert sample_positions(2) == [0, 1]
    assert sample_positions(4) == [0, 1, 2, 3]
    assert sample_positions(10) == [0, 1, 2, 4, 5, 6, 7, 9]
    big = sample_positions(1_000_000)
    assert len(big) == 8 and big[:3] == [0, 1, 2] and big[-1] == 999_999


def test_finds_files_needs_half_of_the_sample() -> None:
    there = {os.path.join("base", p) for p in ("a", "b")}
    assert finds_files("base", ["a", "b", "c", "d"], there.__contains__)
    assert not finds_files("base", ["a", "c", "d"], there.__contains__)
    assert not finds_files("base", ["x"], there.__contains__)


# --------------------------------------------------------------------------------------------- loading


def test_seed_json_list_resolves_against_the_current_folder(project) -> None:
    proj, names = project
    idx = write_json(proj / INDEX, seed_objects(names))
    loaded = load_index(INDEX)
    query = Path(os.path.abspath(proj / "data" / "market1501" / "query"))
    assert loaded.root == query  # the folder holding the images, not where the command ran
    assert loaded.dataset == "market1501" and loaded.source == INDEX
    assert [e.image_id for e in loaded.entries] == names  # kept exactly: the bare file name
    assert [e.path for e in loaded.entries] == [query / n for n in names]
    assert all(e.path.is_file() and e.split == "query" and e.extra is None for e in loaded.entries)
    first = loaded.entries[0]  # 0001_c?s1_...: pid and camera parsed from the name
    assert first.pid == int(names[0][:4]) and first.camid == int(names[0].split("_")[1][1])
    assert load_index(idx).entries == loaded.entries  # an absolute index path: the same


def test_jsonl_with_bom_crlf_and_blank_lines_loads_the_same(project) -> None:
    proj, names = project
    json_list = load_index(write_json(proj / INDEX, seed_objects(names))).entries
    jsonl = write_jsonl(proj / "outputs" / "runs" / "index_batch.jsonl", seed_objects(names), bom=True, crlf=True)
    assert load_index(jsonl).entries == json_list
    single = write_jsonl(proj / "one.jsonl", seed_objects(names[:1]))  # one line: one object, not an index
    assert [e.image_id for e in load_index(single).entries] == names[:1]


def test_windows_separators_and_mixed_splits(project) -> None:
    proj, names = project
    gallery = sorted(p.name for p in (proj / "data" / "market1501" / "bounding_box_test").iterdir())
    objs = ([{"path": f".\\data\\market1501\\query\\{n}"} for n in names]
            + [{"path": f"data/market1501/bounding_box_test/{n}"} for n in gallery])
    loaded = load_index(write_json(proj / INDEX, objs))
    assert loaded.root == Path(os.path.abspath(proj / "data" / "market1501"))
    # no image_id given: the path relative to the root, as for the other forms; split from the folder names
    assert [e.image_id for e in loaded.entries] == ([f"query/{n}" for n in names]
                                                   + [f"bounding_box_test/{n}" for n in gallery])
    assert {e.split for e in loaded.entries} == {"query", "gallery"}
    junk = [e for e in loaded.entries if e.image_id.startswith("bounding_box_test/-1_")]
    assert len(junk) == 1 and junk[0].junk and junk[0].pid == -1


def test_given_fields_win_and_aliases(project) -> None:
    proj, names = project
    objs = [
        {"path": f"./data/market1501/query/{names[0]}", "image_id": "Q 1", "person_id": "0042", "camera": "c5",
         "split": "train"},
        {"path": f"./data/market1501/query/{names[1]}", "pid": 7, "camid": 3.0},
        {"path": f"./data/market1501/query/{names[2]}", "pid": 9, "person_id": 9, "junk": True},
    ]
    loaded = load_index(write_json(proj / INDEX, objs))
    got = [(e.image_id, e.pid, e.camid, e.split, e.junk) for e in loaded.entries]
    cam2 = int(names[1].split("_")[1][1])
    assert got[0] == ("Q 1", 42, 5, "train", False)
    assert got[1] == (names[1], 7, 3, "query", False)  # camid given; split from the folder name
    assert cam2 != 3  # so the given camid is the one kept
    assert got[2][1:] == (9, int(names[2].split("_")[1][1]), "query", True)


@pytest.mark.parametrize("obj, message", [
    ({"image_id": "a"}, "item 0 has no 'path' string"),
    ({"path": "  "}, "item 0 has no 'path' string"),
    ({"path": "a.jpg", "image_id": ""}, "item 0: 'image_id' must be a non-empty string, got ''"),
    ({"path": "a.jpg", "image_id": 3}, "item 0: 'image_id' must be a non-empty string, got 3"),
    ({"path": "a.jpg", "image_id": "a", "pid": "x7"}, "item 0 ('a'): 'pid' must be an integer, got 'x7'"),
    ({"path": "a.jpg", "image_id": "a", "camera": True}, "item 0 ('a'): 'camera' must be an integer, got True"),
    ({"path": "a.jpg", "image_id": "a", "pid": 1, "person_id": 2}, "item 0 ('a'): 'pid' 1 and 'person_id' 2 disagree"),
    ({"path": "a.jpg", "image_id": "a", "split": 1}, "item 0 ('a'): 'split' must be a string or null, got a number"),
    ({"path": "a.jpg", "image_id": "a", "junk": "no"}, "item 0 ('a'): 'junk' must be true or false, got a string"),
])
def test_bad_objects_are_one_line(tmp_path: Path, obj: dict, message: str) -> None:
    idx = write_json(tmp_path / "index.json", [obj])
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx} {message}"


def test_mixed_list_and_bad_jsonl_lines(tmp_path: Path) -> None:
    idx = write_json(tmp_path / "index.json", [{"path": "a.jpg"}, "b.jpg"])
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx}: item 1 is a string, expected an object like item 0"
    jl = tmp_path / "index.jsonl"
    jl.write_text('{"path": "a.jpg"}\n\n{"path": "b.jpg",}\n', encoding="utf-8")
    with pytest.raises(IndexFormatError) as exc:
        load_index(jl)
    assert one_line(exc).startswith(f"index {jl} line 3: malformed JSON at column 18: ")
    jl.write_text('{"path": "a.jpg"}\n["b.jpg"]\n', encoding="utf-8")
    with pytest.raises(IndexFormatError) as exc:
        load_index(jl)
    assert one_line(exc) == f"index {jl} line 2 is a list, expected an object"
    jl.write_text('{"path": "a.jpg"}\n{"path": "b.jpg"}, {"path": "c.jpg"}\n', encoding="utf-8")
    with pytest.raises(IndexFormatError) as exc:
        load_index(jl)
    assert one_line(exc).startswith(f"index {jl} line 2: malformed JSON at column 18: ")


def test_duplicate_image_id(project) -> None:
    proj, names = project
    objs = seed_objects(names)
    objs[2]["image_id"] = names[0]
    idx = write_json(proj / INDEX, objs)
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == f"index {idx}: duplicate image_id {names[0]!r} (2 times)"


def test_found_from_both_folders_is_ambiguous(project) -> None:
    proj, names = project
    runs = proj / "outputs" / "runs"
    for n in names:  # the same relative paths also exist under the index's folder
        synth.make_crop(runs / "data" / "market1501" / "query" / n, upper=synth.PALETTE["red"],
                        lower=synth.PALETTE["blue"])
    idx = write_json(proj / INDEX, seed_objects(names))
    with pytest.raises(IndexFormatError) as exc:
        load_index(INDEX)
    assert one_line(exc) == (
        f"index {INDEX}: its relative paths (e.g. './data/market1501/query/{names[0]}') are found both from "
        f"the current folder {os.path.abspath(proj)} and from the index's folder {os.path.abspath(runs)}; "
        "pass --root to say which")
    # --root decides
    assert load_index(idx, root=proj).entries[0].path == Path(os.path.abspath(proj / "data" / "market1501" / "query" / names[0]))
    assert load_index(idx, root=runs).entries[0].path == Path(os.path.abspath(runs / "data" / "market1501" / "query" / names[0]))


def test_run_from_the_index_folder_is_not_ambiguous(tmp_path, monkeypatch) -> None:
    names = seed_project(tmp_path)
    idx = write_json(tmp_path / "index.json", seed_objects(names))
    monkeypatch.chdir(tmp_path)
    assert [e.image_id for e in load_index(idx).entries] == names


def test_found_from_nowhere(project, tmp_path, monkeypatch) -> None:
    proj, names = project
    idx = write_json(proj / INDEX, seed_objects(names))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx)
    assert one_line(exc) == (
        f"index {idx}: its relative paths (e.g. './data/market1501/query/{names[0]}') are found from none of: "
        f"the current folder {os.path.abspath(elsewhere)}; the index's folder {os.path.abspath(proj / 'outputs' / 'runs')}; "
        "run from the folder they are relative to, or pass it as --root")
    assert [e.image_id for e in load_index(idx, root=proj).entries] == names
    # export and status read only ids: with every image_id given, the index loads anyway
    assert [e.image_id for e in load_index(idx, require_files=False).entries] == names
    with pytest.raises(IndexFormatError):
        load_index(idx, root=elsewhere)


def test_root_naming_the_image_folder_with_cwd_relative_paths(project) -> None:
    """--root data/market1501 with the seed's paths: they are found from the current folder, inside the
    root, so the root is the image root (ids without image_id are relative to it)."""
    proj, names = project
    objs = [{"path": o["path"]} for o in seed_objects(names)]
    idx = write_json(proj / INDEX, objs)
    loaded = load_index(idx, root=Path("data/market1501"))
    assert loaded.root == Path(os.path.abspath(proj / "data" / "market1501"))
    assert [e.image_id for e in loaded.entries] == [f"query/{n}" for n in names]
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx, root=Path("data/market1501/bounding_box_train"))
    train = os.path.abspath(proj / "data" / "market1501" / "bounding_box_train")
    assert one_line(exc) == (
        f"index {idx}: its relative paths (e.g. './data/market1501/query/{names[0]}') are not found under "
        f"--root {train} (from the current folder {os.path.abspath(proj)} they are, but outside it); "
        "pass the folder they are relative to as --root")


def test_containment_and_symlinks_with_a_root(project, tmp_path) -> None:
    proj, names = project
    outside = os.path.abspath(tmp_path / "other.jpg")
    objs = seed_objects(names) + [{"path": outside}]
    idx = write_json(proj / INDEX, objs)
    with pytest.raises(IndexFormatError) as exc:
        load_index(idx, root=Path("data/market1501"))
    root = os.path.abspath(proj / "data" / "market1501")
    assert one_line(exc) == f"index {idx} item {len(names)}: path {outside!r} is outside the image root {root}"
    escape = seed_objects(names) + [{"path": "data/market1501/../../outputs/x.jpg"}]
    with pytest.raises(IndexFormatError) as exc:
        load_index(write_json(proj / INDEX, escape), root=Path("data/market1501"))
    assert "is outside the image root" in one_line(exc)

    if not hasattr(os, "symlink"):
        return
    target = synth.make_crop(tmp_path / "secret" / "0009_c1s1_000001_01.jpg", upper=synth.PALETTE["red"],
                             lower=synth.PALETTE["blue"])
    link = proj / "data" / "market1501" / "query" / "0009_c1s1_000001_01.jpg"
    try:
        link.symlink_to(target)
    except OSError:
        pytest.skip("cannot make symlinks here")
    idx = write_json(proj / INDEX, seed_objects([*names, link.name]))
    with pytest.raises(InputError) as exc:
        load_index(idx)
    assert "is a symlink to" in one_line(exc) and "--follow-symlinks" in one_line(exc)
    assert len(load_index(idx, follow_symlinks=True).entries) == len(names) + 1


def test_absolute_paths_root_is_their_common_folder(tmp_path) -> None:
    names = seed_project(tmp_path / "p")
    query = Path(os.path.abspath(tmp_path / "p" / "data" / "market1501" / "query"))
    idx = write_jsonl(tmp_path / "idx" / "index.jsonl", [{"path": str(query / n)} for n in names])
    loaded = load_index(idx)
    assert loaded.root == query and [e.image_id for e in loaded.entries] == names


def test_extra_fields_are_kept_compactly(project) -> None:
    proj, names = project
    objs = seed_objects(names)
    objs[0].update({"caption_gt": "a man in red", "meta": {"src": "v1"}, "split": "query"})
    loaded = load_index(write_json(proj / INDEX, objs))
    assert loaded.entries[0].extra == {"caption_gt": "a man in red", "meta": {"src": "v1"}}
    assert all(e.extra is None for e in loaded.entries[1:])


# --------------------------------------------------------------------------------------------- end to end


def test_seed_index_runs_keeps_ids_and_resumes(cli, server, api_env, project, prompt_file) -> None:
    proj, names = project
    write_json(proj / INDEX, seed_objects(names))
    out = Path("outputs/captions/batch")
    res = cli(*run_args(INDEX, out, prompt_file, server, "--batch-size", 2))
    assert res.code == 0, res.err
    table = rows(out / "captions_all.csv")
    assert sorted(r["image_id"] for r in table) == names  # exactly the file's image_id, what their scripts key on
    query = proj / "data" / "market1501" / "query"
    for r in table:
        assert r["caption"] == expected_caption((query / r["image_id"]).read_bytes())
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["root"] == os.path.abspath(query)

    sent = server.stats.requests
    res = cli(*run_args(INDEX, out, prompt_file, server, "--batch-size", 2))
    assert res.code == 0, res.err
    assert server.stats.requests == sent  # resume: nothing asked again
    assert f"skipped {len(names)}" in res.out


def test_jsonl_index_missing_image_is_a_per_image_error(cli, server, api_env, project, prompt_file) -> None:
    proj, names = project
    gallery = sorted(p.name for p in (proj / "data" / "market1501" / "bounding_box_test").iterdir())
    objs = seed_objects(names) + seed_objects(gallery, "gallery", "bounding_box_test")
    objs.append({"image_id": "gone.jpg", "path": "./data/market1501/query/0099_c1s1_000001_01.jpg"})
    write_jsonl(proj / "outputs" / "runs" / "index_batch.jsonl", objs, crlf=True)
    out = Path("outputs/captions/jl")
    res = cli(*run_args(Path("outputs/runs/index_batch.jsonl"), out, prompt_file, server))
    assert res.code == 1, res.err
    errors = rows(out / "errors.csv")
    assert [(e["image_id"], e["reason"]) for e in errors] == [("gone.jpg", "missing")]
    assert len(rows(out / "captions_all.csv")) == len(objs) - 1


def test_paths_found_nowhere_exit_2_before_sending(cli, server, api_env, project, prompt_file, tmp_path,
                                                     monkeypatch) -> None:
    proj, names = project
    idx = write_json(proj / INDEX, seed_objects(names))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = cli(*run_args(idx, tmp_path / "out", prompt_file, server))
    assert res.code == 2
    line = res.err.strip()
    assert "\n" not in line and "found from none of" in line and "--root" in line and "Traceback" not in res.err
    assert server.stats.requests == 0
    res = cli(*run_args(idx, tmp_path / "out", prompt_file, server, "--root", proj))
    assert res.code == 0, res.err


def test_extra_fields_reach_the_jsonl_export(cli, server, api_env, project, prompt_file, tmp_path,
                                             monkeypatch) -> None:
    proj, names = project
    objs = seed_objects(names)
    for k, o in enumerate(objs):
        o.update({"caption_gt": f"person {k}", "source": {"v": 1}, "pid_note": None})
    objs[0]["split"] = "query"
    objs[0]["captions"] = "must not replace ours"
    write_json(proj / INDEX, objs)
    out = Path("outputs/captions/batch")
    assert cli(*run_args(INDEX, out, prompt_file, server)).code == 0
    res = cli("export", "--out", out, "--format", "jsonl")
    assert res.code == 0, res.err
    records = [json.loads(line) for line in (out / "export_jsonl.jsonl").read_text(encoding="utf-8").splitlines()]
    by_id = {r["image_id"]: r for r in records}
    assert sorted(by_id) == names
    for k, n in enumerate(names):
        r = by_id[n]
        assert r["caption_gt"] == f"person {k}" and r["source"] == {"v": 1} and "pid_note" in r
        assert r["dataset_split"] == "query" and r["split"] == "test" and r["pid"] == int(n[:4])
    assert isinstance(by_id[names[0]]["captions"], list)  # our key kept

    # from another folder the paths resolve nowhere, but the ids are the file's own: export still works
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = cli("export", "--out", proj / out, "--format", "jsonl", "--to", elsewhere / "x.jsonl")
    assert res.code == 0, res.err
    assert len((elsewhere / "x.jsonl").read_text(encoding="utf-8").splitlines()) == len(names)
