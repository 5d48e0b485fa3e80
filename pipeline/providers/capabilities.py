"""What an OpenAI-compatible server does with the parts of a request that servers treat differently.

Servers differ where OpenAI's API is optional: `n` (OpenAI and vLLM honour it; Ollama and `transformers
serve` ignore it and answer one choice; llama.cpp's `llama-server` rejects it with 400 "Only one completion
choice is allowed"), `response_format` (enforced, ignored, or rejected), `detail`, `usage`, rate-limit
headers (none of the local servers send any) and `max_tokens` vs `max_completion_tokens`.

Two things find this out: `python -m pipeline probe` asks on purpose (pipeline.run.probe), and every run
notes it from its first answers (`Learned`, kept in manifest.json as `learned`, read by the dry-run).
Both use the pure decisions here, tested without a server:

- `classify_n`, `classify_json_schema`, `classify_json_object`: an answer (or a refusal) -> "honoured" /
  "enforced" / "ignored" / "rejected";
- `recommend_concurrency`: from latencies measured at concurrency 1, 2, 4, 8, the concurrency beyond
  which latency grows faster than throughput (past it, a request waits longer than the extra
  throughput buys: the server is queueing, not working in parallel);
- `merge_learned`: what a run saw (manifest.json's `learned`), over what earlier runs in the folder saw.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "HONOURED", "IGNORED", "REJECTED", "ENFORCED", "ACCEPTED", "UNKNOWN",
    "classify_n", "classify_json_schema", "classify_json_object", "classify_accepted",
    "has_rate_limit_headers", "usage_present", "max_tokens_param",
    "LevelStats", "level_stats", "recommend_concurrency", "merge_levels", "matches_probe_schema",
    "LEARNED_KEYS", "merge_learned", "n_unsupported", "one_request_per_caption_note",
]

HONOURED = "honoured"
IGNORED = "ignored"
REJECTED = "rejected"
ENFORCED = "enforced"
ACCEPTED = "accepted"
UNKNOWN = "unknown"  # the question could not be asked (a 5xx, a timeout): no claim either way

# Statuses that mean "the server read the request and refused this part of it" (not a fault of its own).
_REFUSING_STATUSES = frozenset({400, 404, 415, 422, 501})


def _refused(status: int | None) -> bool:
    return status is not None and status in _REFUSING_STATUSES


def classify_n(asked: int, choices: int | None, status: int | None = 200) -> str:
    """`n` honoured, ignored or rejected, from one request that asked for `asked` (> 1) choices.

    `choices`: how many came back (None when the request failed); `status`: the HTTP status (None: no
    HTTP answer at all). A 400/422 to a request that differs from an accepted one only by `n` is a
    rejection (llama-server); one choice back is "ignored" (Ollama, transformers serve); all of them is
    "honoured". Anything else (5xx, timeout) is "unknown": no conclusion from a server's bad moment.
    """
    if asked < 2:
        raise ValueError("classify_n needs a request that asked for at least 2 choices")
    if status == 200 and choices is not None:
        return HONOURED if choices >= asked else IGNORED
    if _refused(status):
        return REJECTED
    return UNKNOWN


def _parse_json(content: str | None) -> Any:
    """The answer's JSON value (a ```json fence around it allowed), or a sentinel when it is not JSON."""
    text = (content or "").strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text[4:] if text[:4].lower() == "json" else text
        text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


_NOT_JSON = object()


def matches_probe_schema(value: Any, schema: Mapping[str, Any]) -> bool:
    """Does `value` fit the probe's own small schema (an object of enum-valued string fields, all required,
    nothing else)? Deliberately only that shape: the probe sends exactly one such schema."""
    if not isinstance(value, dict):
        return False
    props: Mapping[str, Any] = schema.get("properties") or {}
    if set(value) != set(props) or set(schema.get("required") or props) - set(value):
        return False
    for name, sub in props.items():
        options = sub.get("enum")
        if options is not None and value[name] not in options:
            return False
        if sub.get("type") == "string" and not isinstance(value[name], str):
            return False
    return True


def classify_json_schema(status: int | None, content: str | None, schema: Mapping[str, Any]) -> str:
    """`response_format: json_schema` enforced, ignored or rejected, from one answer.

    The probe's prompt does not ask for JSON, so an answer that is JSON fitting the schema was made so
    by the server (enforced); anything else that came back 200 means the server did not apply it
    (ignored; a truncated answer counts here too). A 400/422 is a rejection; 5xx or no answer, unknown.
    """
    if status == 200:
        return ENFORCED if matches_probe_schema(_parse_json(content), schema) else IGNORED
    return REJECTED if _refused(status) else UNKNOWN


def classify_json_object(status: int | None, content: str | None) -> str:
    """`response_format: json_object` enforced, ignored or rejected, from one answer.

    OpenAI requires the word "JSON" in the prompt for this mode, so the prompt asks for JSON and a model
    that follows instructions may answer JSON unasked: "enforced" here means "an object came back".
    """
    if status == 200:
        return ENFORCED if isinstance(_parse_json(content), dict) else IGNORED
    return REJECTED if _refused(status) else UNKNOWN


def classify_accepted(status: int | None) -> str:
    """A parameter (`detail`, `max_completion_tokens`, an image type) accepted, rejected or unknown."""
    if status == 200:
        return ACCEPTED
    return REJECTED if _refused(status) else UNKNOWN


