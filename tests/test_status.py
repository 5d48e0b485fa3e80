"""`status`: how far an output folder got, from its files alone, without changing them."""

from __future__ import annotations

import inspect
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from rich.console import Console

import pipeline.review.status as status_mod
from pipeline.errors import InputError
from pipeline.ledger.outputs import (
    ATTRIBUTE_META_COLUMNS,
    ATTRIBUTES,
    CAPTION_COLUMNS,
    CAPTIONS_ALL,
    ERROR_COLUMNS,
    ERRORS,
    MANIFEST,
    caption_record,
    error_record,
    to_csv_text,
    write_csv_atomic,
)
from pipeline.records import CaptionRow, ErrorRow
from pipeline.review.status import StatusReport, collect_status, parse_time, pid_alive, render_status

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


def make_index(tmp: Path, n: int) -> Path:
    """A tiny JSON index of n images (the files need not exist: status only counts them)."""
    root = tmp / "images"
    root.mkdir(exist_ok=True)
    images = [
        {"image_id": f"train/{i:04d}_c1s1_000001_01.jpg", "path": f"train/{i:04d}_c1s1_000001_01.jpg",
         "pid": i, "camid": 1, "split": "train"}
        for i in range(n)
    ]
    path = tmp / "index.json"
    path.write_text(json.dumps({"root": str(root), "dataset": "folder", "images": images}), encoding="utf-8")
    return path


def image_id(i: int) -> str:
    return f"train/{i:04d}_c1s1_000001_01.jpg"


def caption(i: int, prompt: str = "base", k: int = 0, cost: float = 0.001, text: str = "a man in a red coat") -> CaptionRow:
    return CaptionRow(image_id(i), "Describe the person.", text, iso(NOW), "gpt-4o-mini", 3000, 60, cost,
                      prompt, k, 1, 1.5)


def error(i: int, reason: str, prompt: str = "base", k: int = 0) -> ErrorRow:
    return ErrorRow(image_id(i), reason, f"{reason} after 6 attempts", 6, iso(NOW), prompt, k)


def write_manifest(out: Path, *, state: str, index: Path | str, images: int, total: int,
                   prompts: tuple[str, ...] = ("base",), cpi: int = 1, pid: int = 999_999,
                   updated: datetime = NOW, stop_reason: str | None = None, **extra: object) -> None:
    data = {
        "tool": "reid-prompt",
        "version": "0.1.0",
        "state": state,
        "started_at": iso(updated - timedelta(hours=1)),
        "updated_at": iso(updated),
        "ended_at": None if state == "running" else iso(updated),
        "pid": pid,
        "index": str(index),
        "index_images": images,
        "work_items_total": total,
        "out": str(out),
        "prompts": [{"name": p, "path": f"prompts/{p}.txt", "sha256": "0" * 64} for p in prompts],
        "backend": "openai",
        "model": "gpt-4o-mini",
        "base_url": "https://user:sk-secret-in-url@example.invalid/v1",
        "detail": "low",
        "max_tokens": 300,
        "captions_per_image": cpi,
        "batch_size": 1000,
        "concurrency": 16,
        "rpm": None,
        "tpm": None,
        "max_cost": None,
        "counts": {"captioned_this_run": 0, "skipped_done": 0, "failed_this_run": 0, "failed_by_reason": {},
                   "requests": 0, "retries": 0, "rate_limited": 0},
        "tokens": {"input": 0, "output": 0},
        "cost_usd_this_run": 0.0,
        "cost_usd_total": 0.0,
        "stop_reason": stop_reason,
        "runs": [{"started_at": iso(updated), "ended_at": iso(updated), "state": state, "captioned": 1,
                  "failed": 0, "cost_usd": 0.0}],
    }
    data.update(extra)
    (out / MANIFEST).write_text(json.dumps(data, indent=2), encoding="utf-8")


def write_outputs(out: Path, captions: list[CaptionRow], errors: list[ErrorRow]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / CAPTIONS_ALL, CAPTION_COLUMNS, [caption_record(r) for r in captions])
    write_csv_atomic(out / ERRORS, ERROR_COLUMNS, [error_record(r) for r in errors])


def draw(report: StatusReport) -> str:
    console = Console(record=True, width=160, force_terminal=True, file=io.StringIO())
    render_status(report, console)
    return console.export_text()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- folders in each state -------------------------------------------------------------------------------

