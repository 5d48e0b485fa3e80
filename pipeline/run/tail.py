"""No tail: an adaptive per-request deadline and hedged requests at the end of the work.

A run waits for its slowest request. With a fixed `--timeout` of 60 s, one request the server never
answers holds the run's end a minute; a shorter fixed timeout would cut off honest slow answers on a slow
server. So the deadline follows the latency the run observes:

- `adaptive_deadline`: once there are `min_samples` answers, a request is abandoned (and retried) after
  `k x p99` of the recent answers' latency, never below `floor_s` and never above the user's `--timeout`
  (the ceiling). Before that the ceiling applies; a request out is held to the deadline as it is now
  (`race` re-reads it), so one sent before any answer is cut once the window knows better. A timeout at an adaptive deadline says "this one request
  hung", not "the server is queueing": the adaptive concurrency limit is only told about timeouts at the
  ceiling (see `timeout_is_load`), and a hedge's answer gives it no latency sample.
- `should_hedge`: near the end of the work (the plan is exhausted, so some workers idle), a request out
  longer than `factor x p99` gets a second request for the same work; the first answer wins and the other
  is cancelled. Hedges are at most `budget` of the requests sent, and never sent while a rate limit binds
  (limits given or learned from headers) or under `--max-cost`: there a second request costs someone else's
  capacity or the user's money. A cancelled loser's answer is never received, so whether the server billed
  it is not known; only answers received are counted (a billed failure is an answer: it wins like any).

Both decisions are pure functions (table-tested without a server); `TailTracker` keeps the latency window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import anyio

from pipeline.providers.base import APIFailure, ErrorKind

T = TypeVar("T")

__all__ = ["TailPolicy", "TailTracker", "adaptive_deadline", "should_hedge", "timeout_is_load", "percentile", "race",
           "hedge_after"]


@dataclass(frozen=True)
class TailPolicy:
    k: float = 4.0  # a request is abandoned after k x p99 of recent answers
    floor_s: float = 1.0  # ... but never before this (a busy event loop or GC pause is not a hang)
    min_samples: int = 20  # answers needed before the window is trusted; before that the ceiling applies
    window: int = 500  # recent answers the percentile is taken over
    refresh_every: int = 16  # the percentile is re-sorted every this many new samples (cheap on a fast run)
    hedge: bool = True  # --no-hedge turns it off
    hedge_factor: float = 2.0  # a request out longer than this x p99 may get a hedge
    hedge_min_s: float = 0.25  # ... and at least this long (tiny latencies are noise)
    hedge_budget: float = 0.03  # hedges at most this share of the requests sent
    hedge_allowance: int = 2  # ... plus this many (so a small run may hedge at all)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list; None for an empty one."""
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values))))
    return sorted_values[k]


def adaptive_deadline(p99: float | None, samples: int, ceiling: float, policy: TailPolicy = TailPolicy()) -> float:
    """Seconds a request may take before it is abandoned: `clamp(k x p99, floor, ceiling)` (pure).

    Too few samples (or none): the ceiling, the user's `--timeout`. The floor never exceeds the ceiling: a
    user who asked for 0.5 s gets 0.5 s.
    """
    if p99 is None or samples < policy.min_samples:
        return ceiling
    return min(ceiling, max(policy.floor_s, policy.k * p99))


def timeout_is_load(deadline: float, ceiling: float) -> bool:
    """Whether a timeout tells the adaptive concurrency limit that the server is overloaded.

    Only a timeout at the user's ceiling does. One at an adaptive deadline (k x p99, below the ceiling)
    is one request far slower than the rest - a hang - and must not halve the pool on a fast server.
    """
    return deadline >= ceiling


def should_hedge(
    *,
    age_s: float,
    p99: float | None,
    samples: int,
    plan_exhausted: bool,
    idle: bool,
    hedges: int,
    requests: int,
    rate_limit_binds: bool,
    policy: TailPolicy = TailPolicy(),
) -> bool:
    """Whether a request out for `age_s` gets a second request for the same work now (pure).

    Only near the end of the work (the plan is exhausted) with a worker idle, only past `factor x p99` of
    a trusted window, within the hedge budget, and never while a rate limit binds.
    """
    if not policy.hedge or rate_limit_binds or not plan_exhausted or not idle:
        return False
    if p99 is None or samples < policy.min_samples:
        return False
    if hedges >= policy.hedge_allowance + policy.hedge_budget * requests:
        return False
    return age_s >= hedge_after(p99, policy)


