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

import math
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal, Mapping

from pipeline.backends.base import ErrorKind

__all__ = [
    "RetryPolicy",
    "Decision",
    "decide",
    "backoff_s",
    "parse_retry_after",
    "parse_duration",
    "rate_limit_wait",
    "classify_status",
    "exceeds_token_limit",
]


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
_STOP_RUN = frozenset({ErrorKind.AUTH, ErrorKind.PERMISSION, ErrorKind.NOT_FOUND, ErrorKind.QUOTA})
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
      (`pipeline.outage`) and gives up on the server, not on images.
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
    if kind in _STOP_RUN:
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


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names are case-insensitive; APIFailure lower-cases them already but a raw Mapping may not."""
    return {str(k).lower(): v for k, v in headers.items()}


def _finite_nonneg(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, or None.

    `retry-after-ms` (OpenAI, milliseconds) wins over `retry-after` (RFC 9110: delay-seconds or an
    HTTP-date). Negative, non-finite and unparseable values are ignored, so a broken retry-after-ms still
    lets retry-after speak. A date in the past gives 0.0. `now` (epoch seconds) is for tests.
    """
    h = _lower(headers)
    ms = _finite_nonneg(h.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    raw = h.get("retry-after")
    if raw is None:
        return None
    seconds = _finite_nonneg(raw)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(str(raw).strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less date is garbage
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration ("1s", "6m0s", "20ms", "1m30.5s", "2h1m", "500us"), or None.

    OpenAI's x-ratelimit-reset-* headers use Go's time.Duration format. Liberal on purpose: surrounding
    whitespace and upper case are accepted, and a bare number is taken as seconds (some compatible servers
    send "1.5"). Negative and malformed values give None.
    """
    if text is None:
        return None
    s = str(text).strip().lower()
    if not s:
        return None
    bare = _finite_nonneg(s)
    if bare is not None:
        return bare
    if s.startswith("+"):
        s = s[1:]
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(s):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(s) or not math.isfinite(total):
        return None
    return total


def header_int(h: Mapping[str, str], name: str) -> int | None:
    """An integer header value (\"1000\", \"999.0\"); None when absent or not a number."""
    raw = h.get(name)
    if raw is None:
        return None
    try:
        return int(float(str(raw).strip()))
    except (ValueError, OverflowError):
        return None


def rate_limit_wait(headers: Mapping[str, str]) -> float | None:
    """How long a 429 asks us to wait, from its headers; None if they do not say.

    Order: retry-after-ms, retry-after, then x-ratelimit-reset-{requests,tokens}. OpenAI's reset is the
    time until that bucket is *full* again, so a nearly-full but exhausted bucket can announce a long
    reset; we take the reset of the limit whose remaining is 0 when exactly that is known, else the larger
    reset (a too-short wait costs another 429 and one attempt of this image, a too-long one only time).
    Values <= 0 are treated as "not said", since retrying a 429 immediately only buys another 429.
    """
    after = parse_retry_after(headers)
    if after is not None and after > 0:
        return after
    h = _lower(headers)
    resets: dict[str, float] = {}
    exhausted: list[str] = []
    for dim in ("requests", "tokens"):
        reset = parse_duration(h.get(f"x-ratelimit-reset-{dim}", "") or "")
        if reset is None or reset <= 0:
            continue
        resets[dim] = reset
        remaining = header_int(h, f"x-ratelimit-remaining-{dim}")
        if remaining is not None and remaining <= 0:
            exhausted.append(dim)
    if not resets:
        return None
    if len(exhausted) == 1:
        return resets[exhausted[0]]
    return max(resets.values())


def exceeds_token_limit(headers: Mapping[str, str], reserve_tokens: int) -> bool:
    """True when a request's reserved tokens exceed the whole per-minute token limit in `headers`.

    OpenAI answers such a request with 429 code "rate_limit_exceeded" ("Request too large ... on tokens
    per min") - the same code as an ordinary rate limit - and it can never succeed. The only structural
    way to tell them apart is to compare the request's reservation (input + max_tokens·n) to
    x-ratelimit-limit-tokens. A missing, 0 or -1 limit (Azure) never counts as exceeded.
    """
    limit = header_int(_lower(headers), "x-ratelimit-limit-tokens")
    return limit is not None and limit > 0 and reserve_tokens > limit


# --------------------------------------------------------------------------------------------- status


_QUOTA_CODES = frozenset({"insufficient_quota", "billing_not_active", "billing_hard_limit_reached"})
_TOO_LARGE_CODES = frozenset(
    {"request_too_large", "context_length_exceeded", "string_above_max_length", "tokens_exceeded"}
)
_AUTH_CODES = frozenset({"invalid_api_key", "invalid_authentication"})


def classify_status(
    status: int,
    code: str | None,
    *,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    reserve_tokens: int | None = None,
) -> ErrorKind:
    """Map an HTTP status and OpenAI's error `code` (and optionally `type`) to an ErrorKind.

    Codes refine the status; messages are never read. Notes:
    - 429 is a rate limit unless the code/type says quota (OpenAI has sent insufficient_quota with
      code null and type "insufficient_quota", hence `error_type`). "Request too large" arrives as 429
      rate_limit_exceeded; pass the 429's `headers` and the request's `reserve_tokens` to detect it
      (`exceeds_token_limit`), otherwise it is retried as a rate limit until attempts run out.
    - 413 and context-length codes are TOO_LARGE; 402 (payment required, used by some compatible
      gateways) is QUOTA; 409 (conflict/lock, retried by the SDK too) and 5xx are SERVER.
    """
    c = (code or "").strip().lower()
    t = (error_type or "").strip().lower()
    if status == 429:
        if c in _QUOTA_CODES or t in _QUOTA_CODES:
            return ErrorKind.QUOTA
        if c in _TOO_LARGE_CODES:
            return ErrorKind.TOO_LARGE
        if headers is not None and reserve_tokens is not None and exceeds_token_limit(headers, reserve_tokens):
            return ErrorKind.TOO_LARGE
        return ErrorKind.RATE_LIMIT
    if status == 413 or c in _TOO_LARGE_CODES:
        return ErrorKind.TOO_LARGE
    if status == 402 or c in _QUOTA_CODES:
        return ErrorKind.QUOTA
    if status == 401 or c in _AUTH_CODES:
        return ErrorKind.AUTH
    if status == 403:
        return ErrorKind.PERMISSION
    if status == 404 or c == "model_not_found":
        return ErrorKind.NOT_FOUND
    if status == 408:
        return ErrorKind.TIMEOUT
    if status == 409 or 500 <= status <= 599:
        return ErrorKind.SERVER
    if status in (400, 422):
        return ErrorKind.BAD_REQUEST
    return ErrorKind.OTHER