def test_finished_folder(tmp_path: Path) -> None:
    index = make_index(tmp_path, 4)
    out = tmp_path / "out"
    write_outputs(out, [caption(0, cost=0.25), caption(1, cost=0.25), caption(2, cost=0.5)], [error(3, "timeout")])
    write_manifest(out, state="finished", index=index, images=4, total=4)

    report = collect_status(out, now=NOW + timedelta(minutes=5))
    assert report.state == "finished" and report.finished
    assert (report.total, report.total_source, report.images_total) == (4, "index", 4)
    assert report.captioned == 3 and report.images_captioned == 3
    assert report.failed_by_reason == {"timeout": 1}
    assert report.left == 0
    assert report.cost_usd == pytest.approx(1.0)
    assert report.updated_at == NOW
    assert report.last_seen_s == pytest.approx(300)
    assert report.torn_bytes == 0 and report.warnings == []

    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["state"] == "finished" and d["finished"] is True
    assert d["left"] == 0 and d["failed_by_reason"] == {"timeout": 1}
    assert d["updated_at"] == "2025-03-01T12:00:00+00:00"
    assert "base_url" not in d and "sk-secret-in-url" not in json.dumps(d)

    text = draw(report)
    for expected in ["finished", "4 (4 images), from the index", "3 (75.0%), 3 images", "timeout 1", "$1.00",
                     "5 min ago", "gpt-4o-mini"]:
        assert expected in text, expected
    assert "sk-secret-in-url" not in text


def test_interrupted_folder_counts_distinct_keys_and_only_failures_not_captioned_since(tmp_path: Path) -> None:
    index = make_index(tmp_path, 10)
    out = tmp_path / "out"
    caps = [caption(0, "base", 0), caption(0, "base", 1), caption(0, "attr", 0), caption(1, "base", 0),
            caption(1, "base", 0), caption(2, "base", 0)]  # (1, base, 0) twice: one key
    errs = [error(5, "refused"), error(6, "timeout"), error(6, "timeout", k=1), error(2, "timeout")]  # 2 was captioned
    write_outputs(out, caps, errs)
    write_manifest(out, state="interrupted", index=index, images=10, total=40, prompts=("base", "attr"), cpi=2,
                   stop_reason="interrupted")

    report = collect_status(out, now=NOW)
    assert report.state == "interrupted" and not report.finished
    assert report.stop_reason == "interrupted"
    assert report.total == 40
    assert report.captioned == 5 and report.images_captioned == 3
    assert report.failed_by_reason == {"timeout": 2, "refused": 1}
    assert report.left == 40 - 5 - 3
    text = draw(report)
    assert "interrupted" in text and "timeout 2, refused 1" in text and "base, attr" in text


def test_crashed_folder_dead_pid_and_torn_last_row_is_read_not_repaired(tmp_path: Path) -> None:
    index = make_index(tmp_path, 5)
    out = tmp_path / "out"
    write_outputs(out, [caption(0), caption(1)], [])
    with open(out / CAPTIONS_ALL, "ab") as fh:  # a writer killed mid-row: no terminator, quote never closed
        fh.write(b'train/0002_c1s1_000001_01.jpg,Describe.,"a woman in a')
    before = (out / CAPTIONS_ALL).read_bytes()
    write_manifest(out, state="running", index=index, images=5, total=5, pid=dead_pid(), updated=NOW)

    report = collect_status(out, now=NOW + timedelta(seconds=30))
    assert report.state == "crashed"
    assert report.state_detail.startswith("crashed (last seen ")
    assert "30s ago" in report.state_detail
    assert report.captioned == 2 and report.left == 3
    assert report.torn_bytes > 0
    assert (out / CAPTIONS_ALL).read_bytes() == before  # status never repairs
    assert not list(out.glob("*.tmp"))
    text = draw(report)
    assert "crashed" in text and "last row incomplete" in text


def test_running_with_a_stale_heartbeat_is_crashed_even_if_the_pid_exists(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [caption(0)], [])
    write_manifest(out, state="running", index=make_index(tmp_path, 3), images=3, total=3, pid=os.getpid(),
                   updated=NOW - timedelta(minutes=10))
    report = collect_status(out, now=NOW)
    assert report.state == "crashed" and "10 min ago" in report.state_detail


