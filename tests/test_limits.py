"""The rate limiter with small rates. Tolerant timing: count what finished within a window.

Pacing is GCRA with no burst (requests leave evenly spaced at safety x the limit); the exact schedule math
is tested with a fake clock in tests/test_pacing.py.
"""

from __future__ import annotations

import asyncio

import anyio
import time

import pytest

from pipeline.run.limits import DEFAULT_SAFETY, RateLimiter


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _count_done_after(tasks: list[asyncio.Task], seconds: float) -> int:
    await asyncio.sleep(seconds)
    return sum(t.done() for t in tasks)


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize("kwargs", [{"rpm": 0, "tpm": None}, {"rpm": None, "tpm": -5}, {"rpm": float("nan"), "tpm": None}])
def test_nonpositive_limits_are_rejected(kwargs):
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)


def test_configured_limits_are_reported_as_is():
    rl = RateLimiter(500, 200_000)
    assert (rl.rpm_limit, rl.tpm_limit) == (500, 200_000)
    assert RateLimiter(None, None).rpm_limit is None


# ------------------------------------------------------------------ rpm pacing


@pytest.mark.anyio
async def test_rpm_paces_requests():
    rl = RateLimiter(1200, None, safety=1.0)  # 20/s, evenly: one every 50 ms, no burst
    start = time.monotonic()
    tasks = [asyncio.create_task(rl.acquire(0)) for _ in range(30)]
    done_at_half = await _count_done_after(tasks, 0.52)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    elapsed = time.monotonic() - start
    assert 8 <= done_at_half <= 13  # ~11 in the first half second (0, 50, ..., 500 ms), never a burst
    assert 1.3 <= elapsed <= 2.5  # the 30th at 29 x 50 ms


@pytest.mark.anyio
async def test_tiny_rpm_still_admits_one_request():
    rl = RateLimiter(30, None)  # 0.5/s: the first request goes at once, the next ~2 s later
    await asyncio.wait_for(rl.acquire(0), 0.5)
    second = asyncio.create_task(rl.acquire(0))
    await asyncio.sleep(0.3)
    assert not second.done()
    second.cancel()


# ------------------------------------------------------------------ tpm and correct()


@pytest.mark.anyio
async def test_tpm_give_back_lets_the_next_request_through():
    rl = RateLimiter(None, 6000, safety=1.0)  # 100 tokens/s
    first = await asyncio.wait_for(rl.acquire(100), 0.5)  # moves the token schedule on by 1 s
    rl.correct(first, 0)  # the answer used nothing (e.g. a 429): give it all back
    await asyncio.wait_for(rl.acquire(100), 0.3)  # the next one goes at once


@pytest.mark.anyio
async def test_tpm_charges_more_when_the_answer_used_more():
    rl = RateLimiter(None, 6000, safety=1.0)
    r = await rl.acquire(100)
    rl.correct(r, 150)  # 50 more than reserved: the schedule is 1.5 s ahead
    start = time.monotonic()
    await asyncio.wait_for(rl.acquire(10), 3)
    assert 1.2 <= time.monotonic() - start <= 2.0


@pytest.mark.anyio
async def test_correct_settles_once():
    rl = RateLimiter(None, 6000)
    r = await rl.acquire(100)
    rl.correct(r, 0)
    rl.correct(r, 10_000)  # ignored: already settled
    assert r.settled
    await asyncio.wait_for(rl.acquire(100), 0.3)


@pytest.mark.anyio
async def test_large_estimate_does_not_deadlock():
    rl = RateLimiter(None, 60_000, safety=1.0)  # 1000 tokens/s
    big = await asyncio.wait_for(rl.acquire(600), 0.5)  # goes at once, the schedule moves on by 0.6 s
    assert big.charged_tokens == 600
    start = time.monotonic()
    await asyncio.wait_for(rl.acquire(50), 3)  # waits out the 600 tokens
    assert 0.45 <= time.monotonic() - start <= 1.2


@pytest.mark.anyio
async def test_large_estimate_is_not_starved_by_small_ones():
    rl = RateLimiter(None, 6000, safety=1.0)  # 100/s
    await rl.acquire(100)
    big = asyncio.create_task(rl.acquire(300))
    await asyncio.sleep(0)
    small = [asyncio.create_task(rl.acquire(10)) for _ in range(5)]
    await asyncio.wait_for(big, 3)  # FIFO: the big one goes first (after ~1 s), not after the small ones
    assert sum(t.done() for t in small) <= 1
    for t in small:
        t.cancel()


# ------------------------------------------------------------------ pause


