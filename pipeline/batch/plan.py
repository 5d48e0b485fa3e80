"""Shards planned on every limit at once, and written to disk as they fill.

A Batch API input file has three limits, and a shard must keep all of them: at most `max_requests` lines
(OpenAI: 50,000), at most `max_bytes` bytes of JSONL (OpenAI: 200 MB, and the base64 images are most of
it: counting lines alone is how files get rejected for size), and, when the account's tier caps the
tokens enqueued per model, at most `max_tokens` estimated input tokens. A line is placed in the current
shard if all three still hold with it, else it starts the next shard. A single line larger than a limit
on its own can never be sent in any shard: it is reported (errors.csv, `request_too_large`), never put in
an empty or oversize shard.

`ShardPacker` is that decision alone (pure, no I/O); `plan_shards` groups lines with it (tests, small
plans) and `summarize_shards` counts shards without keeping lines (the dry run). `write_shards` streams:
each line is appended to the open shard file as it comes, so memory holds one line whatever the number
of images; a full shard is fsynced, renamed into place and recorded in the ledger (state `planned`)
before the next one starts, and only then may it be uploaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

from pipeline.batch.ledger import BatchLedger, ShardRecord
from pipeline.batch.lines import BatchLine, line_cost
from pipeline.config import BATCH_MAX_BYTES, BATCH_MAX_REQUESTS, BatchConfig
from pipeline.providers.pricing import ModelPrice

__all__ = [
    "TOO_LARGE",
    "LineInfo",
    "ShardLimits",
    "ShardPacker",
    "ShardSummary",
    "plan_shards",
    "summarize_shards",
    "write_shards",
]

TOO_LARGE = "request_too_large"  # errors.csv reason of a line no shard can hold


class LineInfo(Protocol):
    """What the planner needs of a line: its size in bytes and its estimated input tokens."""

    @property
    def nbytes(self) -> int: ...

    @property
    def est_input_tokens(self) -> int: ...


L = TypeVar("L", bound=LineInfo)


@dataclass(frozen=True)
class ShardLimits:
    """The limits every shard keeps at once. `max_tokens` None: no cap on estimated queued tokens."""

    max_requests: int = BATCH_MAX_REQUESTS
    max_bytes: int = BATCH_MAX_BYTES
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_bytes < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ValueError(f"shard limits must be at least 1: {self}")

    @classmethod
    def from_config(cls, batch: BatchConfig) -> "ShardLimits":
        return cls(batch.max_requests, batch.max_bytes, batch.max_tokens)

    def too_large(self, nbytes: int, tokens: int) -> str | None:
        """Why one line alone breaks a limit (its errors.csv detail), or None."""
        if nbytes > self.max_bytes:
            return (f"the request is {nbytes:,} bytes as a batch line (base64 image included), more than a "
                    f"batch file may hold ({self.max_bytes:,} bytes, --batch-max-bytes)")
        if self.max_tokens is not None and tokens > self.max_tokens:
            return (f"the request is about {tokens:,} input tokens, more than a batch may queue "
                    f"({self.max_tokens:,}, --batch-max-tokens)")
        return None


class ShardPacker:
    """Where the next line goes: into the current shard, the start of a new one, or nowhere (too large).

    Pure and incremental: it keeps the current shard's counts, never its lines."""

    def __init__(self, limits: ShardLimits) -> None:
        self.limits = limits
        self.lines = 0
        self.nbytes = 0
        self.tokens = 0

    def place(self, nbytes: int, tokens: int) -> str:
        """"same" (added to the current shard), "new" (the current shard is full: close it; the line
        starts the next one, already counted) or "too_large" (no shard can hold it; not counted)."""
        lim = self.limits
        if lim.too_large(nbytes, tokens) is not None:
            return "too_large"
        fits = (self.lines + 1 <= lim.max_requests and self.nbytes + nbytes <= lim.max_bytes
                and (lim.max_tokens is None or self.tokens + tokens <= lim.max_tokens))
        if fits:  # (an empty shard holds any line that is not too large)
            self.lines += 1
            self.nbytes += nbytes
            self.tokens += tokens
            return "same"
        self.lines, self.nbytes, self.tokens = 1, nbytes, tokens
        return "new"


def placed(lines: Iterable[L], limits: ShardLimits, too_large: Callable[[L, str], None]) -> Iterator[tuple[str, L]]:
    """(`ShardPacker.place`'s "same" or "new", line) for each line in order; a line too large for any
    shard goes to `too_large(line, why)` instead (the one loop the planners below share)."""
    packer = ShardPacker(limits)
    for line in lines:
        where = packer.place(line.nbytes, line.est_input_tokens)
        if where == "too_large":
            too_large(line, limits.too_large(line.nbytes, line.est_input_tokens) or TOO_LARGE)
            continue
        yield where, line


def plan_shards(lines: Iterable[L], limits: ShardLimits,
                too_large: Callable[[L, str], None]) -> Iterator[list[L]]:
    """Group `lines` into shards that keep every limit, in order; a line too large for any shard goes to
    `too_large(line, why)`. Holds one shard's lines (use `write_shards` to stream to disk)."""
    shard: list[L] = []
    for where, line in placed(lines, limits, too_large):
        if where == "new":
            yield shard
            shard = []
        shard.append(line)
    if shard:
        yield shard


