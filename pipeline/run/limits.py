"""The pool-wide rate limiter: requests and tokens per minute, learned from headers, paused by 429s.

One `RateLimiter` is shared by all workers of a run. Before each request a worker calls
`acquire(est_tokens)`; after the answer it calls `correct(reservation, actual_tokens)` and
`observe_headers(reply.headers)`; after a 429 it calls `pause(decision.wait_s)`.

Why leaky buckets with a one-second burst: OpenAI enforces per-minute limits at sub-minute granularity
(60,000 RPM is enforced as about 1,000 per second), so a bucket that lets a whole minute's worth out at
once earns a burst of 429s. Each limit is an `aiolimiter.AsyncLimiter` that holds `limit/60 x burst_s`
units and drains `limit/60` units per second.

aiolimiter internals relied on (checked against 1.1-1.3, asserted at import by `_check_aiolimiter`):
`_level` (units currently in the bucket), `_leak()` (drains `_level` for the time elapsed since the last
check and stamps that check) and `_rate_per_sec`. We touch them for three things the public API lacks:
charging a token estimate larger than the bucket (the excess is added to `_level` as debt, which later
acquires wait out), `correct()` (adding or removing actual-minus-estimate tokens), and changing a learned
limit in place. `_leak()` is always called first, so the change applies to the level *as of now* rather
than being drained retroactively over time that already passed. After lowering the level we call
`_wake_next()` (1.3) so a waiter whose timer was set for the old level is woken early.

Cost: with capacity, `acquire` is one monotonic-clock read plus one aiolimiter acquire per bucket - no
sleeps, no polling. Waiting is done by aiolimiter's timers (one per bucket) and, during a pause, one
`asyncio.sleep` per waiting worker for the length of the pause.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Mapping

from aiolimiter import AsyncLimiter

from pipeline.providers.headers import header_int, parse_duration

__all__ = ["RateLimiter", "Reservation", "HeaderSnapshot"]


def _check_aiolimiter() -> None:
    probe = AsyncLimiter(1, 1)
    missing = [name for name in ("_level", "_leak", "_rate_per_sec") if not hasattr(probe, name)]
    if missing:  # pragma: no cover - only on an aiolimiter whose internals changed
        raise ImportError(
            f"pipeline.run.limits needs aiolimiter internals {missing}; this aiolimiter version changed them"
        )


_check_aiolimiter()


class _Bucket:
    """One limit ("N per minute") as an AsyncLimiter holding at most max(N/60 x burst_s, 1) units.

    The capacity is at least 1 so a single request always fits the requests bucket even at very low
    limits (rpm=30 with burst_s=1 would otherwise hold 0.5 and aiolimiter would refuse every acquire).
    """

    __slots__ = ("per_minute", "burst_s", "limiter")

    def __init__(self, per_minute: float, burst_s: float) -> None:
        rate = per_minute / 60.0
        capacity = max(rate * burst_s, 1.0)
        self.per_minute = per_minute
        self.burst_s = burst_s
        self.limiter = AsyncLimiter(capacity, capacity / rate)

    @property
    def capacity(self) -> float:
        return float(self.limiter.max_rate)

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0

    async def acquire(self, amount: float) -> None:
        """Take `amount` units, waiting for room; an amount above the capacity is charged as debt.

        aiolimiter raises ValueError for amount > max_rate (it could never fit). One request's token
        estimate can exceed a second's worth of tpm, so we wait for a full bucket's worth of room, take
        that, and add the excess to the level: following acquires then wait until the debt has drained,
        which is exactly the pacing a leaky bucket owes a large request.
        """
        take = min(amount, self.capacity)
        if take > 0:
            await self.limiter.acquire(take)
        excess = amount - take
        if excess > 0:
            self.adjust(excess)

    def _leak_now(self) -> bool:
        try:
            self.limiter._leak()  # drain for the time elapsed so far; needs the running loop's clock
        except RuntimeError:  # no running loop: nobody can be waiting, and the level is only read in-loop
            return False
        return True

    def _wake(self) -> None:
        wake = getattr(self.limiter, "_wake_next", None)  # aiolimiter >= 1.2; 1.1 waiters re-poll
        if wake is not None:
            wake()

    def adjust(self, delta: float) -> None:
        """Add (delta > 0) or give back (delta < 0) units, as of now. The level never goes below 0."""
        if delta == 0:
            return
        self._leak_now()
        self.limiter._level = max(0.0, self.limiter._level + delta)
        if delta < 0:
            self._wake()

    def fill_for(self, seconds: float) -> None:
        """Make the bucket full `seconds` from now, so traffic resumes at the steady rate after a pause.

        Without this the bucket would drain during the pause and every worker would burst at its end,
        which is how one 429 becomes a train of them.
        """
        if seconds <= 0:
            return
        self._leak_now()
        target = self.capacity + self.rate_per_s * seconds
        if self.limiter._level < target:
            self.limiter._level = target

    def set_limit(self, per_minute: float) -> None:
        """Change the limit in place, keeping the current level (and the waiters) of the bucket."""
        self._leak_now()
        rate = per_minute / 60.0
        capacity = max(rate * self.burst_s, 1.0)
        self.per_minute = per_minute
        self.limiter.max_rate = capacity
        self.limiter.time_period = capacity / rate
        self.limiter._rate_per_sec = rate
        self._wake()


@dataclass
class Reservation:
    """What one `acquire` took, so `correct` can settle it against the tokens actually used."""

    est_tokens: int
    charged_tokens: int = 0  # tokens put into the tpm bucket; 0 when tpm was unlimited at acquire time
    settled: bool = False
    _bucket: _Bucket | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class HeaderSnapshot:
    """The last rate-limit headers seen (raw server values; None where absent or nonsense), for display."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