@pytest.mark.anyio
async def test_pause_blocks_all_acquirers():
    rl = RateLimiter(None, None)
    rl.pause(0.4)
    tasks = [asyncio.create_task(rl.acquire(10)) for _ in range(8)]
    assert await _count_done_after(tasks, 0.2) == 0
    await asyncio.wait_for(asyncio.gather(*tasks), 1.0)


@pytest.mark.anyio
async def test_pause_extends_never_shortens():
    rl = RateLimiter(None, None)
    rl.pause(0.5)
    until = rl.paused_until
    rl.pause(0.1)
    assert rl.paused_until == until
    rl.pause(0.0)
    rl.pause(-3)
    assert rl.paused_until == until
    rl.pause(1.0)
    assert rl.paused_until > until


@pytest.mark.anyio
async def test_pause_reaches_requests_already_waiting_in_a_bucket():
    rl = RateLimiter(600, None, safety=1.0)  # 10/s
    await rl.acquire(0)
    waiter = asyncio.create_task(rl.acquire(0))  # would go in ~0.1 s
    await asyncio.sleep(0.02)
    rl.pause(0.5)
    assert await _count_done_after([waiter], 0.3) == 0
    await asyncio.wait_for(waiter, 1.0)


@pytest.mark.anyio
async def test_no_burst_after_a_pause():
    rl = RateLimiter(6000, None, safety=1.0)  # 100/s
    rl.pause(0.3)
    tasks = [asyncio.create_task(rl.acquire(0)) for _ in range(60)]
    done = await _count_done_after(tasks, 0.5)  # 0.2 s after the pause: ~20 at the steady rate, not 60
    assert 5 <= done <= 40
    for t in tasks:
        t.cancel()


# ------------------------------------------------------------------ headers

OPENAI_HEADERS = {
    "x-ratelimit-limit-requests": "600",
    "x-ratelimit-limit-tokens": "200000",
    "x-ratelimit-remaining-requests": "599",
    "x-ratelimit-remaining-tokens": "199000",
    "x-ratelimit-reset-requests": "100ms",
    "x-ratelimit-reset-tokens": "300ms",
}


def test_limits_are_learned_from_headers_with_safety():
    rl = RateLimiter(None, None)
    rl.observe_headers(OPENAI_HEADERS)
    assert rl.rpm_limit == 600 and rl.tpm_limit == 200_000
    assert rl.pace_rpm == pytest.approx(600 * DEFAULT_SAFETY)  # the same margin as a given limit
    assert rl.pace_tpm == pytest.approx(200_000 * DEFAULT_SAFETY)
    assert rl.paused_until == 0.0  # plenty remaining: no pause
    assert rl.snapshot.limit_requests == 600


def test_learning_follows_a_changed_limit():
    rl = RateLimiter(None, None, safety=1.0)
    rl.observe_headers({"x-ratelimit-limit-requests": "600"})
    rl.observe_headers({"X-RateLimit-Limit-Requests": "5000"})  # tier upgrade; header case does not matter
    assert rl.rpm_limit == 5000


@pytest.mark.parametrize(
    ("rpm", "tpm", "learn", "expected"),
    [
        (100, None, True, (100, 200_000)),  # configured rpm wins, tpm learned
        (None, 5000, True, (600, 5000)),
        (None, None, False, (None, None)),  # learning off: unlimited stays unlimited
        (100, 5000, False, (100, 5000)),
    ],
)
def test_configured_limits_are_never_overridden(rpm, tpm, learn, expected):
    rl = RateLimiter(rpm, tpm, learn=learn)
    rl.observe_headers(OPENAI_HEADERS)
    for got, want in zip((rl.rpm_limit, rl.tpm_limit), expected):
        assert got == (None if want is None else pytest.approx(want))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"content-type": "application/json", "server": "uvicorn"},  # vLLM
        {"x-ratelimit-limit-requests": "-1", "x-ratelimit-limit-tokens": "0"},  # Azure nonsense
        {"x-ratelimit-limit-requests": "lots", "x-ratelimit-limit-tokens": ""},
        {"x-ratelimit-limit-requests": "-1", "x-ratelimit-remaining-requests": "0",
         "x-ratelimit-reset-requests": "10s"},
    ],
)
def test_no_or_nonsense_headers_stay_unlimited(headers):
    rl = RateLimiter(None, None)
    rl.observe_headers(headers)
    assert rl.rpm_limit is None and rl.tpm_limit is None
    assert rl.paused_until == 0.0


@pytest.mark.anyio
async def test_unlimited_limiter_never_waits():
    rl = RateLimiter(None, None)
    rl.observe_headers({"server": "ollama"})
    start = time.monotonic()
    for _ in range(5000):
        r = await rl.acquire(10_000)
        rl.correct(r, 50)
    assert time.monotonic() - start < 0.5


