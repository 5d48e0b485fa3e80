"""The done set held as digests, captions_all.csv read in one clean pass, parts not re-read when in step.

Pure tests of `pipeline.ledger.donekeys` and `tally_clean_captions`, file-level tests of the start's fast
path (`recover_folder` with the parts' in-step record, `pipeline.ledger.partstate`), and one end to end
run against the loopback server: a finished run records the parts, a damaged part after it still wins.
"""

from __future__ import annotations

import os

import pytest

from conftest import rows
from pipeline.ledger import partstate
from pipeline.ledger.donekeys import DistinctStrings, DoneKeys, key_digest
from pipeline.ledger.outputs import CAPTION_COLUMNS, read_done, read_table, tally_clean_captions, write_csv_atomic
from pipeline.ledger.recover import recover_folder
from pipeline.run.dispatch import count_work
from test_ledger_recover import _first_run, _rerun, csv_bytes, record


def test_done_keys_membership_length_and_no_iteration():
    keys = DoneKeys([("a.jpg", "base", 0), ("a.jpg", "base", 1), ("b.jpg", "base", 0)])
    keys.add(("a.jpg", "base", 0))  # written twice: counted once
    assert ("a.jpg", "base", 1) in keys and ("b.jpg", "base", 0) in keys
    assert ("a.jpg", "base", 2) not in keys and ("b.jpg", "zh", 0) not in keys and "a.jpg" not in keys
    assert len(keys) == 3
    keys.add(("c.jpg", "base", 0))  # added after a look-up: the bucket is sorted again
    assert ("c.jpg", "base", 0) in keys and len(keys) == 4
    with pytest.raises(TypeError):
        list(keys)
    images = DistinctStrings()
    for name in ("a.jpg", "a.jpg", "b.jpg"):
        images.add(name)
    assert len(images) == 2 and "a.jpg" in images and "c.jpg" not in images


def test_digests_are_stable_and_eight_bytes_a_key():
    assert key_digest("x.jpg", "base", 0) == key_digest("x.jpg", "base", 0) != key_digest("x.jpg", "base", 1)
    keys = DoneKeys((f"{i:06d}.jpg", "base", 0) for i in range(10_000))
    assert len(keys) == 10_000 and keys.nbytes == 80_000


def test_count_work_asks_the_done_set():
    class Entry:
        def __init__(self, image_id: str) -> None:
            self.image_id = image_id

    class P:
        def __init__(self, name: str) -> None:
            self.name, self.schema, self.templates = name, None, None

    entries = [Entry(f"{i}.jpg") for i in range(5)]
    done = DoneKeys([("0.jpg", "base", 0), ("1.jpg", "base", 1), ("9.jpg", "base", 0), ("2.jpg", "other", 0)])
    assert count_work(entries, [P("base")], 2, done) == (10, 2)  # 9.jpg (not in the index), other: not counted


def test_clean_pass_agrees_with_the_careful_scan(tmp_path):
    path = tmp_path / "captions_all.csv"
    for bom in (True, False):
        path.write_bytes(csv_bytes(50, bom=bom))
        tally = tally_clean_captions(path, count_images=True)
        assert tally is not None and tally.rows == 50 == len(read_table(path).rows)
        assert ("train/0007_c1s1_000001_01.jpg", "base", 0) in tally.keys and len(tally.images) == 50
        assert tally.completion_tokens == 50 * 40 and abs(tally.usd - 50 * 0.00012345) < 1e-12
        done = read_done(tmp_path)
        assert done.caption_count == 50 and done.measured_rows == 50 and done.cut_bytes["captions_all.csv"] == 0


