"""`python -m pipeline probe`: a handful of tiny requests that find out what a server does.

Each question is one request that differs from a request the server already answered in exactly one
part, so a refusal can be put on that part:

1. a first answer: a 32x64 JPEG (else PNG, else WEBP) with `max_tokens` (else `max_completion_tokens`);
   it tells whether `usage` comes back and whether rate-limit headers are sent, and a key, model or
   address problem stops the probe here with one line (exit 3), as it would stop a run;
2. the other image types, the other length parameter, `n: 2`, `response_format` json_schema and
   json_object, `detail` low and high (same image: do the prompt tokens differ?);
3. latency with 1, 2, 4 and 8 requests in flight (a few requests each), and the concurrency beyond
   which latency grows faster than throughput (`capabilities.recommend_concurrency`).

At most `MAX_REQUESTS` requests and about `budget_s` seconds: a level not started by then is skipped,
and a level with any failed request ends the climb (a request abandoned on a one-at-a-time server keeps
it busy, so a higher level would only measure the pile-up). The decisions are the pure functions of
`pipeline.providers.capabilities`; this module only sends and times.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import anyio

from pipeline.errors import FatalAPIError, ServerUnreachableError
from pipeline.providers.base import APIFailure, ErrorKind
from pipeline.providers.capabilities import (
    ACCEPTED,
    REJECTED,
    UNKNOWN,
    LevelStats,
    classify_accepted,
    classify_json_object,
    classify_json_schema,
    classify_n,
    has_rate_limit_headers,
    level_stats,
    max_tokens_param,
    merge_levels,
    recommend_concurrency,
    usage_present,
)
from pipeline.providers.classify import wrong_model
from pipeline.providers.headers import parse_retry_after
from pipeline.providers.presets import get_preset, model_or_default, resolve_api_version, resolve_endpoint
from pipeline.run.outage import DEFAULT_BASE_URL, cannot_reach_message, display_url

MAX_REQUESTS = 40  # the probe never sends more than this, retries included
LEVELS: tuple[tuple[int, int], ...] = ((1, 3), (2, 4), (4, 8), (8, 8))  # (in flight, requests) per level
IMAGE_FORMATS: tuple[tuple[str, str, str], ...] = (("jpeg", "JPEG", "image/jpeg"), ("png", "PNG", "image/png"),
                                                   ("webp", "WEBP", "image/webp"))
PROMPT = "Describe the person in this picture in a few words."
SCHEMA_PROMPT = "What colour is the upper half of this picture? One word."
JSON_OBJECT_PROMPT = 'What colour is the upper half of this picture? Answer in JSON: {"colour": "..."}.'
PROBE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "blue", "green", "other"]}},
    "required": ["colour"],
    "additionalProperties": False,
}
TRANSIENT = frozenset({ErrorKind.RATE_LIMIT, ErrorKind.SERVER, ErrorKind.CONNECTION})
RETRY_WAIT_MAX_S = 5.0


@dataclass(frozen=True)
class ProbeOptions:
    """Where to probe and how hard. `api_key` never printed; `key_variable` names where it came from."""

    base_url: str | None
    model: str
    api_key: str = field(repr=False)
    key_variable: str = "OPENAI_API_KEY"
    provider: str = "openai"
    api_version: str | None = None
    timeout: float = 30.0
    budget_s: float = 120.0
    max_tokens: int = 16
    http_client: str = "aiohttp"

    @property
    def where(self) -> str:
        return display_url(self.base_url or DEFAULT_BASE_URL)


def probe_options(provider: str, base_url: str | None, model: str | None, api_version: str | None,
                  env: Mapping[str, str], *, timeout: float = 30.0, budget_s: float = 120.0) -> ProbeOptions:
    """The probe's endpoint, model and key, resolved exactly as `run` resolves them (pipeline.providers.presets)."""
    from pipeline.run.runner import usable_key

    endpoint = resolve_endpoint(provider, base_url, env)
    chosen = model_or_default(provider, model)
    resolved = usable_key(provider, env)
    return ProbeOptions(endpoint.base_url, chosen, resolved.key, resolved.variable, provider,
                        resolve_api_version(provider, api_version, env), timeout, budget_s)


