"""Adaptive concurrency for servers without rate-limit headers: the decision tables (pure), the gate, and one
run against the loopback server's single-stream backend (a timeout below the queue's latency)."""

from __future__ import annotations

import json

import anyio
import pytest

from conftest import make_big_market, prepare_index, rows
from pipeline.providers.base import ErrorKind
from pipeline.run.adaptive import (
    AdaptiveLimit,
    AdaptivePolicy,
    LimitState,
    Outcome,
    Sample,
    classify_failure,
    initial_state,
    next_state,
    queue_estimate,
)

P = AdaptivePolicy(ceiling=16, initial=4, alpha=2.0, beta=4.0, jitter_s=0.0)


def ok(latency: float, in_flight: int = 16, sent: float = 10.0) -> Sample:
    return Sample(Outcome.OK, latency, sent, sent + latency, in_flight)


def state(limit: float, baseline: float | None = 1.0, last_decrease: float = -1e9) -> LimitState:
    return LimitState(limit=limit, baseline_s=baseline, last_decrease=last_decrease, max_limit=limit)


def test_queue_estimate_is_vegas():
    assert queue_estimate(8, 1.0, 1.0) == 0  # latency holds: nothing queued
    assert queue_estimate(8, 2.0, 1.0) == 4  # twice the latency: half of what is in flight waits
    assert queue_estimate(8, 0.5, 1.0) == 0  # never negative
    assert queue_estimate(8, 1.04, 1.0, jitter_s=0.05) == 0  # below the jitter: noise, not queue


@pytest.mark.parametrize(
    "before, sample, after",
    [
        (state(4), ok(1.0), 5),  # latency holds: grow by 1
        (state(4), ok(1.0, in_flight=1), 4),  # the pool does not use the limit: a larger one proves nothing
        (state(16), ok(1.0), 16),  # never above the ceiling
        (state(8), ok(1.5), 8),  # queue 2.7 between alpha and beta: hold
        (state(10), ok(2.0), 8),  # queue 5 > beta: shrink by the latency factor
        (state(8), Sample(Outcome.OVERLOAD, 3.0, 10.0, 13.0, 8), 4),  # timeout / 503: halve
        (state(1), Sample(Outcome.OVERLOAD, 3.0, 10.0, 13.0, 1), 1),
        (state(8), Sample(Outcome.OTHER, 0.1, 10.0, 10.1, 8), 8),  # a dropped connection says nothing
        # sent before the last decrease: that request could not know of it, no second decrease
        (state(8, last_decrease=11.0), Sample(Outcome.OVERLOAD, 3.0, 10.0, 13.0, 8), 8),
        (state(10, last_decrease=11.0), ok(2.0), 10),
    ],
)
def test_decision_table(before, sample, after):
    assert next_state(before, sample, P).limit == after


def test_a_burst_of_timeouts_halves_once():
    s = state(16)
    for i in range(16):  # 16 requests sent at t=10 all time out at t=13
        s = next_state(s, Sample(Outcome.OVERLOAD, 3.0, 10.0, 13.0 + i * 0.01, 16), P)
    assert s.limit == 8
    s = next_state(s, Sample(Outcome.OVERLOAD, 3.0, 14.0, 17.0, 8), P)  # one sent after the halving
    assert s.limit == 4


def test_baseline_is_the_smallest_latency_and_max_is_kept():
    s = initial_state(P)
    assert s.limit == 4 and s.baseline_s is None
    s = next_state(s, ok(0.5), P)
    s = next_state(s, ok(0.8), P)
    assert s.baseline_s == 0.5 and s.max_limit == s.limit


def test_the_timeout_bounds_the_limit():
    p = AdaptivePolicy(ceiling=16, initial=4, timeout_s=1.0, jitter_s=0.0)
    # first answer alone took 0.2 s: at most headroom x timeout / latency = 2.5 requests at once
    assert next_state(initial_state(p), ok(0.2, in_flight=1), p).limit == 2.5
    # latency that one more request would push past half the timeout: no growth even with no queue
    assert next_state(state(4, baseline=0.45), ok(0.45), p).limit == 4
    assert next_state(state(4, baseline=0.1), ok(0.1), p).limit == 5
    # latency near the timeout: shrink before anything times out, never below 1
    assert next_state(state(4, baseline=0.8), ok(0.8), p).limit == pytest.approx(3.2)
    assert next_state(state(1, baseline=0.8), ok(0.8), p).limit == 1


