"""The retry policy as tables: every kind on a first and a last attempt, with and without headers."""

from __future__ import annotations

from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from pipeline.providers.base import ErrorKind as K
from pipeline.run.retry import Decision, RetryPolicy, backoff_s, decide
from pipeline.providers.classify import classify_status
from pipeline.providers.headers import exceeds_token_limit, parse_duration, parse_retry_after, rate_limit_wait

P = RetryPolicy()  # max_attempts 6, base 0.5, cap 20, retry-after cap 120
NO_HEADERS: dict[str, str] = {}
RA = {"retry-after": "3"}
RA_MS = {"retry-after-ms": "644", "retry-after": "9"}
RESETS = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1.5s"}
HUGE_RA = {"retry-after": "3600"}

# (kind, attempt, headers, rand, expected decision)
CASES = [
    # stop the run: nothing else can succeed; attempt and headers do not matter
    *[(k, a, h, 0.5, Decision("stop_run", reason=k.value))
      for k in (K.AUTH, K.PERMISSION, K.NOT_FOUND, K.QUOTA) for a in (1, 6) for h in (NO_HEADERS, RA)],
    # this image can never succeed
    *[(k, a, h, 0.5, Decision("give_up", reason=k.value))
      for k in (K.BAD_REQUEST, K.TOO_LARGE) for a in (1, 6) for h in (NO_HEADERS, RA)],
    # unusable answer: one more try after a short (equal-jitter base) wait, then give up
    *[(k, 1, h, 0.0, Decision("retry", wait_s=0.25, reason=k.value)) for k in (K.REFUSED, K.EMPTY, K.INVALID)
      for h in (NO_HEADERS, RA)],
    *[(k, 1, NO_HEADERS, 1.0, Decision("retry", wait_s=0.5, reason=k.value))
      for k in (K.REFUSED, K.EMPTY, K.INVALID)],
    *[(k, a, NO_HEADERS, 0.5, Decision("give_up", reason=k.value))
      for k in (K.REFUSED, K.EMPTY, K.INVALID) for a in (2, 6)],
    # rate limit: the server's wait, the pool pauses
    (K.RATE_LIMIT, 1, RA, 0.5, Decision("retry", wait_s=3.0, reason="rate_limited", pause_pool=True)),
    (K.RATE_LIMIT, 1, RA_MS, 0.5, Decision("retry", wait_s=0.644, reason="rate_limited", pause_pool=True)),
    (K.RATE_LIMIT, 3, RESETS, 0.5, Decision("retry", wait_s=1.5, reason="rate_limited", pause_pool=True)),
    (K.RATE_LIMIT, 1, HUGE_RA, 0.5, Decision("retry", wait_s=120.0, reason="rate_limited", pause_pool=True)),
    (K.RATE_LIMIT, 1, NO_HEADERS, 0.0, Decision("retry", wait_s=0.25, reason="rate_limited", pause_pool=True)),
    (K.RATE_LIMIT, 5, NO_HEADERS, 1.0, Decision("retry", wait_s=8.0, reason="rate_limited", pause_pool=True)),
    (K.RATE_LIMIT, 6, RA, 0.5, Decision("give_up", reason="rate_limited")),
    (K.RATE_LIMIT, 6, NO_HEADERS, 0.5, Decision("give_up", reason="rate_limited")),
    # transient: backoff, or retry-after when sent; never a pool pause
    *[(k, 1, NO_HEADERS, 0.0, Decision("retry", wait_s=0.25, reason=k.value))
      for k in (K.SERVER, K.OTHER)],
    # a timed-out request already waited --timeout; a dropped keep-alive connection is usually stale
    *[(k, 1, NO_HEADERS, 0.7, Decision("retry", wait_s=0.0, reason=k.value))
      for k in (K.TIMEOUT, K.CONNECTION)],
    *[(k, 2, NO_HEADERS, 0.0, Decision("retry", wait_s=0.5, reason=k.value))
      for k in (K.TIMEOUT, K.CONNECTION)],
    *[(k, 1, RA, 0.0, Decision("retry", wait_s=3.0, reason=k.value))
      for k in (K.SERVER, K.TIMEOUT, K.CONNECTION, K.OTHER)],
    *[(k, 5, NO_HEADERS, 1.0, Decision("retry", wait_s=8.0, reason=k.value))
      for k in (K.SERVER, K.TIMEOUT, K.CONNECTION, K.OTHER)],
    *[(k, 6, h, 0.5, Decision("give_up", reason=k.value))
      for k in (K.SERVER, K.TIMEOUT, K.CONNECTION, K.OTHER) for h in (NO_HEADERS, RA)],
    # no connection at all: the run waits out the outage (pool held, probed); never an attempt spent,
    # never given up per image, whatever the attempt count or headers
    *[(K.UNREACHABLE, a, h, r, Decision("wait_outage", reason="unreachable", pause_pool=True))
      for a in (1, 6, 1000) for h in (NO_HEADERS, RA) for r in (0.0, 1.0)],
    (K.SERVER, 1, {"retry-after": "0"}, 1.0, Decision("retry", wait_s=0.5, reason="server_error")),
    (K.SERVER, 1, HUGE_RA, 0.0, Decision("retry", wait_s=120.0, reason="server_error")),
]


