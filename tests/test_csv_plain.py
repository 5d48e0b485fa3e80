"""CSV that plain readers read: no BOM by default, `--excel` for a BOM, a folder keeps its encoding.

The users' own scripts open the files as `csv.DictReader(open(path, encoding="utf-8"))` and key on
`row.get("image_id", row.get("path", ""))`; a BOM would turn the first column name into `\\ufeffimage_id`
and every image_id into "". Each test here reads the files exactly that way, and with pandas, through
real runs against the loopback server.
"""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, prepare_index, rows
from pipeline.ledger import csvscan
from pipeline.ledger.encoding import bom_for, decide, file_bom, folder_bom
from pipeline.ledger.outputs import CAPTION_COLUMNS, ERROR_COLUMNS, write_csv_atomic
from pipeline.ledger.pending import HeldFile, merge_pending, save_pending
from pipeline.ledger.recover import recover_folder
from pipeline.testing.loopback import expected_caption

BOM = codecs.BOM_UTF8
KEEPS = "keeps its encoding (no BOM); --excel applies to new folders"


def attributes_prompt() -> Path:
    """The bundled prompts/attributes.json, wherever the package keeps its bundled prompts."""
    found = sorted(p for d in (REPO / "prompts", REPO / "pipeline") if d.is_dir() for p in d.rglob("attributes.json"))
    assert found, "bundled attributes.json not found"
    return found[0]


def their_rows(p: Path) -> list[dict[str, str]]:
    """Exactly what the users' scripts do."""
    return list(csv.DictReader(open(p, encoding="utf-8")))


def their_id(row: dict[str, str]) -> str:
    return row.get("image_id", row.get("path", ""))


def sig_rows(p: Path) -> list[dict[str, str]]:
    """What an Excel-minded reader does: utf-8-sig drops the BOM if there is one."""
    with open(p, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def csv_files(out: Path) -> list[Path]:
    return [out / "captions_all.csv", *sorted(out.glob("captions_part_*.csv")), out / "errors.csv",
            out / "attributes.csv"]


def make_run(cli, server, market: Path, prompt_file: Path, tmp_path: Path):
    """An index with one missing image (-> errors.csv); a run asks captions and attributes."""
    index = prepare_index(cli, market, tmp_path / "index.json")
    data = json.loads(index.read_text(encoding="utf-8"))
    data["images"].append({"image_id": "bounding_box_test/0999_c1s1_000001_01.jpg",
                           "path": "bounding_box_test/0999_c1s1_000001_01.jpg", "pid": 999, "camid": 1,
                           "split": "gallery"})
    index.write_text(json.dumps(data), encoding="utf-8")
    ids = {im["image_id"] for im in data["images"]}
    root = Path(data["root"])

    def run(out: Path, *extra: object):
        return cli("run", "--index", index, "--out", out, "--prompt-file", prompt_file,
                   "--prompt-file", attributes_prompt(), "--base-url", server.base_url, "--no-dashboard",
                   "--batch-size", 5, *extra)

    return run, ids, root


def check_readers(out: Path, ids: set[str], root: Path, *, bom: bool) -> None:
    """Every file: BOM as expected; image_ids right through the users' reader (plain folder) or
    utf-8-sig (BOM folder); pandas reads `image_id` as the first column either way."""
    files = csv_files(out)
    assert all(p.exists() for p in files), [p.name for p in files if not p.exists()]
    assert len(files) >= 5  # captions_all, at least two parts, errors, attributes
    for p in files:
        raw = p.read_bytes()
        assert raw.startswith(BOM) == bom, p.name
        table = their_rows(p) if not bom else sig_rows(p)
        assert table, p.name
        assert list(table[0])[0] == "image_id", p.name
        for row in table:
            assert their_id(row) in ids, (p.name, row)
        if p.name.startswith("captions"):
            for row in table:
                assert row["caption"] == expected_caption((root / their_id(row)).read_bytes())
        frame = pd.read_csv(p)
        assert frame.columns[0] == "image_id", p.name
        assert set(frame["image_id"]) == {their_id(r) for r in table}
    errors = {their_id(r): r["reason"] for r in (their_rows if not bom else sig_rows)(out / "errors.csv")}
    assert errors == {"bounding_box_test/0999_c1s1_000001_01.jpg": "missing"}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["csv_bom"] is bom


def damage_a_row(path: Path) -> None:
    """A pasted extra cell in the second record: quarantined, and the file rewritten from its good bytes."""
    data = path.read_bytes()
    found = csvscan.scan(data)
    start, end = found.span(1)
    assert data[end - 2:end] == b"\r\n"
    path.write_bytes(data[:end - 2] + b",pasted\r\n" + data[end:])


# --- through the CLI ----------------------------------------------------------------------------------------

def test_default_csv_is_plain_utf8_for_their_reader(cli, server, api_env, market, prompt_file, tmp_path):
    run, ids, root = make_run(cli, server, market, prompt_file, tmp_path)
    out = tmp_path / "out"
    res = run(out)
    assert res.code == 1, res.err  # the missing image failed; everything else is done
    check_readers(out, ids, root, bom=False)
    # the users' exact reader: the header has no \ufeff, every image_id is there and right
    table = their_rows(out / "captions_all.csv")
    assert list(table[0]) == CAPTION_COLUMNS
    assert all(their_id(r) for r in table) and len(table) == len(ids) - 1
    assert list(their_rows(out / "errors.csv")[0]) == ERROR_COLUMNS
    assert KEEPS not in res.err


def test_excel_writes_a_bom_and_the_folder_keeps_it(cli, server, api_env, market, prompt_file, tmp_path):
    run, ids, root = make_run(cli, server, market, prompt_file, tmp_path)
    out = tmp_path / "out"
    assert run(out, "--excel").code == 1
    check_readers(out, ids, root, bom=True)
    # our own readers accept the BOM too
    st = cli("status", "--out", out, "--json")
    assert st.code in (0, 1), st.err
    assert cli("export", "--out", out, "--format", "jsonl", "--to", tmp_path / "x.jsonl").code == 0
    exported = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text(encoding="utf-8").splitlines()]
    assert exported and all(e["image_id"] in ids for e in exported)

    # rerun WITHOUT --excel: a damaged row is quarantined (rewrite), a part and errors.csv are new files
    damage_a_row(out / "captions_all.csv")
    parts = sorted(out.glob("captions_part_*.csv"))
    parts[0].unlink()
    (out / "errors.csv").unlink()
    res = run(out)
    assert res.code == 1, res.err
    assert "pasted" not in (out / "captions_all.csv").read_text(encoding="utf-8-sig")
    assert "moved line" in res.err and KEEPS not in res.err
    check_readers(out, ids, root, bom=True)
    # every file once, the BOM only at the start
    for p in csv_files(out):
        assert p.read_bytes().count(BOM) == 1, p.name