@dataclass
class ShardSummary:
    """A shard's counts: what the dry run prints and the ledger records."""

    lines: int = 0
    bytes: int = 0
    est_input_tokens: int = 0
    est_output_tokens: int = 0  # every answer at max_tokens
    est_cost_usd: float = 0.0  # at `price` (the batch price), every answer at max_tokens
    captions: int = 0  # captions asked (n summed)

    def add(self, line: BatchLine, price: ModelPrice | None) -> None:
        self.lines += 1
        self.captions += line.n
        self.bytes += line.nbytes
        self.est_input_tokens += line.est_input_tokens
        self.est_output_tokens += line.est_output_tokens
        if price is not None:
            self.est_cost_usd += line_cost(price, line.est_input_tokens, line.est_output_tokens)


def summarize_shards(lines: Iterable[BatchLine], limits: ShardLimits, too_large: Callable[[BatchLine, str], None],
                     price: ModelPrice | None = None) -> Iterator[ShardSummary]:
    """The shards `write_shards` would write, as counts only (nothing kept, nothing written)."""
    current: ShardSummary | None = None
    for where, line in placed(lines, limits, too_large):
        if where == "new" and current is not None:
            yield current
            current = None
        if current is None:
            current = ShardSummary()
        current.add(line, price)
    if current is not None:
        yield current


class _OpenShard:
    """One shard being written: `<id>.jsonl.part` and `<id>.ids.part`, hashed as they grow."""

    def __init__(self, jsonl: Path, ids: Path) -> None:
        self.jsonl, self.ids = jsonl, ids
        self.jsonl_part = jsonl.with_name(jsonl.name + ".part")
        self.ids_part = ids.with_name(ids.name + ".part")
        self.fh = self.jsonl_part.open("wb")
        self.ids_fh = self.ids_part.open("wb")
        self.sha = hashlib.sha256()
        self.summary = ShardSummary()

    def add(self, line: BatchLine, price: ModelPrice | None) -> None:
        self.fh.write(line.data)
        self.sha.update(line.data)
        self.ids_fh.write(line.custom_id.encode("utf-8") + b"\n")
        self.summary.add(line, price)

    def close(self) -> None:
        """Flush, fsync and rename both files into place: a recorded shard's files are whole."""
        for fh in (self.fh, self.ids_fh):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        os.replace(self.ids_part, self.ids)
        os.replace(self.jsonl_part, self.jsonl)

    def abandon(self) -> None:
        for fh, part in ((self.fh, self.jsonl_part), (self.ids_fh, self.ids_part)):
            try:
                fh.close()
                part.unlink()
            except OSError:
                pass


def remove_partial_files(*folders: Path) -> None:
    """Shard files a killed run left half-written (`*.part`): never recorded, never uploaded."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for pattern in ("s[0-9]*.jsonl.part", "s[0-9]*.ids.part"):
            for part in folder.glob(pattern):
                try:
                    part.unlink()
                except OSError:
                    pass


def write_shards(ledger: BatchLedger, lines: Iterable[BatchLine], limits: ShardLimits,
                 too_large: Callable[[BatchLine, str], None], *, price: ModelPrice | None = None,
                 round: int = 1, state: str = "planned", jsonl_dir: Path | None = None) -> Iterator[ShardRecord]:
    """Stream `lines` into shard files and record each full shard in `ledger` (saved), yielding its record
    as soon as it is recorded, so the caller may upload it while later shards are planned.

    `<jsonl_dir>/<shard>.jsonl` (default `OUT/batches/`) holds the lines, `OUT/batches/<shard>.ids` their
    custom_ids; `price` (the batch price) gives each record's `est_cost_usd`; `state` is `planned`, or
    `local` for `--batch-files-only`. A shard's files are renamed into place only when whole, and the
    ledger names them only after that, so a kill leaves at most `*.part` files nobody refers to (removed
    by the next call)."""
    ids_dir = ledger.folder
    jsonl_dir = Path(jsonl_dir) if jsonl_dir is not None else ids_dir
    ids_dir.mkdir(parents=True, exist_ok=True)
    jsonl_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(ids_dir, jsonl_dir)
    current: _OpenShard | None = None

    def finish(shard: _OpenShard) -> ShardRecord:
        shard.close()
        s = shard.summary
        return ledger.new_shard(shard_id=shard.ids.name[:-len(".ids")], round=round, jsonl=shard.jsonl,
                                ids=shard.ids, sha256=shard.sha.hexdigest(), lines=s.lines, bytes=s.bytes,
                                est_input_tokens=s.est_input_tokens, est_cost_usd=s.est_cost_usd, state=state)

    try:
        for where, line in placed(lines, limits, too_large):
            if where == "new" and current is not None:
                shard, current = current, None
                yield finish(shard)
            if current is None:
                shard_id = ledger.next_shard_id()
                current = _OpenShard(jsonl_dir / f"{shard_id}.jsonl", ids_dir / f"{shard_id}.ids")
            current.add(line, price)
        if current is not None:
            shard, current = current, None
            yield finish(shard)
    finally:
        if current is not None:  # stopped early (an error, or the caller stopped iterating)
            current.abandon()