def max_tokens_param(max_tokens: str, max_completion_tokens: str) -> str:
    """Which length parameter the server takes: "max_tokens", "max_completion_tokens", "both", "neither",
    or "unknown" when a request could not tell (each argument is a `classify_accepted` result)."""
    a, b = max_tokens == ACCEPTED, max_completion_tokens == ACCEPTED
    if a and b:
        return "both"
    if a:
        return "max_tokens"
    if b:
        return "max_completion_tokens"
    if max_tokens == REJECTED and max_completion_tokens == REJECTED:
        return "neither"
    return UNKNOWN


def has_rate_limit_headers(headers: Mapping[str, str]) -> bool:
    """Does an answer carry OpenAI-style rate-limit headers (`x-ratelimit-limit-requests`, ...)?"""
    return any(str(k).lower().startswith("x-ratelimit-") for k in headers)


def usage_present(completion: Mapping[str, Any]) -> bool:
    """Does a chat.completion object report `usage` with token counts?"""
    u = completion.get("usage")
    return isinstance(u, dict) and any(isinstance(u.get(k), int) for k in ("prompt_tokens", "completion_tokens"))


# --- latency at rising concurrency ------------------------------------------------------------------

@dataclass(frozen=True)
class LevelStats:
    """Requests at one concurrency: `concurrency` requests kept in flight until `requests` were sent."""

    concurrency: int
    requests: int
    errors: int
    p50_s: float | None  # median latency of the answered requests
    throughput_rps: float  # answered requests per second of wall time

    def to_dict(self) -> dict[str, Any]:
        return {"p50_s": None if self.p50_s is None else round(self.p50_s, 4),
                "throughput_rps": round(self.throughput_rps, 3), "requests": self.requests, "errors": self.errors}


def level_stats(concurrency: int, latencies: Sequence[float], errors: int, wall_s: float) -> LevelStats:
    """Summarise one level from the answered requests' latencies and the wall time of the whole level."""
    p50 = statistics.median(latencies) if latencies else None
    rps = len(latencies) / wall_s if wall_s > 0 and latencies else 0.0
    return LevelStats(concurrency, len(latencies) + errors, errors, p50, rps)


def recommend_concurrency(levels: Sequence[LevelStats]) -> int:
    """The concurrency beyond which latency grows faster than throughput; levels in rising order.

    Going from one level to the next, the latency grows by p50'/p50 and the throughput by rps'/rps. While
    throughput grows at least as fast as latency, more requests in flight are being worked on in parallel
    and pay off; once latency grows faster, the extra requests only queue (on a one-at-a-time server
    latency doubles and throughput stays put at the first step, so the answer is 1). A level with any
    error (timeout, 5xx, 503 busy) ends the climb at the level before it. Never below 1.
    """
    good = [lv for lv in levels if lv.p50_s is not None and lv.throughput_rps > 0]
    if not levels or not good or levels[0] is not good[0] or levels[0].errors:
        return 1
    best = levels[0].concurrency
    for prev, cur in zip(levels, levels[1:]):
        if cur.errors or cur.p50_s is None or cur.throughput_rps <= 0:
            break
        latency_growth = cur.p50_s / max(prev.p50_s or 0.0, 1e-9)
        throughput_growth = cur.throughput_rps / max(prev.throughput_rps, 1e-9)
        if latency_growth > throughput_growth:
            break
        best = cur.concurrency
    return max(1, best)


# --- what a run learns from its first answers -----------------------------------------------------------

# manifest.json's `learned`: what runs in the folder found out about the server. `n`, `json_schema`,
# `json_object` and `structured_mode` are decided by the fallbacks (pipeline.run.fallbacks); the run notes
# `rate_limit_headers` and `usage` from its answers (RunStats.saw_answer).
LEARNED_KEYS: tuple[str, ...] = ("n", "json_schema", "json_object", "structured_mode", "rate_limit_headers", "usage")


def merge_learned(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """This run's findings over the folder's earlier ones, key by key: a run that learned nothing (a rerun
    with everything done sends no request; a run of one caption per image never asks `n`) keeps what an
    earlier run learned. Values None mean "not known"."""
    old = previous if isinstance(previous, Mapping) else {}
    return {k: current.get(k) if current.get(k) is not None else old.get(k) for k in LEARNED_KEYS}


def n_unsupported(learned: Mapping[str, Any] | None) -> str | None:
    """"ignored" or "rejected" when a folder's `learned` (or a saved probe) says the server does not honour
    `n`, else None. The dry-run then counts one request per caption."""
    value = (learned or {}).get("n") if isinstance(learned, Mapping) else None
    return value if value in (IGNORED, REJECTED) else None


def one_request_per_caption_note(verdict: str, where: str) -> str:
    """The dry-run's line saying why it counts one request per caption."""
    return (f"the server {verdict} n ({where}): one request per caption, the image's input tokens paid "
            "for each caption")


def merge_levels(levels: Iterable[LevelStats]) -> dict[str, dict[str, Any]]:
    """The probe's `latency` JSON: {"1": {"p50_s", "throughput_rps", "requests", "errors"}, ...}."""
    return {str(lv.concurrency): lv.to_dict() for lv in levels}
