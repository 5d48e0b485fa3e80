"""What a server's answer headers say: retry-after, Go-style durations, rate-limit counters.

Plain functions over a header mapping, tested without a server. The retry policy (`pipeline.run.retry`)
and the rate limiter (`pipeline.run.limits`) read waits and limits through these; the backend reads
`exceeds_token_limit` to tell "request too large" from an ordinary 429.
"""

from __future__ import annotations

import math
import re
import time
from email.utils import parsedate_to_datetime
from typing import Mapping

__all__ = ["parse_retry_after", "parse_duration", "header_int", "rate_limit_wait", "exceeds_token_limit"]


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