# --- the requests -------------------------------------------------------------------------------------

def probe_image(fmt: str) -> bytes:
    """A 32x64 figure (red top, blue bottom) encoded as `fmt` (Pillow format name), made in memory."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (32, 64), (200, 200, 200))
    draw = ImageDraw.Draw(im)
    draw.rectangle((8, 4, 23, 31), fill=(200, 30, 30))
    draw.rectangle((10, 32, 21, 60), fill=(30, 40, 180))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def can_encode(fmt: str) -> bool:
    """Can this Pillow write `fmt` (WEBP needs libwebp)? A format it cannot write is not asked about."""
    try:
        probe_image(fmt)
    except (OSError, KeyError, ValueError):
        return False
    return True


def chat_body(model: str, prompt: str, image: bytes, mime: str, *, length_param: str = "max_tokens",
              max_tokens: int = 16, detail: str | None = None, **extra: Any) -> dict[str, Any]:
    """One chat-completions body: a text part and a base64 image part, plus `extra` (n, response_format)."""
    url: dict[str, Any] = {"url": f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"}
    if detail:
        url["detail"] = detail
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                  {"type": "image_url", "image_url": url}]}],
        length_param: max_tokens,
    }
    body.update(extra)
    return body


@dataclass
class Answer:
    """What came back for one probe request: an HTTP status (None: none at all), the JSON and headers."""

    status: int | None
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    latency_s: float = 0.0
    failure: APIFailure | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body is not None

    @property
    def choices(self) -> int | None:
        return len(self.body.get("choices") or []) if self.ok and self.body is not None else None

    @property
    def content(self) -> str | None:
        if not self.ok or self.body is None:
            return None
        choices = self.body.get("choices") or []
        message = (choices[0].get("message") or {}) if choices else {}
        content = message.get("content")
        return content if isinstance(content, str) else None

    @property
    def prompt_tokens(self) -> int | None:
        u = (self.body or {}).get("usage") if self.ok else None
        value = u.get("prompt_tokens") if isinstance(u, dict) else None
        return value if isinstance(value, int) else None

    @property
    def why(self) -> str:
        return self.failure.message if self.failure is not None else ""


class ProbeBudget(Exception):
    """The probe's request or time budget is spent: the questions left stay unanswered."""


class Prober:
    """Sends the probe's requests through one backend, counting them against `MAX_REQUESTS`."""

    def __init__(self, opts: ProbeOptions, backend: Any, max_requests: int = MAX_REQUESTS) -> None:
        self.opts = opts
        self.backend = backend
        self.max_requests = max_requests
        self.sent = 0
        self.headers_seen = False
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def budget_left(self) -> float:
        return self.opts.budget_s - self.elapsed

    async def once(self, body: Mapping[str, Any], *, timed: bool = True) -> Answer:
        """One request. `timed`: refused once the time budget is spent (the first answer is never refused)."""
        if self.sent >= self.max_requests:
            raise ProbeBudget(f"{self.max_requests} requests sent")
        if timed and self.budget_left() <= 0:
            raise ProbeBudget(f"the time budget of {self.opts.budget_s:g} s is spent")
        self.sent += 1
        try:
            data, headers, latency = await self.backend.raw_completion(body)
        except APIFailure as failure:
            if failure.headers and has_rate_limit_headers(failure.headers):
                self.headers_seen = True
            return Answer(failure.status if failure.status is not None else None, headers=failure.headers,
                          failure=failure)
        if has_rate_limit_headers(headers):
            self.headers_seen = True
        return Answer(200, data, headers, latency)

    async def ask(self, body: Mapping[str, Any], *, timed: bool = True) -> Answer:
        """One question; a 429, 5xx or dropped connection is asked once more after a short wait."""
        answer = await self.once(body, timed=timed)
        if answer.failure is not None and answer.failure.kind in TRANSIENT and self.sent < self.max_requests:
            wait = parse_retry_after(answer.failure.headers) or 1.0
            await anyio.sleep(min(wait, RETRY_WAIT_MAX_S))
            answer = await self.once(body, timed=timed)
        return answer