@pytest.mark.anyio
async def test_learned_limit_is_enforced():
    rl = RateLimiter(None, None, safety=1.0)
    rl.observe_headers({"x-ratelimit-limit-requests": "1200"})  # 20/s
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(rl.acquire(0) for _ in range(15))), 3)
    assert 0.6 <= time.monotonic() - start <= 1.3  # evenly: the 15th at 14 x 50 ms


@pytest.mark.parametrize(
    ("headers", "pause_s"),
    [
        # exhausted: linear refill of the one request we need, out of 600 over 60 s = 0.1 s
        ({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
          "x-ratelimit-reset-requests": "60s"}, 0.1),
        # not exhausted (even if low): pacing keeps us under, no reaction that would cost throughput
        ({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "5",
          "x-ratelimit-reset-requests": "59.5s"}, 0.0),
        # no limit header: only exhaustion counts, and we wait the whole reset
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "2s"}, 0.0),
        # tokens: 0 remaining of 60,000, full in 60 s; the next request needs 600 (its estimate) -> 0.6 s
        ({"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "0",
          "x-ratelimit-reset-tokens": "1m0s"}, 0.6),
        ({"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "50000",
          "x-ratelimit-reset-tokens": "10s"}, 0.0),
        # remaining but no reset: nothing to go by
        ({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0"}, 0.0),
    ],
)
@pytest.mark.anyio
async def test_low_remaining_pauses_until_refilled(headers, pause_s):
    rl = RateLimiter(None, None, learn=False)
    await rl.acquire(600)  # the last estimate is what the next request needs
    before = time.monotonic()
    rl.observe_headers(headers)
    if pause_s == 0.0:
        assert rl.paused_until == 0.0
    else:
        assert rl.paused_until - before == pytest.approx(pause_s, abs=0.05)


@pytest.mark.anyio
async def test_refill_pause_never_exceeds_the_reset():
    rl = RateLimiter(None, None, learn=False)
    await rl.acquire(5000)  # needs more than the whole window refills in its reset
    before = time.monotonic()
    rl.observe_headers({"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0",
                        "x-ratelimit-reset-tokens": "300ms"})
    assert rl.paused_until - before == pytest.approx(0.3, abs=0.05)


@pytest.mark.anyio
async def test_remaining_tokens_below_the_next_request_pauses():
    rl = RateLimiter(None, None, learn=False)
    await rl.acquire(3000)  # the last estimate is what the next request needs
    before = time.monotonic()
    rl.observe_headers({"x-ratelimit-limit-tokens": "100000", "x-ratelimit-remaining-tokens": "1000",
                        "x-ratelimit-reset-tokens": "9.9s"})
    # deficit 2000 of 99,000 missing over 9.9 s -> 0.2 s
    assert rl.paused_until - before == pytest.approx(0.2, abs=0.05)


@pytest.mark.anyio
async def test_remaining_zero_pause_holds_acquirers():
    rl = RateLimiter(None, None)
    rl.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "300ms"})
    task = asyncio.create_task(rl.acquire(1))
    assert await _count_done_after([task], 0.15) == 0
    await asyncio.wait_for(task, 1.0)


@pytest.mark.anyio
async def test_reservation_taken_before_learning_is_not_corrected():
    rl = RateLimiter(None, None, safety=1.0)
    r = await rl.acquire(500)
    assert r.charged_tokens == 0
    rl.observe_headers({"x-ratelimit-limit-tokens": "6000"})  # now 100/s
    rl.correct(r, 0)  # nothing was charged to the new bucket, so nothing is given back
    await asyncio.wait_for(rl.acquire(100), 0.3)
    waiter = asyncio.create_task(rl.acquire(100))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    waiter.cancel()


@pytest.mark.anyio
async def test_probe_holds_the_pool_until_the_first_answer_teaches_the_limit():
    limiter = RateLimiter(None, None, probe=True)
    first = await limiter.acquire(100)
    started: list[int] = []

    async def other(i: int) -> None:
        r = await limiter.acquire(100)
        started.append(i)
        limiter.correct(r, 100)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(other, i)
        await anyio.sleep(0.05)
        assert started == []  # nobody goes before the probe's answer
        limiter.observe_headers({"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "5999",
                                 "x-ratelimit-reset-requests": "10ms"})
        limiter.correct(first, 100)
    assert sorted(started) == list(range(5))
    assert limiter.rpm_limit == 6000 and limiter.pace_rpm == pytest.approx(6000 * DEFAULT_SAFETY)


@pytest.mark.anyio
async def test_probe_is_skipped_when_limits_are_configured():
    limiter = RateLimiter(600000, 100_000_000, probe=True)
    a = await limiter.acquire(10)
    b = await limiter.acquire(10)  # does not wait for a's answer
    limiter.correct(a, 10), limiter.correct(b, 10)
