"""A write that fails loses nothing: held answers, retries, the pending file, the pre-flight check.

Faults are real (a small tmpfs that fills up) or injected at our own file layer
(`pipeline.ledger.appendfile`), never in the SDK: the runs go through the CLI and the real openai SDK to
the loopback server.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_big_market, prepare_index, rows, spawn, wait_for_rows
from pipeline.ledger import appendfile, pending
from pipeline.ledger.appendfile import append_bytes, describe_write_error, header_bytes, records_bytes
from pipeline.ledger.pending import HeldFile, find_pending, folder_tag, merge_pending, save_pending
from pipeline.ledger.outputs import CAPTION_COLUMNS, ERROR_COLUMNS
from pipeline.testing import disk as tmpfs
from test_run import check_captions_belong, run_args

NO_CRASH = ("internal error", "Traceback", "ExceptionGroup")


def n_images(index: Path) -> int:
    return len(json.loads(index.read_text(encoding="utf-8"))["images"])


class Fault:
    """Make appends to one output file fail while `on`, at the file layer (the seam every append uses)."""

    def __init__(self, monkeypatch, name: str, make_error) -> None:
        self.name, self.make_error, self.on, self.hits = name, make_error, True, 0
        real = appendfile.append_bytes

        def faulty(path, data, header=b""):
            if self.on and Path(path).name == self.name:
                self.hits += 1
                raise self.make_error()
            return real(path, data, header)

        monkeypatch.setattr(appendfile, "append_bytes", faulty)


def eacces() -> OSError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def parts_hold_each_once(out: Path, ids: set[str]) -> None:
    union: Counter[str] = Counter()
    for part in out.glob("captions_part_*.csv"):
        union.update(r["image_id"] for r in rows(part))
    assert set(union) == ids and max(union.values()) == 1


# --- the file layer, without a server ----------------------------------------------------------------

def test_a_failed_append_leaves_the_file_as_it_was(monkeypatch, tmp_path):
    path = tmp_path / "captions_all.csv"
    append_bytes(path, records_bytes([["a", "1"]]), header_bytes(["image_id", "n"], bom=True))  # --excel
    before = path.read_bytes()
    assert before.startswith(b"\xef\xbb\xbf") and before.count(b"\xef\xbb\xbf") == 1
    real_open = appendfile.open_append

    class HalfThenFull:
        """A device that takes a few bytes of the record, then is full (what a real disk does)."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            if len(data) > 3:
                return self.fh.write(bytes(data[:3]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

    monkeypatch.setattr(appendfile, "open_append", lambda p: HalfThenFull(real_open(p)))
    with pytest.raises(OSError) as info:
        append_bytes(path, records_bytes([["b", "2"], ["c", "3"]]))
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before  # the half record is gone, not buried mid-file by the next append
    monkeypatch.setattr(appendfile, "open_append", real_open)
    append_bytes(path, records_bytes([["b", "2"]]), header_bytes(["image_id", "n"], bom=True))
    assert [r["image_id"] for r in rows(path)] == ["a", "b"]  # header not written twice
    assert path.read_bytes().count(b"\xef\xbb\xbf") == 1  # nor the BOM


def test_write_errors_are_named_by_kind_not_by_text():
    sharing = PermissionError(errno.EACCES, "The process cannot access the file")
    sharing.winerror = 32  # what Windows raises while Excel holds the file
    assert "in use by another program" in describe_write_error(sharing)
    assert describe_write_error(eacces()) == "Permission denied (is it open in Excel?)"
    assert describe_write_error(OSError(errno.ENOSPC, "whatever")) == "no space left on the disk"
    assert describe_write_error(OSError(errno.EROFS, "x")) == "the disk is read-only"


def test_merge_pending_is_crash_safe_and_finds_the_temp_copy(monkeypatch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cap = lambda i: [f"img{i}.jpg", "p", f"caption {i}", "t", "m", "1", "1", "0.1", "base", "0", "1", "0.1", "h"]
    err = [["img9.jpg", "timeout", "slow", "3", "t", "base", "0", "", "0", "0", "0", "run1"]]
    held = [HeldFile("captions_all.csv", CAPTION_COLUMNS, [cap(i) for i in range(5)]),
            HeldFile("errors.csv", ERROR_COLUMNS, err)]
    # the folder cannot take the pending file (say the disk is full): it goes to the temp folder
    real_write = appendfile.write_new_file

    def no_room_in_folder(path, data):
        if Path(path).parent == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(appendfile, "write_new_file", no_room_in_folder)
    monkeypatch.setattr(pending.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    saved = save_pending(out, held)
    assert saved.parent == tmp_path / "tmp" and folder_tag(out) in saved.name
    assert find_pending(out) == [saved]
    assert find_pending(tmp_path / "other") == []

    # a merge killed half-way: two of the rows are already in captions_all.csv, the error row too
    append_bytes(out / "captions_all.csv", records_bytes([cap(0), cap(3)]), header_bytes(CAPTION_COLUMNS))
    append_bytes(out / "errors.csv", records_bytes(err), header_bytes(ERROR_COLUMNS))
    notes = merge_pending(out)
    assert len(notes) == 1 and "3 into captions_all.csv" in notes[0] and "3 already there" in notes[0]
    assert not saved.exists()
    ids = [r["image_id"] for r in rows(out / "captions_all.csv")]
    assert sorted(ids) == [f"img{i}.jpg" for i in range(5)]
    assert len(rows(out / "errors.csv")) == 1
    assert merge_pending(out) == []  # nothing left: nothing doubled


def test_a_file_that_is_not_a_pending_file_is_moved_aside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    bad = out / "pending-20250101-000000-1.jsonl"
    bad.write_text('{"file": "../../etc/passwd", "header": [], "records": []}\n', encoding="utf-8")
    notes = merge_pending(out)
    assert len(notes) == 1 and "moved aside" in notes[0]
    assert not bad.exists() and (out / (bad.name + ".rejected")).exists()


# --- through the CLI ---------------------------------------------------------------------------------

def test_captions_all_unwritable_for_a_while_holds_then_writes_everything(
    monkeypatch, cli, server, api_env, prompt_file, tmp_path
):
    root = make_big_market(tmp_path / "big", n_ids=30, per_id=2)
    index = prepare_index(cli, root, tmp_path / "index.json")
    n = n_images(index)
    fault = Fault(monkeypatch, "captions_all.csv", eacces)
    seen: dict[str, int] = {}

    def clear_when_requests_stop() -> None:
        """Excel closes once new requests have stopped (the gate held them) for a moment."""
        last, still, deadline = -1, time.monotonic(), time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.05)
            r = server.stats.requests
            if r != last or r == 0:
                last, still = r, time.monotonic()
            elif time.monotonic() - still > 1.0:
                break
        seen["requests"] = server.stats.requests
        fault.on = False

    threading.Thread(target=clear_when_requests_stop, daemon=True).start()
    out = tmp_path / "out"
    res = cli(*run_args(index, out, prompt_file, server, "--concurrency", 4, "--batch-size", 40,
                        "--hold-retry", 0.1, "--hold-final", 20))
    assert res.code == 0, res.err
    assert fault.hits >= 2
    warnings = [ln for ln in res.err.splitlines() if "cannot be written" in ln]
    assert warnings == ["captions_all.csv cannot be written: Permission denied (is it open in Excel?); "
                        "holding 1 answer, retrying"]
    assert "captions_all.csv written again;" in res.err
    # the gate held new requests once more than 64 answers were held: 4 workers in flight, plus the answers
    # already queued for the writer when it noticed (a busy machine makes that queue a little longer)
    assert 64 < seen["requests"] <= 64 + 4 * 4 < n
    by_id = check_captions_belong(index, out)
    assert len(by_id) == n and server.stats.requests == n
    parts_hold_each_once(out, set(by_id))
    assert not any(s in res.err + res.out for s in NO_CRASH)


def test_captions_all_unwritable_all_run_goes_to_a_pending_file_merged_next_start(
    monkeypatch, cli, server, api_env, market, prompt_file, tmp_path
):
    index = prepare_index(cli, market, tmp_path / "index.json")
    n = n_images(index)
    out = tmp_path / "out"
    fault = Fault(monkeypatch, "captions_all.csv", eacces)
    args = run_args(index, out, prompt_file, server, "--hold-retry", 0.05, "--hold-final", 0.3)
    res = cli(*args)
    assert not any(s in res.err + res.out for s in NO_CRASH), res.err
    saved = [ln for ln in res.err.splitlines() if "saved to" in ln]
    assert len(saved) == 1 and f"{n} answers could not be written to captions_all.csv" in saved[0]
    files = list(out.glob("pending-*.jsonl"))
    assert len(files) == 1 and str(files[0]) in saved[0]
    assert not (out / "captions_all.csv").exists() or rows(out / "captions_all.csv") == []
    assert server.stats.requests == n

    fault.on = False
    res2 = cli(*args)
    assert res2.code == 0, res2.err
    assert server.stats.requests == n  # zero requests: every held answer counted as done
    assert "merged held answers" in res2.err
    assert not list(out.glob("pending-*.jsonl"))
    by_id = check_captions_belong(index, out)
    assert len(by_id) == n
    parts_hold_each_once(out, set(by_id))


def test_a_part_that_cannot_be_written_does_not_hold_captions_all(
    monkeypatch, cli, server, api_env, market, prompt_file, tmp_path
):
    index = prepare_index(cli, market, tmp_path / "index.json")
    n = n_images(index)
    out = tmp_path / "out"
    fault = Fault(monkeypatch, "captions_part_0000.csv", eacces)
    res = cli(*run_args(index, out, prompt_file, server, "--hold-retry", 0.05, "--hold-final", 0.3))
    assert res.code == 0, res.err
    assert "captions_part_0000.csv cannot be written" in res.err
    assert "rebuilt from captions_all.csv at the next start" in res.err
    assert not list(out.glob("pending-*.jsonl"))
    assert len(check_captions_belong(index, out)) == n  # captions_all.csv got every row as they came
    fault.on = False
    res2 = cli(*run_args(index, out, prompt_file, server))
    assert res2.code == 0 and server.stats.requests == n
    parts_hold_each_once(out, set(check_captions_belong(index, out)))


def test_preflight_refuses_a_captions_file_that_cannot_be_opened(
    monkeypatch, cli, server, api_env, market, prompt_file, tmp_path
):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "captions_all.csv").write_bytes(header_bytes(CAPTION_COLUMNS))
    real_open = appendfile.open_append

    def locked(path):
        if Path(path).name == "captions_all.csv":
            err = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            raise err
        return real_open(path)

    monkeypatch.setattr(appendfile, "open_append", locked)
    res = cli(*run_args(index, out, prompt_file, server))
    assert res.code == 2
    assert res.err.strip() == ("error: captions_all.csv cannot be opened for writing: "
                               "Permission denied (is it open in Excel?)")
    assert server.stats.requests == 0


def _mount_tmpfs(where: Path, size: str) -> None:
    why = tmpfs.mount_tmpfs(where, size)
    if why is not None:
        pytest.skip(why)


def test_a_real_full_disk_freed_mid_run_loses_and_doubles_nothing(cli, server, api_env, prompt_file, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    proc = None
    try:
        root = make_big_market(tmp_path / "big", n_ids=30, per_id=2)
        index = prepare_index(cli, root, tmp_path / "index.json")
        n = n_images(index)
        out = disk / "out"
        server.configure(latency=0.05)
        proc = spawn(*run_args(index, out, prompt_file, server, "--concurrency", 4, "--batch-size", 40,
                               "--hold-retry", 0.2), base_url=server.base_url)
        err: list[str] = []
        outs: list[str] = []
        readers = [threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
                   for s, into in ((proc.stderr, err), (proc.stdout, outs))]
        for t in readers:
            t.start()
        assert wait_for_rows(out / "captions_all.csv", 10) >= 10
        filler = disk / "filler"
        tmpfs.fill(filler)
        deadline = time.monotonic() + 15
        while not any("cannot be written" in ln for ln in err) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any("captions_all.csv cannot be written: no space left on the disk" in ln for ln in err), err
        time.sleep(0.3)
        filler.unlink()
        proc.wait(timeout=60)
        for t in readers:
            t.join(timeout=5)
        text = "".join(err)
        assert proc.returncode == 0, text
        assert "written again" in text and not any(s in text for s in NO_CRASH)
        by_id = check_captions_belong(index, out)
        assert len(by_id) == n and server.stats.requests == n  # none lost, none doubled, none paid twice
        parts_hold_each_once(out, set(by_id))
        assert not list(out.glob("pending-*.jsonl"))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        tmpfs.umount(disk)


def test_ctrl_c_while_the_disk_is_full_saves_held_answers_in_temp_and_next_run_merges_them(
    monkeypatch, cli, server, api_env, prompt_file, tmp_path
):
    import signal

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the child's system temp folder
    proc = None
    try:
        root = make_big_market(tmp_path / "big", n_ids=12, per_id=2)
        index = prepare_index(cli, root, tmp_path / "index.json")
        n = n_images(index)
        out = disk / "out"
        server.configure(latency=0.05)
        args = run_args(index, out, prompt_file, server, "--concurrency", 4, "--hold-retry", 0.2,
                        "--hold-final", 60)
        proc = spawn(*args, base_url=server.base_url)
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
        reader.start()
        assert wait_for_rows(out / "captions_all.csv", 5) >= 5
        filler = disk / "filler"
        tmpfs.fill(filler)
        deadline = time.monotonic() + 15
        while not any("cannot be written" in ln for ln in err) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a few more answers arrive and are held
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        proc.stdout.read()
        reader.join(timeout=5)
        text = "".join(err)
        assert proc.returncode == 130, text
        assert not any(s in text for s in NO_CRASH), text
        saved = [ln for ln in text.splitlines() if "saved to" in ln]
        assert len(saved) == 1 and str(temp) in saved[0], text
        assert len(list(temp.glob("reid-prompt-pending-*.jsonl"))) == 1
        filler.unlink()

        proc = spawn(*args, base_url=server.base_url)
        _, err2 = proc.communicate(timeout=60)
        assert proc.returncode == 0, err2
        assert "merged held answers" in err2
        assert not list(temp.glob("reid-prompt-pending-*.jsonl"))
        by_id = check_captions_belong(index, out)
        assert len(by_id) == n and server.stats.requests == n  # no answer paid for was lost or asked again
        parts_hold_each_once(out, set(by_id))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        tmpfs.umount(disk)


def test_errors_csv_held_by_another_program_keeps_its_rows_for_the_next_start(
    monkeypatch, cli, server, api_env, market, prompt_file, tmp_path
):
    from pipeline.testing import synth

    index = prepare_index(cli, market, tmp_path / "index.json")
    n = n_images(index)
    bad = json.loads(index.read_text(encoding="utf-8"))["images"][0]["image_id"]
    synth.make_corrupt(market / bad)  # one image error row

    def sharing_violation() -> OSError:
        err = PermissionError(errno.EACCES, "The process cannot access the file")
        err.winerror = 32  # Windows: Excel holds errors.csv open
        return err

    fault = Fault(monkeypatch, "errors.csv", sharing_violation)
    out = tmp_path / "out"
    args = run_args(index, out, prompt_file, server, "--hold-retry", 0.05, "--hold-final", 0.2)
    res = cli(*args)
    assert "errors.csv cannot be written: the file is in use by another program (is it open in Excel?)" in res.err
    assert len(check_captions_belong(index, out)) == n - 1  # captions went on being written
    assert len(list(out.glob("pending-*.jsonl"))) == 1
    fault.on = False
    res2 = cli(*args)
    assert "merged held answers" in res2.err and "1 into errors.csv" in res2.err
    errs = rows(out / "errors.csv")
    assert [r["image_id"] for r in errs].count(bad) == 2  # one per run: errors.csv is append-only
    assert len(errs) == len({tuple(r.items()) for r in errs})  # no row twice
    assert not any(s in res.err + res2.err for s in NO_CRASH)