def test_plain_folder_stays_plain_when_excel_is_given_later(cli, server, api_env, market, prompt_file, tmp_path):
    run, ids, root = make_run(cli, server, market, prompt_file, tmp_path)
    out = tmp_path / "out"
    assert run(out).code == 1
    damage_a_row(out / "captions_all.csv")
    sorted(out.glob("captions_part_*.csv"))[-1].unlink()
    (out / "errors.csv").unlink()
    res = run(out, "--excel")
    assert res.code == 1, res.err
    assert f"output folder {out} {KEEPS}" in res.err
    assert sum(KEEPS in line for line in res.err.splitlines()) == 1
    check_readers(out, ids, root, bom=False)


# --- the decision and the rewrites, without a server ----------------------------------------------------------

def test_decide() -> None:
    assert decide(None, False).bom is False and decide(None, True).bom is True  # a new folder: --excel decides
    assert decide(True, False).bom is True and decide(True, False).note is None  # started with a BOM: kept
    assert decide(False, False).note is None
    kept = decide(False, True, "output folder out")
    assert kept.bom is False and kept.note == f"output folder out {KEEPS}"


def test_folder_bom_reads_the_first_file_with_bytes(tmp_path) -> None:
    out = tmp_path / "out"
    assert folder_bom(out) is None and folder_bom(out, recorded=True) is True
    out.mkdir()
    (out / "captions_all.csv").write_bytes(b"")  # empty: says nothing
    write_csv_atomic(out / "errors.csv", ERROR_COLUMNS, [], bom=True)
    assert file_bom(out / "captions_all.csv") is None and file_bom(out / "errors.csv") is True
    assert folder_bom(out, recorded=False) is True  # the files win over the manifest
    write_csv_atomic(out / "captions_all.csv", CAPTION_COLUMNS, [])
    assert folder_bom(out) is False  # captions_all.csv speaks first
    assert folder_bom(out, recorded="yes") is False
    assert bom_for(out / "errors.csv", False) is True and bom_for(out / "new.csv", True) is True


def record(i: int) -> list[str]:
    return [f"train/{i:04d}.jpg", "Describe.", f"caption {i}", "2025-01-01 10:00:00", "m", "1", "1", "0",
            "base", "0", "1", "0.100", "h"]


@pytest.mark.parametrize("bom", [False, True])
def test_recovery_rewrites_keep_the_folders_encoding(tmp_path, bom: bool) -> None:
    """Migration of an old header, a rebuilt part, a new part and a pending merge into a new errors.csv."""
    out = tmp_path / "out"
    out.mkdir()
    old = CAPTION_COLUMNS[:4]
    write_csv_atomic(out / "captions_all.csv", old, [record(i)[:4] for i in range(4)], bom=bom)
    write_csv_atomic(out / "captions_part_0000.csv", old, [record(0)[:4]], bom=bom)
    err = ["train/0009.jpg", "timeout", "", "6", "t", "base", "0", "m", "0", "0", "", "r"]
    save_pending(out, [HeldFile("errors.csv", ERROR_COLUMNS, [err])])
    positions = {f"train/{i:04d}.jpg": i for i in range(10)}
    folder = folder_bom(out)
    assert folder is bom
    rec = recover_folder(out, batch_size=2, positions=positions, bom=folder)
    assert any("rewritten with the current columns" in n for n in rec.notes)
    files = [out / "captions_all.csv", out / "captions_part_0000.csv", out / "captions_part_0001.csv",
             out / "errors.csv"]
    for p in files:
        assert p.read_bytes().startswith(BOM) is bom, p.name
        assert all(their_id(r) for r in (sig_rows(p) if bom else their_rows(p))), p.name
    assert [their_id(r) for r in (sig_rows if bom else their_rows)(out / "errors.csv")] == ["train/0009.jpg"]


def test_pending_merge_into_a_new_file_follows_the_folder(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    save_pending(out, [HeldFile("captions_all.csv", CAPTION_COLUMNS, [record(1)])])
    merge_pending(out, bom=True)
    assert (out / "captions_all.csv").read_bytes().startswith(BOM)
    assert [r["image_id"] for r in rows(out / "captions_all.csv")] == ["train/0001.jpg"]
