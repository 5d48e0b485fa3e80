"""The folder's batch ledger: records, states, covered work, atomic saves, damage reported in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.batch import ledger as ledger_mod
from pipeline.batch.ids import make_custom_id
from pipeline.batch.ledger import BatchLedger, ShardRecord
from pipeline.errors import ConfigError


def add_shard(led: BatchLedger, ids: list[str], state: str = "planned", **extra) -> ShardRecord:
    shard_id = led.next_shard_id()
    led.folder.mkdir(parents=True, exist_ok=True)
    ids_path = led.folder / f"{shard_id}.ids"
    ids_path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    jsonl = led.folder / f"{shard_id}.jsonl"
    jsonl.write_bytes(b"{}\n" * len(ids))
    return led.new_shard(jsonl=jsonl, ids=ids_path, sha256="0" * 64, lines=len(ids), bytes=3 * len(ids),
                         est_input_tokens=100 * len(ids), est_cost_usd=0.001 * len(ids), state=state, **extra)


def test_an_absent_ledger_is_empty_and_its_tag_is_kept_by_the_first_save(tmp_path):
    led = BatchLedger.load(tmp_path)
    assert led.shards == [] and len(led.folder_tag) == 32
    assert not led.path.exists()  # loading writes nothing
    add_shard(led, [make_custom_id("a.jpg", "base", (0,))])
    again = BatchLedger.load(tmp_path)
    assert again.folder_tag == led.folder_tag
    assert BatchLedger.load(tmp_path).folder_tag == led.folder_tag


def test_records_round_trip_with_relative_paths(tmp_path):
    led = BatchLedger.load(tmp_path)
    rec = add_shard(led, [make_custom_id("a.jpg", "base", (0, 1))])
    assert (rec.shard_id, rec.round, rec.state) == ("s000001", 1, "planned")
    assert rec.jsonl == "batches/s000001.jsonl" and rec.ids == "batches/s000001.ids"
    led.update("s000001", state="uploaded", input_file_id="file-abc")
    led.update("s000001", state="submitted", batch_id="batch_1", batch_status="validating",
               request_counts={"total": 1, "completed": 0, "failed": 0},
               errors=[{"code": "x", "message": "y", "line": 1}])
    loaded = BatchLedger.load(tmp_path).get("s000001")
    assert loaded == led.get("s000001")
    assert loaded.to_dict() == json.loads(led.path.read_text(encoding="utf-8"))["shards"][0]
    assert ShardRecord.from_dict(loaded.to_dict()) == loaded
    assert led.resolve(loaded.jsonl) == tmp_path / "batches" / "s000001.jsonl"


def test_shard_ids_are_never_reused(tmp_path):
    led = BatchLedger.load(tmp_path)
    for _ in range(3):
        add_shard(led, [make_custom_id(f"{len(led.shards)}.jpg", "base", (0,))])
    led.update("s000003", state="collected")
    assert BatchLedger.load(tmp_path).next_shard_id() == "s000004"
    with pytest.raises(ValueError):
        led.new_shard(shard_id="s000002", jsonl="x", ids="y", sha256="", lines=0, bytes=0, est_input_tokens=0,
                      est_cost_usd=0)


def test_outstanding_and_covered_work(tmp_path):
    led = BatchLedger.load(tmp_path)
    a = [make_custom_id("q/1.jpg", "base", (0, 1)), make_custom_id("q/2.jpg", "描述", (0,))]
    b = [make_custom_id("q/3.jpg", "base", (0,))]
    c = [make_custom_id("q/4.jpg", "base", (2,))]
    add_shard(led, a)
    add_shard(led, b, state="local")
    add_shard(led, c)
    led.update("s000003", state="collected")
    assert [s.shard_id for s in led.outstanding()] == ["s000001", "s000002"]
    assert led.covered_ids() == set(a + b)
    slots = led.covered_slots()
    assert ("q/1.jpg", "base", 0) in slots and ("q/1.jpg", "base", 1) in slots
    assert ("q/2.jpg", "描述", 0) in slots and ("q/3.jpg", "base", 0) in slots
    assert ("q/4.jpg", "base", 2) not in slots  # collected: its work is in the CSV files
    assert ("q/1.jpg", "base", 2) not in slots


def test_metadata_and_upload_name_name_the_folder_and_shard(tmp_path):
    led = BatchLedger.load(tmp_path)
    rec = add_shard(led, [make_custom_id("a.jpg", "base", (0,))])
    assert led.metadata(rec) == {"reid_prompt_folder": led.folder_tag, "reid_prompt_shard": "s000001"}
    assert led.upload_name(rec) == f"reid-prompt-{led.folder_tag}-s000001.jsonl"


@pytest.mark.parametrize("changes", [{"state": "flying"}, {"lines": -1}, {"nonsense": 1}, {"batch_id": 5}])
def test_a_bad_update_changes_nothing(tmp_path, changes):
    led = BatchLedger.load(tmp_path)
    add_shard(led, [make_custom_id("a.jpg", "base", (0,))])
    before = led.path.read_bytes()
    with pytest.raises(ValueError):
        led.update("s000001", **changes)
    assert led.path.read_bytes() == before
    assert led.get("s000001").to_dict() == BatchLedger.load(tmp_path).get("s000001").to_dict()


class Torn:
    """A file object that writes part of what it is given, then fails: a full disk mid-write."""

    def __init__(self, fh, after: int) -> None:
        self.fh, self.left = fh, after

    def write(self, data: bytes) -> int:
        self.fh.write(data[: self.left])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("fault", ["write", "fsync", "replace"])
def test_a_save_that_fails_midway_leaves_the_old_ledger_whole(tmp_path, monkeypatch, fault):
    led = BatchLedger.load(tmp_path)
    add_shard(led, [make_custom_id("a.jpg", "base", (0,))])
    before = led.path.read_bytes()
    real_fdopen, real_fsync, real_replace = os.fdopen, os.fsync, os.replace
    if fault == "write":
        monkeypatch.setattr(ledger_mod.os, "fdopen", lambda fd, mode: Torn(real_fdopen(fd, mode), 50))
    elif fault == "fsync":
        def fsync(fd):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(ledger_mod.os, "fsync", fsync)
    else:
        def replace(src, dst):
            raise PermissionError(13, "Access is denied")
        monkeypatch.setattr(ledger_mod.os, "replace", replace)
    with pytest.raises(OSError):
        led.update("s000001", state="uploaded", input_file_id="file-1")
    monkeypatch.setattr(ledger_mod.os, "fdopen", real_fdopen)
    monkeypatch.setattr(ledger_mod.os, "fsync", real_fsync)
    monkeypatch.setattr(ledger_mod.os, "replace", real_replace)
    assert led.path.read_bytes() == before  # the old ledger, whole
    assert BatchLedger.load(tmp_path).get("s000001").state == "planned"
    assert sorted(p.name for p in led.folder.iterdir()) == ["ledger.json", "s000001.ids", "s000001.jsonl"]
    led.update("s000001", state="uploaded", input_file_id="file-1")  # the next save works
    assert BatchLedger.load(tmp_path).get("s000001").input_file_id == "file-1"


def damaged(text: str):
    return lambda led: led.path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("damage", [
    lambda led: led.path.write_bytes(led.path.read_bytes()[:40]),  # torn
    lambda led: led.path.write_bytes(b"\xff\xfe garbage"),
    damaged("[]"),
    damaged('{"version": 2, "folder_tag": "0123456789abcdef0123456789abcdef", "shards": []}'),
    damaged('{"version": 1, "folder_tag": "short", "shards": []}'),
    damaged('{"version": 1, "folder_tag": "0123456789abcdef0123456789abcdef", "shards": {}}'),
    lambda led: led.path.write_text(led.path.read_text().replace('"planned"', '"flying"')),
    lambda led: led.path.write_text(led.path.read_text().replace('"lines": 1', '"lines": "1"')),
    lambda led: led.path.write_text(led.path.read_text().replace('"sha256"', '"sha"')),
])
def test_a_damaged_ledger_is_one_line_naming_the_file(tmp_path, damage):
    led = BatchLedger.load(tmp_path)
    add_shard(led, [make_custom_id("a.jpg", "base", (0,))])
    damage(led)
    with pytest.raises(ConfigError) as exc:
        BatchLedger.load(tmp_path)
    message = str(exc.value)
    assert str(led.path) in message and "damaged" in message and "\n" not in message
    assert exc.value.exit_code == 2


def test_duplicate_shard_ids_are_damage(tmp_path):
    led = BatchLedger.load(tmp_path)
    add_shard(led, [make_custom_id("a.jpg", "base", (0,))])
    data = json.loads(led.path.read_text())
    data["shards"].append(data["shards"][0])
    led.path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="twice"):
        BatchLedger.load(tmp_path)


def test_a_missing_ids_file_or_a_foreign_id_is_one_line(tmp_path):
    led = BatchLedger.load(tmp_path)
    add_shard(led, ["not-ours"])
    with pytest.raises(ConfigError, match="not reid-prompt's"):
        led.covered_slots()
    (led.folder / "s000001.ids").unlink()
    with pytest.raises(ConfigError, match="missing"):
        led.covered_ids()


def test_the_cli_refuses_a_damaged_ledger_with_exit_2(tmp_path, cli):
    root = Path(__file__).resolve().parents[1] / "samples" / "Market-1501-sample"
    index = tmp_path / "index.json"
    assert cli("prepare", "--root", root, "--out", index).code == 0
    out = tmp_path / "out"
    (out / "batches").mkdir(parents=True)
    (out / "batches" / "ledger.json").write_text("{not json", encoding="utf-8")
    res = cli("run", "--index", index, "--out", out, "--mode", "batch", "--dry-run")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert lines[-1].startswith("error: the batch ledger ") and "Traceback" not in res.err


def test_status_table_of_batches_fits_80_columns_with_whole_ids():
    """`status` on a plain 80-column terminal: OpenAI's 30-character batch ids and the counts are whole;
    only the state may wrap; a re-submitted shard shows its round (`r2`)."""
    from rich.console import Console

    from pipeline.review.status import render_batches

    rows_ = [{"shard": f"s{k:06d}", "batch_id": f"batch_{k:024x}", "state": state, "batch_status": status,
              "round": rnd, "lines": 50_000, "done": 49_999, "failed": 1, "age_s": 86_000.0}
             for k, (state, status, rnd) in enumerate([("submitted", "in_progress", 1), ("collected", "expired", 1),
                                                       ("waiting", None, 2), ("planned", None, 1)], 1)]
    console = Console(width=80, record=True, color_system=None)
    console.print(render_batches(rows_))
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    for r in rows_:
        assert r["batch_id"] in text
    assert "in_progress" in text and "s000003 r2" in text and "50,000" in text and "23.9h" in text
    assert "…" not in text
