"""`run --mode batch`, `cancel` and `collect`: the folder's shards driven through the Batch API to rows.

The ledger (`pipeline.batch.ledger`) says where every shard is; this module moves each one on by its
state and records every step before the next call, so a kill at any moment followed by the same command
picks up where the folder is, never sending a shard twice:

    planned   upload its JSONL (or adopt the upload a killed run made: found by its file name)
    uploaded  create its batch (or adopt the batch a killed run created: listed by its metadata tag)
    waiting   refused for the enqueued-token limit: created again once this folder has no batch in
              flight; refused again while alone, it is split in two
    submitted polled with adaptive backoff (about 1 s after submission, x1.5 up to --poll-max)
    ended     its output and error files downloaded, joined on custom_id (`pipeline.batch.collect`) and
              written through the folder's OutputWriter; lines to try again become a shard of the
              next round (up to --max-attempts); then `collected`, and its files deleted from the
              provider unless --keep-batch-files

Collecting is idempotent: a line's rows are written only for slots not done yet, errors.csv rows carry
the shard's own run id (`batch-<shard>-<folder tag>`) and are not written twice, and a line to retry is
not re-planned if another outstanding shard already holds it. `--max-cost` counts the full estimate of
every batch submitted and not yet collected as committed (`BatchLedger.committed_usd`).

Ctrl-C stops waiting at once (exit 130): batches stay on the provider, the ledger records them, and the
same command picks them up.
"""

from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import anyio

from pipeline.batch.api import TOKEN_LIMIT_CODE, TRANSIENT, BatchAPI, BatchInfo, FileInfo
from pipeline.batch.collect import Join, Judge, LineOutcome, Verdict, job_for, join_lines, judge_line
from pipeline.batch.ids import parse_custom_id
from pipeline.batch.ledger import BatchLedger, ShardRecord
from pipeline.batch.lines import BatchLine, LineSettings, job_lines
from pipeline.batch.plan import ShardLimits, write_shards
from pipeline.batch.work import ErrorSink, pending_lines
from pipeline.config import RunConfig
from pipeline.data.index import IndexEntries
from pipeline.errors import FatalAPIError, OutputError, ServerUnreachableError
from pipeline.ledger.appendfile import describe_write_error
from pipeline.ledger.costs import new_run_id, retried_reason
from pipeline.ledger.outputs import ATTRIBUTES, CAPTIONS_ALL, ERRORS
from pipeline.ledger.writer import Result, say
from pipeline.providers.base import APIFailure, ErrorKind
from pipeline.providers.pricing import ModelPrice
from pipeline.records import CaptionRow, ErrorRow, IndexEntry, Prompt
from pipeline.run.control import Controller, signal_handlers
from pipeline.run.dispatch import Job
from pipeline.run.keeper import ManifestKeeper
from pipeline.run.runner import (
    SOFT_KINDS, Prepared, RunResult, describe_run, error_rows, final_state, make_backend, prepare, announce,
)
from pipeline.run.retry import STOP_RUN, backoff_s
from pipeline.run.stats import RunStats

ANSWER_FILES = frozenset({CAPTIONS_ALL, ERRORS, ATTRIBUTES})  # the record of what is done (parts are copies)
POLL_FIRST_S = 1.0
POLL_FACTOR = 1.5
CLOCK_SKEW_S = 3600.0  # the provider's clock and ours may differ: batches this much older are still looked at
SOFT_RETRIED = frozenset(retried_reason(k.value) for k in SOFT_KINDS)  # errors.csv: "one more try" was used


# --- pure helpers --------------------------------------------------------------------------------------

@dataclass
class Poll:
    """Adaptive polling: `first_s` after a submission, then x`factor` per look up to `max_s`."""

    max_s: float
    first_s: float = POLL_FIRST_S
    factor: float = POLL_FACTOR
    current: float = 0.0

    def reset(self) -> None:
        self.current = 0.0

    def next(self) -> float:
        self.current = min(self.max_s, self.first_s if self.current <= 0 else self.current * self.factor)
        return self.current


def collection_run_id(ledger: BatchLedger, shard_id: str) -> str:
    """The run id on the errors.csv rows a shard's collection writes: the same however often the shard
    is collected (a kill mid-collection), so its rows are recognised and never written twice."""
    return f"batch-{shard_id}-{ledger.folder_tag[:8]}"


def entry_finder(entries: Sequence[IndexEntry]) -> Callable[[str], IndexEntry | None]:
    """image_id -> IndexEntry of the run's index (compact entries answer by themselves)."""
    if isinstance(entries, IndexEntries):
        def find(image_id: str) -> IndexEntry | None:
            pos = entries.position_of(image_id)
            return None if pos is None else entries[pos]
        return find
    by_id = {e.image_id: e for e in entries}
    return by_id.get


def slot_keys(custom_ids: Iterable[str]) -> set[tuple[str, str, int]]:
    """(image_id, prompt_name, slot) of every slot the custom_ids name (ids not ours are skipped)."""
    keys: set[tuple[str, str, int]] = set()
    for cid in custom_ids:
        try:
            image_id, prompt_name, indices = parse_custom_id(cid)
        except ValueError:
            continue
        keys.update((image_id, prompt_name, i) for i in indices)
    return keys


def uncovered(jobs: Iterable[Job], covered: set[tuple[str, str, int]]) -> Iterator[Job]:
    """`jobs` without the slots another shard holds already (jobs left with no slot are dropped)."""
    for job in jobs:
        if covered:
            todo = tuple(i for i in job.indices if (job.entry.image_id, job.prompt.name, i) not in covered)
            if not todo:
                continue
            if todo != tuple(job.indices):
                job = replace(job, indices=todo)
        yield job