def fatal_for(answer: Answer, opts: ProbeOptions) -> Exception | None:
    """The one-line error that stops the probe (exit 3) for an answer that rules out every other request."""
    failure = answer.failure
    if failure is None:
        return None
    kind, message, where = failure.kind, failure.message, opts.where
    if kind is ErrorKind.UNREACHABLE:
        return ServerUnreachableError(cannot_reach_message(opts.base_url or DEFAULT_BASE_URL, message))
    if kind is ErrorKind.AUTH:
        return FatalAPIError(f"the API key was rejected by {where} ({message}): check {opts.key_variable}")
    if kind is ErrorKind.PERMISSION:
        return FatalAPIError(f"{where} refused access ({message})")
    if kind is ErrorKind.NOT_FOUND or (kind is ErrorKind.BAD_REQUEST and failure.status is not None
                                       and wrong_model(failure.status, message, opts.model)):
        # a 404, or a 400 naming the model (transformers serve's {"detail": ...}): the server's own words
        return FatalAPIError(f"model {opts.model!r} is not available at {where} ({message}): check --model")
    if kind is ErrorKind.QUOTA:
        return FatalAPIError(f"{where} says the account is out of quota or credit ({message})")
    if kind is ErrorKind.TIMEOUT:
        return FatalAPIError(f"{where} did not answer the probe's first request within {opts.timeout:g} s "
                             "(a busy or very slow server: try --timeout)")
    return None


# --- the report ---------------------------------------------------------------------------------------

@dataclass
class ProbeReport:
    """What the probe found. `to_dict` is the `--json` output (keys documented in the README)."""

    base_url: str
    model: str
    provider: str
    images: dict[str, bool | None] = field(default_factory=dict)
    n: str = UNKNOWN
    json_schema: str = UNKNOWN
    json_object: str = UNKNOWN
    detail: str = UNKNOWN
    detail_changes_tokens: bool | None = None
    usage: bool | None = None
    rate_limit_headers: bool = False
    max_tokens_param: str = UNKNOWN
    levels: list[LevelStats] = field(default_factory=list)
    recommended_concurrency: int = 1
    requests_sent: int = 0
    elapsed_s: float = 0.0
    server_said: dict[str, str] = field(default_factory=dict)  # a rejection in the server's own words
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "provider": self.provider,
            "images": dict(self.images),
            "n": self.n,
            "json_schema": self.json_schema,
            "json_object": self.json_object,
            "detail": self.detail,
            "detail_changes_tokens": self.detail_changes_tokens,
            "usage": self.usage,
            "rate_limit_headers": self.rate_limit_headers,
            "max_tokens_param": self.max_tokens_param,
            "latency": merge_levels(self.levels),
            "recommended_concurrency": self.recommended_concurrency,
            "requests_sent": self.requests_sent,
            "elapsed_s": round(self.elapsed_s, 3),
            "server_said": dict(self.server_said),
            "notes": list(self.notes),
        }


def _said(report: ProbeReport, key: str, answer: Answer, verdict: str) -> str:
    if verdict in (REJECTED, UNKNOWN) and answer.why:
        report.server_said[key] = answer.why[:300]
    return verdict


# --- the probe ------------------------------------------------------------------------------------------

