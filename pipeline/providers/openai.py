"""The OpenAI backend: any OpenAI-compatible chat-completions server, through the real `openai` SDK.

One `AsyncOpenAI` client for the whole run, on the SDK's aiohttp transport with a connection pool sized
to the worker pool. The SDK's own retries are off: the pipeline owns retries (pipeline.run.retry) so that
every attempt is counted and a 429 pauses the whole pool.

Requests go through the SDK's documented low-level call, `client.post("/chat/completions",
cast_to=httpx.Response, body=...)`: the same client, auth, transport, timeouts and typed errors
(`openai.RateLimitError`, `AuthenticationError`, ...), minus two per-request costs that buy nothing for a
request we build ourselves as plain JSON: the SDK's TypedDict transform of the parameters (it walks the
whole message, base64 image included) and the pydantic model of the answer. Measured on 2 cores at
concurrency 64 against the loopback server (benchmarks/bench_ceiling.py), those two were most of the
client's CPU per request; without them the client is no longer the ceiling.

Building the request and reading the answer are plain functions, tested without a server.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import time
from typing import Any, Mapping

import anyio
import openai

try:  # the SDK's default transport (openai[aiohttp]); classification works without it
    import aiohttp as _aiohttp
except ImportError:  # pragma: no cover
    _aiohttp = None  # type: ignore[assignment]

try:  # the SDK's HTTP library: httpx2 in openai>=3, httpx before
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - older SDKs
    import httpx as _httpx  # type: ignore[no-redef]

from pipeline.providers.base import APIFailure, ErrorKind, ModelReply, ModelRequest
from pipeline.records import Usage
from pipeline.providers.refusals import clean_text, is_empty, looks_like_refusal
from pipeline.providers.classify import classify_status, wrong_model
from pipeline.providers.errorbody import error_code, error_message, error_type, one_line


def build_messages(req: ModelRequest) -> list[dict[str, Any]]:
    image_part: dict[str, Any] = {"type": "image_url", "image_url": {"url": req.image.data_url}}
    if req.detail:
        image_part["image_url"]["detail"] = req.detail
    first = {"role": "user", "content": [{"type": "text", "text": req.prompt_text}, image_part]}
    return [first, *({"role": role, "content": text} for role, text in req.follow_up)]


def build_request(req: ModelRequest) -> dict[str, Any]:
    """The keyword arguments of `chat.completions.create` for one request."""
    kwargs: dict[str, Any] = {"model": req.model, "messages": build_messages(req)}
    if req.max_tokens:
        kwargs["max_tokens"] = req.max_tokens
    if req.n > 1:
        kwargs["n"] = req.n
    if req.temperature is not None:
        kwargs["temperature"] = req.temperature
    if req.response_format is not None:
        kwargs["response_format"] = req.response_format
    return kwargs


def usage_of(completion: Mapping[str, Any]) -> Usage:
    u = completion.get("usage") or {}
    details = u.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


def judge_choice(content: str | None, refusal: str | None, finish_reason: str | None) -> tuple[ErrorKind | None, str]:
    """Is one choice a caption? Returns (None, text) or (REFUSED|EMPTY, why)."""
    if refusal:
        return ErrorKind.REFUSED, f"refusal: {refusal.strip()[:200]}"
    if finish_reason == "content_filter":
        return ErrorKind.REFUSED, "finish_reason content_filter"
    if content is None or not content.strip():
        return ErrorKind.EMPTY, f"empty answer (finish_reason {finish_reason})"
    text = clean_text(content).strip()  # control characters never reach a file
    if is_empty(text):
        return ErrorKind.EMPTY, f"no letters or digits in the answer: {content.strip()[:40]!r}"
    if looks_like_refusal(text):
        return ErrorKind.REFUSED, f"apology: {text[:200]}"
    return None, text


def parse_completion(
    completion: Mapping[str, Any], headers: Mapping[str, str], latency_s: float, requested_model: str
) -> ModelReply:
    """Turn a chat.completion JSON object into a ModelReply; raise APIFailure when no choice is a caption."""
    texts: list[str] = []
    rejected: list[tuple[ErrorKind, str]] = []
    choices = completion.get("choices") or []
    for choice in sorted(choices, key=lambda c: c.get("index") or 0):
        msg = choice.get("message") or {}
        kind, text = judge_choice(msg.get("content"), msg.get("refusal"), choice.get("finish_reason"))
        if kind is None:
            texts.append(text)
        else:
            rejected.append((kind, text))
    usage = usage_of(completion)
    model = completion.get("model") or requested_model
    if not texts:
        kind, why = rejected[0] if rejected else (ErrorKind.EMPTY, "no choices in the answer")
        raise APIFailure(kind, why, status=200, headers=headers, usage=usage, model=model)
    return ModelReply(texts=texts, usage=usage, model=model, headers=dict(headers), latency_s=latency_s, rejected=rejected)


def decode_body(content: bytes) -> Mapping[str, Any]:
    """The answer's JSON; a 200 that is not a JSON object is a server fault (retryable)."""
    try:
        data = json.loads(content)
    except ValueError:
        raise APIFailure(
            ErrorKind.SERVER, "the server answered 200 with a body that is not JSON", status=200
        ) from None
    if not isinstance(data, dict):
        raise APIFailure(ErrorKind.SERVER, "the server answered 200 with JSON that is not an object", status=200)
    return data


def redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "sk-…redacted")
    return text


def failure_from_sdk(
    exc: Exception, secret: str | None, reserve_tokens: int | None = None, model: str | None = None
) -> APIFailure:
    """Map an SDK exception to a typed APIFailure (by class, status, code and type).

    One exception to "never message text": a 400/422 whose words name the requested `model` is an
    unknown model (NOT_FOUND: the run stops), since servers such as `transformers serve` say so with no
    code at all (`pipeline.providers.classify.wrong_model`).
    """
    if isinstance(exc, openai.APIStatusError):
        # exc.body is the decoded answer (its "error" object when there is one), a list (Gemini) or the
        # plain text; each provider's shape is read by pipeline.providers.errorbody.
        body = exc.body
        code = error_code(body) or (exc.code if isinstance(exc.code, str) else None)
        sdk_type = getattr(exc, "type", None)
        etype = error_type(body) or (sdk_type if isinstance(sdk_type, str) else None)
        # no words in the body (an empty 502 from a proxy): the status line's reason phrase, "Bad Gateway"
        message = error_message(body) or one_line(getattr(exc.response, "reason_phrase", "") or "") or "no message"
        headers = dict(exc.response.headers) if exc.response is not None else {}
        kind = classify_status(exc.status_code, code, error_type=etype, headers=headers, reserve_tokens=reserve_tokens)
        if kind is ErrorKind.BAD_REQUEST and wrong_model(exc.status_code, message, model):
            kind = ErrorKind.NOT_FOUND
        return APIFailure(
            kind,
            redact(f"HTTP {exc.status_code}{f' {code}' if code else ''}: {message}", secret),
            status=exc.status_code,
            headers=headers,
            code=code,
        )
    if isinstance(exc, (openai.APIConnectionError, _httpx.HTTPError, TimeoutError, OSError)):
        kind, why = transport_failure(exc)
        return APIFailure(kind, why)
    return APIFailure(ErrorKind.OTHER, redact(f"{type(exc).__name__}: {exc}", secret)[:300])


def cause_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it wraps (`__cause__`, else `__context__`), outermost first, each once."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# Errors raised while a connection is being opened (so nothing was sent). The aiohttp ones matter because
# the SDK's aiohttp transport re-raises every aiohttp connection error, refused and dropped alike, as
# httpx's ConnectTimeout -> openai.APITimeoutError: only the wrapped cause tells what happened.
_CONNECTING: tuple[type[BaseException], ...] = (_httpx.ConnectError, _httpx.UnsupportedProtocol)
_DROPPED: tuple[type[BaseException], ...] = (ConnectionError,)  # reset, aborted, broken pipe
if _aiohttp is not None:
    _CONNECTING += (_aiohttp.ClientConnectorError,)
    _DROPPED += (_aiohttp.ClientConnectionError, _aiohttp.ClientPayloadError)