def fatal_for(failure: APIFailure, where: str) -> FatalAPIError | None:
    """The one-line stop for a Batch API failure that no retry can fix (key, quota, no such endpoint)."""
    if failure.kind is ErrorKind.UNREACHABLE:
        return ServerUnreachableError(f"cannot reach {where}: {failure.message}")
    if failure.kind in STOP_RUN:
        if failure.kind is ErrorKind.NOT_FOUND:
            return FatalAPIError(f"{where} answered {failure.message}: does the server offer the Batch API "
                                 "(/v1/files, /v1/batches)?")
        return FatalAPIError(f"{where} refused the Batch API call ({failure.message})")
    return None


# --- the flow ------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What a collection did, for the run's counters and the `collect` command's report."""

    captioned: int = 0
    failed: int = 0
    retried: int = 0
    left: int = 0
    already_done: int = 0
    unknown: int = 0
    duplicates: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)

    def add_join(self, join: Join) -> None:
        self.unknown += join.unknown
        self.duplicates += join.duplicates
        self.malformed += join.malformed
        self.examples += join.examples[: max(0, 5 - len(self.examples))]


class BatchFlow:
    """One command's work on a folder's shards (run, cancel, collect share it)."""

    def __init__(self, prep: Prepared, api: BatchAPI, stats: RunStats, controller: Controller,
                 *, where: str, out: Callable[[str], None] = print) -> None:
        self.prep = prep
        self.cfg: RunConfig = prep.cfg
        self.api = api
        self.stats = stats
        self.controller = controller
        self.where = where  # the endpoint, for messages
        self.out = out  # stdout lines (--no-wait's batch ids)
        self.ledger = BatchLedger.load(self.cfg.out)
        self.price: ModelPrice = prep.price.batch()
        self.prompts: dict[str, Prompt] = {p.name: p for p in prep.prompts}
        self.find_entry = entry_finder(prep.index.entries)
        self.done = prep.resume.done
        self.poll = Poll(max(0.01, self.cfg.batch.poll_max_s))
        self.limits = ShardLimits.from_config(self.cfg.batch)
        self.tally = Tally()
        self.replan = True  # False under `cancel`: unanswered lines are left for a later run
        self.budget_blocked = False
        self.settings = LineSettings.for_run(prep)
        self._soft: dict[tuple[str, str, int], set[str]] = {}  # slot -> shards' run ids that retried a soft failure
        self._recorded_errors = self._errors_by_run()
        self.beat: Callable[[], None] = lambda: None  # the manifest's heartbeat (status tells a live run by it)
        self._alone: dict[str, bool] = {}  # shard -> sent while no other batch of the folder was in flight
        self._pending_rows: list[Result] = []  # errors.csv rows of planning (unreadable images, too large)
        self.planning = False  # round 1 being planned: no shard may be written by anything else meanwhile

    # --- planning ---------------------------------------------------------------------------------
    async def plan_new(self) -> list[ShardRecord]:
        """Round 1 shards for the work not done and not held by an outstanding shard
        (`pipeline.batch.work.pending_lines`, as `--dry-run --mode batch` and `--batch-files-only` plan),
        each sent (uploaded, its batch created) as soon as it is written and recorded: a million images
        take minutes to read and encode, and the first batch need not wait for the last shard.

        Each shard is planned in a worker thread (one `write_shards` step at a time: the ledger is never
        touched by two threads at once), so a Ctrl-C is heard: the plan then stops after the shard being
        written, which is recorded whole; the next run plans the rest. Nothing is collected, split or
        re-planned while planning (those write shards too); `drive` does that once the plan is done."""
        sink = self._sink()
        lines = self._until_stopped(pending_lines(self.prep, self.ledger, sink, self.settings))
        shards = write_shards(self.ledger, lines, self.limits, sink.too_large, price=self.price, round=1)
        planned: list[ShardRecord] = []
        self.planning = True
        try:
            while not self.controller.stopping:
                rec = await anyio.to_thread.run_sync(next, shards, None)
                if rec is None:
                    break
                planned.append(rec)
                await self.send_new(rec)
        finally:
            self.planning = False
            shards.close()  # stopped early: the shard being written is abandoned (its lines planned again)
            self._sunk(sink)
        return planned

    async def send_new(self, rec: ShardRecord) -> None:
        """Upload a shard just planned and create its batch, unless the folder must hold new batches
        back: a shard waits for the enqueued-token limit (new ones would be refused too) or the budget
        has no room (`upload` checks it). Held shards stay `planned`; `drive` sends them later."""
        if any(r.state == "waiting" for r in self.ledger.outstanding()):
            return
        await self.upload(rec)
        rec = self.ledger.get(rec.shard_id)
        if rec.state == "uploaded":
            await self.submit(rec)

    def _until_stopped(self, lines: Iterable[BatchLine]) -> Iterator[BatchLine]:
        for line in lines:
            if self.controller.stopping:
                return
            yield line

    def _write(self, jobs: Iterable[Job], round_: int) -> list[ShardRecord]:
        """Shards of round `round_` for `jobs` (lines to try again)."""
        sink = self._sink()
        shards = list(write_shards(self.ledger, job_lines(jobs, self.settings, sink.image_error), self.limits,
                                   sink.too_large, price=self.price, round=round_))
        self._sunk(sink)
        return shards

    def _sink(self) -> ErrorSink:
        return ErrorSink(model=self.cfg.model.model, run_id=self.stats.run_id)

    def _sunk(self, sink: ErrorSink) -> None:
        """errors.csv rows of planning (an image that cannot be read, a line too large), written next."""
        self._pending_rows += sink.rows
        for reason, n in sink.by_reason.items():
            self.stats.failed(reason, n)

    def _job_of(self, cid: str, round_: int) -> Job | None:
        job, _, _ = job_for(cid, self.find_entry, self.prompts, self.done, round_)
        return job

    # --- the main loop ----------------------------------------------------------------------------
    async def drive(self) -> None:
        """Move every outstanding shard on until all are collected (or --no-wait, a stop, the budget)."""
        while not self.controller.stopping:
            self.budget_blocked = False
            for rec in list(self.ledger.outstanding()):
                if self.controller.stopping:
                    return
                if rec.state == "ended":
                    await self.collect(rec)
                    continue
                if rec.state == "planned":
                    await self.upload(rec)
                if rec.state in ("uploaded", "waiting"):  # (the record changes in place: uploaded just now)
                    await self.submit(rec)
            active = [r for r in self.ledger.outstanding() if r.state != "local"]
            if not active:
                return
            submitted = [r for r in active if r.state == "submitted"]
            if self.cfg.batch.no_wait and not any(r.state == "ended" for r in active):
                # sent what can be sent now (the rest waits for the token limit or the budget)
                for r in submitted:
                    self.out(f"batch {r.batch_id} (shard {r.shard_id}, {r.lines:,} lines)")
                return
            if not submitted:
                if any(r.state == "ended" for r in active):
                    continue
                if self.budget_blocked:
                    self.controller.request_stop("budget")
                    return
                continue
            await anyio.sleep(self.poll.next())
            for rec in submitted:
                await self.refresh(rec)
            self.beat()

    async def refresh(self, rec: ShardRecord) -> None:
        """One look at a batch in flight; an ended one is recorded `ended` (or `waiting`: token limit)."""
        assert rec.batch_id is not None
        info = await self._api(self.api.retrieve(rec.batch_id))
        await self._record_status(rec, info)

    async def _record_status(self, rec: ShardRecord, info: BatchInfo) -> None:
        counts = dict(info.request_counts)
        if info.token_limited:
            self.ledger.update(rec.shard_id, batch_status=info.status, request_counts=counts)
            await self.refused(self.ledger.get(rec.shard_id), [dict(e, batch_id=info.id) for e in info.errors])
            return
        if info.ended:
            errors = list(rec.errors) + [dict(e, batch_id=info.id) for e in info.errors]
            self.ledger.update(rec.shard_id, state="ended", batch_status=info.status, request_counts=counts,
                               output_file_id=info.output_file_id, error_file_id=info.error_file_id,
                               errors=errors)
            if info.status != "failed":
                say(f"batch {info.id} (shard {rec.shard_id}): {info.status}, {counts_text(counts)}")
            if info.status == "failed":
                said = "; ".join(f"{e.get('code')}: {e.get('message')}" + (f" (line {e['line']})" if e.get("line") else "")
                                 for e in info.errors[:3]) or "no reason given"
                say(f"batch {info.id} (shard {rec.shard_id}) failed: {said}")
            return
        if info.status != rec.batch_status or counts != rec.request_counts:
            if info.status != rec.batch_status:
                say(f"batch {info.id} (shard {rec.shard_id}): {info.status}, {counts_text(counts)}")
            self.ledger.update(rec.shard_id, batch_status=info.status, request_counts=counts)

    async def upload(self, rec: ShardRecord) -> None:
        """Upload the shard's JSONL, unless an upload a killed run made is found (by its file name). A
        call that failed in a way worth another try (its answer lost, a 5xx) is followed by a look for
        the file before it is uploaded again, so a lost answer leaves no second copy behind."""
        if not self._affordable(rec):
            return
        name = self.ledger.upload_name(rec)
        found = await self._find_upload(rec, name)
        started, attempt = time.monotonic(), 0
        while found is None:
            try:
                found = await self.api.upload(self.ledger.resolve(rec.jsonl), name)
            except APIFailure as failure:
                attempt += 1
                await self._after_lost_call(failure, started, attempt)
                found = await self._find_upload(rec, name)
        self.ledger.update(rec.shard_id, state="uploaded", input_file_id=found.id)

    async def _find_upload(self, rec: ShardRecord, name: str) -> FileInfo | None:
        found = await self._api(self.api.find_file(name))
        if found is not None and found.bytes is not None and found.bytes != rec.bytes:
            return None  # not this shard's whole file: upload it again
        return found

    async def _after_lost_call(self, failure: APIFailure, started: float, attempt: int) -> None:
        """A create or upload failed: stop (exit 3) unless it is worth another try within the run's
        patience (--outage-timeout); then wait a backoff, after which the caller looks for what the call
        may have made all the same (the server did the work, the answer was lost) before calling again."""
        if failure.kind not in TRANSIENT or time.monotonic() - started >= self.api.patience_s:
            raise self._stop_for(failure) from None
        await anyio.sleep(backoff_s(attempt, self.api.policy, random.random()))

    async def _find_batch(self, rec: ShardRecord) -> BatchInfo | None:
        """The batch of this folder and shard on the provider, if one exists (newest first; a batch the
        provider refused for the token limit is not it)."""
        rejected = {e.get("batch_id") for e in rec.errors if isinstance(e, dict)}
        tag = self.ledger.metadata(rec)
        since = _epoch(rec.created_at)
        listing = self._api_iter(self.api.batches())
        try:
            async for info in listing:
                if all(info.metadata.get(k) == v for k, v in tag.items()) and info.id not in rejected:
                    return info
                if since is not None and info.created_at is not None and info.created_at < since - CLOCK_SKEW_S:
                    return None  # newest first: every batch from here on is older than the shard itself
        finally:
            await listing.aclose()
        return None

    async def submit(self, rec: ShardRecord) -> None:
        """Create the shard's batch, unless one a killed run created is found (listed before creating).

        A create is never simply sent again: when its answer is lost (a timeout, a dropped connection,
        a 5xx after the server made it), the batches are listed again first, so one shard never gets two
        batches (both would be paid)."""
        others = [r for r in self.ledger.outstanding() if r.state == "submitted" and r.shard_id != rec.shard_id]
        if rec.state == "uploaded" and others and any(
                r.state == "waiting" for r in self.ledger.outstanding() if r.shard_id != rec.shard_id):
            return  # a shard already waits for the enqueued-token limit: this one would be refused too
        if rec.state == "waiting":
            if others:
                return  # sent again once this folder's batches in flight have ended
            if self._split_done(rec):
                return
        if not self._affordable(rec):
            return
        adopted = await self._find_batch(rec)
        if adopted is None:
            if rec.input_file_id is None:
                self.ledger.update(rec.shard_id, state="planned")
                return
            self._alone[rec.shard_id] = not others
            started, attempt = time.monotonic(), 0
            while adopted is None:
                try:
                    adopted = await self.api.create(rec.input_file_id, self.ledger.metadata(rec))
                except APIFailure as failure:
                    if failure.code == TOKEN_LIMIT_CODE:  # the enqueued-token limit, at creation
                        await self.refused(rec, [{"code": TOKEN_LIMIT_CODE, "message": failure.message}])
                        return
                    attempt += 1
                    await self._after_lost_call(failure, started, attempt)
                    adopted = await self._find_batch(rec)
        self.ledger.update(rec.shard_id, state="submitted", batch_id=adopted.id, batch_status=adopted.status)
        self.poll.reset()
        say(f"batch {adopted.id} submitted (shard {rec.shard_id}, round {rec.round}, {rec.lines:,} lines)")
        if adopted.ended:
            await self._record_status(self.ledger.get(rec.shard_id), adopted)

    async def refused(self, rec: ShardRecord, errors: list[dict[str, Any]]) -> None:
        """The enqueued-token limit refused the shard: it waits for this folder's batches in flight to
        end; refused with none in flight, it is over the limit alone and is split (never a spin)."""
        alone = self._alone.get(rec.shard_id, False)  # nothing else of ours was in flight when it was sent
        self.ledger.update(rec.shard_id, state="waiting", batch_id=None, errors=list(rec.errors) + errors)
        if alone and not self.planning:  # (while planning, `drive` sends it again alone, then splits it)
            await self.split(self.ledger.get(rec.shard_id))
        else:
            say(f"shard {rec.shard_id} refused for the enqueued-token limit: it is sent again once this "
                "folder's batches in flight end")

    def _split_done(self, rec: ShardRecord) -> bool:
        """A waiting shard refused while alone has been split: its lines are in newer shards."""
        mine = set(self.ledger.read_ids(rec))
        held = set(self._ids_elsewhere(rec.shard_id))
        if mine and mine <= held:
            self.ledger.update(rec.shard_id, state="collected")
            return True
        return False

    async def split(self, rec: ShardRecord) -> None:
        """Refused for the enqueued-token limit with nothing else in flight: the shard alone is over the
        limit. Its lines go into two new shards of the same round (recorded first, then this one
        `collected`); a one-line shard cannot be split and its line goes to errors.csv."""
        path = self.ledger.resolve(rec.jsonl)
        data = path.read_bytes().splitlines(keepends=True)
        if len(data) <= 1:
            rows: list[Result] = []
            for cid in self.ledger.read_ids(rec):
                job = self._job_of(cid, rec.round)
                if job is not None:
                    rows += error_rows(job, "token_limit_exceeded", "the request alone is over the account's "
                                       "enqueued-token limit", run_id=collection_run_id(self.ledger, rec.shard_id))
                    self.stats.failed("token_limit_exceeded", len(job.indices))
            await self.write_rows(rows)
            self.ledger.update(rec.shard_id, state="collected")
            return
        ids = list(self.ledger.read_ids(rec))
        per_line = max(1, rec.est_input_tokens // max(1, rec.lines))
        lines = [BatchLine(cid, raw if raw.endswith(b"\n") else raw + b"\n", per_line, 0)
                 for cid, raw in zip(ids, data)]
        half = ShardLimits(max_requests=math.ceil(len(lines) / 2), max_bytes=self.limits.max_bytes)
        new = list(write_shards(self.ledger, lines, half, lambda line, why: None, price=None, round=rec.round))
        share = rec.est_cost_usd / max(1, rec.lines)
        for n in new:
            self.ledger.update(n.shard_id, est_cost_usd=round(share * n.lines, 8))
        self.ledger.update(rec.shard_id, state="collected")
        say(f"shard {rec.shard_id} alone is over the enqueued-token limit: split into "
            f"{', '.join(n.shard_id for n in new)}")
        await self.clean_up(rec, [])

    def _affordable(self, rec: ShardRecord) -> bool:
        """--max-cost: spent + the full estimate of every batch in flight + this one must stay within it."""
        budget = self.cfg.limits.max_cost
        if budget is None:
            return True
        spent = self.prep.resume.cost_usd + self.stats.cost_usd
        if spent + self.ledger.committed_usd() + rec.est_cost_usd > budget + 1e-12:
            self.budget_blocked = True
            return False
        return True

    # --- collecting -------------------------------------------------------------------------------
    async def collect(self, rec: ShardRecord) -> None:
        """Download, join, write; lines to retry become the next round's shard; then `collected`."""
        files: list[Path] = []
        for file_id, suffix in ((rec.output_file_id, "output"), (rec.error_file_id, "errors")):
            if file_id:
                target = self.ledger.folder / f"{rec.shard_id}.{suffix}.jsonl"
                if not target.exists():
                    try:
                        await self.api.download(file_id, target)
                    except APIFailure as failure:
                        if failure.status != 404:
                            raise self._stop_for(failure) from None
                        say(f"note: the {suffix} file {file_id} of batch {rec.batch_id} is gone from the provider: "
                            "its lines count as unanswered")
                        continue
                files.append(target)
        summary = None
        if rec.batch_status == "failed":
            summary = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in rec.errors[-3:]) or "batch failed"
        before = (self.tally.captioned, self.tally.failed)
        verdict_rows, retry = self.judge_files(rec, files, failed_batch=summary)
        await self.write_rows(verdict_rows)
        again: list[ShardRecord] = []
        if retry and self.replan:
            again = self._write(retry, round_=rec.round + 1)
            await self.write_pending()
        self.ledger.update(rec.shard_id, state="collected")
        slots = sum(len(j.indices) for j in retry)
        next_round = (f", {slots:,} to try again in {', '.join(r.shard_id for r in again)} (round {rec.round + 1})"
                      if again else f", {slots:,} left for a later run" if slots else "")
        say(f"collected shard {rec.shard_id}: {self.tally.captioned - before[0]:,} caption(s), "
            f"{self.tally.failed - before[1]:,} failed{next_round}")
        await self.clean_up(rec, files)

    def judge_files(self, rec: ShardRecord, files: Sequence[Path], *, failed_batch: str | None = None,
                    replan: bool | None = None) -> tuple[list[Result], list[Job]]:
        """Rows and next-round jobs of a shard from its output/error files (see `judge_join`)."""
        ids = list(self.ledger.read_ids(rec))
        join = join_lines(ids, _file_lines(files), where=rec.shard_id)
        if failed_batch is not None:
            for cid, o in list(join.outcomes.items()):
                if o.missing:
                    join.outcomes[cid] = LineOutcome(cid, error_code="batch_failed", error_message=failed_batch)
        self.tally.add_join(join)
        for e in join.examples:
            say(f"note: {e}")
        return self.judge_join(join, ids, rec.round, collection_run_id(self.ledger, rec.shard_id),
                               replan=self.replan if replan is None else replan, exclude=rec.shard_id)

    def judge_join(self, join: Join, ids: Iterable[str], round_: int, run_id: str, *, replan: bool,
                   exclude: str | None = None) -> tuple[list[Result], list[Job]]:
        """Each expected line judged by the online rules (`pipeline.batch.collect.judge_line`)."""
        judge = Judge(self.price, run_id, self.cfg.model.model, self.cfg.limits.max_attempts, replan=replan)
        rows: list[Result] = []
        retry: list[Job] = []
        held: set[tuple[str, str, int]] | None = None
        recorded = self._recorded_errors.get(run_id, set())
        for cid in ids:
            outcome = join.outcomes.get(cid)
            if outcome is None:
                continue
            job, done_n, why = job_for(cid, self.find_entry, self.prompts, self.done, round_)
            self.tally.already_done += done_n
            if job is None:
                if why:
                    self.tally.unknown += 1
                    say(f"note: {why} (custom_id {cid[:80]!r}): line left out")
                continue
            job.soft_failures = self._soft_before(job, run_id)
            verdict = judge_line(outcome, job, judge)
            kept: list[Result] = []
            for row in verdict.rows:
                if isinstance(row, ErrorRow):
                    key = (row.image_id, row.prompt_name, row.caption_index, row.reason)
                    if key in recorded:
                        continue  # written by an earlier collection of this shard (a kill mid-way)
                    recorded.add(key)
                    if row.reason in SOFT_RETRIED:
                        self._soft.setdefault(key[:3], set()).add(run_id)
                kept.append(row)
                if not isinstance(row, ErrorRow):
                    self.done.add(row.key)
            if verdict.rows and not kept:
                continue  # this line was collected before: counted then, re-planned then
            self._count(verdict)
            rows += kept
            if verdict.retry:
                if held is None:
                    held = slot_keys(self._ids_elsewhere(exclude))
                retry += list(uncovered(verdict.retry, held))
        self._recorded_errors[run_id] = recorded
        return rows, retry

    def _count(self, v: Verdict) -> None:
        s, t = self.stats, self.tally
        if v.usage is not None:
            s.usage(v.usage.prompt_tokens, v.usage.completion_tokens, v.cost)
        if v.captioned:
            first = next(r for r in v.rows if not isinstance(r, ErrorRow))
            s.captioned(first.image_id, first.caption if isinstance(first, CaptionRow) else "(attributes)", 0.0,
                        n=v.captioned)
        for reason, n in v.failed.items():
            s.failed(reason, n)
        t.captioned += v.captioned
        t.failed += sum(v.failed.values())
        t.retried += sum(len(j.indices) for j in v.retry)
        t.left += v.left
        if v.retry:
            s.retry()

    def _soft_before(self, job: Job, run_id: str) -> int:
        """Answers that were no caption (refused, empty, invalid) the job's slots got in earlier rounds:
        the `<kind>_retried` rows other shards' collections wrote (errors.csv), so the online rule of one
        more try per work item holds across rounds, runs and kills."""
        return max((len(self._soft.get((job.entry.image_id, job.prompt.name, i), set()) - {run_id})
                    for i in job.indices), default=0)

    def _ids_elsewhere(self, exclude: str | None) -> Iterator[str]:
        for other in self.ledger.outstanding():
            if other.shard_id != exclude:
                yield from self.ledger.read_ids(other)

    def _errors_by_run(self) -> dict[str, set[tuple[str, str, int, str]]]:
        """errors.csv rows earlier collections wrote, by their run id (batch-<shard>-<tag> only)."""
        found: dict[str, set[tuple[str, str, int, str]]] = {}
        read = self.prep.resume.read
        for d in (read.error_rows if read is not None else []):
            run_id = d.get("run_id") or ""
            if not run_id.startswith("batch-"):
                continue
            try:
                index = int(d.get("caption_index") or 0)
            except ValueError:
                continue
            key = (d.get("image_id", ""), d.get("prompt_name", ""), index, d.get("reason", ""))
            found.setdefault(run_id, set()).add(key)
            if key[3] in SOFT_RETRIED:
                self._soft.setdefault(key[:3], set()).add(run_id)
        return found

    async def write_pending(self) -> None:
        """The errors.csv rows of planning held so far (`_sunk`), written now."""
        rows, self._pending_rows = self._pending_rows, []
        await self.write_rows(rows)

    async def write_rows(self, rows: list[Result]) -> None:
        """Through the folder's writer; a file that cannot be written stops the command (nothing lost:
        the shard stays `ended` and its downloaded files stay, so the next start collects it again)."""
        if not rows:
            return
        writer = self.prep.writer
        with anyio.CancelScope(shield=True):
            failures = await writer.write(rows)
        for name in [n for n in failures if n not in ANSWER_FILES]:
            writer.give_up_part(name)  # a part is a copy: rebuilt from captions_all.csv at the next start
            del failures[name]
        if failures:
            name, exc = next(iter(failures.items()))
            raise OutputError(f"{name} cannot be written: {describe_write_error(exc)}")

    async def clean_up(self, rec: ShardRecord, downloaded: Sequence[Path]) -> None:
        """A collected shard's files: deleted from the provider and the folder unless --keep-batch-files
        (the `.ids` file stays: it is the shard's record). A delete that fails is only a warning."""
        if self.cfg.batch.keep_files:
            return
        for file_id in (rec.input_file_id, rec.output_file_id, rec.error_file_id):
            if file_id:
                try:
                    await self._api(self.api.delete_file(file_id))
                except (APIFailure, FatalAPIError) as exc:
                    say(f"warning: file {file_id} not deleted on the provider ({exc})")
        for path in [self.ledger.resolve(rec.jsonl), *downloaded]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                say(f"warning: {path} not deleted ({exc.strerror or exc})")

    # --- cancel -----------------------------------------------------------------------------------
    async def cancel_all(self) -> list[str]:
        """Cancel every batch of the folder in flight, wait for each to end, collect what it answered."""
        self.replan = False
        cancelled: list[str] = []
        for rec in self.ledger.outstanding():
            if rec.state == "submitted" and rec.batch_id:
                info = await self._api(self.api.cancel(rec.batch_id))
                cancelled.append(rec.batch_id)
                await self._record_status(rec, info)
        while not self.controller.stopping:
            for rec in list(self.ledger.outstanding()):
                if rec.state == "ended":
                    await self.collect(rec)
            if not any(r.state == "submitted" for r in self.ledger.outstanding()):
                return cancelled
            await anyio.sleep(self.poll.next())
            for rec in [r for r in self.ledger.outstanding() if r.state == "submitted"]:
                await self.refresh(rec)
        return cancelled

    # --- API calls --------------------------------------------------------------------------------
    async def check(self) -> None:
        """`BatchAPI.check`: key and endpoints, before any image is read (a failure stops the run)."""
        await self._api(self.api.check())

    def _stop_for(self, failure: APIFailure) -> FatalAPIError:
        """A Batch API call that failed for good (after `BatchAPI`'s retries): the run stops (exit 3)."""
        return fatal_for(failure, self.where) or FatalAPIError(f"{self.where}: {failure.message}")

    async def _api(self, call, *, raise_token_limit: bool = False):
        try:
            return await call
        except APIFailure as failure:
            if raise_token_limit and failure.code == TOKEN_LIMIT_CODE:
                raise
            raise self._stop_for(failure) from None

    async def _api_iter(self, items):
        try:
            async for item in items:
                yield item
        except APIFailure as failure:
            raise self._stop_for(failure) from None
        finally:
            await items.aclose()


