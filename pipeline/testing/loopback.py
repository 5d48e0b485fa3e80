"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

The server speaks the subset of the OpenAI API that reid-prompt uses
(``POST /v1/chat/completions``, ``GET /v1/models``) over real HTTP, so the real
``openai`` SDK can be pointed at it with ``base_url=server.base_url``.

Captions prove which image the server received: the caption of choice ``i`` is
``expected_caption(image_bytes, i)``, built from the sha256 of the first image's
bytes.  Rate limits (token buckets at sub-minute granularity, OpenAI headers
and 429 bodies), auth, unknown models, and a range of faults (5xx, dropped
connections, hangs, refusals, apologies, content filter, empty answers, slow
answers, injected 429s, 429 storms, invalid JSON) can be switched on; faults
are chosen deterministically from ``(seed, image digest, prompt, attempt)``.

In process::

    with LoopbackServer(latency=0.01, rpm=600) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.config.api_key)
        ...
        server.config.p_5xx = 0.1        # takes effect for later requests
        print(server.stats.outcomes)

In another process (benchmarks)::

    python -m pipeline.testing.loopback --port 0 --latency 0.2 --rpm 600 --no-headers
    # prints "LISTENING http://127.0.0.1:PORT/v1", serves until SIGTERM/SIGINT/stdin EOF,
    # then prints "STATS {...json...}".

The Batch API (``/v1/files``, ``/v1/batches``) lives in ``pipeline.testing.batchserver``; its lines are
answered by the same code as the chat endpoint (``LoopbackServer._complete``).

Nothing here imports from ``pipeline`` outside ``pipeline.testing`` (token counts are an independent estimate).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from pipeline.testing.batchserver import BatchService

__all__ = [
    "LoopbackConfig",
    "LoopbackServer",
    "LoopbackStats",
    "expected_caption",
    "expected_json",
    "image_digest",
    "estimate_text_tokens",
    "image_tokens",
    "message_overhead",
    "format_go_duration",
    "qwen_image_tokens",
    "gemini_image_tokens",
    "shape_error",
    "ERROR_SHAPES",
    "DEFAULT_MODELS",
    "DEFAULT_API_KEY",
    "REFUSAL_TEXT",
    "APOLOGY_TEXT",
]

# Marks a request whose answer is being delayed (a client giving up then is counted as "cancelled").
_PENDING = web.RequestKey("lb_pending", bool) if hasattr(web, "RequestKey") else "lb_pending"

DEFAULT_API_KEY = "sk-loopback-test"
DEFAULT_MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "loopback",
)
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
APOLOGY_TEXT = "I'm sorry, I can't assist with that request."

# ---------------------------------------------------------------------------
# Pure helpers (usable by tests without a server)
# ---------------------------------------------------------------------------


def image_digest(image_bytes: bytes) -> str:
    """The 12-hex-digit digest the server uses to identify an image."""
    return hashlib.sha256(image_bytes).hexdigest()[:12]


def _caption_for_digest(digest: str, index: int = 0) -> str:
    text = f"A person in image {digest}."
    if index > 0:
        text += f" Variant {index}."
    return text


def expected_caption(image_bytes: bytes, index: int = 0) -> str:
    """The caption the server returns for choice ``index`` of a request whose first image is ``image_bytes``."""
    return _caption_for_digest(image_digest(image_bytes), index)


_TOKEN_RE = re.compile(
    r"[A-Za-z0-9]+"
    r"|[\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    r"\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
    r"|[^\sA-Za-z0-9]"
)


def estimate_text_tokens(text: str | None) -> int:
    """Independent token estimate: ASCII alphanumeric runs cost ceil(len/4),
    every CJK character, punctuation mark or other symbol costs 1."""
    if not text:
        return 0
    n = 0
    for m in _TOKEN_RE.findall(text):
        c = m[0]
        if c.isascii() and c.isalnum():
            n += (len(m) + 3) // 4
        else:
            n += 1
    return n


# Per-message framing tokens and reply priming, as in OpenAI's cookbook counting.
_TOKENS_PER_MESSAGE = 3
_REPLY_PRIMING = 3


def message_overhead(n_messages: int) -> int:
    """Tokens the server adds for message framing (3 per message + 3 reply priming)."""
    return _TOKENS_PER_MESSAGE * n_messages + _REPLY_PRIMING


# (base, per tile) for tile models; multiplier for patch models.  Longest prefix wins.
_TILE_MODELS: dict[str, tuple[int, int]] = {
    "gpt-4o-mini": (2833, 5667),
    "gpt-4o": (85, 170),
    "chatgpt-4o": (85, 170),
    "gpt-4.1": (85, 170),
    "gpt-4.5": (85, 170),
    "gpt-4-turbo": (85, 170),
    "o1": (75, 150),
    "o3": (75, 150),
}
_PATCH_MODELS: dict[str, float] = {
    "gpt-4.1-mini": 1.62,
    "gpt-4.1-nano": 2.46,
    "o4-mini": 1.72,
}


def qwen_image_tokens(width: int, height: int, factor: int = 28, max_tokens: int = 1280) -> int:
    """Qwen-VL's bill for one image, written here independently of the pipeline's estimate (so a test
    compares two implementations): qwen_vl_utils' smart_resize, then one token per factor x factor patch
    plus 2 (DashScope's documented rule; min 4 patches, max `max_tokens`)."""
    min_pixels, max_pixels = 4 * factor * factor, max_tokens * factor * factor
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor) + 2


def gemini_image_tokens(width: int, height: int) -> int:
    """Gemini 2.x's bill for one image: 258 if both sides <= 384 px, else 258 per tile of side
    min(w, h) / 1.5 kept within 256..768 px (Google's published rule)."""
    if width <= 384 and height <= 384:
        return 258
    unit = min(max(min(width, height) / 1.5, 256.0), 768.0)
    return 258 * math.ceil(width / unit - 1e-9) * math.ceil(height / unit - 1e-9)


# Model-name prefixes billed by another family's rule: (factor, max patches) for Qwen-VL.
_QWEN_MODELS: dict[str, tuple[int, int]] = {
    "qwen-vl-": (28, 1280),
    "qwen2-vl-": (28, 1280),
    "qwen2.5-vl-": (28, 1280),
    "qwen3-vl-": (32, 2560),
    "qwen-vl-plus-2025-08-15": (32, 2560),
    "qwen-vl-plus-2025-07-10": (32, 2560),
    "qwen-vl-max-2025-08-13": (32, 2560),
}


def _lookup_rule(model: str) -> tuple[str, Any]:
    qwen = [p for p in _QWEN_MODELS if model.startswith(p)]
    if qwen:
        return "qwen", _QWEN_MODELS[max(qwen, key=len)]
    if model.startswith("gemini-"):
        return "gemini", None
    best: tuple[int, str, Any] = (-1, "tile", (85, 170))  # unknown models: gpt-4o rule
    for prefix, rule in _TILE_MODELS.items():
        if model.startswith(prefix) and len(prefix) > best[0]:
            best = (len(prefix), "tile", rule)
    for prefix, mult in _PATCH_MODELS.items():
        if model.startswith(prefix) and len(prefix) > best[0]:
            best = (len(prefix), "patch", mult)
    return best[1], best[2]