def _check_limit(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not value > 0:
        raise ValueError(f"{name} must be a positive number or None (unlimited), got {value!r}")
    return float(value)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets shared by all workers, plus a pool-wide pause.

    `rpm`/`tpm` None means "not configured": with `learn` the limit is taken from the first
    x-ratelimit-limit-* header (times `safety`, so our pacing stays just under the server's and small
    clock and estimate errors do not cost 429s); without headers (vLLM, Ollama) the limiter stays
    unlimited and `--concurrency` alone brakes. Configured limits are never overridden by headers.
    Must be used from one asyncio event loop (aiolimiter is asyncio-only).
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        learn: bool = True,
        burst_s: float = 1.0,
        safety: float = 0.97,
        probe: bool = False,
    ) -> None:
        if not burst_s > 0:
            raise ValueError(f"burst_s must be positive, got {burst_s!r}")
        if not 0 < safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {safety!r}")
        self._configured_rpm = _check_limit("rpm", rpm)
        self._configured_tpm = _check_limit("tpm", tpm)
        self.learn = learn
        self.burst_s = float(burst_s)
        self.safety = float(safety)
        self._rpm = _Bucket(self._configured_rpm, self.burst_s) if self._configured_rpm else None
        self._tpm = _Bucket(self._configured_tpm, self.burst_s) if self._configured_tpm else None
        # Serialises waiting on the token bucket: aiolimiter wakes its smallest waiter first, so without
        # this FIFO gate a large estimate could starve behind a stream of smaller ones.
        self._tpm_gate = asyncio.Lock()
        self._paused_until = 0.0
        self._last_est = 0
        self.snapshot = HeaderSnapshot()
        # Probe: while a limit is still to be learned, one request goes first and the rest of the pool
        # waits for its answer (and its headers). Without it a pool of 64 workers fires 64 requests at a
        # limit it has not seen yet, and the start of every run is a burst of 429s.
        # `probe` is for callers that settle every reservation (`correct`) or report every answer's
        # headers (`observe_headers`); the probe ends at the first of either.
        self._probing = probe and learn and (self._configured_rpm is None or self._configured_tpm is None)
        self._probe_sent = False
        self._probe_answered = asyncio.Event()

    # ------------------------------------------------------------------ limits

    @property
    def rpm_limit(self) -> float | None:
        """Effective requests per minute we pace to (configured, or learned x safety); None = unlimited."""
        return self._rpm.per_minute if self._rpm is not None else None

    @property
    def tpm_limit(self) -> float | None:
        """Effective tokens per minute we pace to (configured, or learned x safety); None = unlimited."""
        return self._tpm.per_minute if self._tpm is not None else None

    @property
    def paused_until(self) -> float:
        """time.monotonic() before which no new request starts (0.0 or in the past: not paused)."""
        return self._paused_until

    # ------------------------------------------------------------------ acquire / correct

    async def _wait_pause(self) -> None:
        # Loop because the pause can be extended while we sleep.
        while (left := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(left)

    async def acquire(self, est_tokens: int) -> Reservation:
        """Wait until no pause is active, one request fits the rpm bucket and `est_tokens` fit the tpm bucket.

        `est_tokens` should be what the server reserves up front: input estimate + max_tokens x n.
        """
        est = max(0, int(est_tokens))
        if self._probing and not self._probe_answered.is_set():
            if self._probe_sent:
                await self._probe_answered.wait()
            else:
                self._probe_sent = True
        await self._wait_pause()
        if self._rpm is not None:
            await self._rpm.acquire(1)
        bucket = self._tpm
        charged = 0
        if bucket is not None and est > 0:
            async with self._tpm_gate:
                await bucket.acquire(est)
            charged = est
        # A 429 may have paused the pool while we waited in a bucket; honour it before sending.
        await self._wait_pause()
        self._last_est = est
        return Reservation(est_tokens=est, charged_tokens=charged, _bucket=bucket)

    def correct(self, reservation: Reservation, actual_tokens: int) -> None:
        """Settle a reservation: charge (actual - charged) more tokens, or give back the difference.

        Call with the answer's total tokens (prompt + completion of all choices). After a 429 the server
        counted nothing, so `correct(reservation, 0)` gives the whole reservation back. A reservation is
        settled once; later calls are ignored. If the tpm limit was learned after this reservation was
        taken, the reservation was never charged and nothing is adjusted.
        """
        self._end_probe()
        if reservation.settled:
            return
        reservation.settled = True
        bucket = reservation._bucket
        if bucket is None or bucket is not self._tpm:
            return
        bucket.adjust(max(0, int(actual_tokens)) - reservation.charged_tokens)

    def _end_probe(self) -> None:
        """The probe came back (answered, failed or abandoned): open the pool."""
        if self._probing and not self._probe_answered.is_set():
            self._probe_answered.set()

    # ------------------------------------------------------------------ pause

    def pause(self, seconds: float) -> None:
        """Hold every new request of the pool for `seconds` from now (a 429 speaks for the whole key).

        Extends, never shortens, an existing pause. The buckets are filled so that they are full when the
        pause ends: traffic resumes at the steady rate instead of bursting into the next 429.
        """
        if not seconds > 0:
            return
        until = time.monotonic() + seconds
        if until <= self._paused_until:
            return
        self._paused_until = until
        for bucket in (self._rpm, self._tpm):
            if bucket is not None:
                bucket.fill_for(seconds)

    # ------------------------------------------------------------------ headers

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn limits from x-ratelimit-* headers and pause when the server says we are nearly out.

        - limit-requests / limit-tokens: when that limit was not configured and `learn` is set, enforce
          limit x safety from now on (a changed limit, e.g. a tier upgrade mid-run, is followed).
          Values <= 0 (Azure has sent -1 and 0) are ignored, along with that limit's remaining.
        - remaining-* with reset-*: OpenAI's reset is the time until the bucket is full again, so assuming
          linear refill the server regains (limit - remaining)/reset units per second. When remaining is
          below what we need next (one burst's worth: limit/60 x burst_s, at least 1 request, at least the
          last token estimate) the pool pauses until that deficit has refilled, capped at the reset.
          Headers of answers that were in flight are a little stale; a pause is only ever extended, and
          this applies with or without `learn` because the server's state is the truth for a shared key.
        """
        if not headers:
            self._end_probe()
            return
        h = {str(k).lower(): v for k, v in headers.items()}
        if "x-ratelimit-limit-requests" not in h and "x-ratelimit-remaining-requests" not in h and (
            "x-ratelimit-limit-tokens" not in h and "x-ratelimit-remaining-tokens" not in h
        ):
            self._end_probe()
            return  # vLLM, Ollama, LM Studio: nothing to learn

        lim_r = header_int(h, "x-ratelimit-limit-requests")
        lim_t = header_int(h, "x-ratelimit-limit-tokens")
        rem_r = header_int(h, "x-ratelimit-remaining-requests")
        rem_t = header_int(h, "x-ratelimit-remaining-tokens")
        rst_r = parse_duration(h.get("x-ratelimit-reset-requests") or "")
        rst_t = parse_duration(h.get("x-ratelimit-reset-tokens") or "")
        if lim_r is not None and lim_r <= 0:
            lim_r = rem_r = None
        if lim_t is not None and lim_t <= 0:
            lim_t = rem_t = None
        self.snapshot = HeaderSnapshot(lim_r, lim_t, rem_r, rem_t, rst_r, rst_t)

        if self.learn:
            if self._configured_rpm is None and lim_r:
                self._rpm = self._learn(self._rpm, lim_r * self.safety)
            if self._configured_tpm is None and lim_t:
                self._tpm = self._learn(self._tpm, lim_t * self.safety)

        wait = max(
            self._refill_wait(lim_r, rem_r, rst_r, need=1.0),
            self._refill_wait(lim_t, rem_t, rst_t, need=float(max(1, self._last_est))),
        )
        if wait > 0:
            self.pause(wait)
        self._end_probe()

    def _learn(self, bucket: _Bucket | None, per_minute: float) -> _Bucket:
        if bucket is None:
            return _Bucket(per_minute, self.burst_s)
        if abs(per_minute - bucket.per_minute) > 0.005 * bucket.per_minute:
            bucket.set_limit(per_minute)
        return bucket

    def _refill_wait(self, limit: int | None, remaining: int | None, reset: float | None, need: float) -> float:
        """Seconds until the server's bucket holds `need` (or a burst's worth) again; 0 if it already does."""
        if remaining is None or reset is None or reset <= 0:
            return 0.0
        if limit is None:  # no limit header: only an exhausted bucket is a clear signal
            return reset if remaining <= 0 else 0.0
        need = max(need, limit / 60.0 * self.burst_s)
        deficit = need - remaining
        if deficit <= 0:
            return 0.0
        missing = limit - remaining
        if missing <= 0:
            return 0.0
        return min(reset, reset * deficit / missing)