def counts_text(counts: dict[str, Any]) -> str:
    """A batch's request counts in words: "12/20 done, 1 failed"."""
    total, done, failed = counts.get("total"), counts.get("completed") or 0, counts.get("failed") or 0
    return f"{done:,}/{total:,} done, {failed:,} failed" if isinstance(total, int) else f"{done:,} done, {failed:,} failed"


def _epoch(iso: str) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def _file_lines(files: Sequence[Path]) -> Iterator[bytes]:
    for path in files:
        with path.open("rb") as fh:
            yield from fh


# --- entry points ---------------------------------------------------------------------------------------

def make_api(prep: Prepared) -> BatchAPI:
    """The Batch API over the run's own client (endpoint, key, Azure, transport as online mode)."""
    backend = make_backend(prep.cfg, prep.api_key)
    client = getattr(backend, "client", None)
    if client is None:
        from pipeline.errors import ConfigError

        raise ConfigError("--mode batch needs an OpenAI-compatible server (not --backend offline)")
    return BatchAPI(client, prep.api_key, patience_s=prep.cfg.limits.outage_timeout)


def endpoint_name(cfg: RunConfig) -> str:
    return cfg.model.base_url or "the OpenAI API"


def new_stats(prep: Prepared, price: ModelPrice) -> RunStats:
    spent_before = prep.resume.read.spent if prep.resume.read is not None else None
    return RunStats(total=prep.total, skipped=prep.skipped, concurrency=0, max_cost=prep.cfg.limits.max_cost,
                    run_id=new_run_id(), price_known=price.known, cost_before_usd=prep.resume.cost_usd,
                    cost_before_unknown=spent_before.unknown if spent_before is not None else 0)


