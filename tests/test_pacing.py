"""Even pacing (GCRA, no burst): the pure schedule math with a fake clock, and the loopback's sliding window.

Why: a server that enforces its per-minute limit over any rolling second (as OpenAI does) counts a burst
against the next second too; the limiter must send evenly spaced requests, for given and learned limits
alike, and after a 429 wait exactly what the server asked.
"""

from __future__ import annotations

import pytest

from pipeline.run.limits import CATCH_UP_S, DEFAULT_SAFETY, RateLimiter, Schedule, refill_wait
from pipeline.testing.loopback import _Window


def send_times(schedule: Schedule, arrivals: list[float], cost: float = 1.0) -> list[float]:
    """Send times the schedule hands out to requests asking at `arrivals` (each used at once)."""
    out = []
    for now in arrivals:
        start, end = schedule.reserve(now, cost)
        schedule.commit(end)
        out.append(start)
    return out


def max_in_any_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_requests_that_all_ask_at_once_leave_evenly_spaced():
    s = Schedule(1200)  # 20/s: one every 50 ms
    times = send_times(s, [10.0] * 40)
    gaps = {round(b - a, 9) for a, b in zip(times, times[1:])}
    assert times[0] == 10.0 and gaps == {0.05}


def test_no_burst_beyond_the_allowance_in_any_rolling_second():
    s = Schedule(1200 * DEFAULT_SAFETY)
    arrivals = [0.0] * 64 + [0.5 + 0.01 * i for i in range(300)] + [9.0] * 64
    times = send_times(s, arrivals)
    assert max_in_any_window(times) <= 20  # a server counting 20 in any rolling second never says 429


def test_idle_time_earns_no_credit_beyond_the_catch_up():
    s = Schedule(60, catch_up_s=0.0)  # 1/s
    assert send_times(s, [0.0]) == [0.0]
    # ten idle seconds later, two at once: the first now, the second a full interval later, not a burst
    assert send_times(s, [10.0, 10.0]) == [10.0, 11.0]
    s = Schedule(60)  # the catch-up makes up a stall (a slot missed by <= CATCH_UP_S), not idle time
    send_times(s, [0.0])
    assert send_times(s, [10.0, 10.0]) == [10.0, 11.0]
    assert send_times(s, [12.0 + CATCH_UP_S / 2]) == [12.0 + CATCH_UP_S / 2]  # sent now, booked at 12.0
    assert send_times(s, [12.0 + CATCH_UP_S / 2]) == [13.0]


def test_a_short_stall_is_made_up_without_exceeding_the_limit():
    s = Schedule(6000 * DEFAULT_SAFETY)  # 100/s limit, slots every 10.2 ms
    arrivals = [i * 0.0102 for i in range(50)]
    arrivals[20:25] = [arrivals[19] + 0.015] * 5  # the loop stalled 15 ms: five ask at once, late
    times = send_times(s, arrivals + [0.51 + i * 0.0102 for i in range(200)])
    assert max_in_any_window(times) <= 100
    assert times[-1] == pytest.approx((len(times) - 1) * 60 / (6000 * DEFAULT_SAFETY))  # no slot lost


def test_token_reservation_advances_the_schedule_by_tokens_over_rate():
    s = Schedule(6000)  # 100 tokens/s
    assert send_times(s, [0.0], cost=300) == [0.0]
    assert send_times(s, [0.0], cost=50) == [3.0]  # waits out the 300 tokens
    s.charge(-50)  # the answer used 50 fewer than reserved: given back to later requests
    assert send_times(s, [0.0], cost=10) == [3.0]


def test_rebase_after_a_pause_restarts_at_its_end_without_extra_wait():
    s = Schedule(1200)
    send_times(s, [0.0] * 5)  # sent: the schedule is at 0.25
    s.reserve(0.0)  # reserved but abandoned by the pause
    s.rebase(2.0)
    assert send_times(s, [2.0, 2.0]) == [2.0, 2.05]