@pytest.mark.parametrize(("kind", "attempt", "headers", "rand", "expected"), CASES)
def test_decide_table(kind, attempt, headers, rand, expected):
    got = decide(kind, attempt, headers, P, rand)
    assert got.action == expected.action
    assert got.reason == expected.reason
    assert got.pause_pool == expected.pause_pool
    assert got.wait_s == pytest.approx(expected.wait_s)


def test_every_kind_is_covered():
    seen = {case[0] for case in CASES}
    assert seen == set(K)


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_max_attempts_bounds_retries(max_attempts):
    policy = RetryPolicy(max_attempts=max_attempts)
    for kind in (K.SERVER, K.RATE_LIMIT, K.REFUSED):
        retries = 0
        for attempt in range(1, 10):
            if decide(kind, attempt, NO_HEADERS, policy, 0.5).action != "retry":
                break
            retries += 1
        limit = max_attempts - 1 if kind is not K.REFUSED else min(1, max_attempts - 1)
        assert retries == limit, kind


@pytest.mark.parametrize("attempt", range(1, 12))
@pytest.mark.parametrize("rand", [0.0, 0.3, 0.999])
def test_backoff_equal_jitter_bounds(attempt, rand):
    b = min(P.cap_s, P.base_s * 2 ** (attempt - 1))
    wait = backoff_s(attempt, P, rand)
    assert b / 2 <= wait <= b
    assert wait == pytest.approx(b / 2 + rand * b / 2)


def test_backoff_is_capped_and_survives_huge_attempts():
    policy = RetryPolicy(max_attempts=10_000)
    assert backoff_s(10_000, policy, 0.999) <= policy.cap_s
    assert decide(K.SERVER, 9_000, NO_HEADERS, policy, 0.999).wait_s <= policy.cap_s


def test_backoff_grows_then_caps():
    waits = [backoff_s(n, P, 1.0) for n in range(1, 9)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


def test_rand_out_of_range_is_clamped():
    assert backoff_s(1, P, -3.0) == pytest.approx(0.25)
    assert backoff_s(1, P, 7.0) == pytest.approx(0.5)


def test_attempt_zero_is_treated_as_first():
    assert decide(K.SERVER, 0, NO_HEADERS, P, 0.0) == decide(K.SERVER, 1, NO_HEADERS, P, 0.0)


def test_mixed_case_header_names():
    got = decide(K.RATE_LIMIT, 1, {"Retry-After-Ms": "250"}, P, 0.5)
    assert got.wait_s == pytest.approx(0.25)


# ------------------------------------------------------------------ parse_duration

@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1m30.5s", 90.5),
        ("2h1m", 7260.0),
        ("0s", 0.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("250ns", 2.5e-7),
        ("1h0m0s", 3600.0),
        (".5s", 0.5),
        ("17.281s", 17.281),
        ("1S", 1.0),
        (" 2m ", 120.0),
        ("+3s", 3.0),
        ("1.5", 1.5),  # bare number: seconds
        ("0", 0.0),
        ("", None),
        ("   ", None),
        ("-1s", None),
        ("abc", None),
        ("1x", None),
        ("s", None),
        ("1s garbage", None),
        ("1 s", None),
        ("nan", None),
        ("inf", None),
        ("1ss", None),
    ],
)
def test_parse_duration(text, seconds):
    got = parse_duration(text)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


# ------------------------------------------------------------------ parse_retry_after

