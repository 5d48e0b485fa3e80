"""kill -9 of `run --mode batch` at each dangerous moment, then the same command: no second batch, nothing
missing, nothing doubled, every caption its own image's.

The loopback server does the work and holds its answer (`batch_delay_*_s`), so the client is killed at a
known point: the file is stored but the client never heard its id (upload), the batch exists but the client
never heard of it (create), a batch is in flight (polling), the output is being downloaded (content).
POSIX only (SIGKILL).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import prepare_index, rows, spawn
from pipeline.testing.loopback import expected_caption

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

MAX_LINES = 10  # the small market set gives 22 lines: three shards


def run_cmd(index: Path, out: Path, prompt: Path) -> list[object]:
    return ["run", "--index", index, "--out", out, "--prompt-file", prompt, "--no-dashboard", "--mode", "batch",
            "--batch-max-requests", MAX_LINES, "--poll-max", 0.2]


def wait_until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def calls(server) -> Counter:
    return server.stats.snapshot()["batch_calls"]


# (knobs while the first run is killed, the call the server must have received, extra condition)
KILL_POINTS = {
    "after_upload": ({"batch_delay_upload_s": 60.0}, "upload"),
    "after_create": ({"batch_delay_create_s": 60.0}, "create"),
    "while_polling": ({"batch_step_s": 0.3}, "retrieve"),
    "while_downloading": ({"batch_delay_content_s": 60.0}, "content"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill9_then_same_command_collects_everything_once(cli, server, market, prompt_file, tmp_path, point):
    knobs, call = KILL_POINTS[point]
    index = prepare_index(cli, market, tmp_path / "index.json")
    idx = json.loads(index.read_text(encoding="utf-8"))
    n_images = len(idx["images"])
    out = tmp_path / "out"
    server.configure(**knobs)

    first = spawn(*run_cmd(index, out, prompt_file), base_url=server.base_url)
    try:
        wait_until(lambda: calls(server)[call] >= 1 or first.poll() is not None, f"the first {call}")
        assert first.poll() is None, first.communicate()[1]
        if point == "while_polling":  # killed with batches in flight, not after they ended
            assert any(b["status"] not in ("completed", "failed", "expired", "cancelled")
                       for b in server.batches.batches_for())
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
        first.stdout.close(), first.stderr.close()

    server.configure(batch_delay_upload_s=0.0, batch_delay_create_s=0.0, batch_delay_content_s=0.0,
                     batch_step_s=0.0)
    second = spawn(*run_cmd(index, out, prompt_file), base_url=server.base_url)
    stdout, stderr = second.communicate(timeout=90)
    assert second.returncode == 0, stderr + stdout

    # every image once, with its own caption; nothing failed
    root = Path(idx["root"])
    table = rows(out / "captions_all.csv")
    ids = Counter(r["image_id"] for r in table)
    assert len(ids) == n_images and max(ids.values()) == 1
    for r in table:
        assert r["caption"] == expected_caption((root / r["image_id"]).read_bytes()), r["image_id"]
    errors = out / "errors.csv"
    assert not errors.exists() or rows(errors) == []

    # one upload and one batch per shard, never a second; everything collected and cleaned up
    ledger = json.loads((out / "batches" / "ledger.json").read_text(encoding="utf-8"))
    shards = ledger["shards"]
    assert len(shards) == 3 and {s["state"] for s in shards} == {"collected"}
    created = server.stats.snapshot()["batches_created"]
    assert created == Counter({(ledger["folder_tag"], s["shard_id"]): 1 for s in shards})
    assert calls(server)["upload"] == len(shards)
    assert server.batches.files == {}  # inputs and outputs deleted on the provider
    assert not list((out / "batches").glob("*.jsonl"))