def test_rebase_keeps_the_debt_of_what_was_sent():
    s = Schedule(6000)
    send_times(s, [0.0], cost=1000)  # 10 s worth of tokens already sent
    s.rebase(1.0)
    assert send_times(s, [1.0], cost=1) == [10.0]


def test_set_limit_rescales_what_is_still_ahead():
    s = Schedule(600)  # 10/s
    send_times(s, [0.0] * 3)  # schedule at 0.3
    s.set_limit(1200, now=0.1)  # 20/s: the 0.2 s still ahead becomes 0.1 s
    assert send_times(s, [0.1]) == [pytest.approx(0.2)]


@pytest.mark.parametrize(
    ("limit", "remaining", "reset", "need", "want"),
    [
        (1200, 1180, 1.0, 1, 0.0),  # plenty left: no reaction that would cost throughput
        (1200, 1, 1.0, 1, 0.0),  # one left: exactly enough
        (1200, 0, 60.0, 1, 0.05),  # out: the one request we need refills in 60 s / 1200
        (None, 0, 2.0, 1, 2.0),  # no limit known: the whole reset
        (1000, 0, 0.3, 5000, 0.3),  # capped at the reset
    ],
)
def test_refill_wait_only_reacts_to_an_exhausted_window(limit, remaining, reset, need, want):
    assert refill_wait(limit, remaining, reset, need) == pytest.approx(want)


def test_one_safety_rule_for_given_and_learned_limits():
    given = RateLimiter(1200, 60_000)
    learned = RateLimiter(None, None)
    learned.observe_headers({"x-ratelimit-limit-requests": "1200", "x-ratelimit-limit-tokens": "60000"})
    assert given.rpm_limit == learned.rpm_limit == 1200
    assert given.pace_rpm == learned.pace_rpm == pytest.approx(1200 * DEFAULT_SAFETY)
    assert given.pace_tpm == learned.pace_tpm == pytest.approx(60_000 * DEFAULT_SAFETY)


def test_learned_limit_is_adopted_and_followed():
    rl = RateLimiter(None, None, safety=1.0)
    rl.observe_headers({"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "1199",
                        "x-ratelimit-reset-requests": "50ms"})
    assert rl.pace_rpm == 1200 and rl.paused_until == 0.0  # learned; remaining is no reason to pause
    rl.observe_headers({"x-ratelimit-limit-requests": "6000"})
    assert rl.rpm_limit == 6000 and rl.pace_rpm == 6000


def test_pause_is_exactly_what_was_asked():
    import time

    rl = RateLimiter(1200, None)
    before = time.monotonic()
    rl.pause(0.137)  # e.g. retry-after-ms: 137
    after = time.monotonic()
    assert before + 0.137 <= rl.paused_until <= after + 0.137
    assert rl._rpm is not None and rl._rpm.tat == pytest.approx(rl.paused_until)  # no extra second on top


# ------------------------------------------------------------------ the loopback's sliding window


def test_sliding_window_counts_a_burst_against_the_next_second():
    w = _Window(1200, 1.0)  # 20 in any rolling second
    t0 = w.t  # the window's clock starts at its creation (time.monotonic())
    w.refill(t0)
    for _ in range(20):
        assert w.wait_for(1) == 0.0
        w.take(1)
    w.refill(t0 + 0.5)
    assert w.wait_for(1) == pytest.approx(0.5)  # a token bucket would have refilled 10 by now
    w.refill(t0 + 1.0)
    assert w.wait_for(1) == 0.0 and w.remaining() == 1200


def test_sliding_window_admits_an_even_stream_at_the_limit():
    w = _Window(1200, 1.0)
    t0, refused = w.t, 0
    for i in range(200):
        w.refill(t0 + i * 0.0505)
        if w.wait_for(1) > 0:
            refused += 1
        else:
            w.take(1)
    assert refused == 0