def transport_failure(exc: BaseException) -> tuple[ErrorKind, str]:
    """What went wrong below HTTP, by the exception types along the cause chain (never message text).

    The innermost cause that is known decides, since the wrappers lie (see `_CONNECTING`):
    - no connection could be made - refused, host name not found, TLS handshake or certificate
      failed, no route, not an http(s) URL - is UNREACHABLE: the server is not there, nothing was sent;
    - a timeout (ours, the SDK's, the socket's) is TIMEOUT;
    - a connection that dropped or was reset under a request is CONNECTION.
    """
    chain = cause_chain(exc)
    connecting = any(isinstance(e, _CONNECTING) for e in chain)
    for e in reversed(chain):
        if isinstance(e, (socket.gaierror, ConnectionRefusedError, _httpx.UnsupportedProtocol)):
            return ErrorKind.UNREACHABLE, unreachable_why(e, chain)
        if isinstance(e, ssl.SSLError):
            if connecting:
                return ErrorKind.UNREACHABLE, unreachable_why(e, chain)
            return ErrorKind.CONNECTION, f"connection failed ({type(e).__name__})"
        if isinstance(e, (TimeoutError, asyncio.TimeoutError, _httpx.TimeoutException)):
            return ErrorKind.TIMEOUT, "request timed out"
        if isinstance(e, _CONNECTING):
            return ErrorKind.UNREACHABLE, unreachable_why(e, chain)
        if isinstance(e, (*_DROPPED, _httpx.TransportError)):
            return ErrorKind.CONNECTION, f"connection failed ({type(chain[-1]).__name__})"
    if isinstance(exc, openai.APITimeoutError):
        return ErrorKind.TIMEOUT, "request timed out"
    return ErrorKind.CONNECTION, f"connection failed ({type(chain[-1]).__name__})"


def unreachable_why(cause: BaseException, chain: list[BaseException]) -> str:
    """A few words on why no connection could be made, from the cause's type and its structured fields."""
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return "host name not found"
    if isinstance(cause, _httpx.UnsupportedProtocol):
        return "not an http:// or https:// URL"
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = getattr(cause, "verify_message", None)
        return f"TLS certificate not accepted ({detail})" if detail else "TLS certificate not accepted"
    if isinstance(cause, ssl.SSLError):
        reason = getattr(cause, "reason", None)
        return f"TLS handshake failed ({reason})" if reason else "TLS handshake failed"
    for e in reversed(chain):  # no route to host, network unreachable, ...: the OS's words for its errno
        errno_ = getattr(e, "errno", None)
        if isinstance(e, OSError) and isinstance(errno_, int) and errno_ > 0:
            return os.strerror(errno_).lower()
    return "cannot connect"


PROBE_TIMEOUT_S = 5.0  # a reachability probe that takes longer than this counts as "not reachable"


def make_http_client(transport: str, max_connections: int, timeout: float) -> Any:
    """One pooled HTTP client for the run. `transport`: "aiohttp" (default) or "httpx"."""
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    if transport == "aiohttp":
        return openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
    return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)


def azure_client_args(endpoint: str | None, api_version: str) -> dict[str, Any]:
    """How an Azure endpoint is handed to `AsyncAzureOpenAI`: a resource URL
    (https://<resource>.openai.azure.com) as `azure_endpoint`, a URL already holding `/openai` as
    `base_url`. Pure.

    Either way the deployment is the request's `model`: for `/chat/completions` with a JSON body the SDK
    (openai/lib/azure.py, `BaseAzureClient._build_request`) rewrites the path to
    `/openai/deployments/{model}/chat/completions`, the same for the low-level `client.post` the backend
    uses, and adds `?api-version=...` to every request; the key goes in the `api-key` header.
    """
    if not endpoint:
        raise ValueError("Azure needs an endpoint (AZURE_OPENAI_ENDPOINT or --base-url)")
    url = endpoint.strip()
    path = url.split("://", 1)[-1].partition("/")[2]
    if "openai" in path.split("/"):
        return {"base_url": url.rstrip("/"), "api_version": api_version}
    return {"azure_endpoint": url.rstrip("/"), "api_version": api_version}


