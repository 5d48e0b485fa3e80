"""`run --mode batch`, `cancel`, `collect` and `status`, end to end through the CLI and the real `openai`
SDK against the loopback server's Batch API (`pipeline.testing.batchserver`).

Kept fast: the server's lifecycle steps take `batch_step_s` (a few ms), polling is capped by
`--poll-max 0.2`, and the datasets are a dozen crops.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import prepare_index, rows
from test_run import run_args as online_args
from pipeline.batch.ledger import BatchLedger
from pipeline.providers.pricing import load_run_pricing, resolve_price
from pipeline.testing.loopback import LoopbackServer, expected_caption

STEP = 0.005


@pytest.fixture
def bserver():
    srv = LoopbackServer(batch_step_s=STEP).start()
    try:
        yield srv
    finally:
        srv.stop()


def run_args(index: Path, out: Path, prompt: Path, server, *extra: object) -> list[object]:
    """test_run's online command line, in batch mode, polling at most every 0.2 s."""
    return online_args(index, out, prompt, server, "--mode", "batch", "--poll-max", 0.2, *extra)


def image_root(index: Path) -> Path:
    return Path(json.loads(index.read_text(encoding="utf-8"))["root"])


def n_images(index: Path) -> int:
    return len(json.loads(index.read_text(encoding="utf-8"))["images"])


def check_rows(index: Path, out: Path) -> list[dict[str, str]]:
    """Every caption row is its own image's caption, and no (image, prompt, slot) appears twice."""
    root = image_root(index)
    table = rows(out / "captions_all.csv")
    keys = Counter((r["image_id"], r["prompt_name"], r["caption_index"]) for r in table)
    assert all(c == 1 for c in keys.values()), [k for k, c in keys.items() if c > 1]
    for r in table:
        assert r["caption"] == expected_caption((root / r["image_id"]).read_bytes(), int(r["caption_index"])), r
    return table


def ledger_of(out: Path) -> BatchLedger:
    return BatchLedger.load(out)


@pytest.fixture
def index(cli, market, tmp_path):
    return prepare_index(cli, market, tmp_path / "runs" / "index.json")