def batch_facts(prep: Prepared, price: ModelPrice) -> dict[str, Any]:
    """The manifest's facts for a batch run: the online facts, the mode and the batch price."""
    facts = describe_run(prep)
    b = prep.cfg.batch
    facts["mode"] = "batch"
    facts["batch"] = {"max_requests": b.max_requests, "max_bytes": b.max_bytes, "max_tokens": b.max_tokens,
                      "keep_files": b.keep_files, "no_wait": b.no_wait}
    facts["price"] = {"model": price.model, "input": price.input, "output": price.output,
                      "cached_input": price.cached_input, "known": price.known, "source": price.source,
                      "taken_on": price.taken_on, "tier": "batch"}
    return facts


async def _with_flow(prep: Prepared, body, *, install_signals: bool = True,
                     out: Callable[[str], None] = print, mode: str = "batch") -> RunResult:
    """Run `body(flow)` with the manifest kept, Ctrl-C routed to a stop, and the folder released."""
    api = make_api(prep)
    controller = Controller()
    price = prep.price.batch()
    stats = new_stats(prep, price)
    flow = BatchFlow(prep, api, stats, controller, where=endpoint_name(prep.cfg), out=out)
    keeper = ManifestKeeper(prep.cfg.out, batch_facts(prep, price), stats, prep.resume.cost_usd,
                            prep.previous_manifest)
    def beat() -> None:
        try:
            keeper.save()
        except OSError:  # informational: a full disk must not stop the batches
            pass

    flow.beat = beat
    scope = anyio.CancelScope()
    controller.on_stop.append(lambda: scope.cancel() if controller.interrupts else None)
    sig_ctx = signal_handlers(controller) if install_signals else nullcontext()
    state = "interrupted"
    started = False
    try:
        with sig_ctx:
            keeper.save("running")
            started = True
            with scope:
                await body(flow)
            await flow.write_pending()
        state = final_state(controller)
        if mode == "batch" and state == "finished" and any(r.state in ("submitted", "uploaded", "waiting", "planned")
                                       for r in flow.ledger.outstanding()):
            state = "submitted"  # --no-wait: batches in flight, collected by the same command later
    except FatalAPIError as exc:
        controller.fatal = controller.fatal or exc
        state = "failed"
    except OutputError as exc:
        # an output file cannot be written: the shard stays `ended` (its files kept), what the writer holds
        # goes to the pending file below, and the next start merges it and collects the shard again (exit 1)
        say(f"error: {exc}")
        controller.request_stop("an output file cannot be written")
        state = "finished"
    finally:
        with anyio.CancelScope(shield=True):
            await api.client.close()
            if prep.writer.held_answers:
                try:
                    prep.writer.save_held()
                except OSError:
                    prep.writer.lost_answers += prep.writer.held_answers
            prep.writer.record_parts()
        stats.stop_reason = controller.stop_reason
        if started:
            try:
                keeper.finish(state)
                keeper.data["runs"][-1]["mode"] = mode
                keeper.save(state)
            except OSError as exc:
                print(f"warning: manifest.json not updated: {describe_write_error(exc)}", file=sys.stderr)
    return RunResult(state, stats.snapshot(), prep.cfg.out, controller.fatal, prep.resume.repaired, 0,
                     held=prep.writer.pending_answers + prep.writer.lost_answers)


