"""The done-keys snapshot (`pipeline.ledger.donesnap`) and the start's streamed check of the parts.

File-level tests: the snapshot is trusted only while captions_all.csv is the file it describes (same
bytes, or the same bytes with clean rows appended after them); the streamed recovery
(`recover._stream_captions`, what a killed run's folder gets) leaves every file exactly as the full
recovery does, for the damage a killed run or a hand edit leaves. One end to end run: a finished run
leaves a snapshot that the next start uses, and damage after it is still quarantined.
"""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import rows
from pipeline.ledger import donesnap, partstate, recover
from pipeline.ledger.outputs import CAPTION_COLUMNS, tally_clean_captions, to_csv_text, write_csv_atomic
from pipeline.ledger.recover import recover_folder
from test_ledger_recover import _first_run, _rerun, record


def _captions(out, recs):
    write_csv_atomic(out / "captions_all.csv", CAPTION_COLUMNS, recs)


def _bump_mtime(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))


def test_snapshot_round_trip_and_what_invalidates_it(tmp_path):
    out = tmp_path
    path = out / "captions_all.csv"
    _captions(out, [record(i) for i in range(40)])
    tally = tally_clean_captions(path)
    assert donesnap.save(out, tally) == path.stat().st_size and tally.saved
    got = donesnap.load(out)
    assert got is not None and got.saved and got.rows == 40 and len(got.keys) == 40
    assert (record(7)[0], "base", 0) in got.keys and (record(41)[0], "base", 0) not in got.keys
    assert abs(got.usd - tally.usd) < 1e-15 and got.completion_tokens == tally.completion_tokens

    data = path.read_bytes()
    path.write_bytes(data.replace(b"2900", b"29x0", 1))  # a hand edit of the same size
    _bump_mtime(path)
    assert donesnap.load(out) is None
    path.write_bytes(data)
    _bump_mtime(path)  # the same bytes, touched: same size, another time: not trusted
    assert donesnap.load(out) is None

    assert donesnap.save(out, tally_clean_captions(path)) is not None
    with open(path, "ab") as fh:  # two clean rows appended (a run killed after writing them)
        fh.write(to_csv_text([record(40), record(41)]).encode("utf-8"))
    got = donesnap.load(out)
    assert got is not None and not got.saved and got.rows == 42 and (record(41)[0], "base", 0) in got.keys
    with open(path, "ab") as fh:  # then a torn row: the whole file is read (and repaired) instead
        fh.write(b"train/9999.jpg,half a r")
    assert donesnap.load(out) is None

    path.write_bytes(data[:-10])  # smaller than what it covers
    assert donesnap.load(out) is None
    path.write_bytes(data)
    assert donesnap.save(out, tally_clean_captions(path)) is not None
    snap = out / donesnap.SNAP_FILE
    blob = bytearray(snap.read_bytes())
    blob[-3] ^= 0xFF  # a damaged snapshot
    snap.write_bytes(bytes(blob))
    assert donesnap.load(out) is None


def test_a_rewrite_that_keeps_the_edges_but_not_the_inode_is_not_trusted(tmp_path):
    out = tmp_path
    path = out / "captions_all.csv"
    _captions(out, [record(i) for i in range(30)])
    assert donesnap.save(out, tally_clean_captions(path)) is not None
    data = path.read_bytes()
    tmp = out / "x.tmp"
    tmp.write_bytes(data + to_csv_text([record(30)]).encode("utf-8"))  # an editor's save: a new file
    os.replace(tmp, path)
    assert donesnap.load(out) is None


def _folder(tmp, n=16, batch=2):
    out = tmp / "out"
    out.mkdir(parents=True)
    recs = [record(i) for i in range(n)]
    _captions(out, recs)
    for k in range(0, n, batch):
        write_csv_atomic(out / f"captions_part_{k // batch:04d}.csv", CAPTION_COLUMNS, recs[k:k + batch])
    positions = {r[0]: i for i, r in enumerate(recs)}
    positions.update((f"train/new_{i}.jpg", i) for i in range(n, n + 4))  # images not done yet
    return out, recs, positions


