"""What a backend takes and gives back, and the typed failures it raises.

A backend turns one `ModelRequest` into one `ModelReply` or raises `APIFailure` with an `ErrorKind`.
The retry policy (`pipeline.run.retry`) and the rate limiter (`pipeline.run.limits`) read only these types,
never exception messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from pipeline.records import Usage


class ErrorKind(str, enum.Enum):
    RATE_LIMIT = "rate_limited"  # 429 rate_limit_exceeded: wait and retry, pause the whole pool
    QUOTA = "insufficient_quota"  # 429 insufficient_quota: out of money, stop
    TOO_LARGE = "request_too_large"  # 429/413 request too large: can never succeed
    SERVER = "server_error"  # 5xx
    TIMEOUT = "timeout"  # 408 or our own --timeout
    CONNECTION = "connection_error"  # a connection dropped or reset while a request was on it
    UNREACHABLE = "unreachable"  # no connection at all: refused, host name not found, TLS handshake failed
    BAD_REQUEST = "bad_request"  # 400/422 for this image
    AUTH = "auth"  # 401
    PERMISSION = "permission"  # 403
    NOT_FOUND = "model_not_found"  # 404
    REFUSED = "refused"  # message.refusal, content_filter, apology
    EMPTY = "empty"  # no text in the answer
    INVALID = "invalid"  # structured answer that fails its schema
    OTHER = "api_error"


@dataclass(frozen=True)
class ImagePayload:
    """The image as it is sent: a data URL plus what token estimates need."""

    data_url: str
    mime: str
    width: int
    height: int
    nbytes: int
    reencoded: bool = False


@dataclass(frozen=True)
class ModelRequest:
    image_id: str
    prompt_text: str
    image: ImagePayload
    model: str
    detail: str = "low"
    max_tokens: int | None = 300
    n: int = 1
    temperature: float | None = None
    response_format: dict | None = None  # e.g. strict json_schema for attribute prompts
    reserve_tokens: int | None = None  # what the limiter reserved: tells "request too large" from a 429
    # turns after the first (image) message: (role, text), e.g. a repair request for a malformed answer
    follow_up: tuple[tuple[str, str], ...] = ()
    # seconds before this request is abandoned (pipeline.run.tail's adaptive deadline); None: the backend's timeout
    timeout_s: float | None = None


@dataclass(frozen=True)
class ModelReply:
    texts: list[str]  # one per choice, in order; refusals/empties already removed by the backend
    usage: Usage
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)
    latency_s: float = 0.0
    rejected: list[tuple[ErrorKind, str]] = field(default_factory=list)  # choices that were refusals/empty


class APIFailure(Exception):
    """A request failed. `kind` decides what happens next; `headers` carry retry-after and rate-limit info."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        usage: Usage | None = None,
        model: str = "",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code  # the error body's machine-readable code, if it had one
        self.kind = kind
        self.message = message
        self.status = status
        self.usage = usage  # set when the server answered (and billed) but the answer is no caption
        self.model = model
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}


class Backend(Protocol):
    name: str

    async def caption(self, request: ModelRequest) -> ModelReply: ...

    async def reachable(self) -> bool:
        """Does the server answer at all? A cheap probe while the run waits out an outage."""
        ...

    async def aclose(self) -> None: ...
