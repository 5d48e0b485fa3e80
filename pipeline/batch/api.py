"""The Batch API through the real `openai` SDK: files and batches, as plain records and typed failures.

A thin async wrapper (`BatchAPI`) over `client.files` and `client.batches` of the run's own client (the
same endpoint, key, Azure handling and transport as online mode, `pipeline.run.runner.make_backend`).
Every SDK exception becomes a typed `APIFailure` through `pipeline.providers.openai.failure_from_sdk`
(classified by status and code, never by message text; the key is redacted from any message). Transient
failures (5xx, timeouts, dropped connections, 429 rate limits, an unreachable server) are retried here
with backoff for up to `patience_s`; the SDK's own retries stay off, as online. A refusal that retrying
cannot fix is raised at once: the enqueued-token limit (`token_limit_exceeded`), a bad request, a key or
quota problem.

Lists are paged (`after`/`limit`) to the end, so a folder's batch is found again among any number of
the account's batches.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
import openai

from pipeline.batch.lines import BATCH_URL
from pipeline.providers.base import APIFailure, ErrorKind
from pipeline.providers.openai import failure_from_sdk
from pipeline.run.retry import RetryPolicy, backoff_s

try:  # the SDK's HTTP library: httpx2 in openai>=3, httpx before
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - older SDKs
    import httpx as _httpx  # type: ignore[no-redef]

T = TypeVar("T")

COMPLETION_WINDOW = "24h"
TOKEN_LIMIT_CODE = "token_limit_exceeded"
ENDED_STATES = frozenset({"completed", "failed", "expired", "cancelled"})
PAGE = 100  # items per list page (OpenAI's maximum)
# failures worth another try of the same call: the server or the way to it, not the call
TRANSIENT = frozenset({ErrorKind.SERVER, ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.RATE_LIMIT,
                       ErrorKind.UNREACHABLE, ErrorKind.OTHER})


@dataclass(frozen=True)
class BatchInfo:
    """What the flow needs of a batch object (OpenAI's documented fields)."""

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # errors.data: {"code","message","param","line"}
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: int | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATES

    @property
    def token_limited(self) -> bool:
        """Failed validation on the account's enqueued-token limit (worth submitting again later)."""
        return self.status == "failed" and any(e.get("code") == TOKEN_LIMIT_CODE for e in self.errors)


@dataclass(frozen=True)
class FileInfo:
    id: str
    filename: str
    bytes: int | None = None
    purpose: str | None = None


def batch_info(data: dict[str, Any]) -> BatchInfo:
    """A BatchInfo from a batch object as JSON (pure; tolerant of servers that leave fields out)."""
    errors = data.get("errors") or {}
    lines = errors.get("data") if isinstance(errors, dict) else None
    counts = data.get("request_counts") or {}
    meta = data.get("metadata") or {}
    return BatchInfo(
        id=str(data.get("id") or ""),
        status=str(data.get("status") or ""),
        input_file_id=data.get("input_file_id"),
        output_file_id=data.get("output_file_id") or None,
        error_file_id=data.get("error_file_id") or None,
        request_counts={k: int(v) for k, v in counts.items() if isinstance(v, int)} if isinstance(counts, dict) else {},
        errors=[{k: e.get(k) for k in ("code", "message", "param", "line")} for e in lines or [] if isinstance(e, dict)],
        metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
        created_at=data.get("created_at") if isinstance(data.get("created_at"), int) else None,
    )


def _dump(obj: Any) -> dict[str, Any]:
    dump = getattr(obj, "model_dump", None)
    return dump() if callable(dump) else dict(obj)


class BatchAPI:
    """The Batch API calls of one run. `client`: an `openai.AsyncOpenAI` (or Azure) client; `secret`: the
    key, only to redact it from messages. `patience_s`: how long transient failures of one call are
    retried before the failure is raised (the run's --outage-timeout)."""

    def __init__(self, client: Any, secret: str | None, *, patience_s: float = 300.0,
                 policy: RetryPolicy = RetryPolicy(base_s=0.2, cap_s=10.0)) -> None:
        self.client = client
        self._secret = secret
        self.patience_s = patience_s
        self.policy = policy
        self.calls = 0  # HTTP calls made (each list page counts)

    # --- the calls ----------------------------------------------------------------------------------
    async def upload(self, path: Path, filename: str) -> FileInfo:
        """Upload a JSONL input file (`purpose="batch"`) under `filename` (how an orphan is found again).
        Tried once: a lost answer may hide a stored file, so the caller looks for it before uploading
        again (`pipeline.batch.flow`)."""

        async def call() -> Any:
            with open(path, "rb") as fh:
                return await self.client.files.create(file=(filename, fh), purpose="batch")

        return _file_info(_dump(await self._call(call, retry=False)))

    async def find_file(self, filename: str) -> FileInfo | None:
        """The newest uploaded batch input file named `filename`, if any (pages through the list)."""
        pages = self._pages(lambda after: self.client.files.list(purpose="batch", limit=PAGE, after=after))
        try:
            async for f in pages:
                info = _file_info(f)
                if info.filename == filename:
                    return info
        finally:
            await pages.aclose()
        return None

    async def create(self, input_file_id: str, metadata: dict[str, str]) -> BatchInfo:
        """Create a batch. Tried once, never again here: a create whose answer was lost may have made
        the batch, and a second one would be paid too; the caller lists the batches (by `metadata`)
        before it creates again (`pipeline.batch.flow`)."""
        return batch_info(_dump(await self._call(lambda: self.client.batches.create(
            input_file_id=input_file_id, endpoint=BATCH_URL, completion_window=COMPLETION_WINDOW,
            metadata=metadata), retry=False)))

    async def retrieve(self, batch_id: str) -> BatchInfo:
        return batch_info(_dump(await self._call(lambda: self.client.batches.retrieve(batch_id))))

    async def cancel(self, batch_id: str) -> BatchInfo:
        return batch_info(_dump(await self._call(lambda: self.client.batches.cancel(batch_id))))

    async def check(self) -> None:
        """One cheap, unbilled call (the newest batch) before anything is planned: a wrong key or a server
        without the Batch API is said in one line at once, not after minutes of reading images."""
        await self._call(lambda: self.client.batches.list(limit=1))

    async def batches(self) -> AsyncIterator[BatchInfo]:
        """Every batch of the account, newest first, page by page."""
        async for b in self._pages(lambda after: self.client.batches.list(limit=PAGE, after=after)):
            yield batch_info(b)

    async def download(self, file_id: str, target: Path) -> Path:
        """A file's content to `target`, whole or not at all (written beside it, then renamed)."""
        tmp = target.with_name(target.name + ".part")

        async def call() -> None:
            async with self.client.files.with_streaming_response.content(file_id) as response:
                with open(tmp, "wb") as fh:
                    async for chunk in response.iter_bytes():
                        fh.write(chunk)

        await self._call(call)
        tmp.replace(target)
        return target

    async def delete_file(self, file_id: str) -> bool:
        """Delete a file on the provider; False if it was already gone."""
        try:
            await self._call(lambda: self.client.files.delete(file_id))
        except APIFailure as failure:
            if failure.status == 404:
                return False
            raise
        return True

    # --- plumbing -----------------------------------------------------------------------------------
    async def _pages(self, first: Callable[[Any], Awaitable[Any]]) -> AsyncIterator[dict[str, Any]]:
        """Items of a cursor-paged list, following `after` until `has_more` is false."""
        after: Any = openai.omit
        while True:
            page = await self._call(lambda: first(after))
            data = [_dump(item) for item in (getattr(page, "data", None) or [])]
            for item in data:
                yield item
            if not data or not getattr(page, "has_more", False):
                return
            after = data[-1].get("id")

    async def _call(self, make: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """One API call; transient failures retried with backoff for up to `patience_s` (`retry`: calls
        that are safe to repeat: reads, cancel, delete)."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            self.calls += 1
            try:
                return await make()
            except (openai.OpenAIError, _httpx.HTTPError, OSError, TimeoutError) as exc:
                failure = failure_from_sdk(exc, self._secret)
            if not retry or failure.code == TOKEN_LIMIT_CODE or failure.kind not in TRANSIENT:
                raise failure
            if time.monotonic() - started >= self.patience_s:
                raise failure
            await anyio.sleep(backoff_s(attempt, self.policy, random.random()))


def _file_info(data: dict[str, Any]) -> FileInfo:
    return FileInfo(id=str(data.get("id") or ""), filename=str(data.get("filename") or ""),
                    bytes=data.get("bytes") if isinstance(data.get("bytes"), int) else None,
                    purpose=data.get("purpose"))
