"""The pool-wide rate limiter: requests and tokens per minute, paced evenly, learned from headers, paused by 429s.

One `RateLimiter` is shared by all workers of a run. Before each request a worker calls
`acquire(est_tokens)`; after the answer it calls `correct(reservation, actual_tokens)` and
`observe_headers(reply.headers)`; after a 429 it calls `pause(decision.wait_s)`.

Why even spacing and no burst: OpenAI enforces per-minute limits at sub-minute granularity (60,000 RPM is
enforced as about 1,000 in any rolling second), so anything that lets a second's worth out at once is
counted against the next second too and earns 429s. Each limit is a `Schedule`: GCRA / virtual scheduling
with zero burst tolerance. It keeps one number, the theoretical arrival time (TAT) of the next unit; a
request of cost c is sent at max(now, TAT) and moves TAT on by c x 60/limit. Requests cost 1 on the
request schedule; on the token schedule a request's token reservation (input estimate + max_tokens x n)
moves the schedule on by tokens/rate, and `correct` moves it by the difference once the answer says what
was used. Idle time earns no credit (max(now, TAT)), so a pool that was idle cannot burst either; only
a slot missed by at most `CATCH_UP_S` (a stall of the event loop) is still used.

The safety margin is ONE rule for both modes: we pace at `safety` x the limit (default 0.98, i.e. 2 %
under it), whether the limit was given (`--rpm`/`--tpm`) or learned from x-ratelimit-limit-* headers.
2 % leaves about 20 ms per second for clock and network jitter between our send and the server's count.

Cost: `acquire` is a few float operations per schedule plus one `asyncio.sleep` until the reserved send
time - no polling, no thundering herd: each waiter sleeps to its own slot. Slots are handed out in call
order (FIFO), so a large token reservation is never starved by smaller ones. A pool-wide pause (429) bumps
an epoch and rebases the schedules at its end; workers sleeping toward a slot reserved before the pause
reserve again, so traffic resumes at the steady rate instead of bursting.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Mapping

from pipeline.providers.headers import header_int, parse_duration

__all__ = ["RateLimiter", "Reservation", "HeaderSnapshot", "Schedule", "DEFAULT_SAFETY", "CATCH_UP_S"]

DEFAULT_SAFETY = 0.98  # pace at 98 % of a limit, given or learned (the one safety-margin rule)
# A slot missed by at most this much (the event loop or the CPU was late) is still used, so short stalls do
# not cost throughput. Safe against "N in any rolling second" while CATCH_UP_S <= 1/safety - 1 (20 ms at
# 0.98): N slots span N/(safety x N/s) = 1.0204 s, a late first one shortens that by at most CATCH_UP_S.
# 5 ms leaves 15 ms for the jitter between our send and the server's count (measured: +-7 ms at p1/p99).
CATCH_UP_S = 0.005


@dataclass
class Schedule:
    """GCRA virtual scheduling for one limit ("N per minute"), zero burst tolerance; pure (the caller
    passes `now`), so the pacing math is tested with a fake clock.

    `tat`: the earliest time the next unit may go. `sent_tat`: `tat` as of the latest reservation that
    was actually used, which is what a rebase after a pause must not go below (tokens already sent keep
    their debt; reservations abandoned by the pause are forgotten). `catch_up_s`: a slot that passed at
    most this long ago is still booked (sent now), so a stall of the caller's loop is made up, never more.
    """

    per_minute: float
    tat: float = float("-inf")
    sent_tat: float = float("-inf")
    catch_up_s: float = CATCH_UP_S

    @property
    def interval(self) -> float:
        """Seconds one unit occupies on the schedule."""
        return 60.0 / self.per_minute

    def reserve(self, now: float, cost: float = 1.0) -> tuple[float, float]:
        """Reserve `cost` units: (send time, the schedule's TAT after them). The send time is never
        before `now` nor before the previous reservation's end. A slot missed by at most `catch_up_s`
        (a stall) is booked and sent now; one missed by more (idle time) earns no credit at all."""
        booked = self.tat if now - self.catch_up_s <= self.tat else now
        self.tat = booked + max(0.0, cost) * self.interval
        return max(now, booked), self.tat

    def commit(self, end: float) -> None:
        """The reservation ending at `end` was used (its request went out)."""
        if end > self.sent_tat:
            self.sent_tat = end

    def charge(self, delta: float) -> None:
        """Add (delta > 0) or give back (delta < 0) units after the fact, e.g. actual minus estimated tokens."""
        shift = delta * self.interval
        self.tat += shift
        self.sent_tat += shift

    def rebase(self, at: float) -> None:
        """After a pause until `at`: the next unit goes no earlier than `at`, nor before what was sent."""
        self.tat = max(at, self.sent_tat)

    def set_limit(self, per_minute: float, now: float) -> None:
        """Change the rate in place; the part of the schedule still ahead of `now` is rescaled to it."""
        scale = self.per_minute / per_minute
        if self.tat > now:
            self.tat = now + (self.tat - now) * scale
        if self.sent_tat > now:
            self.sent_tat = now + (self.sent_tat - now) * scale
        self.per_minute = per_minute


@dataclass
class Reservation:
    """What one `acquire` took, so `correct` can settle it against the tokens actually used."""

    est_tokens: int
    charged_tokens: int = 0  # tokens put on the tpm schedule; 0 when tpm was unlimited at acquire time
    settled: bool = False
    _schedule: Schedule | None = field(default=None, repr=False, compare=False)


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


def refill_wait(limit: int | None, remaining: int | None, reset: float | None, need: float) -> float:
    """Seconds until the server's window holds `need` units again; 0 if it already does.

    Only a window that is (nearly) exhausted - remaining below what the next request needs - pauses: the
    pacing already keeps us under the limit, and reacting to every remaining count costs throughput.
    OpenAI's reset is the time until the window is full again, so assuming linear refill the server
    regains (limit - remaining)/reset units per second; the wait is capped at the reset.
    """
    if remaining is None or reset is None or reset <= 0:
        return 0.0
    if limit is None:  # no limit header: only an exhausted window is a clear signal
        return reset if remaining <= 0 else 0.0
    deficit = max(need, 1.0) - remaining
    if deficit <= 0:
        return 0.0
    missing = limit - remaining
    if missing <= 0:
        return 0.0
    return min(reset, reset * deficit / missing)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute schedules shared by all workers, plus a pool-wide pause.

    `rpm`/`tpm` None means "not configured": with `learn` the limit is taken from the first
    x-ratelimit-limit-* header (a changed limit is followed); without headers (vLLM, Ollama) the limiter
    stays unlimited and `--concurrency` alone brakes. Configured limits are never overridden by headers.
    Given or learned, requests are paced at `safety` x the limit. `rpm_limit`/`tpm_limit` report the
    limit itself; `pace_rpm`/`pace_tpm` the rate actually paced to. Must be used from one asyncio loop.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        learn: bool = True,
        safety: float = DEFAULT_SAFETY,
        probe: bool = False,
    ) -> None:
        if not 0 < safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {safety!r}")
        self._configured_rpm = _check_limit("rpm", rpm)
        self._configured_tpm = _check_limit("tpm", tpm)
        self.learn = learn
        self.safety = float(safety)
        self._rpm_limit = self._configured_rpm
        self._tpm_limit = self._configured_tpm
        self._rpm = Schedule(self._configured_rpm * self.safety) if self._configured_rpm else None
        self._tpm = Schedule(self._configured_tpm * self.safety) if self._configured_tpm else None
        self._paused_until = 0.0
        self._epoch = 0  # bumped by every pause: slots reserved before it are given up and taken again
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
        """The requests-per-minute limit (configured, or learned from headers); None = unlimited."""
        return self._rpm_limit

    @property
    def tpm_limit(self) -> float | None:
        """The tokens-per-minute limit (configured, or learned from headers); None = unlimited."""
        return self._tpm_limit

    @property
    def pace_rpm(self) -> float | None:
        """Requests per minute actually paced to: safety x rpm_limit."""
        return self._rpm.per_minute if self._rpm is not None else None

    @property
    def pace_tpm(self) -> float | None:
        """Tokens per minute actually paced to: safety x tpm_limit."""
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
        """Wait for this request's slot: no pause active, its place on the request schedule and its
        `est_tokens` on the token schedule (what the server reserves up front: input + max_tokens x n)."""
        est = max(0, int(est_tokens))
        if self._probing and not self._probe_answered.is_set():
            if self._probe_sent:
                await self._probe_answered.wait()
            else:
                self._probe_sent = True
        while True:
            await self._wait_pause()
            epoch = self._epoch
            now = time.monotonic()
            rpm, tpm = self._rpm, self._tpm
            send_at = now
            r_end = t_end = None
            if rpm is not None:
                send_at, r_end = rpm.reserve(send_at, 1.0)
            if tpm is not None and est > 0:
                send_at, t_end = tpm.reserve(send_at, est)
            if send_at > now:
                await asyncio.sleep(send_at - now)
            if epoch != self._epoch or self._paused_until > time.monotonic():
                continue  # a pause came while we waited: our slot was given up, take a new one after it
            if rpm is not None and r_end is not None:
                rpm.commit(r_end)
            if tpm is not None and t_end is not None:
                tpm.commit(t_end)
            self._last_est = est
            charged = est if t_end is not None else 0
            return Reservation(est_tokens=est, charged_tokens=charged, _schedule=tpm if charged else None)

    def correct(self, reservation: Reservation, actual_tokens: int) -> None:
        """Settle a reservation: move the token schedule by (actual - charged) tokens.

        Call with the answer's total tokens (prompt + completion of all choices). After a 429 the server
        counted nothing, so `correct(reservation, 0)` gives the whole reservation back (later requests
        benefit; slots already handed out keep their time). A reservation is settled once; later calls are
        ignored. If the tpm limit was learned after this reservation was taken, nothing is adjusted.
        """
        self._end_probe()
        if reservation.settled:
            return
        reservation.settled = True
        schedule = reservation._schedule
        if schedule is None or schedule is not self._tpm:
            return
        schedule.charge(max(0, int(actual_tokens)) - reservation.charged_tokens)

    def _end_probe(self) -> None:
        """The probe came back (answered, failed or abandoned): open the pool."""
        if self._probing and not self._probe_answered.is_set():
            self._probe_answered.set()

    # ------------------------------------------------------------------ pause

    def pause(self, seconds: float) -> None:
        """Hold every new request of the pool for exactly `seconds` from now (a 429 speaks for the whole
        key; `seconds` is what the server asked). Extends, never shortens, an existing pause. The schedules
        restart at its end at the steady rate: no burst, and no extra wait on top of what was asked."""
        if not seconds > 0:
            return
        until = time.monotonic() + seconds
        if until <= self._paused_until:
            return
        self._paused_until = until
        self._epoch += 1
        for schedule in (self._rpm, self._tpm):
            if schedule is not None:
                schedule.rebase(until)

    # ------------------------------------------------------------------ headers

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn limits from x-ratelimit-* headers; pause only when the server's window is nearly out.

        - limit-requests / limit-tokens: when that limit was not configured and `learn` is set, pace to
          safety x limit from now on (a changed limit, e.g. a tier upgrade mid-run, is followed).
          Values <= 0 (Azure has sent -1 and 0) are ignored, along with that limit's remaining.
        - remaining-* with reset-*: only when remaining is below what the next request needs (1 request,
          the last token estimate) does the pool pause, until that deficit has refilled (`refill_wait`).
          This applies with or without `learn`: the server's state is the truth for a shared key.
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
            now = time.monotonic()
            if self._configured_rpm is None and lim_r:
                self._rpm_limit = float(lim_r)
                self._rpm = self._learn(self._rpm, lim_r * self.safety, now)
            if self._configured_tpm is None and lim_t:
                self._tpm_limit = float(lim_t)
                self._tpm = self._learn(self._tpm, lim_t * self.safety, now)

        wait = max(
            refill_wait(lim_r, rem_r, rst_r, need=1.0),
            refill_wait(lim_t, rem_t, rst_t, need=float(max(1, self._last_est))),
        )
        if wait > 0:
            self.pause(wait)
        self._end_probe()

    @staticmethod
    def _learn(schedule: Schedule | None, per_minute: float, now: float) -> Schedule:
        if schedule is None:
            return Schedule(per_minute)
        if abs(per_minute - schedule.per_minute) > 0.005 * schedule.per_minute:
            schedule.set_limit(per_minute, now)
        return schedule