def is_azure_v1(endpoint: str | None) -> bool:
    """Azure's v1 API (https://<resource>.openai.azure.com/openai/v1/) takes the plain OpenAI client:
    model names in the body, no api-version, no /deployments/ path."""
    path = (endpoint or "").split("://", 1)[-1].partition("/")[2].strip("/")
    return path.endswith("openai/v1")


def make_azure_client(api_key: str, endpoint: str | None, api_version: str, timeout: float, http_client: Any) -> Any:
    """An `openai.AsyncAzureOpenAI` client for Azure OpenAI deployments (see `azure_client_args`)."""
    return openai.AsyncAzureOpenAI(
        api_key=api_key, max_retries=0, timeout=timeout, http_client=http_client,
        **azure_client_args(endpoint, api_version),
    )


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
        azure_api_version: str | None = None,
    ) -> None:
        self._key = api_key
        self.timeout = timeout
        self.probe_timeout = min(PROBE_TIMEOUT_S, timeout)
        http_client = make_http_client(transport, max_connections, timeout)
        if azure_api_version is not None and not is_azure_v1(base_url):
            self.client = make_azure_client(api_key, base_url, azure_api_version, timeout, http_client)
        else:
            self.client = openai.AsyncOpenAI(
                api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout, http_client=http_client
            )

    async def caption(self, request: ModelRequest) -> ModelReply:
        kwargs = build_request(request)
        t0 = time.perf_counter()
        try:
            # Our own deadline as well as the SDK's: a server that trickles bytes forever is abandoned too.
            # A per-request deadline (adaptive, below --timeout) is ours alone.
            deadline = self.timeout + 1.0 if request.timeout_s is None else min(request.timeout_s, self.timeout + 1.0)
            with anyio.fail_after(deadline):
                response = await self.client.post("/chat/completions", cast_to=_httpx.Response, body=kwargs)
                content = await response.aread()
        except (openai.OpenAIError, TimeoutError, _httpx.HTTPError) as exc:
            raise failure_from_sdk(exc, self._key, request.reserve_tokens, request.model) from None
        return parse_completion(decode_body(content), response.headers, time.perf_counter() - t0, request.model)

    async def raw_completion(self, body: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, str], float]:
        """One chat completion of a body built by the caller, answered as it came: (JSON, headers, seconds).

        For `python -m pipeline probe` (pipeline.run.probe), which needs what `caption` judges away: the
        number of choices, the raw text, the usage object. Failures are the same typed APIFailure.
        """
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(self.timeout + 1.0):
                response = await self.client.post("/chat/completions", cast_to=_httpx.Response, body=dict(body))
                content = await response.aread()
        except (openai.OpenAIError, TimeoutError, _httpx.HTTPError) as exc:
            raise failure_from_sdk(exc, self._key) from None
        return decode_body(content), dict(response.headers), time.perf_counter() - t0

    async def reachable(self) -> bool:
        """True once the server gives any HTTP answer (even 401 or 404) to a GET of `/models`.

        It goes through the run's own client, so proxies, TLS trust and the transport are the ones the
        requests use: a server whose port accepts but whose TLS fails is still unreachable. Not billed.
        """
        with anyio.move_on_after(self.probe_timeout):
            try:
                await self.client.get("/models", cast_to=_httpx.Response)
            except openai.APIStatusError:
                return True
            except (openai.OpenAIError, TimeoutError, OSError, _httpx.HTTPError):
                return False
            return True
        return False

    async def aclose(self) -> None:
        await self.client.close()