async def run_prepared_batch(prep: Prepared, *, install_signals: bool = True,
                             out: Callable[[str], None] = print) -> RunResult:
    async def body(flow: BatchFlow) -> None:
        await flow.check()  # key and endpoints, before any image is read
        await flow.plan_new()
        await flow.write_pending()
        await flow.drive()

    return await _with_flow(prep, body, install_signals=install_signals, out=out)


def run_batch(cfg: RunConfig, *, views: Any = None, notes: Sequence[str] = ()) -> RunResult:
    """`run --mode batch`: check everything as online (`prepare`), then drive the folder's shards."""
    prep = prepare(cfg)
    try:
        announce(prep, notes)
        return anyio.run(lambda: run_prepared_batch(prep))
    finally:
        prep.release()


# --- `cancel` and `collect`: commands on a folder, its run options read from its manifest ----------------

def config_from_folder(out: Path, *, base_url: str | None = None, api_key: str | None = None) -> RunConfig:
    """The run options of an output folder, as its manifest records them (index, prompts, model,
    endpoint), for the commands that act on a folder's batches without repeating the run's flags.
    A folder with no readable manifest is one line (exit 2)."""
    from pipeline.config import BatchConfig, LimitConfig, ModelConfig
    from pipeline.errors import InputError
    from pipeline.ledger.manifest import read_manifest

    out = Path(out)
    if not out.is_dir():
        raise InputError(f"output folder {out} does not exist")
    m = read_manifest(out)
    if m is None or not isinstance(m.get("index"), str):
        raise InputError(f"{out} has no readable manifest.json naming its index: run `run` there first")
    prompts = []
    for p in m.get("prompts") or []:
        if isinstance(p, dict) and (p.get("path") or p.get("name")):
            prompts.append(Path(p.get("path") or p["name"]))
    if not prompts:
        raise InputError(f"{out}/manifest.json names no prompts")

    def get(key: str, kind: type, default: Any) -> Any:
        value = m.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else default

    return RunConfig(
        index=Path(m["index"]),
        root=Path(m["root"]) if isinstance(m.get("root"), str) else None,
        out=out,
        prompt_files=prompts,
        batch_size=get("batch_size", int, 20),
        model=ModelConfig(
            backend="openai",
            model=get("model", str, "gpt-4o-mini"),
            base_url=base_url or get("base_url", str, None),
            provider=get("provider", str, "openai"),
            api_version=get("api_version", str, None),
            detail=get("detail", str, "low"),
            max_tokens=get("max_tokens", int, 300),
            temperature=m.get("temperature") if isinstance(m.get("temperature"), (int, float)) else None,
            captions_per_image=get("captions_per_image", int, 1),
        ),
        limits=LimitConfig(max_attempts=get("max_attempts", int, 6)),
        batch=BatchConfig(mode="batch"),
        api_key=api_key,
    )