def test_full_batch_run_every_row_its_own_image_at_batch_price(cli, bserver, api_env, index, prompt_file, tmp_path):
    out = tmp_path / "out"
    res = cli(*run_args(index, out, prompt_file, bserver, "--batch-max-requests", 3))
    assert res.code == 0, res.err
    table = check_rows(index, out)
    assert len(table) == n_images(index)
    # shards split by lines: at most 3 lines each, every one collected, its files deleted on the provider
    ledger = ledger_of(out)
    assert len(ledger.shards) == -(-n_images(index) // 3)
    assert all(s.lines <= 3 and s.state == "collected" for s in ledger.shards)
    stats = bserver.stats.snapshot()
    assert sum(stats["batches_created"].values()) == len(ledger.shards)
    assert all(n == 1 for n in stats["batches_created"].values())
    assert not list((out / "batches").glob("*.jsonl"))  # local input/output files removed once collected
    # cost at the batch price: half of gpt-4o-mini's online price
    price = resolve_price(load_run_pricing(None), "gpt-4o-mini", None, None, None).batch()
    for r in table:
        expect = (int(r["prompt_tokens"]) * price.input + int(r["completion_tokens"]) * price.output) / 1e6
        assert float(r["cost_usd"]) == pytest.approx(expect, rel=1e-6, abs=1e-9)
    assert price.input == pytest.approx(0.075)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["mode"] == "batch" and manifest["runs"][-1]["mode"] == "batch"
    assert manifest["state"] == "finished"
    # the same command again: nothing left, no batch created
    again = cli(*run_args(index, out, prompt_file, bserver, "--batch-max-requests", 3))
    assert again.code == 0, again.err
    assert sum(bserver.stats.snapshot()["batches_created"].values()) == len(ledger.shards)
    assert len(rows(out / "captions_all.csv")) == n_images(index)


def test_line_failures_and_expiry_are_resubmitted_as_new_rounds(cli, api_env, index, prompt_file, tmp_path):
    with LoopbackServer(batch_step_s=STEP, batch_line_fail_p=0.3, batch_expire_after=2) as srv:
        out = tmp_path / "out"
        res = cli(*run_args(index, out, prompt_file, srv, "--batch-max-requests", 3))
        assert res.code == 0, res.err
        table = check_rows(index, out)
        assert len(table) == n_images(index)
        ledger = ledger_of(out)
        assert max(s.round for s in ledger.shards) >= 2  # failed and expired lines went into later rounds
        assert all(s.state == "collected" for s in ledger.shards)
        lines = srv.stats.snapshot()["batch_lines"]
        assert lines.get("500", 0) > 0 and lines.get("expired", 0) > 0
        # a caption answered in round r says so in its attempts column
        assert {int(r["attempts"]) for r in table} >= {1, 2}
        assert not (out / "errors.csv").exists() or not [r for r in rows(out / "errors.csv")
                                                          if not r["reason"].endswith("_retried")]


def test_out_of_rounds_goes_to_errors_csv(cli, api_env, index, prompt_file, tmp_path):
    with LoopbackServer(batch_step_s=STEP, batch_line_fail_p=1.0) as srv:
        out = tmp_path / "out"
        res = cli(*run_args(index, out, prompt_file, srv, "--max-attempts", 2))
        assert res.code == 1, res.err
        errors = rows(out / "errors.csv")
        assert len(errors) == n_images(index)
        assert {r["reason"] for r in errors} == {"server_error"} and {r["attempts"] for r in errors} == {"2"}
        assert max(s.round for s in ledger_of(out).shards) == 2


def test_a_refusal_after_a_5xx_round_still_gets_its_one_more_try(cli, api_env, index, prompt_file, tmp_path):
    """Online's rule per work item: a 500 in round 1, a refusal in round 2 (tried once more, billed as
    `refused_retried`), refused again in round 3: errors.csv says `refused`, after 3 rounds of 6."""
    with LoopbackServer(batch_step_s=STEP, fail_first_attempts=1, p_refusal=1.0) as srv:
        out = tmp_path / "out"
        res = cli(*run_args(index, out, prompt_file, srv, "--limit", 3))
        assert res.code == 1, res.err
        reasons = Counter((r["image_id"], r["reason"], r["attempts"]) for r in rows(out / "errors.csv"))
        assert set(Counter(reason for _, reason, _ in reasons).items()) == {("refused_retried", 3), ("refused", 3)}
        assert {(reason, attempts) for _, reason, attempts in reasons} == {("refused_retried", "2"), ("refused", "3")}
        assert max(s.round for s in ledger_of(out).shards) == 3


def test_enqueued_token_limit_waits_for_own_batches(cli, api_env, index, prompt_file, tmp_path):
    # a shard of 8 lines queues ~23,000 prompt tokens: two at once are over the limit
    with LoopbackServer(batch_step_s=0.05, batch_enqueued_token_limit=30_000) as srv:
        out = tmp_path / "out"
        res = cli(*run_args(index, out, prompt_file, srv, "--batch-max-requests", 8))
        assert res.code == 0, res.err
        assert len(check_rows(index, out)) == n_images(index)
        ledger = ledger_of(out)
        refused = [s for s in ledger.shards if any(e.get("code") == "token_limit_exceeded" for e in s.errors)]
        assert refused, "no shard was refused for the enqueued-token limit"
        assert len(ledger.shards) == 3 and all(s.state == "collected" for s in ledger.shards)
        assert "enqueued-token limit" in res.err


def test_a_shard_over_the_token_limit_alone_is_split(cli, api_env, index, prompt_file, tmp_path):
    with LoopbackServer(batch_step_s=STEP, batch_enqueued_token_limit=15_000) as srv:
        out = tmp_path / "out"
        res = cli(*run_args(index, out, prompt_file, srv, "--batch-max-requests", 8))
        assert res.code == 0, res.err
        assert len(check_rows(index, out)) == n_images(index)
        shards = ledger_of(out).shards
        assert len(shards) > 3 and max(s.lines for s in shards if s.batch_id and s.batch_status == "completed") <= 4
        assert "split into" in res.err


def test_no_wait_then_the_same_command_collects(cli, api_env, index, prompt_file, tmp_path):
    with LoopbackServer(batch_step_s=0.05) as srv:
        out = tmp_path / "out"
        first = cli(*run_args(index, out, prompt_file, srv, "--batch-max-requests", 5, "--no-wait"))
        assert first.code == 0, first.err
        printed = [line for line in first.out.splitlines() if line.startswith("batch ")]
        ledger = ledger_of(out)
        assert len(printed) == len(ledger.shards) and all(s.state == "submitted" for s in ledger.shards)
        assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["state"] == "submitted"
        summary = first.out.splitlines()[-1]
        assert f"{len(ledger.shards)} batch(es) in flight ({n_images(index)} requests): the same command waits " \
               "for and collects them (exit 0" in summary and "costs at the batch price" in summary
        said = " ".join(cli("status", "--out", out).out.split())
        assert f"{len(ledger.shards)} batch shard(s) not collected yet" in said
        assert all(s.batch_id in said for s in ledger.shards)  # whole ids, never cut at 80 columns
        status = cli("status", "--out", out, "--json")
        assert status.code == 0, status.err
        batches = json.loads(status.out)["batches"]
        assert [b["batch_id"] for b in batches] == [s.batch_id for s in ledger.shards]
        created = sum(srv.stats.snapshot()["batches_created"].values())
        second = cli(*run_args(index, out, prompt_file, srv, "--batch-max-requests", 5))
        assert second.code == 0, second.err
        assert sum(srv.stats.snapshot()["batches_created"].values()) == created  # nothing sent twice
        assert len(check_rows(index, out)) == n_images(index)
        table = cli("status", "--out", out)
        assert table.code == 0 and "collected" in table.out


def test_cancel_collects_partial_output_and_leaves_the_rest(cli, api_env, index, prompt_file, tmp_path):
    with LoopbackServer(batch_step_s=0.2) as srv:
        out = tmp_path / "out"
        first = cli(*run_args(index, out, prompt_file, srv, "--no-wait"))
        assert first.code == 0, first.err
        time.sleep(0.75)  # validating, then a line or two answered
        res = cli("cancel", "--out", out, "--poll-max", 0.2)
        assert res.code == 0, res.err
        assert "cancelled: batch_" in res.out
        ledger = ledger_of(out)
        assert all(s.state == "collected" and s.batch_status == "cancelled" for s in ledger.shards)
        done = check_rows(index, out) if (out / "captions_all.csv").exists() else []
        assert 0 < len(done) < n_images(index)
        assert not (out / "errors.csv").exists()  # cancelled lines are left undone, not failed
        srv.configure(batch_step_s=STEP)
        rest = cli(*run_args(index, out, prompt_file, srv))
        assert rest.code == 0, rest.err
        assert len(check_rows(index, out)) == n_images(index)


def answer_like_vllm_run_batch(srv: LoopbackServer, jsonl: Path, target: Path) -> int:
    """What `vllm run-batch -i JSONL -o TARGET` does: each line's body sent to the chat endpoint, each
    answer written as an OpenAI batch output line (in another order than the input)."""
    import urllib.request

    out_lines = []
    for k, raw in enumerate(jsonl.read_text(encoding="utf-8").splitlines()):
        line = json.loads(raw)
        req = urllib.request.Request(srv.base_url + "/chat/completions", data=json.dumps(line["body"]).encode(),
                                     headers={"Authorization": f"Bearer {srv.config.api_key}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            body = json.loads(resp.read())
            status = resp.status
        out_lines.append(json.dumps({"id": f"vllm-{k}", "custom_id": line["custom_id"],
                                     "response": {"status_code": status, "request_id": f"r{k}", "body": body},
                                     "error": None}, ensure_ascii=False))
    target.write_text("\n".join(reversed(out_lines)) + "\n", encoding="utf-8")
    return len(out_lines)


def test_batch_files_only_then_collect(cli, bserver, api_env, index, prompt_file, tmp_path, monkeypatch):
    out, files = tmp_path / "out", tmp_path / "for-vllm"
    monkeypatch.delenv("OPENAI_API_KEY")  # neither writing the files nor collecting needs a key
    res = cli(*run_args(index, out, prompt_file, bserver, "--batch-files-only", files, "--batch-max-requests", 8))
    assert res.code == 0, res.err
    shards = sorted(files.glob("s*.jsonl"))
    assert len(shards) == 3 and all(s.state == "local" for s in ledger_of(out).shards)
    first = tmp_path / "s1.out.jsonl"
    answered = answer_like_vllm_run_batch(bserver, shards[0], first)
    with first.open("a", encoding="utf-8") as fh:  # what does not belong is reported, never written
        fh.write("{not json\n")
        fh.write(json.dumps({"custom_id": "rp1/base/0/not-in-this-folder.jpg", "response": {"status_code": 200,
                                                                                           "body": {}}}) + "\n")
    got = cli("collect", "--out", out, first)
    assert got.code == 0, got.err
    assert f"collected {answered} caption(s)" in got.out
    assert "1 unknown id(s)" in got.out and "1 malformed line(s)" in got.out
    assert len(check_rows(index, out)) == answered
    states = [s.state for s in ledger_of(out).shards]
    assert states == ["collected", "local", "local"]
    # the same file again: every line is work already done, nothing is written twice
    again = cli("collect", "--out", out, first)
    assert again.code == 0, again.err
    assert "collected 0 caption(s)" in again.out and "already done" in again.out
    assert len(check_rows(index, out)) == answered
    rest = [tmp_path / f"s{k}.out.jsonl" for k in (2, 3)]
    for shard, target in zip(shards[1:], rest):
        answer_like_vllm_run_batch(bserver, shard, target)
    done = cli("collect", "--out", out, *rest)
    assert done.code == 0, done.err
    assert len(check_rows(index, out)) == n_images(index)
    assert all(s.state == "collected" for s in ledger_of(out).shards)
    # the Batch API was never used
    assert not bserver.stats.snapshot()["batch_calls"]


def test_online_and_batch_rows_in_one_folder(cli, bserver, api_env, index, prompt_file, tmp_path):
    out = tmp_path / "out"
    online = cli("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--base-url",
                 bserver.base_url, "--no-dashboard", "--limit", 5)
    assert online.code == 0, online.err
    batch = cli(*run_args(index, out, prompt_file, bserver, "--keep-batch-files"))
    assert batch.code == 0, batch.err
    assert "skipped 5" in batch.out
    assert not bserver.stats.snapshot()["batch_calls"].get("delete")  # --keep-batch-files
    assert list((out / "batches").glob("s*.jsonl"))
    table = check_rows(index, out)
    assert len(table) == n_images(index)
    lines = sum(s.lines for s in ledger_of(out).shards)
    assert lines == n_images(index) - 5  # the online rows were not asked again
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [r.get("mode", "online") for r in manifest["runs"]] == ["online", "batch"]
    status = json.loads(cli("status", "--out", out, "--json").out)
    assert status["captioned"] == n_images(index) and status["left"] == 0
    assert len(status["batches"]) == len(ledger_of(out).shards)


def test_max_cost_counts_submitted_estimates_as_committed(cli, bserver, api_env, index, prompt_file, tmp_path):
    out = tmp_path / "out"
    nothing = cli(*run_args(index, out, prompt_file, bserver, "--batch-max-requests", 3, "--max-cost", 0))
    assert nothing.code == 4, nothing.err  # not even one shard fits: nothing sent, shards kept for later
    assert not bserver.stats.snapshot()["batch_calls"].get("create")
    shards = ledger_of(out).shards
    assert shards and all(s.state == "planned" for s in shards)
    budget = shards[0].est_cost_usd + shards[1].est_cost_usd + 1e-9
    res = cli(*run_args(index, out, prompt_file, bserver, "--batch-max-requests", 3, "--max-cost", budget))
    assert res.code == 4, res.err
    assert "budget" in res.out
    # two batches fit beside each other; once collected, what they cost plus another's full estimate
    # fits only for the last, smaller shard: never was spent + committed over the budget
    created = {shard for _, shard in bserver.stats.snapshot()["batches_created"]}
    assert {"s000001", "s000002"} <= created and len(created) < len(shards)
    table = check_rows(index, out)
    by_id = {s.shard_id: s for s in shards}
    assert len(table) == sum(by_id[s].lines for s in created)
    spent = sum(float(r["cost_usd"]) for r in table)
    assert spent <= budget
    assert len(ledger_of(out).shards) == len(shards)  # the rest is still planned, not planned twice


def test_rejected_key_is_one_line_exit_3_and_never_printed(cli, bserver, index, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-1234567890")
    res = cli(*run_args(index, tmp_path / "out", prompt_file, bserver))
    assert res.code == 3
    lines = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.err
    assert "sk-wrong-key-1234567890" not in res.err + res.out
    # said before any image was read: no shard was planned, nothing was sent
    assert ledger_of(tmp_path / "out").shards == []


def test_a_server_without_the_batch_api_is_one_line_before_any_shard(cli, server, api_env, index, prompt_file,
                                                                      tmp_path):
    """A chat-only server (vLLM, Ollama): its 404 on /v1/batches is said at once, with what to do."""
    server.configure(batch_api=False)
    res = cli(*run_args(index, tmp_path / "out", prompt_file, server))
    assert res.code == 3
    lines = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "/v1/batches" in lines[0] and "Traceback" not in res.err
    assert not (tmp_path / "out" / "batches").exists() or ledger_of(tmp_path / "out").shards == []
    assert server.stats.requests == 0  # no chat request either


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to the own process")
def test_ctrl_c_while_waiting_exits_130_and_the_next_run_collects(cli, api_env, index, prompt_file, tmp_path):
    """A real SIGINT, sent to this process once every batch is submitted and the run is waiting."""
    import os
    import threading

    out = tmp_path / "out"
    sent = threading.Event()
    every = -(-n_images(index) // 8)  # shards of 8 lines: each is sent as soon as it is written

    def interrupt_when_submitted() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                shards = ledger_of(out).shards
            except Exception:  # noqa: BLE001 - being written
                shards = []
            if len(shards) == every and all(s.state == "submitted" for s in shards):
                sent.set()
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    with LoopbackServer(batch_step_s=0.3) as srv:
        args = run_args(index, out, prompt_file, srv, "--batch-max-requests", 8)
        watcher = threading.Thread(target=interrupt_when_submitted, daemon=True)
        watcher.start()
        res = cli(*args)
        watcher.join()
        assert sent.is_set()
        assert res.code == 130, res.err
        assert "Traceback" not in res.err
        ledger = ledger_of(out)
        assert all(s.state == "submitted" for s in ledger.shards)  # the batches stay on the provider
        assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["state"] == "interrupted"
        created = sum(srv.stats.snapshot()["batches_created"].values())
        srv.configure(batch_step_s=STEP)
        again = cli(*args)
        assert again.code == 0, again.err
        assert sum(srv.stats.snapshot()["batches_created"].values()) == created
        assert len(check_rows(index, out)) == n_images(index)


def test_failed_batch_is_reported_and_its_lines_replanned(cli, api_env, index, prompt_file, tmp_path):
    with LoopbackServer(batch_step_s=STEP, batch_max_lines=2) as srv:  # a 3-line file fails validation
        out = tmp_path / "out"
        res = cli(*run_args(index, out, prompt_file, srv, "--batch-max-requests", 3, "--max-attempts", 2))
        assert res.code == 1, res.err
        assert "failed: too_many_tasks" in res.err or "failed: " in res.err
        errors = rows(out / "errors.csv")
        assert errors and {r["reason"] for r in errors} == {"batch_failed"}
        assert {r["attempts"] for r in errors} == {"2"}
        captions = check_rows(index, out)
        assert len(captions) + len(errors) == n_images(index)  # the one-line shards went through


def test_lost_answers_of_upload_and_create_are_found_again(cli, bserver, api_env, index, prompt_file, tmp_path):
    """The ledger one call behind the provider (a kill between a call and its record): the next run finds
    the upload by its name and the batch by its metadata, and sends neither again."""
    out = tmp_path / "out"
    first = cli(*run_args(index, out, prompt_file, bserver, "--batch-max-requests", 8, "--no-wait"))
    assert first.code == 0, first.err
    ledger = ledger_of(out)
    a, b = ledger.shards[0], ledger.shards[1]
    ledger.update(a.shard_id, state="uploaded", batch_id=None, batch_status=None)  # create's answer lost
    ledger.update(b.shard_id, state="planned", input_file_id=None, batch_id=None, batch_status=None)  # both lost
    before = bserver.stats.snapshot()["batch_calls"]
    res = cli(*run_args(index, out, prompt_file, bserver, "--batch-max-requests", 8))
    assert res.code == 0, res.err
    after = bserver.stats.snapshot()
    assert after["batch_calls"].get("upload", 0) == before.get("upload", 0)
    assert after["batch_calls"].get("create", 0) == before.get("create", 0)
    assert all(n == 1 for n in after["batches_created"].values())
    assert len(check_rows(index, out)) == n_images(index)


def test_a_create_or_upload_whose_answer_is_lost_is_looked_for_not_repeated(cli, api_env, index, prompt_file,
                                                                               tmp_path):
    """The server makes the batch (and stores the file) but its answer comes after the client gave up
    (--timeout): the client lists before it calls again, so each shard has one upload and one batch."""
    with LoopbackServer(batch_step_s=STEP, batch_delay_create_s=0.6, batch_delay_upload_s=0.6) as srv:
        out = tmp_path / "out"
        res = cli(*run_args(index, out, prompt_file, srv, "--batch-max-requests", 8, "--timeout", 0.2))
        assert res.code == 0, res.err
        stats = srv.stats.snapshot()
        shards = ledger_of(out).shards
        assert sorted(stats["batches_created"].values()) == [1] * len(shards)
        assert stats["batch_calls"]["upload"] == len(shards) and stats["batch_calls"]["create"] == len(shards)
        assert len(check_rows(index, out)) == n_images(index)


def test_collecting_again_after_a_kill_writes_nothing_twice(cli, api_env, index, prompt_file, tmp_path):
    """Killed after a shard's rows were written but before it was recorded `collected`: the next run
    collects it again and writes no row, plans no retry and creates no batch a second time."""
    with LoopbackServer(batch_step_s=STEP, batch_line_fail_p=0.5) as srv:
        out = tmp_path / "out"
        args = run_args(index, out, prompt_file, srv, "--max-attempts", 2, "--keep-batch-files")
        first = cli(*args)
        assert first.code == 1, first.err
        captions, errors = rows(out / "captions_all.csv"), rows(out / "errors.csv")
        assert captions and errors
        ledger = ledger_of(out)
        assert [s.round for s in ledger.shards] == [1, 2]
        for s in ledger.shards:
            ledger.update(s.shard_id, state="ended")
        created = sum(srv.stats.snapshot()["batches_created"].values())
        again = cli(*args)
        assert again.code == 0, again.err
        assert rows(out / "captions_all.csv") == captions and rows(out / "errors.csv") == errors
        assert sum(srv.stats.snapshot()["batches_created"].values()) == created
        assert len(ledger_of(out).shards) == 2


def test_cancel_and_collect_bad_input_is_one_line_exit_2(cli, api_env, tmp_path):
    for args in (("cancel", "--out", tmp_path / "nowhere"), ("collect", "--out", tmp_path / "nowhere", tmp_path / "x"),
                 ("collect", "--out", tmp_path, tmp_path / "missing.jsonl")):
        res = cli(*args)
        assert res.code == 2, (args, res.err)
        assert res.err.startswith("error: ") and len(res.err.strip().splitlines()) == 1, res.err


def test_an_unwritable_captions_file_keeps_the_shard_for_the_next_run(cli, bserver, api_env, index, prompt_file,
                                                                        tmp_path, monkeypatch):
    """captions_all.csv cannot be written while a shard is collected (a full disk, injected at the file
    layer): the run says so and exits 1, the shard stays `ended` with its files, the answers go to the
    pending file; the next run merges them and collects the shard again, writing nothing twice."""
    import errno

    from pipeline.ledger import appendfile

    out = tmp_path / "out"
    args = run_args(index, out, prompt_file, bserver, "--batch-max-requests", 8)
    assert cli(*args, "--no-wait").code == 0
    real = appendfile.append_bytes

    def full_disk(path, data, header=b""):
        if Path(path).name == "captions_all.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, header)

    monkeypatch.setattr(appendfile, "append_bytes", full_disk)
    res = cli(*args)
    assert res.code == 1, res.err
    assert "captions_all.csv cannot be written" in res.err and "Traceback" not in res.err
    assert "collected" not in [s.state for s in ledger_of(out).shards]  # the first stopped the collection
    monkeypatch.setattr(appendfile, "append_bytes", real)
    created = sum(bserver.stats.snapshot()["batches_created"].values())
    again = cli(*args)
    assert again.code == 0, again.err
    assert len(check_rows(index, out)) == n_images(index)
    assert sum(bserver.stats.snapshot()["batches_created"].values()) == created


def test_each_shard_is_sent_as_soon_as_it_is_written(cli, bserver, api_env, index, prompt_file, tmp_path,
                                                     monkeypatch):
    """A million images take minutes to plan: the first batch is created before the second shard is
    written, not after the last one (the shards are written by the real planner, only watched here)."""
    import pipeline.batch.flow as flow_mod

    created_before: list[int] = []
    real = flow_mod.write_shards

    def watched(*args, **kwargs):
        for rec in real(*args, **kwargs):
            created_before.append(sum(bserver.stats.snapshot()["batches_created"].values()))
            yield rec

    monkeypatch.setattr(flow_mod, "write_shards", watched)
    res = cli(*run_args(index, tmp_path / "out", prompt_file, bserver, "--batch-max-requests", 3))
    assert res.code == 0, res.err
    shards = -(-n_images(index) // 3)
    assert created_before == list(range(shards))  # shard k is written once the k batches before it exist
    assert len(check_rows(index, tmp_path / "out")) == n_images(index)
