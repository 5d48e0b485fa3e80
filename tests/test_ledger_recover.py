"""Damage is quarantined, never spread; nothing derived is trusted over what was paid.

Pure scanner tests (`pipeline.ledger.csvscan`) on bytes, file-level repair (`read_table(repair=True)`,
`recover_folder`), then end to end through the CLI against the loopback server: a hand-damaged row, an
extra field, a deleted captions_all.csv or part, a changed --batch-size.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import prepare_index, rows
from pipeline.data.prompts import BUNDLED_PROMPTS_DIR
from pipeline.errors import OutputError
from pipeline.ledger import csvscan
from pipeline.ledger.recover import header_change, missing_from, plan_parts, recover_folder
from pipeline.ledger.outputs import (
    CAPTION_COLUMNS,
    ERROR_COLUMNS,
    read_table,
    to_csv_text,
    write_csv_atomic,
)
from test_run import check_captions_belong, run_args

PROMPT = 'Describe the person, briefly.\n描述这个人的衣着, "简短".'


def record(i: int, caption: str | None = None) -> list[str]:
    cap = caption if caption is not None else f"a man\nin a red coat, 第{i}个, \"quoted\""
    return [f"train/{i:04d}_c1s1_000001_01.jpg", PROMPT, cap, "2025-03-01T12:00:00+00:00", "gpt-4o-mini",
            "2900", "40", "0.00012345", "base", "0", "1", "1.234", "abcd1234abcd1234"]


def csv_bytes(n: int, *, bom: bool = True, header: list[str] = CAPTION_COLUMNS, rows_: list[list[str]] | None = None) -> bytes:
    recs = rows_ if rows_ is not None else [record(i) for i in range(n)]
    return (("\ufeff" if bom else "") + to_csv_text([header] + recs)).encode("utf-8")


def row_spans(data: bytes) -> list[tuple[int, int]]:
    """Byte spans of the good records of a file."""
    found = csvscan.scan(data)
    return [found.span(i) for i in range(len(found.records))]


def ids(found: csvscan.Scan) -> list[int]:
    return [int(r[0][6:10]) for r in found.records]


def edit_row(data: bytes, k: int, fn) -> tuple[bytes, bytes]:
    """Apply fn to the bytes of good record k (0-based); returns (new data, original bytes of record k)."""
    a, b = row_spans(data)[k]
    return data[:a] + fn(data[a:b]) + data[b:], data[a:b]


# --- the scanner: clean files ------------------------------------------------------------------------------

@pytest.mark.parametrize("bom", [True, False])
def test_clean_file_spans_are_the_records_bytes(bom):
    data = csv_bytes(6, bom=bom)
    found = csvscan.scan(data)
    assert found.clean and found.bom is bom and found.header == CAPTION_COLUMNS
    assert [r for r in found.records] == [record(i) for i in range(6)]
    for i, rec in enumerate(found.records):
        a, b = found.span(i)
        assert next(csv.reader(io.StringIO(data[a:b].decode("utf-8"), newline=""))) == rec
        assert data[b - 2:b] == b"\r\n"


def test_lf_terminators_and_crlf_inside_fields():
    rows_ = [record(0, "one\r\ntwo\r\nthree"), record(1), record(2, "x")]
    data = to_csv_text([CAPTION_COLUMNS] + rows_).replace("\r\n", "\n").encode("utf-8")
    assert csvscan.scan(data).records == [[c.replace("\r\n", "\n") for c in r] for r in rows_]
    crlf_inside = csv_bytes(3, rows_=rows_)
    found = csvscan.scan(crlf_inside)
    assert found.clean and found.records[0][2] == "one\r\ntwo\r\nthree"


def test_empty_bom_only_and_header_only():
    for data in (b"", csvscan.BOM):
        found = csvscan.scan(data)
        assert found.header is None and found.clean and found.records == []
    found = csvscan.scan(csv_bytes(0))
    assert found.header == CAPTION_COLUMNS and found.clean and found.records == []


def test_older_header_is_read_with_its_own_width():
    old = ["image_id", "prompt", "caption", "timestamp"]
    data = csv_bytes(0, header=old, rows_=[record(i)[:4] for i in range(3)])
    found = csvscan.scan(data)
    assert found.clean and found.header == old and len(found.records) == 3


# --- the scanner: torn tails -------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [
    "mid_unquoted",      # killed inside the image id
    "inside_quote",      # killed inside the quoted prompt, after its \n
    "after_inner_lf",    # killed right after a \n inside a quoted field: ends with \n, quote open
    "before_lf",         # killed between \r and \n of the terminator
    "last_field",        # whole but for the terminator
])
def test_torn_tail_forms(cut):
    data = csv_bytes(5)
    a, b = row_spans(data)[-1]
    last = data[a:b]
    keep = {
        "mid_unquoted": 10,
        "inside_quote": last.index(b"\n") + 5,
        "after_inner_lf": last.index(b"\n") + 1,
        "before_lf": len(last) - 1,
        "last_field": len(last) - 2,
    }[cut]
    torn = data[:a + keep]
    found = csvscan.scan(torn)
    assert ids(found) == [0, 1, 2, 3] and not found.damaged
    assert found.torn is not None and (found.torn.start, found.torn.end) == (a, len(torn))
    assert found.torn.first_line == torn[:a].count(b"\n") + 1


def test_torn_header_only():
    found = csvscan.scan(csv_bytes(0)[:20])
    assert found.header is None and found.torn is not None and found.torn.start == 3


def test_damaged_last_row_is_damage_not_torn():
    data = csv_bytes(5)
    bad, orig = edit_row(data, 4, lambda r: r[:-2] + b",extra\r\n")
    found = csvscan.scan(bad)
    assert ids(found) == [0, 1, 2, 3] and found.torn is None
    assert len(found.damaged) == 1 and bad[found.damaged[0].start:found.damaged[0].end].endswith(b",extra\r\n")


def test_damage_then_torn_tail():
    data = csv_bytes(6)
    bad, _ = edit_row(data, 2, lambda r: r[:-2] + b",extra\r\n")
    bad = bad[:-30]
    found = csvscan.scan(bad)
    assert ids(found) == [0, 1, 3, 4] and len(found.damaged) == 1 and found.torn is not None


# --- the scanner: damage in the middle -----------------------------------------------------------------------

def _remove_quote(where: str):
    def fn(row: bytes) -> bytes:
        if where == "start":  # the opening quote of the prompt
            return row.replace(b',"Describe', b",Describe", 1)
        if where == "middle":  # one of a doubled quote inside the prompt
            return row.replace(b'""', b'"', 1)
        if where == "end":  # the closing quote of the prompt
            return row.replace(b'"".",', b'"".,', 1)
        raise AssertionError(where)
    return fn


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("k", [0, 3, 6])
def test_a_removed_quote_damages_only_its_row(where, k):
    n = 8
    data = csv_bytes(n)
    bad, orig = edit_row(data, k, _remove_quote(where))
    found = csvscan.scan(bad)
    assert ids(found) == [i for i in range(n) if i != k]
    assert found.torn is None and len(found.damaged) == 1
    region = found.damaged[0]
    assert bad[region.start:region.end] == _remove_quote(where)(orig)
    assert region.rows == 1
    first = bad[:region.start].count(b"\n") + 1
    assert (region.first_line, region.last_line) == (first, first + orig.count(b"\n") - 1)


@pytest.mark.parametrize("damage", ["extra_field", "missing_field", "broken_int", "broken_float", "empty_id", "not_utf8"])
def test_wrong_width_or_type_damages_only_its_row(damage):
    data = csv_bytes(7)
    fn = {
        "extra_field": lambda r: r[:-2] + b",surplus\r\n",
        "missing_field": lambda r: r[: r.rindex(b",")] + b"\r\n",
        "broken_int": lambda r: r.replace(b",base,0,1,", b",base,zero,1,"),
        "broken_float": lambda r: r.replace(b",0.00012345,", b",12 cents,"),
        "empty_id": lambda r: r[r.index(b","):],
        "not_utf8": lambda r: r.replace("红".encode(), b"\xba\xec") if "红".encode() in r else r.replace(b"coat", b"c\xffat"),
    }[damage]
    bad, orig = edit_row(data, 4, fn)
    found = csvscan.scan(bad)
    assert ids(found) == [0, 1, 2, 3, 5, 6]
    assert [bad[r.start:r.end] for r in found.damaged] == [fn(orig)]


def test_two_regions_and_adjacent_rows():
    data = csv_bytes(10)
    bad, _ = edit_row(data, 7, _remove_quote("start"))
    bad, _ = edit_row(bad, 3, lambda r: r[:-2] + b",y\r\n")
    bad, _ = edit_row(bad, 2, lambda r: r[:-2] + b",x\r\n")
    found = csvscan.scan(bad)
    assert ids(found) == [0, 1, 4, 5, 6, 8, 9]
    assert len(found.damaged) == 2 and found.damaged_rows == 3


def test_a_caption_line_that_looks_like_a_record_is_not_a_record_start():
    """A record is hidden inside a multi-line caption; its row loses a quote: the hidden one stays hidden."""
    hidden = to_csv_text([record(99, "x")]).rstrip("\r\n")
    rows_ = [record(i) for i in range(5)]
    rows_[2] = record(2, f"first line\n{hidden}\nlast line, \"quoted\"")
    data = csv_bytes(5, rows_=rows_)
    bad, orig = edit_row(data, 2, lambda r: r.replace(b',"first line', b",first line", 1))
    found = csvscan.scan(bad)
    assert ids(found) == [0, 1, 3, 4]


def test_kept_bytes_are_a_file_every_reader_reads():
    data = csv_bytes(9)
    bad, orig = edit_row(data, 4, _remove_quote("end"))
    found = csvscan.scan(bad)
    kept = b"".join(bad[a:b] for a, b in found.kept())
    assert kept == data.replace(orig, b"")
    assert len(list(csv.DictReader(io.StringIO(kept.decode("utf-8-sig"), newline=""), strict=True))) == 8
    assert len(pd.read_csv(io.BytesIO(kept), encoding="utf-8-sig")) == 8


def test_garbage_after_the_header_is_all_damage_and_fast_enough():
    data = csv_bytes(3) + b"\x00\x01 not a row\r\n" * 2000 + csv_bytes(2, bom=False)[len(to_csv_text([CAPTION_COLUMNS])):]
    found = csvscan.scan(data)
    assert len(found.records) == 5 and len(found.damaged) == 1


# --- read_table: repair on disk, read-only untouched -----------------------------------------------------

def test_read_table_repair_moves_the_bytes_and_read_only_changes_nothing(tmp_path):
    path = tmp_path / "captions_all.csv"
    data = csv_bytes(8)
    bad, orig = edit_row(data, 5, _remove_quote("start"))
    path.write_bytes(bad)
    ro = read_table(path, expect_columns=CAPTION_COLUMNS)
    assert len(ro.rows) == 7 and ro.bad_rows == 1 and path.read_bytes() == bad
    assert not (tmp_path / "captions_all.csv.rejected").exists()

    t = read_table(path, repair=True, expect_columns=CAPTION_COLUMNS)
    assert [r["image_id"] for r in t.rows] == [r["image_id"] for r in ro.rows]
    first = bad[:bad.index(orig[:20])].count(b"\n") + 1
    assert t.notes == [f"captions_all.csv: moved lines {first}-{first + 2} (1 row) to captions_all.csv.rejected"]
    assert path.read_bytes() == data.replace(orig, b"")
    rejected = tmp_path / "captions_all.csv.rejected"
    assert rejected.read_bytes() == _remove_quote("start")(orig)
    # appended, never overwritten: a second damage adds to it
    again, orig2 = edit_row(path.read_bytes(), 0, lambda r: r[:-2] + b",x\r\n")
    path.write_bytes(again)
    read_table(path, repair=True)
    assert rejected.read_bytes() == _remove_quote("start")(orig) + orig2[:-2] + b",x\r\n"
    assert len(read_table(path).rows) == 6 and csvscan.scan(path.read_bytes()).clean


def test_read_table_cuts_a_torn_tail_into_rejected(tmp_path):
    path = tmp_path / "errors.csv"
    data = csv_bytes(3)
    path.write_bytes(data + b'train/0009.jpg,"half')
    t = read_table(path, repair=True)
    assert len(t.rows) == 3 and t.cut_bytes == len(b'train/0009.jpg,"half') and "torn" in t.notes[0]
    assert path.read_bytes() == data
    assert (tmp_path / "errors.csv.rejected").read_bytes() == b'train/0009.jpg,"half'


# --- recover_folder: pure decisions and the folder ---------------------------------------------------------

def test_header_change():
    assert header_change(CAPTION_COLUMNS, CAPTION_COLUMNS) is None
    assert header_change(["image_id", "prompt", "caption", "timestamp"], CAPTION_COLUMNS) == CAPTION_COLUMNS[4:]
    assert header_change(CAPTION_COLUMNS[:-1], CAPTION_COLUMNS) == ["prompt_hash"]
    with pytest.raises(OutputError, match="no image_id"):
        header_change(["a", "b"], CAPTION_COLUMNS)
    with pytest.raises(OutputError, match="note"):
        header_change(CAPTION_COLUMNS + ["note"], CAPTION_COLUMNS)


def test_missing_from_and_plan_parts():
    d = lambda i, k=0: {"image_id": f"im{i}", "prompt_name": "base", "caption_index": str(k)}  # noqa: E731
    parts = {"captions_part_0001.csv": [d(2), d(3)], "captions_part_0000.csv": [d(0), d(1), d(1)]}
    assert missing_from([d(0), d(3)], parts) == [d(1), d(2)]
    plan = plan_parts([d(0), d(1), d(2), d(9)], {"im0": 0, "im1": 1, "im2": 2}, 2)
    assert plan == {"captions_part_0000.csv": [d(0), d(1)], "captions_part_0001.csv": [d(2)]}


def test_recover_migrates_old_headers_and_refuses_foreign_ones(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = ["image_id", "prompt", "caption", "timestamp"]
    write_csv_atomic(out / "captions_all.csv", old, [record(i)[:4] for i in range(3)])
    write_csv_atomic(out / "errors.csv", ERROR_COLUMNS[:7], [["train/0007.jpg", "timeout", "", "6", "t", "base", "0"]])
    positions = {record(i)[0]: i for i in range(3)}
    rec = recover_folder(out, batch_size=2, positions=positions)
    assert read_table(out / "captions_all.csv").header == CAPTION_COLUMNS
    assert [r["caption"] for r in rows(out / "captions_all.csv")] == [record(i)[2] for i in range(3)]
    assert rows(out / "captions_all.csv")[0]["model"] == ""
    assert read_table(out / "errors.csv").header == ERROR_COLUMNS
    assert any("captions_all.csv: rewritten with the current columns" in n for n in rec.notes)
    assert sorted(p.name for p in out.glob("captions_part_*.csv")) == ["captions_part_0000.csv", "captions_part_0001.csv"]

    write_csv_atomic(out / "errors.csv", ["when", "what"], [["a", "b"]])
    with pytest.raises(OutputError) as exc:
        recover_folder(out, batch_size=2, positions=positions)
    assert "errors.csv" in str(exc.value) and "\n" not in str(exc.value)


def test_recover_restores_rows_only_a_part_holds_and_resplits(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    recs = [record(i) for i in range(6)]
    positions = {r[0]: i for i, r in enumerate(recs)}
    write_csv_atomic(out / "captions_all.csv", CAPTION_COLUMNS, recs[:4])
    write_csv_atomic(out / "captions_part_0000.csv", CAPTION_COLUMNS, recs[:3])
    write_csv_atomic(out / "captions_part_0001.csv", CAPTION_COLUMNS, recs[3:])
    before = (out / "captions_all.csv").read_bytes()
    rec = recover_folder(out, batch_size=2, positions=positions, previous_batch_size=3)
    after = (out / "captions_all.csv").read_bytes()
    assert after.startswith(before)  # appended, the old rows untouched
    assert sorted(r["image_id"] for r in rows(out / "captions_all.csv")) == sorted(positions)
    assert "captions_all.csv: restored 2 rows that only the part files held" in rec.notes
    assert "re-split parts for --batch-size 2 (was 3)" in rec.notes
    for k in range(3):
        assert [r["image_id"] for r in rows(out / f"captions_part_{k:04d}.csv")] == [recs[2 * k][0], recs[2 * k + 1][0]]
    assert recover_folder(out, batch_size=2, positions=positions).notes == []  # settled: nothing more to do


# --- end to end, through the CLI against the loopback server -------------------------------------------------

def _first_run(cli, server, market, prompt_file, tmp_path, *extra):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    res = cli(*run_args(index, out, prompt_file, server, "--batch-size", 4, *extra))
    assert res.code == 0, res.err
    return index, out


def _rerun(cli, server, index, out, prompt_file, *extra):
    sent = server.stats.requests
    res = cli(*run_args(index, out, prompt_file, server, *extra))
    assert res.code == 0, res.err
    assert "Traceback" not in res.err
    return res, server.stats.requests - sent


def _readers_agree(path: Path, n: int) -> None:
    text = path.read_bytes().decode("utf-8-sig")
    assert len(list(csv.DictReader(io.StringIO(text, newline=""), strict=True))) == n
    assert len(pd.read_csv(path, encoding="utf-8-sig")) == n
    assert len(read_table(path).rows) == n and csvscan.scan(path.read_bytes()).clean


def _part_of(out: Path, image_id: str) -> Path:
    return next(p for p in out.glob("captions_part_*.csv") if any(r["image_id"] == image_id for r in rows(p)))


@pytest.mark.parametrize("damage", ["quote", "extra_field"])
def test_a_row_damaged_in_captions_all_and_its_part_is_asked_again_alone(
    cli, server, api_env, market, prompt_file, tmp_path, damage
):
    index, out = _first_run(cli, server, market, prompt_file, tmp_path)
    all_csv = out / "captions_all.csv"
    n = len(rows(all_csv))
    k = n // 2
    fn = _remove_quote("start") if damage == "quote" else (lambda r: r[:-2] + b",surplus\r\n")
    bad, orig = edit_row(all_csv.read_bytes(), k, fn)
    lost = csvscan.scan(all_csv.read_bytes()).records[k][0]
    all_csv.write_bytes(bad)
    part = _part_of(out, lost)
    part_bad, _ = edit_row(part.read_bytes(), [r["image_id"] for r in rows(part)].index(lost), fn)
    part.write_bytes(part_bad)

    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 1  # exactly that row's image
    assert rows(all_csv)[-1]["image_id"] == lost  # ... and it is the row appended
    kept = bad.replace(fn(orig), b"")
    assert all_csv.read_bytes().startswith(kept)  # the other n-1 rows byte for byte
    assert (out / "captions_all.csv.rejected").read_bytes() == fn(orig)
    assert (part.with_name(part.name + ".rejected")).read_bytes() == fn(orig)
    line = bad[: bad.index(fn(orig))].count(b"\n") + 1
    assert f"repaired: captions_all.csv: moved lines {line}-" in res.err
    _readers_agree(all_csv, n)
    by_id = check_captions_belong(index, out)
    assert lost in by_id
    assert sum(len(rows(p)) for p in out.glob("captions_part_*.csv")) == n


def test_a_row_damaged_in_captions_all_only_comes_back_from_its_part(cli, server, api_env, market, prompt_file, tmp_path):
    index, out = _first_run(cli, server, market, prompt_file, tmp_path)
    all_csv = out / "captions_all.csv"
    before = {r["image_id"]: r for r in rows(all_csv)}
    bad, orig = edit_row(all_csv.read_bytes(), 3, _remove_quote("end"))
    all_csv.write_bytes(bad)
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 0  # paid once, held by its part: not paid again
    assert "restored 1 row" in res.err
    assert {r["image_id"]: r for r in rows(all_csv)} == before
    _readers_agree(all_csv, len(before))


def test_deleted_captions_all_is_rebuilt_from_the_parts(cli, server, api_env, market, prompt_file, tmp_path):
    index, out = _first_run(cli, server, market, prompt_file, tmp_path)
    all_csv = out / "captions_all.csv"
    before = sorted((r["image_id"], r["caption"]) for r in rows(all_csv))
    parts_before = {p.name: p.read_bytes() for p in out.glob("captions_part_*.csv")}
    all_csv.unlink()
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 0
    assert "captions_all.csv was missing: rebuilt from" in res.err
    assert sorted((r["image_id"], r["caption"]) for r in rows(all_csv)) == before
    assert {p.name: p.read_bytes() for p in out.glob("captions_part_*.csv")} == parts_before
    _readers_agree(all_csv, len(before))


def test_deleted_part_is_rebuilt(cli, server, api_env, market, prompt_file, tmp_path):
    index, out = _first_run(cli, server, market, prompt_file, tmp_path)
    part = out / "captions_part_0001.csv"
    want = [r["image_id"] for r in rows(part)]
    part.unlink()
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 0 and "captions_part_0001.csv: rebuilt" in res.err
    assert [r["image_id"] for r in rows(part)] == want


def test_changed_batch_size_resplits_the_same_rows(cli, server, api_env, market, prompt_file, tmp_path):
    index, out = _first_run(cli, server, market, prompt_file, tmp_path)
    all_rows = rows(out / "captions_all.csv")
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 3)
    assert sent == 0
    images = [im["image_id"] for im in json.loads(index.read_text(encoding="utf-8"))["images"]]
    parts = sorted(out.glob("captions_part_*.csv"))
    assert [p.name for p in parts] == [f"captions_part_{k:04d}.csv" for k in range((len(images) + 2) // 3)]
    for k, p in enumerate(parts):
        assert {r["image_id"] for r in rows(p)} == set(images[3 * k: 3 * k + 3])
    assert sorted(r["image_id"] for p in parts for r in rows(p)) == sorted(r["image_id"] for r in all_rows)
    assert rows(out / "captions_all.csv") == all_rows


def test_damaged_errors_csv_row_is_quarantined(cli, server, api_env, market, prompt_file, tmp_path):
    from pipeline.testing import synth

    synth.make_corrupt(market / "bounding_box_test" / "0901_c1s1_000001_01.jpg")
    synth.make_not_image(market / "bounding_box_test" / "0903_c1s1_000001_01.png")
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    res = cli(*run_args(index, out, prompt_file, server))
    assert res.code in (0, 1), res.err
    errors = out / "errors.csv"
    n = len(rows(errors))
    assert n == 2
    bad, orig = edit_row(errors.read_bytes(), 0, lambda r: r.replace(b",base,0,", b",base,nil,"))
    errors.write_bytes(bad)
    res = cli(*run_args(index, out, prompt_file, server))
    assert res.code in (0, 1), res.err
    assert "repaired: errors.csv: moved line 2 (1 row) to errors.csv.rejected" in res.err
    assert (out / "errors.csv.rejected").read_bytes() == orig.replace(b",base,0,", b",base,nil,")
    assert errors.read_bytes().startswith(bad.replace(orig.replace(b",base,0,", b",base,nil,"), b""))
    _readers_agree(errors, len(rows(errors)))


def test_damaged_attributes_row_is_asked_again(cli, server, api_env, market, tmp_path):
    schema = BUNDLED_PROMPTS_DIR / "attributes.json"
    index, out = _first_run(cli, server, market, schema, tmp_path)
    attrs = out / "attributes.csv"
    n = len(rows(attrs))
    bad, orig = edit_row(attrs.read_bytes(), 2, lambda r: r[:-2] + b",surplus\r\n")
    attrs.write_bytes(bad)
    res, sent = _rerun(cli, server, index, out, schema, "--batch-size", 4)
    assert sent == 1 and "attributes.csv: moved line 4 (1 row)" in res.err
    assert attrs.read_bytes().startswith(bad.replace(orig[:-2] + b",surplus\r\n", b""))
    _readers_agree(attrs, n)


def test_a_folder_of_the_earlier_scripts_is_migrated_and_its_rows_kept(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    out.mkdir()
    images = [im["image_id"] for im in json.loads(index.read_text(encoding="utf-8"))["images"]]
    old = ["image_id", "prompt", "caption", "timestamp"]
    write_csv_atomic(out / "captions_all.csv", old, [[i, "Describe.", f"an old caption\nof {i}", "2024-01-01 10:00"] for i in images[:5]])
    res, sent = _rerun(cli, server, index, out, prompt_file)
    assert sent == len(images) - 5  # the earlier scripts' captions count as done
    assert "captions_all.csv: rewritten with the current columns (added model" in res.err
    table = read_table(out / "captions_all.csv")
    assert table.header == CAPTION_COLUMNS
    assert [r["caption"] for r in table.rows[:5]] == [f"an old caption\nof {i}" for i in images[:5]]
    _readers_agree(out / "captions_all.csv", len(images))


def test_a_csv_that_is_not_ours_is_one_line_and_nothing_is_sent(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "captions_all.csv").write_bytes(b"name,score\r\nalice,3\r\n")
    res = cli(*run_args(index, out, prompt_file, server))
    assert res.code == 2
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "image_id" in lines[0], res.err
    assert server.stats.requests == 0
    assert (out / "captions_all.csv").read_bytes() == b"name,score\r\nalice,3\r\n"