@dataclass
class FolderOutcome:
    """What `cancel` / `collect` did, for their summary line and exit code."""

    tally: Tally
    cancelled: list[str]
    result: RunResult
    left_shards: list[str] = field(default_factory=list)


def cancel_folder(out: Path, *, base_url: str | None = None, poll_max_s: float = 60.0) -> FolderOutcome:
    """`cancel --out DIR`: cancel the folder's batches in flight, wait until they end, collect what they
    answered; their unanswered lines are left undone for a later run (not retried, not errors)."""
    cfg = config_from_folder(out, base_url=base_url)
    cfg.batch.poll_max_s = poll_max_s
    prep = prepare(cfg)
    cancelled: list[str] = []
    holder: dict[str, BatchFlow] = {}

    async def body(flow: BatchFlow) -> None:
        holder["flow"] = flow
        cancelled.extend(await flow.cancel_all())

    try:
        result = anyio.run(lambda: _with_flow(prep, body, mode="cancel"))
    finally:
        prep.release()
    flow = holder.get("flow")
    return FolderOutcome(flow.tally if flow else Tally(), cancelled, result)


def collect_folder(out: Path, files: Sequence[Path]) -> FolderOutcome:
    """`collect --out OUT FILE...`: ingest output JSONL produced elsewhere (`vllm run-batch` on the
    shards `--batch-files-only` wrote) with the same join and rules; nothing is sent, no key needed.

    Lines are joined against every shard of the folder not yet collected; a line for an unknown id, a
    slot already done, or a malformed line is reported and never written. A `local` shard every line of
    which came back is `collected`; one still missing lines stays `local` (another file may bring
    them). Lines that would be retried are left undone: the next `run` plans them again."""
    from pipeline.batch.work import FILES_ONLY_KEY
    from pipeline.errors import InputError

    for f in files:
        if not Path(f).is_file():
            raise InputError(f"output file {f} not found")
    cfg = config_from_folder(out, api_key=FILES_ONLY_KEY)
    prep = prepare(cfg)
    holder: dict[str, BatchFlow] = {}
    left: list[str] = []

    async def body(flow: BatchFlow) -> None:
        holder["flow"] = flow
        flow.replan = False
        shards = [r for r in flow.ledger.outstanding() if r.state == "local"]
        ids_of = {r.shard_id: list(flow.ledger.read_ids(r)) for r in shards}
        # ids of the folder's other shards (collected, or sent through the Batch API) are known, not ours to take
        elsewhere = [cid for r in flow.ledger.shards if r.state != "local" for cid in flow.ledger.read_ids(r)]
        everything = [cid for ids in ids_of.values() for cid in ids]
        join = join_lines([*everything, *elsewhere], _file_lines([Path(f) for f in files]))
        flow.tally.add_join(join)
        for e in join.examples:
            say(f"note: {e}")
        taken = sum(1 for cid in set(elsewhere) - set(everything) if not join.outcomes[cid].missing)
        if taken:
            flow.tally.already_done += taken
            say(f"note: {taken:,} line(s) answer work of shards already collected or sent to the Batch API: "
                "not written")
        for rec in shards:
            ids = ids_of[rec.shard_id]
            answered = [cid for cid in ids if not join.outcomes[cid].missing]
            if not answered:
                if rec.state == "local":
                    left.append(rec.shard_id)
                continue
            rows, _ = flow.judge_join(join, answered, rec.round, collection_run_id(flow.ledger, rec.shard_id),
                                      replan=False, exclude=rec.shard_id)
            await flow.write_rows(rows)
            if rec.state == "local" and len(answered) == len(ids):
                flow.ledger.update(rec.shard_id, state="collected")
            elif rec.state == "local":
                left.append(rec.shard_id)

    try:
        result = anyio.run(lambda: _with_flow(prep, body, mode="collect"))
    finally:
        prep.release()
    flow = holder.get("flow")
    return FolderOutcome(flow.tally if flow else Tally(), [], result, left)