def _damage(out, recs, how):
    part = out / "captions_part_0001.csv"
    if how == "part_behind":  # killed between captions_all.csv and the part
        write_csv_atomic(part, CAPTION_COLUMNS, recs[2:3])
    elif how == "part_ahead":  # the part holds a row captions_all.csv lacks
        _captions(out, recs[:3] + recs[4:])
    elif how == "part_missing":
        part.unlink()
    elif how == "part_damaged":
        part.write_bytes(part.read_bytes().replace(b"2900", b"29x0", 1))
    elif how == "part_torn":
        part.write_bytes(part.read_bytes()[:-9])
    elif how == "part_foreign":  # a part of an index twice as long: its rows belong nowhere now
        write_csv_atomic(out / "captions_part_0012.csv", CAPTION_COLUMNS, recs[:1])
    elif how == "part_empty":  # a header only, for a part no row belongs to
        write_csv_atomic(out / "captions_part_0009.csv", CAPTION_COLUMNS, [])
    elif how == "part_wrong_row":  # a row in the wrong part
        write_csv_atomic(part, CAPTION_COLUMNS, recs[2:4] + recs[6:7])


HOW = ["part_behind", "part_ahead", "part_missing", "part_damaged", "part_torn", "part_foreign", "part_empty",
       "part_wrong_row"]


@pytest.mark.parametrize("how", HOW)
def test_streamed_recovery_leaves_the_folder_as_the_full_one_does(tmp_path, monkeypatch, how):
    streamed, recs, positions = _folder(tmp_path / "a")
    _damage(streamed, recs, how)
    full = tmp_path / "b" / "out"
    shutil.copytree(streamed, full)
    got = recover_folder(streamed, batch_size=2, positions=positions, index_key="idx", last_position=19)
    assert got.captions is not None  # it took the streamed path
    with monkeypatch.context() as m:
        m.setattr(recover, "_stream_captions", lambda *a, **k: None)
        want = recover_folder(full, batch_size=2, positions=positions, index_key="idx", last_position=19)
    assert want.captions is None
    names = sorted(p.name for p in full.iterdir() if p.name != partstate.STATE_FILE)
    assert sorted(p.name for p in streamed.iterdir() if p.name != partstate.STATE_FILE) == names
    for name in names:
        assert (streamed / name).read_bytes() == (full / name).read_bytes(), name
    assert got.notes == want.notes and got.notes
    assert got.captions.rows == len(rows(streamed / "captions_all.csv"))
    assert partstate.in_step(streamed, batch_size=2, digits=4, index_key="idx")


def test_streamed_recovery_steps_aside_for_what_only_the_full_one_does(tmp_path):
    out, recs, positions = _folder(tmp_path)
    with open(out / "captions_all.csv", "ab") as fh:
        fh.write(b"train/9999.jpg,half")  # a torn tail: quarantined by the full path
    rec = recover_folder(out, batch_size=2, positions=positions, index_key="idx", last_position=19)
    assert rec.captions is None and any("torn" in n for n in rec.notes)
    assert (out / "captions_all.csv.rejected").read_bytes() == b"train/9999.jpg,half"
    rec = recover_folder(out, batch_size=4, positions=positions, index_key="idx", last_position=19,
                         previous_batch_size=2)
    assert rec.captions is None and rec.notes == ["re-split parts for --batch-size 4 (was 2)"]


def test_a_finished_run_leaves_a_snapshot_and_damage_after_it_is_still_found(
        cli, server, api_env, market, prompt_file, tmp_path):
    index, out = _first_run(cli, server, market, prompt_file, tmp_path)
    all_rows = rows(out / "captions_all.csv")
    snap = donesnap.load(out)
    assert snap is not None and snap.saved and snap.rows == len(all_rows)
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 0
    path = out / "captions_all.csv"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"gpt-4o-mini,", b"gpt-4o-mini,extra,", 1))  # a hand edit: one row damaged
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 0 and "captions_all.csv.rejected" in res.err and "restored 1 row" in res.err  # from its part
    assert sorted(r["image_id"] for r in rows(path)) == sorted(r["image_id"] for r in all_rows)
    snap = donesnap.load(out)
    assert snap is not None and snap.rows == len(all_rows)


