"""The loopback server's Batch API: ``/v1/files`` and ``/v1/batches`` with OpenAI's objects and lifecycle.

Why a second module: the chat endpoint (``pipeline.testing.loopback``) answers one request; a batch is a
stateful job (files in memory, a background task per batch moving it through validating -> in_progress ->
finalizing -> completed, or to failed / expired / cancelling -> cancelled). Each line is answered by the
host server's own chat answering (``host._complete(body, model, now, None)``), so a line gets exactly the
caption, faults, refusals, structured answer and usage that ``POST /v1/chat/completions`` would give it;
rate limits, storms, latency and transport faults (drop, hang, injected 429) do not apply to batch lines.

What can be injected (``LoopbackConfig.batch_*``): time per lifecycle step and per line, per-line 500s
(error file), expiry after k lines (finished lines kept in the output file, the rest ``batch_expired`` in the
error file), validation failures (duplicate ``custom_id``, too many lines, too many bytes, malformed lines,
several models) reported as ``errors.data`` lines, an enqueued-token limit per model
(``token_limit_exceeded``), and held answers for kill tests (upload, create, content: the server has done
the work and holds the HTTP answer).

Nothing here imports from ``pipeline`` (not even ``loopback``: the host is passed in).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from aiohttp import web

__all__ = ["BatchService", "StoredFile", "BatchJob", "validate_input", "page_of", "CHAT_ENDPOINT"]

CHAT_ENDPOINT = "/v1/chat/completions"
# Endpoints OpenAI's Batch API takes; this server answers only chat completions (the others: 400).
_KNOWN_ENDPOINTS = ("/v1/responses", CHAT_ENDPOINT, "/v1/embeddings", "/v1/completions", "/v1/moderations")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_ENQUEUED = frozenset({"in_progress", "finalizing", "cancelling"})  # validated, holding enqueued tokens
_FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_WINDOW_S = 24 * 3600


class Host(Protocol):
    """What the batch service needs from the loopback server."""

    config: Any
    stats: Any
    _tasks: set

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response: ...

    def _check_auth(self, request: web.Request) -> web.Response | None: ...

    async def _complete(self, body: dict, model: Any, now: float, request: None) -> web.Response: ...

    def prompt_tokens_of(self, body: dict) -> int: ...


def _err(message: str, code: str | None = None, param: str | None = None,
         type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _hash(*parts: Any) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big")


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def object(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


@dataclass
class BatchJob:
    """One batch: its public fields plus the worker's progress (kept across a server restart)."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    data: bytes  # the input file as it was at creation (deleting the file later does not change the batch)
    seq: int  # creation order (lists are newest first)
    status: str = "validating"
    lines: list[dict] = field(default_factory=list)
    next_line: int = 0
    outputs: list[dict] = field(default_factory=list)  # answered lines with status 200
    failures: list[dict] = field(default_factory=list)  # answered lines with another status
    enqueued: dict[str, int] = field(default_factory=dict)  # model -> estimated prompt tokens
    errors: list[dict] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int | None] = field(default_factory=lambda: {
        k: None for k in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                          "cancelling_at", "cancelled_at")})
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})

    def object(self) -> dict:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": list(self.errors)} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + _WINDOW_S,
        }
        obj.update(self.times)
        obj["request_counts"] = dict(self.counts)
        obj["metadata"] = dict(self.metadata) if self.metadata is not None else None
        return obj


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def _line_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def validate_input(data: bytes, endpoint: str, max_lines: int, max_bytes: int) -> tuple[list[dict], list[dict]]:
    """(lines, errors.data): the parsed lines of a batch input file, or the reasons it fails validation
    (codes as OpenAI documents them: invalid_json_line, missing_required_parameter, url_mismatch,
    model_mismatch, duplicate_custom_id, too_many_tasks, empty_file; file_too_large for the 200 MB cap).
    Line numbers are 1-based."""
    errors: list[dict] = []
    if len(data) > max_bytes:
        errors.append(_line_error("file_too_large", f"The input file is {len(data)} bytes; the limit is "
                                  f"{max_bytes} bytes."))
        return [], errors
    lines: list[dict] = []
    seen: dict[str, int] = {}
    model: str | None = None
    raw_lines = [ln for ln in data.split(b"\n")]
    if raw_lines and raw_lines[-1].strip() == b"":
        raw_lines.pop()
    for no, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            errors.append(_line_error("invalid_json_line", "This line is empty.", no))
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            errors.append(_line_error("invalid_json_line", "This line is not parseable as valid JSON.", no))
            continue
        if not isinstance(obj, dict):
            errors.append(_line_error("invalid_json_line", "This line is not a JSON object.", no))
            continue
        missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
        if missing:
            errors.append(_line_error("missing_required_parameter",
                                      f"Missing required parameter: '{missing[0]}'.", no, missing[0]))
            continue
        cid, body = obj["custom_id"], obj["body"]
        if not isinstance(cid, str) or not cid:
            errors.append(_line_error("invalid_request", "custom_id must be a non-empty string.", no, "custom_id"))
            continue
        if obj["method"] != "POST":
            errors.append(_line_error("invalid_request", "method must be 'POST'.", no, "method"))
            continue
        if obj["url"] != endpoint:
            errors.append(_line_error("url_mismatch", f"The URL provided for this request does not match the "
                                      f"batch endpoint {endpoint!r}.", no, "url"))
            continue
        if not isinstance(body, dict):
            errors.append(_line_error("invalid_request", "body must be a JSON object.", no, "body"))
            continue
        line_model = body.get("model")
        if model is None and isinstance(line_model, str):
            model = line_model
        elif isinstance(line_model, str) and line_model != model:
            errors.append(_line_error("model_mismatch", "The model provided for this request does not match "
                                      "the model of the other requests in the batch.", no, "body.model"))
            continue
        if cid in seen:
            errors.append(_line_error("duplicate_custom_id", "The custom_id for this request is a duplicate of "
                                      f"another request (line {seen[cid]}). The custom_id parameter must be "
                                      "unique for each request in a batch.", no, "custom_id"))
            continue
        seen[cid] = no
        lines.append(obj)
    if not raw_lines:
        errors.append(_line_error("empty_file", "The batch input file is empty."))
    elif len(raw_lines) > max_lines:
        errors.append(_line_error("too_many_tasks", f"The batch input file has {len(raw_lines)} requests; the "
                                  f"limit is {max_lines}."))
    return (lines if not errors else []), errors