async def first_answer(prober: Prober, report: ProbeReport) -> tuple[str, str, str, Answer]:
    """The first request the server answers: (format, mime, length parameter, answer). Raises the one-line
    error when the server cannot be used at all (unreachable, key, model, every request refused)."""
    opts = prober.opts
    first_refusal: Answer | None = None
    refused: dict[str, set[str]] = {}
    for name, pil, mime in IMAGE_FORMATS:
        if not can_encode(pil):
            continue
        for param in ("max_tokens", "max_completion_tokens"):
            answer = await prober.ask(chat_body(opts.model, PROMPT, probe_image(pil), mime, length_param=param,
                                                max_tokens=opts.max_tokens), timed=False)
            if answer.ok:
                for earlier in refused:  # refused with both parameters, accepted as another type
                    report.images[earlier] = False
                report.images[name] = True
                if refused.get(name) == {"max_tokens"}:
                    report.server_said["max_tokens"] = first_refusal.why[:300] if first_refusal else ""
                return name, mime, param, answer
            fatal = fatal_for(answer, opts)
            if fatal is not None:
                raise fatal
            if answer.failure is not None and answer.failure.kind in TRANSIENT:
                raise FatalAPIError(f"{opts.where} failed the probe's first request twice ({answer.why})")
            first_refusal = first_refusal or answer
            refused.setdefault(name, set()).add(param)
    why = first_refusal.why if first_refusal is not None else "no answer"
    raise FatalAPIError(f"{opts.where} refused every probe request ({why})")


async def measure_level(prober: Prober, body: Mapping[str, Any], concurrency: int, requests: int) -> LevelStats:
    """`concurrency` requests kept in flight until `requests` were sent; latencies of the answered ones."""
    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))
    t0 = time.monotonic()

    async def one_slot() -> None:
        nonlocal errors
        for _ in queue:
            try:
                answer = await prober.once(body)
            except ProbeBudget:
                return
            if answer.ok:
                latencies.append(answer.latency_s)
            else:
                errors += 1

    with anyio.move_on_after(max(0.0, prober.budget_left()) + prober.opts.timeout) as scope:
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(one_slot)
    if scope.cancelled_caught:
        errors += 1
    return level_stats(concurrency, latencies, errors, time.monotonic() - t0)


async def probe(opts: ProbeOptions, backend: Any | None = None, *, levels=LEVELS,
                max_requests: int = MAX_REQUESTS) -> ProbeReport:
    """Ask the server every question; the report. `backend` is for tests (default: an OpenAIBackend)."""
    own = backend is None
    if backend is None:
        from pipeline.providers.openai import OpenAIBackend

        backend = OpenAIBackend(
            api_key=opts.api_key, base_url=opts.base_url, timeout=opts.timeout,
            max_connections=max(c for c, _ in levels) + 2, transport=opts.http_client,
            azure_api_version=opts.api_version if get_preset(opts.provider).azure else None,
        )
    prober = Prober(opts, backend, max_requests)
    report = ProbeReport(base_url=opts.base_url or DEFAULT_BASE_URL, model=opts.model, provider=opts.provider)
    try:
        await _ask_everything(prober, report, levels)
    finally:
        report.requests_sent = prober.sent
        report.elapsed_s = prober.elapsed
        if own:
            with anyio.CancelScope(shield=True):
                await backend.aclose()
    return report