def image_tokens(model: str, width: int, height: int, detail: str | None = "auto") -> int:
    """Input tokens of one image by OpenAI's published rule.

    Tile models: low = base; high/auto = base + per_tile * tiles, after fitting into
    2048x2048 and scaling the short side down to 768 (never up), 512-px tiles.
    Patch models: ceil(w/32)*ceil(h/32) patches (scaled down to at most 1536) * multiplier;
    ``detail`` has no effect.  Qwen-VL models (qwen-vl-*, qwen2.5-vl-*, qwen3-vl-*) and Gemini models
    (gemini-*) are billed by their own providers' rules (``qwen_image_tokens``, ``gemini_image_tokens``).
    Unknown models use the gpt-4o rule.
    """
    kind, rule = _lookup_rule(model)
    w, h = max(1, int(width)), max(1, int(height))
    if kind == "qwen":
        return qwen_image_tokens(w, h, *rule)
    if kind == "gemini":
        return gemini_image_tokens(w, h)
    if kind == "patch":
        patches = math.ceil(w / 32) * math.ceil(h / 32)
        if patches > 1536:
            r = math.sqrt(32 * 32 * 1536 / (w * h))
            r = r * min(math.floor(w * r / 32) / (w * r / 32), math.floor(h * r / 32) / (h * r / 32))
            patches = min(1536, math.ceil(w * r / 32) * math.ceil(h * r / 32))
        return math.ceil(patches * rule)
    base, per_tile = rule
    if (detail or "auto") == "low":
        return base
    fw, fh = float(w), float(h)
    if max(fw, fh) > 2048:
        s = 2048 / max(fw, fh)
        fw, fh = fw * s, fh * s
    if min(fw, fh) > 768:
        s = 768 / min(fw, fh)
        fw, fh = fw * s, fh * s
    tiles = math.ceil(fw / 512) * math.ceil(fh / 512)
    return base + per_tile * tiles


def format_go_duration(seconds: float) -> str:
    """Format like Go's time.Duration.String at millisecond precision: 1s, 6m0s, 20ms, 1m30.5s."""
    if seconds <= 0:
        return "0s"
    ms = math.ceil(seconds * 1000 - 1e-9)
    if ms < 1000:
        return f"{ms}ms"
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s = rem / 1000
    s_txt = (f"{s:.3f}".rstrip("0").rstrip(".")) if rem % 1000 else str(rem // 1000)
    if h:
        return f"{h}h{m}m{s_txt}s"
    if m:
        return f"{m}m{s_txt}s"
    return f"{s_txt}s"


def _hash_int(*parts: Any) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big")


# --- JSON-schema answer generation ------------------------------------------


def _resolve_ref(ref: str, root: dict) -> dict:
    if not ref.startswith("#/"):
        return {}
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {}
        node = node[part]
    return node if isinstance(node, dict) else {}


def _gen_value(schema: Any, root: dict, digest: str, index: int, path: str, key: str, depth: int = 0) -> Any:
    if not isinstance(schema, dict) or depth > 32:
        return f"{key or 'value'} {digest[:6]}"
    if "$ref" in schema:
        return _gen_value(_resolve_ref(schema["$ref"], root), root, digest, index, path, key, depth + 1)
    h = _hash_int(digest, index, path)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema and schema["enum"]:
        options = [o for o in schema["enum"] if o is not None] or list(schema["enum"])
        return options[h % len(options)]
    for comb in ("anyOf", "oneOf", "allOf"):
        if comb in schema and schema[comb]:
            subs = [s for s in schema[comb] if not (isinstance(s, dict) and s.get("type") == "null")]
            sub = (subs or schema[comb])[0]
            return _gen_value(sub, root, digest, index, path, key, depth + 1)
    typ = schema.get("type")
    if isinstance(typ, list):
        non_null = [t for t in typ if t != "null"]
        typ = non_null[0] if non_null else "null"
    if typ is None:
        typ = "object" if "properties" in schema else ("array" if "items" in schema else "string")
    if typ == "object":
        out: dict[str, Any] = {}
        props = schema.get("properties") or {}
        for name, sub in props.items():
            out[name] = _gen_value(sub, root, digest, index, f"{path}/{name}", name, depth + 1)
        for name in schema.get("required") or ():
            if name not in out:
                out[name] = f"{name} {digest[:6]}"
        return out
    if typ == "array":
        items = schema.get("items") or {"type": "string"}
        lo = int(schema.get("minItems", 1))
        hi = int(schema.get("maxItems", max(lo, 3)))
        count = lo + (h % (max(hi, lo) - lo + 1))
        values: list[Any] = []
        enum = items.get("enum") if isinstance(items, dict) else None
        if enum and schema.get("uniqueItems"):
            start = h % len(enum)
            count = min(count, len(enum))
            return [enum[(start + i) % len(enum)] for i in range(count)]
        for i in range(count):
            values.append(_gen_value(items, root, digest, index, f"{path}/{i}", key, depth + 1))
        return values
    if typ == "string":
        lk = (key or "").lower()
        if "caption" in lk or "description" in lk or "text" in lk:
            text = _caption_for_digest(digest, index)
        else:
            text = f"{key or 'value'} {digest[:6]}"
            if index:
                text += f" v{index}"
        lo = int(schema.get("minLength", 0))
        hi = schema.get("maxLength")
        if len(text) < lo:
            text = text + "x" * (lo - len(text))
        if hi is not None and len(text) > int(hi):
            text = text[: int(hi)]
        return text
    if typ == "boolean":
        return bool(h & 1)
    if typ == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1 if "exclusiveMinimum" in schema else 0)
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 1) - 1 if "exclusiveMaximum" in schema else lo + 100)
        lo, hi = int(math.ceil(lo)), int(math.floor(hi))
        return lo + h % (max(hi, lo) - lo + 1)
    if typ == "number":
        lo = float(schema.get("minimum", schema.get("exclusiveMinimum", 0.0)))
        hi = float(schema.get("maximum", schema.get("exclusiveMaximum", lo + 1.0)))
        frac = ((h % 9999) + 1) / 10000.0  # strictly inside (0, 1)
        return round(lo + (hi - lo) * frac, 6)
    if typ == "null":
        return None
    return f"{key or 'value'} {digest[:6]}"


def _schema_of(response_format: Any) -> dict | None:
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        js = response_format.get("json_schema") or {}
        schema = js.get("schema")
        return schema if isinstance(schema, dict) else {"type": "object", "properties": {}}
    if response_format.get("type") == "json_object":
        return {"type": "object", "properties": {"caption": {"type": "string"}}, "required": ["caption"]}
    return None


def _schema_in_prompt(prompt: str) -> dict | None:
    """A JSON schema written into the prompt text (an object with "properties"), if there is one."""
    start = prompt.find("{")
    if start < 0 or '"properties"' not in prompt:
        return None
    decoder = json.JSONDecoder()
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(prompt, start)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("properties"), dict):
            return value
        start = prompt.find("{", start + 1)
    return None


def _expected_json_for_digest(digest: str, schema: dict, index: int = 0) -> Any:
    return _gen_value(schema, schema, digest, index, "", "")


def expected_json(image_bytes: bytes, schema: dict, index: int = 0) -> Any:
    """The object the server answers for a json_schema request (schema = the ``schema`` member)."""
    return _expected_json_for_digest(image_digest(image_bytes), schema, index)