def page_of(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page over `items` (already in list order): the items after the one whose id is
    `after` (all if None or unknown), at most `limit`."""
    start = 0
    if after:
        for i, it in enumerate(items):
            if it["id"] == after:
                start = i + 1
                break
    data = items[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}


def _limit(request: web.Request, default: int, hi: int) -> int:
    try:
        v = int(request.query.get("limit", default))
    except ValueError:
        raise web.HTTPBadRequest() from None
    return max(1, min(hi, v))


# ---------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------


class BatchService:
    """Files and batches held in memory by one loopback server; routes added by `add_routes`."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, BatchJob] = {}
        self._counter = 0
        self._workers: dict[str, asyncio.Task] = {}

    # -- public helpers for tests ------------------------------------------------
    def batches_for(self, folder: str | None = None, shard: str | None = None) -> list[dict]:
        """Batch objects (oldest first) whose metadata names this folder tag / shard id (None = any)."""
        out = []
        for job in sorted(self.jobs.values(), key=lambda j: j.seq):
            md = job.metadata or {}
            if folder is not None and md.get("reid_prompt_folder") != folder:
                continue
            if shard is not None and md.get("reid_prompt_shard") != shard:
                continue
            out.append(job.object())
        return out

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        on = self._if_offered
        r.add_post("/v1/files", on(self._upload))
        r.add_get("/v1/files", on(self._list_files))
        r.add_get("/v1/files/{file_id}", on(self._retrieve_file))
        r.add_get("/v1/files/{file_id}/content", on(self._content))
        r.add_delete("/v1/files/{file_id}", on(self._delete_file))
        r.add_post("/v1/batches", on(self._create))
        r.add_get("/v1/batches", on(self._list_batches))
        r.add_get("/v1/batches/{batch_id}", on(self._retrieve))
        r.add_post("/v1/batches/{batch_id}/cancel", on(self._cancel))

    def _if_offered(self, handler: Any) -> Any:
        """`batch_api=False`: a chat-only server (vLLM's OpenAI server, Ollama) answers these paths 404,
        FastAPI's {"detail": "Not Found"}. Offered, every path checks the key before its handler runs."""
        async def route(request: web.Request) -> web.StreamResponse:
            if not self.host.config.batch_api:
                return web.json_response({"detail": "Not Found"}, status=404)
            bad = self.host._check_auth(request)
            if bad is not None:
                return bad
            return await handler(request)
        return route

    def resume(self) -> None:
        """Start a worker for every batch not yet ended (called on the server loop at every start)."""
        self._workers = {}
        for job in self.jobs.values():
            if job.status not in TERMINAL:
                self._start_worker(job)

    # -- internals -------------------------------------------------------------------
    def _new_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter:06d}{_hash(self.host.config.seed, prefix, self._counter):016x}"

    def _call(self, kind: str) -> None:
        st = self.host.stats
        with st._lock:
            st.batch_calls[kind] += 1

    def _count_line(self, outcome: str) -> None:
        st = self.host.stats
        with st._lock:
            st.batch_lines[outcome] += 1

    def _not_found(self, what: str, ident: str) -> web.Response:
        return self.host._json(404, _err(f"No such {what} object: {ident}", None, "id"))

    async def _hold(self, seconds: float) -> None:
        if seconds and seconds > 0:
            await asyncio.sleep(seconds)

    def _store(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        f = StoredFile(self._new_id("file-"), filename, purpose, data, int(time.time()))
        self.files[f.id] = f
        return f

    # -- /v1/files ------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        cfg = self.host.config
        purpose: str | None = None
        filename: str | None = None
        data: bytes | None = None
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError):
            return self.host._json(400, _err("Expected a multipart/form-data body with 'file' and 'purpose'."))
        while True:
            part = await reader.next()
            if part is None:
                break
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload"
                chunks: list[bytes] = []
                size = 0
                while True:
                    chunk = await part.read_chunk(1 << 20)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > cfg.batch_max_upload_bytes:
                        return self.host._json(400, _err("File is too large."))
                    chunks.append(chunk)
                data = b"".join(chunks)
            else:
                await part.release()
        if data is None:
            return self.host._json(400, _err("'file' is a required property", None, "file"))
        if purpose is None:
            return self.host._json(400, _err("'purpose' is a required property", None, "purpose"))
        if purpose not in _FILE_PURPOSES:
            return self.host._json(400, _err(f"'{purpose}' is not one of {list(_FILE_PURPOSES)} - 'purpose'",
                                             None, "purpose"))
        if purpose == "batch" and not (filename or "").endswith(".jsonl"):
            return self.host._json(400, _err("Invalid file format for Batch API. Must be .jsonl"))
        f = self._store(filename or "upload", purpose, data)
        self._call("upload")
        await self._hold(cfg.batch_delay_upload_s)
        return self.host._json(200, f.object())

    async def _list_files(self, request: web.Request) -> web.Response:
        self._call("file_list")
        purpose = request.query.get("purpose")
        order = request.query.get("order", "desc")
        files = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=(order != "asc"))
        return self.host._json(200, page_of([f.object() for f in files], request.query.get("after"),
                                            _limit(request, 10_000, 10_000)))

    async def _retrieve_file(self, request: web.Request) -> web.Response:
        self._call("file_retrieve")
        f = self.files.get(request.match_info["file_id"])
        return self.host._json(200, f.object()) if f else self._not_found("File", request.match_info["file_id"])

    async def _content(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return self._not_found("File", request.match_info["file_id"])
        self._call("content")
        data = f.data
        await self._hold(self.host.config.batch_delay_content_s)
        return web.Response(status=200, body=data, content_type="application/octet-stream")

    async def _delete_file(self, request: web.Request) -> web.Response:
        fid = request.match_info["file_id"]
        if self.files.pop(fid, None) is None:
            return self._not_found("File", fid)
        self._call("delete")
        return self.host._json(200, {"id": fid, "object": "file", "deleted": True})

    # -- /v1/batches ------------------------------------------------------------------
    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            return self.host._json(400, _err("We could not parse the JSON body of your request."))
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return self.host._json(400, _err(f"Missing required parameter: '{name}'.",
                                                 "missing_required_parameter", name))
        endpoint, window = body["endpoint"], body["completion_window"]
        if endpoint not in _KNOWN_ENDPOINTS:
            return self.host._json(400, _err(f"Invalid value for 'endpoint': {endpoint!r}.", "invalid_value",
                                             "endpoint"))
        if endpoint != CHAT_ENDPOINT:
            return self.host._json(400, _err(f"This server runs batches only for {CHAT_ENDPOINT}.",
                                             "invalid_value", "endpoint"))
        if window != "24h":
            return self.host._json(400, _err(f"Invalid value for 'completion_window': {window!r}. Supported "
                                             "values are: '24h'.", "invalid_value", "completion_window"))
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= 16
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in metadata.items())
        ):
            return self.host._json(400, _err("Invalid 'metadata': at most 16 string pairs (keys up to 64 "
                                             "characters, values up to 512).", "invalid_value", "metadata"))
        f = self.files.get(body["input_file_id"])
        if f is None:
            return self._not_found("File", body["input_file_id"])
        if f.purpose != "batch":
            return self.host._json(400, _err(f"File {f.id} has purpose {f.purpose!r}; a batch needs 'batch'.",
                                             "invalid_value", "input_file_id"))
        seq = len(self.jobs)
        job = BatchJob(self._new_id("batch_"), f.id, endpoint, window, metadata, int(time.time()), f.data, seq)
        self.jobs[job.id] = job
        self._call("create")
        md = metadata or {}
        st = self.host.stats
        with st._lock:
            st.batches_created[(md.get("reid_prompt_folder", ""), md.get("reid_prompt_shard", ""))] += 1
        self._start_worker(job)
        answer = job.object()  # as it was when created (validating)
        await self._hold(self.host.config.batch_delay_create_s)
        return self.host._json(200, answer)

    async def _list_batches(self, request: web.Request) -> web.Response:
        self._call("list")
        jobs = sorted(self.jobs.values(), key=lambda j: j.seq, reverse=True)
        return self.host._json(200, page_of([j.object() for j in jobs], request.query.get("after"),
                                            _limit(request, 20, 100)))

    async def _retrieve(self, request: web.Request) -> web.Response:
        self._call("retrieve")
        job = self.jobs.get(request.match_info["batch_id"])
        return self.host._json(200, job.object()) if job else self._not_found("Batch", request.match_info["batch_id"])

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["batch_id"])
        if job is None:
            return self._not_found("Batch", request.match_info["batch_id"])
        self._call("cancel")
        if job.status in TERMINAL:
            return self.host._json(400, _err(f"Cannot cancel a batch with status '{job.status}'.",
                                             "invalid_request_error"))
        if job.status != "cancelling":
            job.status = "cancelling"
            job.times["cancelling_at"] = int(time.time())
        return self.host._json(200, job.object())

    # -- the worker ---------------------------------------------------------------------
    def _start_worker(self, job: BatchJob) -> None:
        task = asyncio.ensure_future(self._run(job))
        self._workers[job.id] = task
        self.host._tasks.add(task)  # the server's stop cancels it; start() resumes the batch
        task.add_done_callback(self.host._tasks.discard)

    async def _step(self) -> None:
        await asyncio.sleep(max(0.0, float(self.host.config.batch_step_s or 0.0)))

    async def _run(self, job: BatchJob) -> None:
        cfg = self.host.config
        if job.status == "validating":
            await self._step()
            if job.status == "validating":
                self._validate(job)
        while job.status == "in_progress" and job.next_line < len(job.lines):
            if cfg.batch_expire_after is not None and job.next_line >= cfg.batch_expire_after:
                self._end(job, "expired", "batch_expired",
                          "This request could not be executed before the completion window expired.")
                return
            await self._step()
            if job.status != "in_progress":
                break
            line = job.lines[job.next_line]
            out = await self._answer(job, line)
            (job.outputs if out["response"]["status_code"] == 200 else job.failures).append(out)
            job.counts["completed" if out["response"]["status_code"] == 200 else "failed"] += 1
            self._count_line(str(out["response"]["status_code"]))
            job.next_line += 1
        if job.status == "in_progress":
            job.status = "finalizing"
            job.times["finalizing_at"] = int(time.time())
        if job.status == "finalizing":
            await self._step()
            if job.status == "finalizing":
                self._end(job, "completed", "", "")
                return
        if job.status == "cancelling":
            await self._step()
            self._end(job, "cancelled", "batch_cancelled", "This request was not executed because the batch "
                      "was cancelled.")

    def _validate(self, job: BatchJob) -> None:
        cfg = self.host.config
        lines, errors = validate_input(job.data, job.endpoint, cfg.batch_max_lines, cfg.batch_max_bytes)
        if not errors and cfg.batch_enqueued_token_limit is not None:
            mine: dict[str, int] = {}
            for line in lines:
                model = str(line["body"].get("model"))
                mine[model] = mine.get(model, 0) + self.host.prompt_tokens_of(line["body"])
            for model, tokens in mine.items():
                queued = sum(j.enqueued.get(model, 0) for j in self.jobs.values()
                             if j is not job and j.status in _ENQUEUED)
                if queued + tokens > cfg.batch_enqueued_token_limit:
                    errors = [_line_error(
                        "token_limit_exceeded",
                        f"Enqueued token limit reached for {model} in organization org-loopback. Limit: "
                        f"{cfg.batch_enqueued_token_limit} enqueued tokens. Please try again once some "
                        "in_progress batches have been completed.")]
                    break
            job.enqueued = mine
        if errors:
            job.errors = errors
            job.enqueued = {}
            job.status = "failed"
            job.times["failed_at"] = int(time.time())
            return
        job.lines = lines
        job.counts["total"] = len(lines)
        job.status = "in_progress"
        job.times["in_progress_at"] = int(time.time())

    async def _answer(self, job: BatchJob, line: dict) -> dict:
        """The output line for one input line: what the chat endpoint answers for its body."""
        cfg = self.host.config
        cid = line["custom_id"]
        body = line["body"]
        req_id = f"req_{_hash('line', job.id, cid):016x}"
        p = float(cfg.batch_line_fail_p or 0.0)
        if p > 0 and _hash(cfg.seed, "batch-line", job.id, cid) / 2.0**64 < p:
            status, obj = 500, _err("The server had an error while processing your request. Sorry about that!",
                                    None, None, "server_error")
        else:
            try:
                resp = await self.host._complete(body, body.get("model"), time.monotonic(), None)
                status = resp.status
                raw = resp.body if isinstance(resp.body, (bytes, bytearray)) else b""
                try:
                    obj = json.loads(raw)
                except ValueError:
                    obj = raw.decode("utf-8", "replace")
                req_id = resp.headers.get("x-request-id", req_id)
            except Exception as e:  # noqa: BLE001 - a line the chat answering cannot handle is a 500 line
                status, obj = 500, _err(f"internal error answering this line: {type(e).__name__}", None, None,
                                        "server_error")
        return {"id": f"batch_req_{_hash('req', job.id, cid):016x}", "custom_id": cid,
                "response": {"status_code": status, "request_id": req_id, "body": obj}, "error": None}

    def _end(self, job: BatchJob, status: str, code: str, message: str) -> None:
        """Write the output and error files and move the batch to `status` (completed / expired / cancelled).
        Lines never attempted get `code` in the error file. Output order is shuffled (the API keeps none)."""
        unattempted = job.lines[job.next_line:]
        errors = list(job.failures)
        for line in unattempted:
            errors.append({"id": f"batch_req_{_hash('req', job.id, line['custom_id']):016x}",
                           "custom_id": line["custom_id"], "response": None,
                           "error": {"code": code, "message": message}})
            self._count_line(status)
        rng = random.Random(_hash(self.host.config.seed, "order", job.id))
        outputs = list(job.outputs)
        rng.shuffle(outputs)
        rng.shuffle(errors)
        if outputs:
            job.output_file_id = self._store(f"{job.id}_output.jsonl", "batch_output", _jsonl(outputs)).id
        if errors:
            job.error_file_id = self._store(f"{job.id}_error.jsonl", "batch_output", _jsonl(errors)).id
        job.counts["failed"] += len(unattempted)
        job.enqueued = {}
        job.status = status
        job.times[f"{status}_at"] = int(time.time())


def _jsonl(records: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