async def _ask_everything(prober: Prober, report: ProbeReport, levels) -> None:
    opts = prober.opts
    name, mime, param, first = await first_answer(prober, report)
    report.usage = usage_present(first.body or {})
    image = probe_image(dict((n, p) for n, p, _ in IMAGE_FORMATS)[name])

    def body(prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
        return chat_body(opts.model, prompt, image, mime, length_param=param, max_tokens=opts.max_tokens, **extra)

    try:
        for other, pil, other_mime in IMAGE_FORMATS:
            if other not in report.images and not can_encode(pil):
                report.images[other] = None
                report.notes.append(f"this Pillow cannot write {other}: not asked")
            elif other not in report.images:
                answer = await prober.ask(chat_body(opts.model, PROMPT, probe_image(pil), other_mime,
                                                    length_param=param, max_tokens=opts.max_tokens))
                verdict = _said(report, f"image/{other}", answer, classify_accepted(answer.status))
                report.images[other] = {ACCEPTED: True, REJECTED: False}.get(verdict)

        other_param = "max_completion_tokens" if param == "max_tokens" else "max_tokens"
        if other_param == "max_tokens" and "max_tokens" in report.server_said:
            other_verdict = REJECTED
        else:
            answer = await prober.ask(chat_body(opts.model, PROMPT, image, mime, length_param=other_param,
                                                max_tokens=opts.max_tokens))
            other_verdict = _said(report, other_param, answer, classify_accepted(answer.status))
        verdicts = {param: ACCEPTED, other_param: other_verdict}
        report.max_tokens_param = max_tokens_param(verdicts["max_tokens"], verdicts["max_completion_tokens"])

        answer = await prober.ask(body(n=2))
        report.n = _said(report, "n", answer, classify_n(2, answer.choices, answer.status))

        schema_format = {"type": "json_schema",
                         "json_schema": {"name": "probe", "strict": True, "schema": PROBE_SCHEMA}}
        answer = await prober.ask(chat_body(opts.model, SCHEMA_PROMPT, image, mime, length_param=param,
                                            max_tokens=max(opts.max_tokens, 48), response_format=schema_format))
        report.json_schema = _said(report, "json_schema", answer,
                                   classify_json_schema(answer.status, answer.content, PROBE_SCHEMA))
        answer = await prober.ask(chat_body(opts.model, JSON_OBJECT_PROMPT, image, mime, length_param=param,
                                            max_tokens=max(opts.max_tokens, 48),
                                            response_format={"type": "json_object"}))
        report.json_object = _said(report, "json_object", answer,
                                   classify_json_object(answer.status, answer.content))

        low = await prober.ask(body(detail="low"))
        high = await prober.ask(body(detail="high"))
        verdicts_detail = {classify_accepted(low.status), classify_accepted(high.status)}
        report.detail = (REJECTED if REJECTED in verdicts_detail else
                         ACCEPTED if verdicts_detail == {ACCEPTED} else UNKNOWN)
        _said(report, "detail", high if high.failure is not None else low, report.detail)
        if low.prompt_tokens is not None and high.prompt_tokens is not None:
            report.detail_changes_tokens = low.prompt_tokens != high.prompt_tokens

        await _sweep(prober, report, levels, body())
    except ProbeBudget as exc:
        report.notes.append(f"stopped early: {exc}; the questions left are unknown")
    report.rate_limit_headers = prober.headers_seen or has_rate_limit_headers(first.headers)


async def _sweep(prober: Prober, report: ProbeReport, levels, body: Mapping[str, Any]) -> None:
    """Latency at each level in turn; stops at the first level with a failure, or when time runs out."""
    for concurrency, requests in levels:
        if prober.budget_left() <= 0:
            report.notes.append(f"time budget of {prober.opts.budget_s:g} s spent: concurrency {concurrency} "
                                "and above not measured")
            break
        left = prober.max_requests - prober.sent
        if left < concurrency:
            report.notes.append(f"request budget spent: concurrency {concurrency} and above not measured")
            break
        level = await measure_level(prober, body, concurrency, min(requests, left))
        report.levels.append(level)
        if level.errors:
            report.notes.append(f"{level.errors} of {level.requests} requests failed at concurrency "
                                f"{concurrency}: higher concurrency not measured")
            break
        if recommend_concurrency(report.levels) < concurrency:  # the knee is passed: more only queues
            if concurrency != levels[-1][0]:
                report.notes.append(f"latency grew faster than throughput at concurrency {concurrency}: "
                                    "higher concurrency not measured")
            break
    report.recommended_concurrency = recommend_concurrency(report.levels)


def run_probe(opts: ProbeOptions) -> ProbeReport:
    """The CLI's entry: the probe on a fresh event loop."""
    return anyio.run(probe, opts)