def _invalid_json_for(valid: Any, digest: str, mode: str) -> str:
    if mode == "mixed":
        mode = "object" if _hash_int("invalid", digest) & 1 else "truncated"
    text_valid = json.dumps(valid, ensure_ascii=False)
    if mode == "truncated":
        return text_valid[: max(1, len(text_valid) // 2)]
    # A non-conforming object: first field dropped, an undeclared field added.
    bad: dict[str, Any] = dict(valid) if isinstance(valid, dict) else {}
    if bad:
        bad.pop(next(iter(bad)))
    bad["unexpected_field"] = f"not in schema {digest[:6]}"
    return json.dumps(bad, ensure_ascii=False)


# ---------------------------------------------------------------------------
# Configuration and statistics
# ---------------------------------------------------------------------------


@dataclass
class LoopbackConfig:
    """Server behaviour.  Mutable at runtime: changes apply to later requests."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    api_key: str | None = DEFAULT_API_KEY  # None = accept any key (or none)
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS
    latency: float = 0.0  # seconds before answering an admitted request
    # A single-stream backend (transformers serve, Ollama with one slot): 0 = every request computes at once;
    # k = k at a time from a FIFO queue, each taking `latency` s of compute that goes on after the client
    # gives up; max_pending > 0: more than that many waiting -> 503 "server busy" (Ollama's queue).
    serve_slots: int = 0
    max_pending: int = 0
    honour_n: bool = True  # False = always 1 choice, like servers that ignore n
    # Server quirks (fallbacks): reject_n = 400 "Only one completion choice is allowed" when n > 1 (llama-server);
    # response_format_mode: "honour", "ignore" (answers as if none was sent: free text, or JSON when the
    # prompt itself holds a JSON schema, as an instruction-following model would; transformers serve),
    # "reject" (400 for any response_format), "reject_schema" (400 for json_schema, json_object honoured);
    # unknown_model: "404" (OpenAI, vLLM, Ollama) or "400_detail" (transformers serve: 400 {"detail": ...}).
    reject_n: bool = False
    response_format_mode: str = "honour"
    unknown_model: str = "404"
    default_max_tokens: int = 300  # completion budget reserved when max_tokens is absent

    # Rate limits (per minute; None or 0 = unlimited), enforced as continuous token buckets.
    rpm: float | None = None
    tpm: float | None = None
    burst_seconds: float = 1.0  # bucket capacity = burst_seconds * rate/s (at least 1)
    # "bucket": a continuous token bucket (a burst of burst_seconds' worth, then the steady rate);
    # "sliding": at most burst_seconds x rate/s in ANY rolling burst_seconds (how OpenAI enforces per-minute
    # limits at sub-minute granularity): a burst counts against the following window too.
    limit_mode: str = "bucket"
    send_headers: bool = True  # x-ratelimit-* headers on 200 and 429
    quota_exhausted: bool = False  # every request -> 429 insufficient_quota

    # Faults, chosen deterministically from (seed, digest, prompt, attempt).
    seed: int = 0
    p_5xx: float = 0.0
    p_drop: float = 0.0
    p_hang: float = 0.0
    hang_s: float = 3600.0
    p_refusal: float = 0.0
    p_apology: float = 0.0
    p_content_filter: float = 0.0
    p_empty: float = 0.0
    p_slow: float = 0.0
    slow_s: float = 2.0  # a slow answer comes after slow_s instead of latency
    p_429: float = 0.0
    fault_retry_after_s: float = 0.2  # retry-after of injected (p_429) 429s
    p_invalid_json: float = 0.0  # only for response_format json_schema / json_object
    repairable: bool = False  # True: a request holding an assistant turn (a repair request) gets no invalid_json
    p_junk: float = 0.0  # an answer of only punctuation / control / invisible characters ("…", "\x00", U+200B)
    p_control: float = 0.0  # the right caption with control characters inside it ("A person\x00\x1b in image ...")
    invalid_json_mode: str = "object"  # "object" (non-conforming object), "truncated", "mixed"
    fail_first_attempts: int = 0  # every (digest, prompt) gets 500 on its first k served attempts
    # How error bodies are shaped (every 4xx/5xx): "openai" {"error": {...}}, "dashscope" {"code",
    # "message", "request_id"}, "gemini" [{"error": {"code", "message", "status"}}], "detail"
    # {"detail": msg} (FastAPI, transformers serve), "message" {"message": msg}, "text" (plain text).
    error_shape: str = "openai"
    storms: list[tuple[int, float]] = field(default_factory=list)  # (after N requests, seconds) of 429s

    # Batch API (/v1/files, /v1/batches; pipeline.testing.batchserver). Each line is answered as the chat
    # endpoint answers it (same captions, faults, usage; no rate limits, storms or transport faults).
    batch_api: bool = True  # False: no /v1/files, /v1/batches (404), as vLLM's and Ollama's servers
    batch_step_s: float = 0.0  # seconds per lifecycle step (validating, finalizing) and per line
    batch_line_fail_p: float = 0.0  # probability of a 500 line (error file), on top of p_5xx
    batch_expire_after: int | None = None  # a batch expires after this many lines are done (None = never)
    batch_enqueued_token_limit: int | None = None  # per model, prompt tokens of in-progress batches
    batch_max_lines: int = 50_000  # more lines -> the batch fails validation (too_many_tasks)
    batch_max_bytes: int = 200_000_000  # a larger input file -> the batch fails validation (file_too_large)
    batch_max_upload_bytes: int = 512_000_000  # a larger upload -> 400 at /v1/files
    # Kill tests: the server has done the work, then holds the HTTP answer this long.
    batch_delay_upload_s: float = 0.0
    batch_delay_create_s: float = 0.0
    batch_delay_content_s: float = 0.0


class LoopbackStats:
    """Counters updated on the server loop; read from any thread.

    ``snapshot()`` / ``as_dict()`` return consistent copies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset_fields()

    def _reset_fields(self) -> None:
        self.requests = 0  # HTTP requests to /v1/chat/completions
        self.outcomes: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()  # 429 reasons: requests, tokens, storm, injected, too_large
        self.attempts: Counter[tuple[str, str]] = Counter()  # (digest, prompt) -> requests
        self.ok_digests: Counter[str] = Counter()  # digests answered correctly (ok + slow)
        self.timestamps: list[float] = []  # time.monotonic() of each request arrival
        self.timestamps_429: list[float] = []  # time.monotonic() of each 429 sent
        self.last_answer: float | None = None  # time.monotonic() of the last 200 answer (throughput spans)
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompt_tokens = 0  # summed over 200 answers
        self.completion_tokens = 0
        self.azure_requests: list[tuple[str, str | None]] = []  # (path, api-version) of Azure-style requests
        # Batch API: calls per kind (upload, file_retrieve, file_list, content, delete, create, retrieve,
        # list, cancel), batches created per (metadata reid_prompt_folder, reid_prompt_shard), lines per
        # outcome (the line's HTTP status, "expired", "cancelled"). Chat-level counts of batch lines are in
        # the server's `batch_line_stats`.
        self.batch_calls: Counter[str] = Counter()
        self.batches_created: Counter[tuple[str, str]] = Counter()
        self.batch_lines: Counter[str] = Counter()

    def reset(self) -> None:
        with self._lock:
            self._reset_fields()

    # -- derived -----------------------------------------------------------
    @property
    def distinct_pairs(self) -> int:
        return len(self.attempts)

    @property
    def extra_requests(self) -> int:
        """requests - distinct (digest, prompt) pairs seen: the cost of retries (and of 4xx answers)."""
        return self.requests - len(self.attempts)

    @property
    def n_429(self) -> int:
        return len(self.timestamps_429)

    def as_dict(self, timestamps: bool = False) -> dict[str, Any]:
        with self._lock:
            d: dict[str, Any] = {
                "requests": self.requests,
                "outcomes": dict(self.outcomes),
                "rate_limited": dict(self.rate_limited),
                "distinct_pairs": len(self.attempts),
                "extra_requests": self.requests - len(self.attempts),
                "distinct_ok_digests": len(self.ok_digests),
                "ok_answers": sum(self.ok_digests.values()),
                "n_429": len(self.timestamps_429),
                "max_in_flight": self.max_in_flight,
                "in_flight": self.in_flight,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "first_arrival": self.timestamps[0] if self.timestamps else None,
                "last_arrival": self.timestamps[-1] if self.timestamps else None,
                "last_answer": self.last_answer,
                "batch_calls": dict(self.batch_calls),
                "batches_created": {f"{f}/{s}": n for (f, s), n in self.batches_created.items()},
                "batch_lines": dict(self.batch_lines),
            }
            if timestamps:
                d["timestamps"] = list(self.timestamps)
                d["timestamps_429"] = list(self.timestamps_429)
            return d

    def snapshot(self) -> dict[str, Any]:
        """A full copy including counters keyed by tuples (not JSON-serialisable)."""
        with self._lock:
            return {
                "requests": self.requests,
                "outcomes": Counter(self.outcomes),
                "rate_limited": Counter(self.rate_limited),
                "attempts": Counter(self.attempts),
                "ok_digests": Counter(self.ok_digests),
                "timestamps": list(self.timestamps),
                "timestamps_429": list(self.timestamps_429),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "extra_requests": self.requests - len(self.attempts),
                "batch_calls": Counter(self.batch_calls),
                "batches_created": Counter(self.batches_created),
                "batch_lines": Counter(self.batch_lines),
            }

    def __repr__(self) -> str:
        return f"LoopbackStats({self.as_dict()})"


class _Bucket:
    """Continuous token bucket: capacity = max(1, burst_s * rate/s), refilled at per_minute/60 per s."""

    __slots__ = ("per_minute", "rate", "capacity", "level", "t")

    def __init__(self, per_minute: float, burst_s: float) -> None:
        self.per_minute = float(per_minute)
        self.rate = self.per_minute / 60.0
        self.capacity = max(1.0, burst_s * self.rate)
        self.level = self.capacity
        self.t = time.monotonic()

    def refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` can be taken (0 = now).  A cost above capacity needs a full bucket."""
        need = min(cost, self.capacity)
        if self.level >= need - 1e-9:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost

    def remaining(self) -> int:
        # Per-minute terms: the minute's limit minus what was taken and has not refilled yet.
        return max(0, int(self.per_minute - (self.capacity - self.level)))

    def reset_s(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


class _Window:
    """Sliding window: at most `capacity` (= max(1, window_s x rate/s)) units admitted in any rolling
    `window_s`. Same interface as `_Bucket`; what was admitted leaves the window `window_s` after it came."""

    __slots__ = ("per_minute", "rate", "capacity", "window_s", "used", "t", "_log")

    def __init__(self, per_minute: float, window_s: float) -> None:
        self.per_minute = float(per_minute)
        self.rate = self.per_minute / 60.0
        self.window_s = float(window_s)
        self.capacity = max(1.0, window_s * self.rate)
        self.used = 0.0
        self.t = time.monotonic()
        self._log: deque[tuple[float, float]] = deque()  # (admitted at, cost), oldest first

    def refill(self, now: float) -> None:
        self.t = max(self.t, now)
        while self._log and self._log[0][0] <= self.t - self.window_s:
            self.used -= self._log.popleft()[1]
        if not self._log:
            self.used = 0.0

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` fits the window (0 = now).  A cost above capacity needs an empty window."""
        need = min(cost, self.capacity)
        if self.used + need <= self.capacity + 1e-9:
            return 0.0
        freed = 0.0
        for at, c in self._log:
            freed += c
            if self.used - freed + need <= self.capacity + 1e-9:
                return max(0.0, at + self.window_s - self.t)
        return self.window_s

    def take(self, cost: float) -> None:
        self._log.append((self.t, float(cost)))
        self.used += cost

    def remaining(self) -> int:
        return max(0, int(self.per_minute - self.used))

    def reset_s(self) -> float:
        return max(0.0, self._log[-1][0] + self.window_s - self.t) if self._log else 0.0


def _err(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
ERROR_SHAPES = ("openai", "dashscope", "gemini", "detail", "message", "text")


def shape_error(status: int, body: Any, shape: str) -> tuple[bytes, str]:
    """An OpenAI-shaped error `body` re-shaped the way another server sends it: (bytes, content type)."""
    err = body.get("error") if isinstance(body, dict) else None
    if shape == "openai" or not isinstance(err, dict):
        return json.dumps(body, ensure_ascii=False).encode(), "application/json"
    message = str(err.get("message") or "")
    code = err.get("code") or err.get("type")
    if shape == "dashscope":
        out: Any = {"code": code, "message": message, "request_id": "loopback-00000000-0000"}
    elif shape == "gemini":
        out = [{"error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}}]
    elif shape == "detail":
        out = {"detail": message}
    elif shape == "message":
        out = {"message": message}
    elif shape == "text":
        return message.encode(), "text/plain"
    else:
        raise ValueError(f"unknown error_shape {shape!r}: one of {', '.join(ERROR_SHAPES)}")
    return json.dumps(out, ensure_ascii=False).encode(), "application/json"


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    prefix = "sk-proj-" if key.startswith("sk-proj-") else ("sk-" if key.startswith("sk-") else key[:3])
    return prefix + "*" * max(1, len(key) - len(prefix) - 4) + key[-4:]


class _BadImage(Exception):
    pass


_FAULT_ORDER = (
    "drop",
    "hang",
    "5xx",
    "429",
    "slow",
    "refusal",
    "apology",
    "content_filter",
    "empty",
    "invalid_json",
    "junk",
    "control",
)

# Answers with no letter and no digit: what small local models sometimes send back.
JUNK_ANSWERS = ("…", "\x00", "\ufffd", "\u200b", " . \u200b …", "\u200b\u200d\ufeff", "?!", "\x00\x07 \x1b")

_5XX = (
    (500, _err("The server had an error while processing your request. Sorry about that!", "server_error", None)),
    (502, _err("Bad gateway.", "server_error", None)),
    (503, _err("The engine is currently overloaded, please try again later.", "server_error", None)),
)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class LoopbackServer:
    """An aiohttp OpenAI-compatible server running on its own event loop in a daemon thread."""

    def __init__(self, config: LoopbackConfig | None = None, **overrides: Any) -> None:
        self.config = config if config is not None else LoopbackConfig()
        if overrides:
            self.configure(**overrides)
        self.stats = LoopbackStats()
        self.batch_line_stats = LoopbackStats()  # chat-level counts of the lines batches answered
        self.batches = BatchService(self)  # /v1/files + /v1/batches state, kept across stop()/start()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped = False
        # Server-side state that survives config changes; reset by reset_stats().
        self._served_attempts: dict[tuple[str, str], int] = {}
        self._storm_count = 0  # requests counted for storm triggering
        self._storms_fired: set[tuple[int, float, int]] = set()
        self._storm_until = 0.0
        self._buckets_key: tuple | None = None
        self._req_bucket: _Bucket | None = None
        self._tok_bucket: _Bucket | None = None
        self._id_counter = 0
        self._prompts: dict[str, str] = {}
        self._serve_sem: tuple[int, asyncio.Semaphore] | None = None  # (serve_slots, its semaphore)
        self._waiting = 0  # requests queued for a serve slot (serve_slots > 0)

    # -- configuration -----------------------------------------------------
    def configure(self, **changes: Any) -> "LoopbackServer":
        names = {f.name for f in dataclasses.fields(LoopbackConfig)}
        for k in changes:
            if k not in names:
                raise TypeError(f"unknown LoopbackConfig field: {k!r}")
        for k, v in changes.items():
            if k == "storms" and v is not None:
                v = [(int(n), float(d)) for n, d in v]
            setattr(self.config, k, v)
        return self

    def reset_stats(self) -> None:
        """Zero the statistics, the per-(digest, prompt) attempt counts and storm triggers."""
        self.stats.reset()
        self.batch_line_stats.reset()
        self._served_attempts = {}
        self._storm_count = 0
        self._storms_fired = set()
        self._storm_until = 0.0

    def reset_limits(self) -> None:
        """Refill the rate-limit buckets (they are also rebuilt whenever rpm/tpm/burst_seconds change)."""
        self._buckets_key = None

    # -- lifecycle -----------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.config.host}:{self.port}/v1"

    def start(self) -> "LoopbackServer":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="loopback-openai", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"loopback server failed to start: {self._start_error!r}") from self._start_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and close every connection (answers under way get a short grace to finish).

        The server can be started again with `start()`: it listens on the same port, keeps its statistics
        and fault state, so a test can take it away mid-run and bring it back like a restarted process.
        """
        if self._thread is None or self._loop is None or self._stopped:
            return
        self._stopped = True
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            fut.result(timeout)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():  # ready for start() again, on the same port
            self._thread = None
            self._loop = None
            self._runner = None
            self._tasks = set()
            self._started = threading.Event()
            self._stopped = False

    def pause(self, seconds: float) -> threading.Thread:
        """Go away now and come back on the same port after `seconds` (in a background thread, returned)."""
        self.stop()

        def come_back() -> None:
            time.sleep(seconds)
            self.start()

        thread = threading.Thread(target=come_back, name="loopback-restart", daemon=True)
        thread.start()
        return thread

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._start_error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{model}", self._handle_model)
        # Azure OpenAI's paths: the deployment in the path is the model; ?api-version= is required.
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._handle_chat)
        app.router.add_get("/openai/models", self._handle_models)
        self.batches.add_routes(app)
        return app

    async def _startup(self) -> None:
        self._runner = web.AppRunner(
            self._make_app(),
            access_log=None,
            handler_cancellation=True,  # a client that gives up cancels its handler
            shutdown_timeout=1.0,
            keepalive_timeout=75.0,
        )
        await self._runner.setup()
        port = self.config.port or self.port or 0  # a restart listens where the first start did
        site = web.TCPSite(self._runner, self.config.host, port, reuse_address=True, backlog=1024)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp exposes no public accessor for the bound port
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        for s in sockets:
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.batches.resume()  # batches in flight when the server stopped go on

    async def _shutdown(self) -> None:
        # Stop listening first: a client that retries a dropped request finds the port closed (refused),
        # as with a crashed server, instead of a listener that is about to go.
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- request helpers -------------------------------------------------------
    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        if status >= 400 and self.config.error_shape != "openai":
            data, content_type = shape_error(status, body, self.config.error_shape)
            return web.Response(status=status, body=data, content_type=content_type, headers=headers)
        return web.Response(
            status=status,
            body=json.dumps(body, ensure_ascii=False).encode(),
            content_type="application/json",
            headers=headers,
        )

    def _check_auth(self, request: web.Request) -> web.Response | None:
        key = self.config.api_key
        if key is None:
            return None
        auth = request.headers.get("Authorization", "")
        if not auth and request.headers.get("api-key"):  # Azure OpenAI's header
            auth = "Bearer " + request.headers["api-key"]
        if not auth:
            return self._json(
                401,
                _err(
                    "You didn't provide an API key. You need to provide your API key in an Authorization header "
                    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                    None,
                ),
            )
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else auth.strip()
        if given != key:
            return self._json(
                401,
                _err(
                    f"Incorrect API key provided: {_mask_key(given)}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    "invalid_api_key",
                ),
            )
        return None

    def _buckets(self) -> tuple[Any, Any]:
        cfg = self.config
        key = (cfg.rpm, cfg.tpm, cfg.burst_seconds, cfg.limit_mode)
        if key != self._buckets_key:
            self._buckets_key = key
            kind = _Window if cfg.limit_mode == "sliding" else _Bucket
            self._req_bucket = kind(cfg.rpm, cfg.burst_seconds) if cfg.rpm else None
            self._tok_bucket = kind(cfg.tpm, cfg.burst_seconds) if cfg.tpm else None
        return self._req_bucket, self._tok_bucket

    def _limit_headers(self, rb: _Bucket | None, tb: _Bucket | None) -> dict[str, str]:
        if not self.config.send_headers:
            return {}
        h: dict[str, str] = {}
        if rb is not None:
            h["x-ratelimit-limit-requests"] = str(int(rb.per_minute))
            h["x-ratelimit-remaining-requests"] = str(rb.remaining())
            h["x-ratelimit-reset-requests"] = format_go_duration(rb.reset_s())
        if tb is not None:
            h["x-ratelimit-limit-tokens"] = str(int(tb.per_minute))
            h["x-ratelimit-remaining-tokens"] = str(tb.remaining())
            h["x-ratelimit-reset-tokens"] = format_go_duration(tb.reset_s())
        return h

    def _too_many(
        self, reason: str, body: dict, wait_s: float | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        h = dict(headers or {})
        if wait_s is not None:
            wait_s = max(wait_s, 0.001)
            h["retry-after-ms"] = str(math.ceil(wait_s * 1000))
            h["retry-after"] = str(max(1, math.ceil(wait_s)))
        st = self.stats
        with st._lock:
            st.outcomes["429"] += 1
            st.rate_limited[reason] += 1
            st.timestamps_429.append(time.monotonic())
        return self._json(429, body, h)

    def _parse_images_and_text(self, messages: list, model: str) -> tuple[bytes | None, int, str, int]:
        """Returns (first image bytes, image tokens, prompt text, text tokens)."""
        first: bytes | None = None
        img_tokens = 0
        texts: list[str] = []
        for msg in messages:
            if not isinstance(msg, dict):
                raise ValueError("each message must be an object")
            content = msg.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        continue
                    ptype = part.get("type")
                    if ptype == "text":
                        texts.append(str(part.get("text", "")))
                    elif ptype == "image_url":
                        iu = part.get("image_url")
                        url = iu.get("url") if isinstance(iu, dict) else iu
                        detail = iu.get("detail") if isinstance(iu, dict) else None
                        data = self._decode_data_url(url)
                        try:
                            with Image.open(io.BytesIO(data)) as im:
                                w, h = im.size
                        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                            raise _BadImage(
                                "You uploaded an unsupported image. Please make sure your image is valid "
                                f"(the payload of {len(data)} bytes could not be read as an image: "
                                f"{type(e).__name__})."
                            ) from None
                        img_tokens += image_tokens(model, w, h, detail)
                        if first is None:
                            first = data
        prompt = "\n".join(texts)
        return first, img_tokens, prompt, estimate_text_tokens(prompt)

    def prompt_tokens_of(self, body: dict) -> int:
        """Estimated prompt tokens of a chat request body, as `_complete` bills them (the Batch API's
        enqueued-token count); 0 for a body it could not read (that line fails when it is answered)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 0
        try:
            _, img_tokens, _, text_tokens = self._parse_images_and_text(messages, str(body.get("model")))
        except (_BadImage, ValueError):
            return 0
        return img_tokens + text_tokens + message_overhead(len(messages))

    @staticmethod
    def _decode_data_url(url: Any) -> bytes:
        if not isinstance(url, str) or not url.startswith("data:"):
            raise _BadImage("Invalid image URL: the loopback server only accepts base64 data URLs (data:...;base64,...).")
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _BadImage("Invalid image data URL: expected 'data:<mime>;base64,<data>'.")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _BadImage("Invalid base64 image data: the image_url payload could not be base64-decoded.") from None
        if not data:
            raise _BadImage("Invalid image data: the image_url payload is empty.")
        return data

    def _choose_fault(self, digest: str, prompt: str, attempt: int) -> str:
        cfg = self.config
        if attempt < cfg.fail_first_attempts:
            return "fail_first"
        probs = (
            cfg.p_drop,
            cfg.p_hang,
            cfg.p_5xx,
            cfg.p_429,
            cfg.p_slow,
            cfg.p_refusal,
            cfg.p_apology,
            cfg.p_content_filter,
            cfg.p_empty,
            cfg.p_invalid_json,
            cfg.p_junk,
            cfg.p_control,
        )
        if not any(probs):
            return "ok"
        u = _hash_int(cfg.seed, digest, attempt, prompt) / 2.0**64
        acc = 0.0
        for name, p in zip(_FAULT_ORDER, probs):
            acc += p
            if u < acc:
                return name
        return "ok"

    # -- handlers ----------------------------------------------------------------
    async def _handle_models(self, request: web.Request) -> web.Response:
        bad = self._check_auth(request)
        if bad is not None:
            return bad
        created = 1_700_000_000
        data = [{"id": m, "object": "model", "created": created, "owned_by": "loopback"} for m in self.config.models]
        return self._json(200, {"object": "list", "data": data})

    async def _handle_model(self, request: web.Request) -> web.Response:
        bad = self._check_auth(request)
        if bad is not None:
            return bad
        m = request.match_info["model"]
        if m not in self.config.models:
            return self._json(404, self._model_404(m))
        return self._json(200, {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "loopback"})

    @staticmethod
    def _model_404(model: str) -> dict:
        return _err(
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        st = self.stats
        now = time.monotonic()
        task = asyncio.current_task()
        with st._lock:
            st.requests += 1
            st.timestamps.append(now)
            st.in_flight += 1
            if st.in_flight > st.max_in_flight:
                st.max_in_flight = st.in_flight
        if task is not None:
            self._tasks.add(task)
        try:
            return await self._chat(request, now)
        except asyncio.CancelledError:
            # The client gave up (or the server stops) while the answer was being delayed.
            if request.get(_PENDING, False):
                self._count("cancelled")
            raise
        finally:
            with st._lock:
                st.in_flight -= 1
            if task is not None:
                self._tasks.discard(task)

    def _count(self, outcome: str, st: LoopbackStats | None = None) -> None:
        st = self.stats if st is None else st
        with st._lock:
            st.outcomes[outcome] += 1

    async def _chat(self, request: web.Request, now: float) -> web.StreamResponse:
        cfg = self.config
        st = self.stats
        self._storm_count += 1
        req_no = self._storm_count

        bad = self._check_auth(request)
        if bad is not None:
            self._count("401")
            return bad
        if cfg.quota_exhausted:
            self._count("insufficient_quota")
            with st._lock:
                st.timestamps_429.append(time.monotonic())
            return self._json(
                429,
                _err(
                    "You exceeded your current quota, please check your plan and billing details. For more "
                    "information on this error, read the docs: "
                    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                    "insufficient_quota",
                    "insufficient_quota",
                ),
            )

        # --- parse and validate -------------------------------------------------
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            self._count("400")
            return self._json(
                400,
                _err(
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                    "your HTTP library correctly. The OpenAI API expects a JSON payload.)",
                    "invalid_request_error",
                    None,
                ),
            )
        model = body.get("model")
        deployment = request.match_info.get("deployment")
        if deployment is not None:  # Azure: the path names the deployment; the body's model is ignored
            with st._lock:
                st.azure_requests.append((request.path, request.query.get("api-version")))
            if not request.query.get("api-version"):
                self._count("404")
                return self._json(404, _err("Resource not found", "invalid_request_error", "404"))
            model = deployment
        return await self._complete(body, model, now, request, req_no)

    async def _complete(
        self, body: dict, model: Any, now: float, request: web.Request | None, req_no: int = 0
    ) -> web.Response:
        """Answer a parsed chat request. `request` None = a line of a batch (pipeline.testing.batchserver):
        the same validation, captions, faults and usage, but no rate limits, storms, latency or transport
        faults (drop, hang, injected 429, slow), which belong to an HTTP exchange, not to the answer; its
        counts go to `batch_line_stats`."""
        cfg = self.config
        online = request is not None
        st = self.stats if online else self.batch_line_stats
        if not isinstance(model, str) or not model:
            self._count("400", st)
            return self._json(400, _err("you must provide a model parameter", "invalid_request_error", None, "model"))
        if model not in cfg.models:
            if cfg.unknown_model == "400_detail":  # transformers serve: a 400, the reason only in `detail`
                self._count("400", st)
                return web.json_response(
                    {"detail": f"Failed to load model {model}: it is neither a local folder nor a model "
                               "identifier on the Hub"}, status=400)
            self._count("404", st)
            return self._json(404, self._model_404(model))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            self._count("400", st)
            return self._json(
                400, _err("Invalid 'messages': expected a non-empty array.", "invalid_request_error", None, "messages")
            )
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 128:
            self._count("400", st)
            return self._json(400, _err(f"Invalid 'n': {n!r}.", "invalid_request_error", "invalid_value", "n"))
        if cfg.reject_n and n > 1:  # llama-server's words and shape (its code is the status, a number)
            self._count("400", st)
            return self._json(400, {"error": {"code": 400, "message": "Only one completion choice is allowed",
                                              "type": "invalid_request_error"}})
        rf_type = body.get("response_format", {}).get("type") if isinstance(body.get("response_format"), dict) else None
        if rf_type is not None and (cfg.response_format_mode == "reject"
                                    or (cfg.response_format_mode == "reject_schema" and rf_type == "json_schema")):
            self._count("400", st)
            return self._json(400, _err(f"response_format type {rf_type!r} is not supported by this server",
                                        "invalid_request_error", None, "response_format"))
        try:
            image, img_tokens, prompt, text_tokens = self._parse_images_and_text(messages, model)
        except _BadImage as e:
            self._count("400", st)
            return self._json(400, _err(str(e), "invalid_request_error", "invalid_image", "messages"))
        except ValueError as e:
            self._count("400", st)
            return self._json(400, _err(str(e), "invalid_request_error", None, "messages"))

        digest = image_digest(image or b"")
        prompt = self._prompts.setdefault(prompt, prompt) if len(self._prompts) < 100_000 else prompt
        pair = (digest, prompt)
        with st._lock:
            st.attempts[pair] += 1

        prompt_tokens = text_tokens + img_tokens + message_overhead(len(messages))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or cfg.default_max_tokens
        choices_n = n if cfg.honour_n else 1
        cost = prompt_tokens + int(max_tokens) * n

        # --- storms -----------------------------------------------------------------
        if online and cfg.storms:
            for i, (after, dur) in enumerate(cfg.storms):
                key = (int(after), float(dur), i)
                if req_no > after and key not in self._storms_fired:
                    self._storms_fired.add(key)
                    self._storm_until = max(self._storm_until, now + dur)
        if online and now < self._storm_until:
            rb, tb = self._buckets()
            for b in (rb, tb):
                if b is not None:
                    b.refill(now)
            left = self._storm_until - now
            return self._too_many(
                "storm",
                _err(
                    f"Rate limit reached for requests on {model} in organization org-loopback: the service is "
                    f"temporarily overloaded. Please try again in {format_go_duration(left)}.",
                    "requests",
                    "rate_limit_exceeded",
                ),
                left,
                self._limit_headers(rb, tb),
            )

        # --- rate limits --------------------------------------------------------------
        rb, tb = self._buckets() if online else (None, None)
        if rb is not None or tb is not None:
            if rb is not None:
                rb.refill(now)
            if tb is not None:
                tb.refill(now)
                if cost > tb.per_minute:
                    return self._too_many(
                        "too_large",
                        _err(
                            f"Request too large for {model} in organization org-loopback on tokens per min (TPM): "
                            f"Limit {int(tb.per_minute)}, Requested {cost}. The input or output tokens must be "
                            "reduced in order to run successfully.",
                            "tokens",
                            "rate_limit_exceeded",
                        ),
                        None,
                        self._limit_headers(rb, tb),
                    )
            if rb is not None:
                wait = rb.wait_for(1)
                if wait > 0:
                    used = int(rb.per_minute) - rb.remaining()
                    return self._too_many(
                        "requests",
                        _err(
                            f"Rate limit reached for requests per min (RPM) on {model} in organization "
                            f"org-loopback: Limit {int(rb.per_minute)}, Used {used}, Requested 1. "
                            f"Please try again in {format_go_duration(wait)}. Visit "
                            "https://platform.openai.com/account/rate-limits to learn more.",
                            "requests",
                            "rate_limit_exceeded",
                        ),
                        wait,
                        self._limit_headers(rb, tb),
                    )
            if tb is not None:
                wait = tb.wait_for(cost)
                if wait > 0:
                    used = int(tb.per_minute) - tb.remaining()
                    return self._too_many(
                        "tokens",
                        _err(
                            f"Rate limit reached for tokens per min (TPM) on {model} in organization "
                            f"org-loopback: Limit {int(tb.per_minute)}, Used {used}, Requested {cost}. "
                            f"Please try again in {format_go_duration(wait)}. Visit "
                            "https://platform.openai.com/account/rate-limits to learn more.",
                            "tokens",
                            "rate_limit_exceeded",
                        ),
                        wait,
                        self._limit_headers(rb, tb),
                    )
            if rb is not None:
                rb.take(1)
            if tb is not None:
                tb.take(cost)
        headers = self._limit_headers(rb, tb)

        # --- faults -------------------------------------------------------------------
        attempt = self._served_attempts.get(pair, 0)
        self._served_attempts[pair] = attempt + 1
        fault = self._choose_fault(digest, prompt, attempt)
        schema = _schema_of(body.get("response_format")) if cfg.response_format_mode != "ignore" else None
        in_prompt = _schema_in_prompt(prompt)
        if in_prompt is not None and (schema is None or rf_type == "json_object"):
            schema = in_prompt  # the model follows the schema written into the prompt
        repair = any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
        if fault == "invalid_json" and (schema is None or (cfg.repairable and repair)):
            fault = "ok"
        if not online and fault in ("drop", "hang", "429", "slow"):
            fault = "ok"  # faults of an HTTP exchange; a batch line is answered

        if fault == "429":
            ra = cfg.fault_retry_after_s
            return self._too_many(
                "injected",
                _err(
                    f"Rate limit reached for requests per min (RPM) on {model} in organization org-loopback. "
                    f"Please try again in {format_go_duration(ra)}.",
                    "requests",
                    "rate_limit_exceeded",
                ),
                ra,
                headers,
            )
        if fault == "hang":
            self._count("hang", st)
            await asyncio.sleep(cfg.hang_s)
            self._abort(request)
            return web.Response(status=504)
        delay = cfg.slow_s if fault == "slow" else cfg.latency
        if request is None:
            pass  # a batch line's time is batch_step_s, spent by the batch worker
        elif cfg.serve_slots > 0:
            if cfg.max_pending > 0 and self._waiting >= cfg.max_pending:
                self._count("busy", st)
                return self._json(503, {"error": "server busy, please try again.  maximum pending requests "
                                                 "exceeded"}, headers)
            request[_PENDING] = True
            await asyncio.shield(self._serve(delay))  # an abandoned request keeps its slot until computed
            request[_PENDING] = False
        elif delay > 0:
            request[_PENDING] = True
            await asyncio.sleep(delay)
            request[_PENDING] = False
        if fault == "drop":
            self._count("drop", st)
            self._abort(request)
            raise _Dropped()
        if fault in ("5xx", "fail_first"):
            self._count("5xx", st)
            if fault == "fail_first":
                status, err_body = _5XX[0]
            else:
                status, err_body = _5XX[_hash_int("5xx", cfg.seed, digest, attempt) % len(_5XX)]
            return self._json(status, err_body, headers)

        # --- answer -------------------------------------------------------------------
        choices = []
        completion_tokens = 0
        for i in range(choices_n):
            content: str | None
            refusal: str | None = None
            finish = "stop"
            if fault == "refusal":
                content, refusal = None, REFUSAL_TEXT
            elif fault == "apology":
                content = APOLOGY_TEXT
            elif fault == "content_filter":
                content, finish = None, "content_filter"
            elif fault == "empty":
                content = ""
            elif fault == "junk":
                content = JUNK_ANSWERS[_hash_int("junk", digest, attempt, i) % len(JUNK_ANSWERS)]
            elif fault == "control" and schema is None:
                content = _caption_for_digest(digest, i).replace("A person", "A person\x00\x1b\x07", 1) + "\x7f"
            elif schema is not None:
                obj = _expected_json_for_digest(digest, schema, i)
                if fault == "invalid_json":
                    content = _invalid_json_for(obj, digest, cfg.invalid_json_mode)
                else:
                    content = json.dumps(obj, ensure_ascii=False)
            else:
                content = _caption_for_digest(digest, i)
            completion_tokens += estimate_text_tokens(content) + estimate_text_tokens(refusal)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": content, "refusal": refusal, "annotations": []},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            )
        self._id_counter += 1
        resp = {
            "id": f"chatcmpl-loopback{self._id_counter:010d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_loopback",
        }
        outcome = "ok" if fault in ("ok", "fail_first") else fault
        with st._lock:
            st.outcomes[outcome] += 1
            st.prompt_tokens += prompt_tokens
            st.completion_tokens += completion_tokens
            st.last_answer = time.monotonic()
            if outcome in ("ok", "slow"):
                st.ok_digests[digest] += 1
        headers["x-request-id"] = f"req_loopback{self._id_counter:010d}"
        return self._json(200, resp, headers)

    def _serve(self, seconds: float) -> asyncio.Task:
        """Queue for one of `serve_slots` and compute for `seconds`, as a task the client cannot cancel."""
        k = max(1, int(self.config.serve_slots))
        if self._serve_sem is None or self._serve_sem[0] != k:
            self._serve_sem = (k, asyncio.Semaphore(k))
        sem = self._serve_sem[1]

        async def compute() -> None:
            self._waiting += 1
            queued = True
            try:
                async with sem:
                    self._waiting -= 1
                    queued = False
                    if seconds > 0:
                        await asyncio.sleep(seconds)
            finally:
                if queued:
                    self._waiting -= 1

        task = asyncio.ensure_future(compute())
        self._tasks.add(task)  # the server's stop cancels it
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            try:
                transport.abort()
            except Exception:  # noqa: BLE001
                transport.close()


class _Dropped(web.HTTPException):
    """Raised after the connection was aborted so aiohttp does not try to write an answer."""

    status_code = 500


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _parse_storm(text: str) -> tuple[int, float]:
    try:
        n, d = text.split(":", 1)
        return int(n), float(d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"storm must be N:SECONDS, got {text!r}") from None


def _limit(text: str) -> float | None:
    v = float(text)
    return None if v <= 0 else v


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.testing.loopback",
        description="Run the loopback OpenAI-compatible server. Prints 'LISTENING <base_url>' when ready, serves "
        "until SIGTERM/SIGINT (or stdin EOF when stdin is a pipe), then prints 'STATS <json>'.",
    )
    d = LoopbackConfig()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--api-key", default=d.api_key, help=f"required Bearer key (default {d.api_key})")
    p.add_argument("--any-key", action="store_true", help="accept any API key")
    p.add_argument("--models", default=",".join(d.models), help="comma-separated model ids")
    p.add_argument("--latency", type=float, default=d.latency, help="seconds before answering")
    p.add_argument("--no-honour-n", action="store_true", help="always answer 1 choice")
    p.add_argument("--reject-n", action="store_true", help="400 'Only one completion choice is allowed' for n > 1")
    p.add_argument("--response-format", choices=("honour", "ignore", "reject", "reject_schema"),
                   default=d.response_format_mode, help="what to do with response_format")
    p.add_argument("--unknown-model", choices=("404", "400_detail"), default=d.unknown_model,
                   help="answer to an unknown model: 404 (OpenAI) or 400 {\"detail\": ...} (transformers serve)")
    p.add_argument("--serve-slots", type=int, default=0,
                   help="compute k requests at a time from a queue, `latency` s each (0 = all at once)")
    p.add_argument("--max-pending", type=int, default=0, help="503 'server busy' beyond this many queued")
    p.add_argument("--max-tokens-default", type=int, default=d.default_max_tokens)
    p.add_argument("--rpm", type=_limit, default=None, help="requests per minute (0 = unlimited)")
    p.add_argument("--tpm", type=_limit, default=None, help="tokens per minute (0 = unlimited)")
    p.add_argument("--burst-seconds", type=float, default=d.burst_seconds)
    p.add_argument("--sliding-window", action="store_true",
                   help="enforce rpm/tpm over any rolling --burst-seconds (OpenAI-like), not as a token bucket")
    p.add_argument("--no-headers", action="store_true", help="send no x-ratelimit-* headers")
    p.add_argument("--quota-exhausted", action="store_true", help="every request -> 429 insufficient_quota")
    p.add_argument("--seed", type=int, default=d.seed)
    for name in ("5xx", "drop", "hang", "refusal", "apology", "content-filter", "empty", "slow", "429", "invalid-json",
                 "junk", "control"):
        p.add_argument(f"--p-{name}", type=float, default=0.0, help=f"probability of {name} per request")
    p.add_argument("--hang-s", type=float, default=d.hang_s)
    p.add_argument("--slow-s", type=float, default=d.slow_s)
    p.add_argument("--fault-retry-after-s", type=float, default=d.fault_retry_after_s)
    p.add_argument("--invalid-json-mode", choices=("object", "truncated", "mixed"), default=d.invalid_json_mode)
    p.add_argument("--fail-first-attempts", type=int, default=0)
    p.add_argument("--storm", type=_parse_storm, action="append", default=[], metavar="N:SECONDS",
                   help="after the N-th request, 429 everything for SECONDS (repeatable)")
    p.add_argument("--no-batch-api", dest="batch_api", action="store_false",
                   help="no /v1/files, /v1/batches (404), as a chat-only server such as vLLM's")
    p.add_argument("--batch-step-s", type=float, default=d.batch_step_s,
                   help="Batch API: seconds per lifecycle step and per line")
    p.add_argument("--batch-line-fail-p", type=float, default=0.0, help="Batch API: probability of a 500 line")
    p.add_argument("--batch-expire-after", type=int, default=None, help="Batch API: expire after N lines")
    p.add_argument("--batch-enqueued-token-limit", type=int, default=None,
                   help="Batch API: enqueued prompt tokens per model (over it: token_limit_exceeded)")
    p.add_argument("--batch-max-lines", type=int, default=d.batch_max_lines)
    p.add_argument("--batch-max-bytes", type=int, default=d.batch_max_bytes)
    p.add_argument("--batch-delay-upload-s", type=float, default=0.0, help="hold the upload answer (kill tests)")
    p.add_argument("--batch-delay-create-s", type=float, default=0.0, help="hold the create answer (kill tests)")
    p.add_argument("--batch-delay-content-s", type=float, default=0.0, help="hold file contents (kill tests)")
    p.add_argument("--no-stdin-watch", action="store_true", help="do not stop when stdin reaches EOF")
    p.add_argument("--stats-timestamps", action="store_true", help="include timestamps in the STATS line")
    return p


def config_from_args(a: argparse.Namespace) -> LoopbackConfig:
    return LoopbackConfig(
        host=a.host,
        port=a.port,
        api_key=None if a.any_key or a.api_key in ("", "none", "None") else a.api_key,
        models=tuple(m.strip() for m in a.models.split(",") if m.strip()),
        latency=a.latency,
        honour_n=not a.no_honour_n,
        reject_n=a.reject_n,
        response_format_mode=a.response_format,
        unknown_model=a.unknown_model,
        p_junk=a.p_junk,
        p_control=a.p_control,
        serve_slots=a.serve_slots,
        max_pending=a.max_pending,
        default_max_tokens=a.max_tokens_default,
        rpm=a.rpm,
        tpm=a.tpm,
        burst_seconds=a.burst_seconds,
        limit_mode="sliding" if a.sliding_window else "bucket",
        send_headers=not a.no_headers,
        quota_exhausted=a.quota_exhausted,
        seed=a.seed,
        p_5xx=a.p_5xx,
        p_drop=a.p_drop,
        p_hang=a.p_hang,
        hang_s=a.hang_s,
        p_refusal=a.p_refusal,
        p_apology=a.p_apology,
        p_content_filter=a.p_content_filter,
        p_empty=a.p_empty,
        p_slow=a.p_slow,
        slow_s=a.slow_s,
        p_429=a.p_429,
        fault_retry_after_s=a.fault_retry_after_s,
        p_invalid_json=a.p_invalid_json,
        invalid_json_mode=a.invalid_json_mode,
        fail_first_attempts=a.fail_first_attempts,
        storms=list(a.storm),
        batch_api=a.batch_api,
        batch_step_s=a.batch_step_s,
        batch_line_fail_p=a.batch_line_fail_p,
        batch_expire_after=a.batch_expire_after,
        batch_enqueued_token_limit=a.batch_enqueued_token_limit,
        batch_max_lines=a.batch_max_lines,
        batch_max_bytes=a.batch_max_bytes,
        batch_delay_upload_s=a.batch_delay_upload_s,
        batch_delay_create_s=a.batch_delay_create_s,
        batch_delay_content_s=a.batch_delay_content_s,
    )


def _stdin_is_pipe() -> bool:
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def main(argv: Iterable[str] | None = None) -> int:
    args = build_arg_parser().parse_args(list(argv) if argv is not None else None)
    server = LoopbackServer(config_from_args(args))
    done = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    sys.stdout.write(f"LISTENING {server.base_url}\n")
    sys.stdout.flush()
    if not args.no_stdin_watch and _stdin_is_pipe():

        def _watch() -> None:
            try:
                while sys.stdin.buffer.read(65536):
                    pass
            except Exception:  # noqa: BLE001
                pass
            done.set()

        threading.Thread(target=_watch, name="stdin-watch", daemon=True).start()
    while not done.wait(0.5):
        pass
    server.stop()
    try:
        sys.stdout.write("STATS " + json.dumps(server.stats.as_dict(timestamps=args.stats_timestamps)) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # the reader went away
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