def hedge_after(p99: float, policy: TailPolicy = TailPolicy()) -> float:
    """Age past which a request may be hedged."""
    return max(policy.hedge_min_s, policy.hedge_factor * p99)


@dataclass
class TailTracker:
    """The recent answers' latencies and the p99 over them, refreshed every few samples."""

    policy: TailPolicy = field(default_factory=TailPolicy)
    samples: int = 0
    hedges: int = 0  # hedge requests sent
    hedge_wins: int = 0  # hedges that answered first
    p99: float | None = None
    _window: deque = field(default_factory=deque)
    _since_refresh: int = 0

    def observe(self, latency_s: float) -> None:
        """One answer's latency (a caption or a billed answer that is no caption)."""
        self._window.append(latency_s)
        if len(self._window) > self.policy.window:
            self._window.popleft()
        self.samples += 1
        self._since_refresh += 1
        if self.p99 is None or self._since_refresh >= self.policy.refresh_every:
            self._since_refresh = 0
            self.p99 = percentile(sorted(self._window), 0.99)

    def deadline(self, ceiling: float) -> float:
        return adaptive_deadline(self.p99, self.samples, ceiling, self.policy)



async def race(
    send: Callable[[], Awaitable[T]],
    deadline: Callable[[], float],
    may_hedge: Callable[[float], bool],
    on_hedge: Callable[[], None],
    *,
    first_check_s: float,
    poll_s: float = 0.25,
) -> tuple[T, bool]:
    """`send()` under a deadline that follows the run, plus a hedge once `may_hedge(age)` says so.

    Returns (answer, whether the hedge won). The deadline is re-read while a request is out, so a request
    sent before the run had any answers (the ceiling applied then) is abandoned once the window says it
    hung; its timeout is an `APIFailure(TIMEOUT)` like the backend's own. The watcher first wakes after
    `first_check_s` (a request answered sooner costs one timer) and then every `poll_s`.

    Structured: every attempt runs in this call's own task group. The first *answer* wins - a return, or an
    `APIFailure` that carries usage (billed: an answer that is no caption) - and the other attempt is
    cancelled, so the caller gets exactly one result and writes one row. An unbilled failure (5xx, drop,
    timeout) waits for the other attempt; when every attempt failed, the first failure is raised.
    """
    results_send, results_recv = anyio.create_memory_object_stream[tuple[int, Any, Any]](2)
    scopes: list[tuple[float, anyio.CancelScope]] = []

    async def attempt(i: int, scope: anyio.CancelScope) -> None:
        answer, failure = None, None
        try:
            with scope:
                answer = await send()
        except APIFailure as exc:
            failure = exc
        if scope.cancelled_caught:
            failure = APIFailure(ErrorKind.TIMEOUT, "request timed out")
        results_send.send_nowait((i, answer, failure))  # room for every attempt: never blocks

    def start(i: int) -> None:
        now = anyio.current_time()
        scope = anyio.CancelScope(deadline=now + deadline())
        scopes.append((now, scope))
        tg.start_soon(attempt, i, scope)

    t0 = anyio.current_time()
    failures: list[APIFailure] = []
    winner: tuple[int, Any, Any] | None = None
    running, hedge_sent, wait = 1, False, first_check_s
    async with results_send, results_recv, anyio.create_task_group() as tg:
        start(0)
        while winner is None and running:
            with anyio.move_on_after(wait):
                i, answer, failure = await results_recv.receive()
                running -= 1
                if failure is None or failure.usage is not None:
                    winner = (i, answer, failure)
                else:
                    failures.append(failure)
                continue
            wait = poll_s
            limit = deadline()
            for sent_at, scope in scopes:  # the window may have learned that these hung
                scope.deadline = min(scope.deadline, sent_at + limit)
            if not hedge_sent and may_hedge(anyio.current_time() - t0):
                hedge_sent = True
                running += 1
                on_hedge()
                start(1)
        tg.cancel_scope.cancel()  # the loser, if any: its answer is never received
    if winner is None:
        raise failures[0]
    i, answer, failure = winner
    if failure is not None:
        raise failure
    return answer, i == 1
