"""The retry policy: what to do after a failed request, as one pure function.

Every worker asks `decide()` after an `APIFailure`; nothing else in the pipeline sleeps or retries on its
own, so "how hard do we push after an error" lives in one place and is table-tested without a server.
The decision reads only the `ErrorKind`, the attempt count and the response headers - never an error
message, whose wording changes between providers and versions.

Jitter: *equal jitter* (wait = b/2 + rand·b/2 for the backoff b). Full jitter (rand·b) spreads retries a
little wider, but it lets a worker retry an overloaded server (Ollama's 503 "server busy", a 5xx burst)
after almost no wait; equal jitter keeps a floor of half the backoff while still spreading a pool of
workers that failed together over a window of b/2. Rate limits (429) do not rely on jitter at all: the
server says when to come back (retry-after, reset headers) and the whole pool pauses (`pause_pool`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from pipeline.providers.base import ErrorKind
from pipeline.providers.headers import parse_retry_after, rate_limit_wait

__all__ = ["RetryPolicy", "Decision", "decide", "backoff_s"]


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts an image gets and how long to wait between them.

    `max_attempts` counts every attempt including the first. `base_s`·2^(attempt-1) is the backoff before
    jitter, capped at `cap_s`. A server's retry-after is honoured up to `retry_after_cap_s`; beyond that we
    assume the header is nonsense (or a daily limit) and would rather give up the image than hang the run.
    """

    max_attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 20.0
    retry_after_cap_s: float = 120.0


@dataclass(frozen=True)
class Decision:
    """What the worker does next. `reason` is always the `ErrorKind` value (a short code for errors.csv)."""

    action: Literal["retry", "give_up", "stop_run", "wait_outage"]
    wait_s: float = 0.0
    reason: str = ""
    pause_pool: bool = False  # a 429 or an outage: every worker waits, not just this one


# Kinds after which every further request of the run is pointless.
STOP_RUN = frozenset({ErrorKind.AUTH, ErrorKind.PERMISSION, ErrorKind.NOT_FOUND, ErrorKind.QUOTA})
# Kinds that can never succeed for this image: retrying only wastes money.
_NEVER = frozenset({ErrorKind.BAD_REQUEST, ErrorKind.TOO_LARGE})
# The model answered but the answer is unusable; sampling again sometimes helps, once.
_ONCE_MORE = frozenset({ErrorKind.REFUSED, ErrorKind.EMPTY, ErrorKind.INVALID})
_ONCE_MORE_ATTEMPTS = 2


def backoff_s(attempt: int, policy: RetryPolicy, rand: float) -> float:
    """Equal-jitter exponential backoff after `attempt` failed attempts: in [b/2, b], b = min(cap, base·2^(n-1))."""
    n = max(1, attempt)
    # Cap the exponent before computing the power so a huge attempt count cannot overflow.
    b = min(policy.cap_s, policy.base_s * 2.0 ** min(n - 1, 64))
    r = min(max(rand, 0.0), 1.0)
    return b / 2.0 + r * b / 2.0


def decide(
    kind: ErrorKind,
    attempt: int,
    headers: Mapping[str, str],
    policy: RetryPolicy,
    rand: float,
) -> Decision:
    """Decide what follows a failure of kind `kind` after `attempt` attempts (1 after the first failure).

    `rand` in [0, 1) is drawn by the caller so tests are deterministic.

    - AUTH, PERMISSION, NOT_FOUND, QUOTA -> stop_run: no other image can succeed either.
    - UNREACHABLE -> wait_outage with `pause_pool`, whatever the attempt: no connection was made, so the
      attempt says nothing about the image and is not spent; the run waits out the outage
      (`pipeline.run.outage`) and gives up on the server, not on images.
    - BAD_REQUEST, TOO_LARGE -> give_up at once: this image can never succeed.
    - REFUSED, EMPTY, INVALID -> one more try after a short wait, then give_up.
    - RATE_LIMIT -> retry with `pause_pool`: wait what the server asked for (retry-after-ms, retry-after,
      else the reset header of the exhausted limit), else backoff.
    - SERVER, TIMEOUT, CONNECTION, OTHER -> retry after retry-after if the server sent one, else backoff.
      The first retry after a TIMEOUT or a dropped CONNECTION goes at once: a timed-out request has
      already waited the whole --timeout (more than any first backoff), and a dropped keep-alive
      connection is usually a stale one, not an overloaded server. Later attempts back off as usual.
    Transient kinds give up once `attempt >= max_attempts`.
    """
    n = max(1, attempt)
    reason = kind.value
    if kind in STOP_RUN:
        return Decision("stop_run", reason=reason)
    if kind is ErrorKind.UNREACHABLE:
        return Decision("wait_outage", reason=reason, pause_pool=True)
    if kind in _NEVER:
        return Decision("give_up", reason=reason)
    if kind in _ONCE_MORE:
        if n < min(_ONCE_MORE_ATTEMPTS, policy.max_attempts):
            return Decision("retry", wait_s=backoff_s(1, policy, rand), reason=reason)
        return Decision("give_up", reason=reason)

    if n >= policy.max_attempts:
        return Decision("give_up", reason=reason)

    if kind is ErrorKind.RATE_LIMIT:
        hinted = rate_limit_wait(headers)
        wait = min(hinted, policy.retry_after_cap_s) if hinted is not None else backoff_s(n, policy, rand)
        return Decision("retry", wait_s=wait, reason=reason, pause_pool=True)

    hinted = parse_retry_after(headers)
    if hinted is not None and hinted > 0:
        wait = min(hinted, policy.retry_after_cap_s)
    elif n == 1 and kind in (ErrorKind.TIMEOUT, ErrorKind.CONNECTION):
        wait = 0.0
    else:
        wait = backoff_s(n, policy, rand)
    return Decision("retry", wait_s=wait, reason=reason)


# --------------------------------------------------------------------------------------------- headers