@pytest.mark.parametrize("damage", ["torn", "width", "type", "header", "utf8"])
def test_anything_unclean_takes_the_careful_path(tmp_path, damage):
    path = tmp_path / "captions_all.csv"
    data = csv_bytes(10, bom=False)
    if damage == "torn":
        data = data[:-7]
    elif damage == "width":
        data = data.replace(b"gpt-4o-mini,", b"gpt-4o-mini,extra,", 1)
    elif damage == "type":
        data = data.replace(b",2900,", b",29x0,", 1)
    elif damage == "header":
        data = data.replace(b"prompt_hash", b"prompt_hash,more", 1)
    else:
        data = data.replace(b"gpt-4o-mini", b"gpt-4o-\xffmini", 1)
    path.write_bytes(data)
    assert tally_clean_captions(path) is None
    if damage != "header":
        done = read_done(tmp_path)  # the careful path: every good row still counts
        assert done.caption_count == 9  # the one torn or damaged row left out


def _folder(tmp_path, n: int = 6):
    out = tmp_path / "out"
    out.mkdir()
    recs = [record(i) for i in range(n)]
    positions = {r[0]: i for i, r in enumerate(recs)}
    write_csv_atomic(out / "captions_all.csv", CAPTION_COLUMNS, recs)
    for k in range(0, n, 2):
        write_csv_atomic(out / f"captions_part_{k // 2:04d}.csv", CAPTION_COLUMNS, recs[k:k + 2])
    return out, recs, positions


def test_parts_in_step_are_not_read_and_any_change_is(tmp_path):
    out, recs, positions = _folder(tmp_path)

    def start(**kw):
        asked = []

        def make():
            asked.append(1)
            return positions

        return recover_folder(out, batch_size=2, positions=make, index_key="idx", last_position=5, **kw), asked

    rec, asked = start()  # no record yet: the parts are checked (streamed), and recorded at the end
    assert rec.captions is not None and asked == [1] and (out / partstate.STATE_FILE).exists()
    rec, asked = start()  # in step: one clean pass, no part read, no positions made
    assert rec.captions is not None and rec.captions.rows == 6 and asked == [] and rec.notes == []
    assert not partstate.in_step(out, batch_size=2, digits=4, index_key="other")  # another index
    rec = recover_folder(out, batch_size=3, positions=positions, index_key="idx", previous_batch_size=2)
    assert rec.captions is None and any("re-split" in n for n in rec.notes)  # the full path
    rec = recover_folder(out, batch_size=2, positions=positions, index_key="idx", previous_batch_size=3)
    assert rec.captions is None and [r["image_id"] for r in rows(out / "captions_part_0002.csv")] == [recs[4][0], recs[5][0]]

    part = out / "captions_part_0001.csv"
    data = part.read_bytes()
    part.write_bytes(data.replace(b"2900", b"29x0", 1))  # a hand edit of the same size
    st = part.stat()
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    rec, asked = start()  # the part's digest sum differs: checked and rebuilt, captions_all.csv read clean
    assert rec.captions is not None and asked == [1]
    assert any("captions_part_0001.csv" in n for n in rec.notes)
    assert [r["image_id"] for r in rows(part)] == [recs[2][0], recs[3][0]]  # rebuilt from captions_all.csv

    part.unlink()  # a deleted part
    rec, asked = start()
    assert asked == [1] and [r["image_id"] for r in rows(part)] == [recs[2][0], recs[3][0]]

    with open(out / "captions_all.csv", "ab") as fh:  # a torn tail in captions_all.csv (a run killed)
        fh.write(b"train/9999.jpg,half a row")
    rec, _ = start()
    assert rec.captions is None and len(rows(out / "captions_all.csv")) == 6
    rec, _ = start()
    assert rec.captions is not None  # settled again


def test_a_finished_run_records_its_parts_and_the_next_start_reads_none(
        cli, server, api_env, market, prompt_file, tmp_path):
    index, out = _first_run(cli, server, market, prompt_file, tmp_path)
    assert (out / partstate.STATE_FILE).exists()
    all_rows = rows(out / "captions_all.csv")
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 0 and "rebuilt" not in res.err
    part = out / "captions_part_0000.csv"
    want = [r["image_id"] for r in rows(part)]
    part.write_bytes(part.read_bytes()[:-5])  # torn after the record was made
    res, sent = _rerun(cli, server, index, out, prompt_file, "--batch-size", 4)
    assert sent == 0 and [r["image_id"] for r in rows(part)] == want
    assert rows(out / "captions_all.csv") == all_rows