NOW = 1_800_000_000.0
FUTURE = format_datetime(datetime.fromtimestamp(NOW + 30, tz=timezone.utc), usegmt=True)
PAST = format_datetime(datetime.fromtimestamp(NOW - 30, tz=timezone.utc), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after-ms": "644"}, 0.644),
        ({"retry-after-ms": "644", "retry-after": "9"}, 0.644),
        ({"retry-after-ms": "-5", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "tomorrow"}, None),
        ({"retry-after": FUTURE}, 30.0),
        ({"retry-after": PAST}, 0.0),
        ({"Retry-After": "4"}, 4.0),
        ({"x-ratelimit-reset-requests": "1s"}, None),  # resets are not retry-after
    ],
)
def test_parse_retry_after(headers, seconds):
    got = parse_retry_after(headers, now=NOW)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        ({"retry-after": "0"}, None),
        ({"retry-after": "2"}, 2.0),
        ({"x-ratelimit-reset-requests": "120ms"}, 0.12),
        # the exhausted limit's reset wins over a longer one of a limit that still has room
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "120ms",
          "x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "30s"}, 0.12),
        # unknown which is exhausted: the longer (a too-short wait costs another 429)
        ({"x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s",
          "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "3s"}, 3.0),
        ({"x-ratelimit-reset-tokens": "0s"}, None),
        ({"x-ratelimit-reset-tokens": "bogus"}, None),
    ],
)
def test_rate_limit_wait(headers, seconds):
    got = rate_limit_wait(headers)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


# ------------------------------------------------------------------ classify_status

@pytest.mark.parametrize(
    ("status", "code", "error_type", "kind"),
    [
        (429, "rate_limit_exceeded", "tokens", K.RATE_LIMIT),
        (429, "rate_limit_exceeded", "requests", K.RATE_LIMIT),
        (429, None, None, K.RATE_LIMIT),  # compatible servers send no code
        (429, "insufficient_quota", "insufficient_quota", K.QUOTA),
        (429, None, "insufficient_quota", K.QUOTA),  # OpenAI has sent code null with this type
        (429, "billing_not_active", None, K.QUOTA),
        (429, "request_too_large", None, K.TOO_LARGE),
        (429, "tokens_exceeded", None, K.TOO_LARGE),
        (413, None, None, K.TOO_LARGE),
        (400, "context_length_exceeded", "invalid_request_error", K.TOO_LARGE),
        (400, "invalid_image_format", "invalid_request_error", K.BAD_REQUEST),
        (400, None, None, K.BAD_REQUEST),
        (422, None, None, K.BAD_REQUEST),
        (401, "invalid_api_key", None, K.AUTH),
        (401, None, None, K.AUTH),
        (403, "unsupported_country_region_territory", None, K.PERMISSION),
        (404, "model_not_found", None, K.NOT_FOUND),
        (404, None, None, K.NOT_FOUND),
        (402, None, None, K.QUOTA),
        (408, None, None, K.TIMEOUT),
        (409, None, None, K.SERVER),
        (500, None, None, K.SERVER),
        (502, None, None, K.SERVER),
        (503, None, None, K.SERVER),  # Ollama's "server busy"
        (504, None, None, K.SERVER),
        (529, None, None, K.SERVER),
        (418, None, None, K.OTHER),
        (200, None, None, K.OTHER),
        (429, "RATE_LIMIT_EXCEEDED", None, K.RATE_LIMIT),
        (429, "Insufficient_Quota", None, K.QUOTA),
    ],
)
def test_classify_status(status, code, error_type, kind):
    assert classify_status(status, code, error_type=error_type) is kind


def test_classify_status_positional_two_args():
    assert classify_status(429, "insufficient_quota") is K.QUOTA


@pytest.mark.parametrize(
    ("headers", "reserve", "kind"),
    [
        ({"x-ratelimit-limit-tokens": "30000"}, 30601, K.TOO_LARGE),  # "Request too large ... Limit 30000"
        ({"x-ratelimit-limit-tokens": "30000"}, 30000, K.RATE_LIMIT),
        ({"x-ratelimit-limit-tokens": "30000"}, 500, K.RATE_LIMIT),
        ({"x-ratelimit-limit-tokens": "-1"}, 10**9, K.RATE_LIMIT),  # Azure nonsense
        ({"x-ratelimit-limit-tokens": "0"}, 10**9, K.RATE_LIMIT),
        ({}, 10**9, K.RATE_LIMIT),
    ],
)
def test_request_too_large_detected_from_headers(headers, reserve, kind):
    assert classify_status(429, "rate_limit_exceeded", headers=headers, reserve_tokens=reserve) is kind
    assert exceeds_token_limit(headers, reserve) is (kind is K.TOO_LARGE)