@pytest.mark.parametrize(
    "kind, status, answered, expected",
    [
        (ErrorKind.TIMEOUT, None, False, (Outcome.OVERLOAD, True)),  # ours: the server still computes it
        (ErrorKind.TIMEOUT, 408, False, (Outcome.OVERLOAD, False)),
        (ErrorKind.SERVER, 503, False, (Outcome.OVERLOAD, False)),  # Ollama "server busy"
        (ErrorKind.RATE_LIMIT, 429, False, (Outcome.OVERLOAD, False)),
        (ErrorKind.SERVER, 500, False, (Outcome.OTHER, False)),
        (ErrorKind.CONNECTION, None, False, (Outcome.OTHER, False)),
        (ErrorKind.REFUSED, 200, True, (Outcome.OK, False)),  # answered: a latency sample
    ],
)
def test_classify_failure(kind, status, answered, expected):
    assert classify_failure(kind, status, answered) == expected


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.anyio
async def test_gate_admits_up_to_the_limit_and_holds_a_timed_out_slot():
    clock = FakeClock()
    gate = AdaptiveLimit(AdaptivePolicy(ceiling=16, initial=2), clock=clock)
    a = await gate.acquire()
    b = await gate.acquire()
    with anyio.move_on_after(0.05) as scope:
        await gate.acquire()
    assert scope.cancelled_caught  # the limit is 2
    clock.t += 3.0
    a.finish(Outcome.OVERLOAD, hold_s=3.0)  # timed out: limit 2 -> 1, the slot stays taken 3 s more
    assert gate.capacity == 1 and gate.held == 1 and gate.in_use == 1
    b.cancel()
    with anyio.move_on_after(0.05) as scope:
        await gate.acquire()
    assert scope.cancelled_caught  # the held slot fills the limit of 1
    clock.t += 3.01  # the server would have finished the abandoned request by now
    c = await gate.acquire()
    assert gate.held == 0 and gate.in_use == 1
    c.finish(Outcome.OK)


@pytest.mark.anyio
async def test_gate_off_admits_everyone_and_disable_wakes_waiters():
    off = AdaptiveLimit(AdaptivePolicy(ceiling=3, initial=1), enabled=False)
    slots = [await off.acquire() for _ in range(5)]
    for s in slots:
        s.finish(Outcome.OVERLOAD, hold_s=10)
    assert off.held == 0 and off.capacity == 3
    gate = AdaptiveLimit(AdaptivePolicy(ceiling=3, initial=1))
    await gate.acquire()
    got = []

    async def waiter():
        got.append(await gate.acquire())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.02)
        assert not got
        gate.disable()  # rate-limit headers learned: --concurrency alone
    assert len(got) == 1


def test_single_stream_server_with_a_short_timeout_does_not_cascade(cli, server, api_env, prompt_file, tmp_path):
    """--concurrency 16 against a server computing one request at a time (0.1 s each): at 16 in flight a
    request waits 1.6 s, past --timeout 1. Every image is captioned, with few requests wasted."""
    root = make_big_market(tmp_path / "data", n_ids=6, per_id=2)  # 6 x (2 + 1 + 2) = 30 images
    index = prepare_index(cli, root, tmp_path / "index.json")
    n = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    server.configure(latency=0.1, serve_slots=1)
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--base-url", server.base_url,
              "--no-dashboard", "--concurrency", 16, "--timeout", 1.0)
    assert res.code == 0, res.err
    assert len({r["image_id"] for r in rows(out / "captions_all.csv")}) == n
    assert server.stats.requests / n <= 1.5
    limit = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["concurrency_limit"]
    assert limit["adaptive"] is True and limit["ceiling"] == 16
    assert 1 <= limit["final"] <= limit["max"] < 16


def test_busy_503_halves_and_retries(cli, server, api_env, prompt_file, tmp_path):
    """Ollama's queue: beyond 2 waiting, 503 "server busy"; the run still captions everything."""
    root = make_big_market(tmp_path / "data", n_ids=4, per_id=1)  # 12 images
    index = prepare_index(cli, root, tmp_path / "index.json")
    n = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    server.configure(latency=0.05, serve_slots=1, max_pending=1)
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--base-url", server.base_url,
              "--no-dashboard", "--concurrency", 16)
    assert res.code == 0, res.err
    assert len({r["image_id"] for r in rows(out / "captions_all.csv")}) == n


def test_rate_limit_headers_keep_the_fixed_pool(cli, server, api_env, prompt_file, tmp_path):
    root = make_big_market(tmp_path / "data", n_ids=4, per_id=1)
    index = prepare_index(cli, root, tmp_path / "index.json")
    server.configure(rpm=100_000, latency=0.05)  # sends x-ratelimit-* headers
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--base-url", server.base_url,
              "--no-dashboard", "--concurrency", 8)
    assert res.code == 0, res.err
    limit = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["concurrency_limit"]
    assert limit == {"adaptive": False, "ceiling": 8, "final": None, "max": None}
    assert server.stats.max_in_flight == 8


def test_dashboard_and_progress_line_show_the_limit():
    from dataclasses import replace

    from pipeline.review.dashboard import flight_text, progress_line
    from pipeline.run.stats import RunStats

    snap = replace(RunStats(total=10, concurrency=16).snapshot(), in_flight=3)
    assert flight_text(snap) == "3 / 16" and "in flight" not in progress_line(snap)
    adaptive = replace(snap, concurrency_limit=5)
    assert flight_text(adaptive) == "3 / limit 5 of 16"
    assert "in flight 3 / limit 5 of 16" in progress_line(adaptive)