def _killed(tmp, how):
    """A folder in step with 15 rows (record and snapshot as a start leaves them), then what a run killed
    after appending rows 15-18 leaves (batch 2: part 7 grows, parts 8 and 9 are new)."""
    out = tmp / "out"
    out.mkdir(parents=True)
    recs = [record(i) for i in range(20)]
    positions = {r[0]: i for i, r in enumerate(recs)}
    _captions(out, recs[:15])
    for k in range(0, 15, 2):
        write_csv_atomic(out / f"captions_part_{k // 2:04d}.csv", CAPTION_COLUMNS, recs[k:min(k + 2, 15)])
    partstate.record(out, batch_size=2, digits=4, index_key="idx")
    donesnap.save(out, tally_clean_captions(out / "captions_all.csv"))
    batches = [recs[15:17], recs[17:19]]
    for i, batch in enumerate(batches):
        with open(out / "captions_all.csv", "ab") as fh:
            fh.write(to_csv_text(batch).encode("utf-8"))
        if how == "between" and i == len(batches) - 1:
            break  # killed before the parts of the last batch
        for r in batch:
            part = out / f"captions_part_{positions[r[0]] // 2:04d}.csv"
            new = not part.exists()
            with open(part, "ab") as fh:
                fh.write(to_csv_text(([CAPTION_COLUMNS] if new else []) + [r]).encode("utf-8"))
            if how == "part_short" and r is batch[0] and i == 0:
                break  # part 7 got row 15; row 16 (part 8) never reached its part
    return out, positions


@pytest.mark.parametrize("how", ["clean", "between", "part_short", "part_edited", "torn", "stray_part"])
def test_a_killed_run_is_read_from_what_it_added(tmp_path, monkeypatch, how):
    out, positions = _killed(tmp_path / "a", how)
    if how == "part_edited":  # an old part edited by hand: the whole folder is checked
        part = out / "captions_part_0002.csv"
        part.write_bytes(part.read_bytes().replace(b"2900", b"29x0", 1))
        _bump_mtime(part)
    if how == "stray_part":  # an empty file named as a part past the index: removed by the whole check
        (out / "captions_part_0012.csv").write_bytes(b"")
    if how == "torn":
        with open(out / "captions_all.csv", "ab") as fh:
            fh.write(b"train/0019_c1s1_000001_01.jpg,half")
    full = tmp_path / "b" / "out"
    shutil.copytree(out, full)
    read_whole = []
    real = recover._part_records
    monkeypatch.setattr(recover, "_part_records", lambda *a: read_whole.append(1) or real(*a))
    got = recover_folder(out, batch_size=2, positions=positions, index_key="idx", last_position=19)
    if how == "torn":  # captions_all.csv must be repaired: the full path
        assert got.captions is None and any("torn" in n for n in got.notes)
    else:  # only what the run added is read, unless an old part changed too
        assert (read_whole == []) == (how not in ("part_edited", "stray_part"))
    with monkeypatch.context() as m:
        m.setattr(recover, "_stream_captions", lambda *a, **k: None)
        want = recover_folder(full, batch_size=2, positions=positions, index_key="idx", last_position=19)
    names = sorted(p.name for p in full.iterdir() if p.name not in (partstate.STATE_FILE, donesnap.SNAP_FILE))
    assert sorted(p.name for p in out.iterdir() if p.name not in (partstate.STATE_FILE, donesnap.SNAP_FILE)) == names
    for name in names:
        assert (out / name).read_bytes() == (full / name).read_bytes(), name
    assert got.notes == want.notes
    assert (got.notes == []) == (how == "clean")
    if how != "torn":
        assert got.captions is not None and got.captions.rows == 19
    assert partstate.in_step(out, batch_size=2, digits=4, index_key="idx")
