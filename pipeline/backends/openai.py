"""The OpenAI backend: any OpenAI-compatible chat-completions server, through the real `openai` SDK.

One `AsyncOpenAI` client for the whole run, on the SDK's aiohttp transport with a connection pool sized
to the worker pool (measured in benchmarks/: cheaper per request than the default httpx transport, which
on 2 cores would make the client, not the API, the ceiling). The SDK's own retries are off: the pipeline
owns retries (pipeline.retry) so that every attempt is counted and a 429 pauses the whole pool.

Building the request and reading the answer are plain functions, tested without a server.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import anyio
import openai

from pipeline.backends.base import APIFailure, ErrorKind, ModelReply, ModelRequest
from pipeline.records import Usage
from pipeline.refusals import is_empty, looks_like_refusal
from pipeline.retry import classify_status


def build_messages(req: ModelRequest) -> list[dict[str, Any]]:
    image_part: dict[str, Any] = {"type": "image_url", "image_url": {"url": req.image.data_url}}
    if req.detail:
        image_part["image_url"]["detail"] = req.detail
    return [{"role": "user", "content": [{"type": "text", "text": req.prompt_text}, image_part]}]


def build_request(req: ModelRequest) -> dict[str, Any]:
    """The keyword arguments of `chat.completions.create` for one request."""
    kwargs: dict[str, Any] = {"model": req.model, "messages": build_messages(req)}
    if req.max_tokens:
        kwargs["max_tokens"] = req.max_tokens
    if req.n > 1:
        kwargs["n"] = req.n
    if req.temperature is not None:
        kwargs["temperature"] = req.temperature
    if req.response_schema is not None:
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": req.schema_name, "strict": True, "schema": req.response_schema},
        }
    return kwargs


def usage_of(completion: Any) -> Usage:
    u = getattr(completion, "usage", None)
    if u is None:
        return Usage()
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", 0) if details is not None else 0
    return Usage(
        prompt_tokens=int(getattr(u, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(u, "completion_tokens", 0) or 0),
        cached_tokens=int(cached or 0),
    )


def judge_choice(content: str | None, refusal: str | None, finish_reason: str | None) -> tuple[ErrorKind | None, str]:
    """Is one choice a caption? Returns (None, text) or (REFUSED|EMPTY, why)."""
    if refusal:
        return ErrorKind.REFUSED, f"refusal: {refusal.strip()[:200]}"
    if finish_reason == "content_filter":
        return ErrorKind.REFUSED, "finish_reason content_filter"
    if is_empty(content):
        return ErrorKind.EMPTY, f"empty answer (finish_reason {finish_reason})"
    assert content is not None
    if looks_like_refusal(content):
        return ErrorKind.REFUSED, f"apology: {content.strip()[:200]}"
    return None, content.strip()


def parse_completion(completion: Any, headers: Mapping[str, str], latency_s: float, requested_model: str) -> ModelReply:
    """Turn a ChatCompletion into a ModelReply; raise APIFailure when no choice is a caption."""
    texts: list[str] = []
    rejected: list[tuple[ErrorKind, str]] = []
    for choice in sorted(completion.choices or [], key=lambda c: c.index or 0):
        msg = choice.message
        kind, text = judge_choice(msg.content if msg else None, getattr(msg, "refusal", None), choice.finish_reason)
        if kind is None:
            texts.append(text)
        else:
            rejected.append((kind, text))
    usage = usage_of(completion)
    model = getattr(completion, "model", None) or requested_model
    if not texts:
        kind, why = rejected[0] if rejected else (ErrorKind.EMPTY, "no choices in the answer")
        raise APIFailure(kind, why, status=200, headers=headers, usage=usage, model=model)
    return ModelReply(texts=texts, usage=usage, model=model, headers=dict(headers), latency_s=latency_s, rejected=rejected)


def redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "sk-…redacted")
    return text


def failure_from_sdk(exc: Exception, secret: str | None) -> APIFailure:
    """Map an SDK exception to a typed APIFailure (by class and status, never by message text)."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        code = exc.code or (err.get("code") if isinstance(err, dict) else None)
        message = (err.get("message") if isinstance(err, dict) else None) or exc.message or ""
        message = " ".join(str(message).split())[:300]
        return APIFailure(
            classify_status(exc.status_code, code),
            redact(f"HTTP {exc.status_code}{f' {code}' if code else ''}: {message}", secret),
            status=exc.status_code,
            headers=dict(exc.response.headers) if exc.response is not None else {},
        )
    if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
        return APIFailure(ErrorKind.TIMEOUT, "request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        why = type(cause).__name__ if cause is not None else "connection error"
        return APIFailure(ErrorKind.CONNECTION, f"connection failed ({why})")
    return APIFailure(ErrorKind.OTHER, redact(f"{type(exc).__name__}: {exc}", secret)[:300])


def make_http_client(transport: str, max_connections: int, timeout: float) -> Any:
    """One pooled HTTP client for the run. `transport`: "aiohttp" (default) or "httpx"."""
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    if transport == "aiohttp":
        return openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
    return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        timeout: float,
        max_connections: int,
        transport: str = "aiohttp",
    ) -> None:
        self._key = api_key
        self.timeout = timeout
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            http_client=make_http_client(transport, max_connections, timeout),
        )

    async def caption(self, request: ModelRequest) -> ModelReply:
        kwargs = build_request(request)
        t0 = time.perf_counter()
        try:
            # Our own deadline as well as the SDK's: a server that trickles bytes forever is abandoned too.
            with anyio.fail_after(self.timeout + 1.0):
                raw = await self.client.chat.completions.with_raw_response.create(**kwargs)
                completion = raw.parse()
        except APIFailure:
            raise
        except (openai.OpenAIError, TimeoutError) as exc:
            raise failure_from_sdk(exc, self._key) from None
        return parse_completion(completion, raw.headers, time.perf_counter() - t0, request.model)

    async def aclose(self) -> None:
        await self.client.close()