def test_running_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [caption(0), caption(1)], [error(2, "bad_request")])
    now = datetime.now(timezone.utc)
    write_manifest(out, state="running", index=make_index(tmp_path, 6), images=6, total=6, pid=os.getpid(),
                   updated=now - timedelta(seconds=5))
    report = collect_status(out)  # the real clock and the real pid check
    assert report.state == "running"
    assert f"pid {os.getpid()}" in report.state_detail
    assert report.captioned == 2 and report.failed == 1 and report.left == 3
    assert report.to_dict()["finished"] is False
    assert "running" in draw(report)


def test_running_on_another_host_is_judged_by_its_heartbeat_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [], [])
    write_manifest(out, state="running", index=make_index(tmp_path, 2), images=2, total=2, pid=dead_pid(),
                   updated=NOW - timedelta(seconds=20), host="some-other-machine-name")
    report = collect_status(out, now=NOW)
    assert report.state == "running" and "some-other-machine-name" in report.state_detail


# --- totals, missing pieces --------------------------------------------------------------------------------

def test_missing_index_falls_back_to_the_manifest_totals(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [caption(0)], [])
    write_manifest(out, state="budget", index=tmp_path / "gone.json", images=50, total=100, stop_reason="budget")
    report = collect_status(out, now=NOW)
    assert report.state == "budget"
    assert (report.total, report.total_source, report.images_total) == (100, "manifest", 50)
    assert report.left == 99
    assert any("gone.json" in w for w in report.warnings)
    assert "warning" in draw(report)


def test_index_that_grew_since_the_run_scales_the_total(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [], [])
    write_manifest(out, state="finished", index=make_index(tmp_path, 8), images=4, total=12, cpi=3)
    assert collect_status(out, now=NOW).total == 24  # 3 items per image, 8 images now


def test_structured_answers_in_attributes_csv_count_as_done(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [caption(0)], [])
    header = ATTRIBUTE_META_COLUMNS + ["gender"]
    rows = [[image_id(1), "attrs", iso(NOW), "gpt-4o-mini", "3000", "40", "0.50000000", "male"]]
    write_csv_atomic(out / ATTRIBUTES, header, rows)
    write_manifest(out, state="finished", index=make_index(tmp_path, 2), images=2, total=4, prompts=("base", "attrs"))
    report = collect_status(out, now=NOW)
    assert report.captioned == 2 and report.images_captioned == 2 and report.left == 2
    assert report.cost_usd == pytest.approx(0.501)


def test_csvs_without_a_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [caption(0)], [])
    report = collect_status(out, now=NOW)
    assert report.state == "unknown" and report.total is None and report.left is None
    assert report.captioned == 1
    text = draw(report)
    assert "unknown" in text


def test_unreadable_manifest_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [caption(0)], [])
    (out / MANIFEST).write_text("{not json", encoding="utf-8")
    report = collect_status(out, now=NOW)
    assert report.state == "unknown" and any(MANIFEST in w for w in report.warnings)


def test_missing_or_empty_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        collect_status(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no reid-prompt run"):
        collect_status(tmp_path / "empty")


def test_a_torn_errors_csv_is_tolerated(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_outputs(out, [], [error(0, "timeout")])
    with open(out / ERRORS, "ab") as fh:
        fh.write(to_csv_text([error_record(error(1, "refused"))]).encode()[:-2])  # no \r\n
    report = collect_status(out, now=NOW)
    assert report.failed_by_reason == {"timeout": 1}


# --- helpers -----------------------------------------------------------------------------------------------

def test_parse_time_accepts_z_and_naive_as_utc() -> None:
    assert parse_time("2025-03-01T12:00:00Z") == NOW
    assert parse_time("2025-03-01T12:00:00") == NOW
    assert parse_time("2025-03-01T13:00:00+01:00") == NOW
    assert parse_time("yesterday") is None and parse_time(None) is None


def test_pid_alive() -> None:
    assert pid_alive(os.getpid()) is True
    assert pid_alive(dead_pid()) is False
    assert pid_alive(0) is None


def test_status_never_reads_the_config() -> None:
    source = inspect.getsource(status_mod)
    assert "api_key" not in source and "pipeline.config" not in source
