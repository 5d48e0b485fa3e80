"""Adaptive concurrency for servers that send no rate-limit headers (vLLM, Ollama, `transformers serve`).

Such servers never answer 429: they queue, so latency grows until requests time out. A timed-out request
is abandoned by the client but keeps running on the server (the server cannot know), so retrying at the
same concurrency only adds to the queue and every timeout makes the next one likelier. The pool therefore
drives a *limit* below `--concurrency` (the ceiling), as TCP Vegas and Netflix's concurrency-limits do:

- the baseline is the smallest latency seen (the first request of a run goes alone, so it is the server's
  own service time); the queue the server holds for us is estimated as
  `limit x (1 - (baseline + jitter) / latency)` (Vegas: what is in flight beyond what latency explains);
- queue below `alpha`: the limit grows by 1 per answer (only while the pool actually uses at least half
  of it, else a larger limit proves nothing: Gradient2's "app-limited" rule);
- queue above `beta`: the limit shrinks by `latency_backoff`;
- a timeout, a 503 ("server busy", Ollama) or a 429: the limit halves (`overload_backoff`);
- decreases happen at most once per round trip: answers to requests sent before the last decrease
  cannot reflect it, so they do not decrease again (as TCP reduces once per window);
- the timeout bounds the limit: after the first answer the limit is at most `headroom x timeout / latency`
  (on a server that answers one request at a time latency grows with the limit), and it grows only while
  `latency x (limit + 1) / limit` stays below `headroom x timeout`; a latency above 3/4 of the timeout
  counts as a long queue;
- a timed-out request still occupies the server: its slot stays taken for `hold_s` (the request's own
  timeout) after the client gave up, so the pool never replaces it with another request at once.

`next_state` is the pure decision (table-tested); `AdaptiveLimit` is the small gate the workers take a slot
from before the rate limiter. With `--rpm`/`--tpm` or learned rate-limit headers the gate is off and
`--concurrency` alone applies, as before.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import anyio

from pipeline.providers.base import ErrorKind

__all__ = ["AdaptivePolicy", "LimitState", "Outcome", "Sample", "AdaptiveLimit", "Slot", "next_state",
           "queue_estimate", "initial_state", "classify_failure"]


class Outcome(str, enum.Enum):
    OK = "ok"  # an answer (a caption, or a billed refusal/empty/invalid answer): a latency sample
    OVERLOAD = "overload"  # timeout, 503 busy, 429 without headers: the server is past its capacity
    OTHER = "other"  # any other failure (dropped connection, 5xx, 400): says nothing about the queue


@dataclass(frozen=True)
class AdaptivePolicy:
    """How the limit moves. `ceiling` is --concurrency."""

    ceiling: int
    initial: int = 4
    floor: int = 1
    alpha: float = 2.0  # queue estimate below which the limit grows (Vegas: 2-3)
    beta: float = 4.0  # queue estimate above which it shrinks (Vegas: 4-6)
    latency_backoff: float = 0.8  # factor on rising latency
    overload_backoff: float = 0.5  # factor on a timeout, 503 or 429
    jitter_s: float = 0.05  # latency differences below this are noise (client and network), not queue
    timeout_s: float | None = None  # --timeout: the limit never grows into latencies near it
    headroom: float = 0.5  # grow only while the latency one more request would bring stays below this x timeout

    def clamp(self, limit: float) -> float:
        return min(float(self.ceiling), max(float(self.floor), limit))


@dataclass(frozen=True)
class LimitState:
    limit: float
    baseline_s: float | None = None  # smallest latency seen: the server's own time with no queue
    last_decrease: float = -math.inf  # clock time of the last decrease
    max_limit: float = 0.0  # the highest limit reached (for the manifest)


@dataclass(frozen=True)
class Sample:
    """One finished request: what happened, how long it took, when it was sent and finished, and how
    many requests were in flight when it was sent (including itself)."""

    outcome: Outcome
    latency_s: float
    sent_at: float
    done_at: float
    in_flight: int


def classify_failure(kind: ErrorKind, status: int | None, answered: bool) -> tuple[Outcome, bool]:
    """What a failed attempt says about the server's queue, and whether the server still works on it.

    Our own timeout (no status): overload, and the server goes on computing the abandoned request. A 503
    (Ollama's "server busy", vLLM overloaded) or a 429 from a server without rate-limit headers: overload.
    A billed answer that is no caption (refused, empty, invalid) was a normal answer: a latency sample.
    """
    if answered:
        return Outcome.OK, False
    if kind is ErrorKind.TIMEOUT:
        return Outcome.OVERLOAD, status is None
    if kind is ErrorKind.RATE_LIMIT or (kind is ErrorKind.SERVER and status == 503):
        return Outcome.OVERLOAD, False
    return Outcome.OTHER, False


def initial_state(policy: AdaptivePolicy) -> LimitState:
    start = policy.clamp(policy.initial)
    return LimitState(limit=start, max_limit=start)


def queue_estimate(limit: float, latency_s: float, baseline_s: float, jitter_s: float = 0.0) -> float:
    """Vegas: requests of ours the server holds beyond those latency explains; 0 while latency holds."""
    if latency_s <= 0:
        return 0.0
    return max(0.0, limit * (1.0 - (baseline_s + jitter_s) / latency_s))


def next_state(state: LimitState, sample: Sample, policy: AdaptivePolicy) -> LimitState:
    """The limit after one finished request (pure)."""
    may_decrease = sample.sent_at >= state.last_decrease  # it was sent knowing the last decrease

    def decreased(factor: float) -> LimitState:
        if not may_decrease:
            return state
        return replace(state, limit=policy.clamp(state.limit * factor), last_decrease=sample.done_at)

    if sample.outcome is Outcome.OVERLOAD:
        return decreased(policy.overload_backoff)
    if sample.outcome is not Outcome.OK:
        return state
    first = state.baseline_s is None
    baseline = sample.latency_s if state.baseline_s is None else min(state.baseline_s, sample.latency_s)
    state = replace(state, baseline_s=baseline)
    timeout = policy.timeout_s
    if first and timeout is not None and sample.latency_s > 0:
        # knowing nothing yet: assume latency grows with the limit (one request at a time)
        state = replace(state, limit=policy.clamp(min(state.limit, policy.headroom * timeout / sample.latency_s)))
    queue = queue_estimate(state.limit, sample.latency_s, baseline, policy.jitter_s)
    if queue > policy.beta or (timeout is not None and sample.latency_s > 0.75 * timeout):
        return decreased(policy.latency_backoff)
    room = timeout is None or sample.latency_s * (state.limit + 1) / state.limit < policy.headroom * timeout
    if queue < policy.alpha and room and sample.in_flight * 2 >= state.limit:
        grown = policy.clamp(state.limit + 1)
        return replace(state, limit=grown, max_limit=max(state.max_limit, grown))
    return state


class Slot:
    """A place in the adaptive limit, taken before a request is sent and given back when it ends."""

    __slots__ = ("owner", "sent_at", "in_flight", "released")

    def __init__(self, owner: "AdaptiveLimit", in_flight: int) -> None:
        self.owner = owner
        self.sent_at = owner.clock()
        self.in_flight = in_flight
        self.released = False

    def finish(self, outcome: Outcome, hold_s: float = 0.0) -> None:
        """The request ended. `hold_s` > 0 (a timeout): the server still works on it, keep the slot that long."""
        if self.released:
            return
        self.released = True
        self.owner._finish(self, outcome, hold_s)

    def cancel(self) -> None:
        """Never sent (stopping) or cut off: give the slot back without a sample."""
        if self.released:
            return
        self.released = True
        self.owner._release()


class AdaptiveLimit:
    """A semaphore whose capacity is the adaptive limit; off, it admits everyone (capacity = ceiling).

    Slots of timed-out requests stay taken until their hold ends; waiters wake when a slot is given back,
    the limit grows or a hold ends. One event loop only (no locks needed).
    """

    def __init__(self, policy: AdaptivePolicy, *, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.enabled = enabled
        self.clock = clock
        self.state = initial_state(policy) if enabled else LimitState(float(policy.ceiling))
        self.in_use = 0
        self._held: list[float] = []  # end times of slots held for timed-out requests
        self._changed = anyio.Event()

    @property
    def capacity(self) -> int:
        return max(self.policy.floor, int(self.state.limit)) if self.enabled else self.policy.ceiling

    @property
    def held(self) -> int:
        return len(self._held)

    def disable(self) -> None:
        """Rate-limit headers were learned (or limits given): --concurrency alone applies from now on."""
        if self.enabled:
            self.enabled = False
            self._notify()

    def _expire(self, now: float) -> None:
        if self._held and min(self._held) <= now:
            self._held = [t for t in self._held if t > now]

    async def acquire(self) -> Slot:
        while True:
            now = self.clock()
            self._expire(now)
            if not self.enabled or self.in_use + len(self._held) < self.capacity:
                self.in_use += 1
                return Slot(self, self.in_use + len(self._held))
            changed = self._changed
            wait = (min(self._held) - now) if self._held else math.inf
            with anyio.move_on_after(wait):
                await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _release(self) -> None:
        self.in_use = max(0, self.in_use - 1)
        self._notify()

    def _finish(self, slot: Slot, outcome: Outcome, hold_s: float) -> None:
        now = self.clock()
        if self.enabled:
            sample = Sample(outcome, now - slot.sent_at, slot.sent_at, now, slot.in_flight)
            self.state = next_state(self.state, sample, self.policy)
        if hold_s > 0 and self.enabled:
            self._held.append(now + hold_s)
        self._release()
