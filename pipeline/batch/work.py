"""What a batch run has to send, for a prepared run: pending jobs -> request lines -> shards.

The glue between the runner's `prepare()` (done set, prompts, price, folder lock) and the planner:
- `new_shards`: write the shards of the work not done and not in a shard yet, recorded in the ledger
  (`planned` for the Batch API, `local` for `--batch-files-only`); images that cannot be read and lines
  too large for any shard become errors.csv rows, as online;
- `preview`: the same plan as counts only, for `--dry-run --mode batch` (nothing written);
- `write_batch_files`: `--batch-files-only DIR`, shards for another server, and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import anyio

from pipeline.batch.ledger import BatchLedger, ShardRecord
from pipeline.batch.lines import BatchLine, LineSettings, job_lines, pending_jobs
from pipeline.batch.plan import TOO_LARGE, ShardLimits, ShardSummary, summarize_shards, write_shards
from pipeline.errors import ImageError
from pipeline.ledger.manifest import base_manifest, now_iso, write_manifest
from pipeline.records import ErrorRow
from pipeline.run.dispatch import Job

__all__ = ["FILES_ONLY_KEY", "ErrorSink", "BatchPreview", "new_shards", "preview", "write_batch_files"]

# `--batch-files-only` sends nothing, so it needs no key: prepare() is handed this stand-in, never sent
FILES_ONLY_KEY = "files-only-no-key"


@dataclass
class ErrorSink:
    """errors.csv rows of jobs that get no line: an image that cannot be read, a line no shard can hold."""

    model: str = ""
    run_id: str = ""
    rows: list[ErrorRow] = field(default_factory=list)
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, job: Job, reason: str, detail: str) -> None:
        ts = now_iso()
        for i in job.indices:
            self.rows.append(ErrorRow(job.entry.image_id, reason, detail, job.attempts, ts, job.prompt.name, i,
                                      model=self.model, run_id=self.run_id, position=job.entry.position))
        self.by_reason[reason] = self.by_reason.get(reason, 0) + len(job.indices)

    def image_error(self, job: Job, exc: ImageError) -> None:
        self.add(job, exc.reason, exc.detail)

    def too_large(self, line: BatchLine, why: str) -> None:
        if line.job is not None:
            self.add(line.job, TOO_LARGE, why)

    def write(self, writer: Any) -> None:
        """Append the rows through the folder's `OutputWriter` (raises the first OSError)."""
        if not self.rows:
            return
        failures = anyio.run(writer.write, list(self.rows))
        if failures:
            raise next(iter(failures.values()))
        self.rows.clear()


def pending_lines(prep: Any, ledger: BatchLedger, sink: ErrorSink,
                  settings: LineSettings | None = None) -> Iterator[BatchLine]:
    """The request lines of the work still to do in `prep`'s folder, less what the ledger's shards hold."""
    cfg = prep.cfg
    settings = settings or LineSettings.for_run(prep)
    jobs = pending_jobs(prep.index.entries, prep.prompts, cfg.model.captions_per_image, prep.resume.done,
                        ledger.covered_slots(), getattr(prep.resume, "todo", None))
    return job_lines(jobs, settings, sink.image_error)


def new_shards(prep: Any, ledger: BatchLedger, sink: ErrorSink, *, state: str = "planned", round: int = 1,
               jsonl_dir: Path | None = None, settings: LineSettings | None = None) -> Iterator[ShardRecord]:
    """Plan and write the shards of the work left (`write_shards`), each recorded in the ledger before it
    is yielded; cost estimates at the batch price."""
    limits = ShardLimits.from_config(prep.cfg.batch)
    lines = pending_lines(prep, ledger, sink, settings)
    return write_shards(ledger, lines, limits, sink.too_large, price=prep.price.batch(), round=round,
                        state=state, jsonl_dir=jsonl_dir)


@dataclass
class BatchPreview:
    """`--dry-run --mode batch`: the shards a run would write now, as counts, and what is in flight."""

    shards: list[tuple[str, ShardSummary]]  # (shard id it would get, counts)
    limits: ShardLimits
    errors: dict[str, int]  # errors.csv reason -> caption slots that would get no line
    outstanding: list[ShardRecord]  # shards of earlier runs not collected yet (their work is left out)

    @property
    def lines(self) -> int:
        return sum(s.lines for _, s in self.shards)

    @property
    def captions(self) -> int:
        return sum(s.captions for _, s in self.shards)


def preview(prep: Any) -> BatchPreview:
    """The shard plan of `prep` (a read-only `prepare`), nothing written: every line is built, so bytes
    and token counts are the ones a run would send."""
    ledger = BatchLedger.load(prep.cfg.out)
    sink = ErrorSink()
    limits = ShardLimits.from_config(prep.cfg.batch)
    summaries = summarize_shards(pending_lines(prep, ledger, sink), limits, sink.too_large,
                                 price=prep.price.batch())
    first = int(ledger.next_shard_id()[1:])
    shards = [(f"s{first + k:06d}", s) for k, s in enumerate(summaries)]
    return BatchPreview(shards, limits, dict(sink.by_reason), ledger.outstanding())


def write_batch_files(prep: Any, folder: Path, describe: Callable[[Any], dict[str, Any]],
                      progress: Callable[[ShardRecord], None] | None = None) -> tuple[list[ShardRecord], ErrorSink]:
    """`--batch-files-only DIR`: the shards of the work left, written to `folder` for another server
    (`vllm run-batch -i DIR/s000001.jsonl -o ...`) and recorded in the output folder's ledger as `local`
    (their `.ids` stay in OUT/batches/, so `collect` joins the answers and a rerun plans none of it
    again); errors.csv rows for what gets no line; the manifest (index, prompts, model: what `collect`
    reads). `describe`: the runner's `describe_run`. Nothing is sent."""
    ledger = BatchLedger.load(prep.cfg.out)
    sink = ErrorSink(model=prep.cfg.model.model)
    written: list[ShardRecord] = []
    for rec in new_shards(prep, ledger, sink, state="local", jsonl_dir=Path(folder)):
        written.append(rec)
        if progress is not None:
            progress(rec)
    sink.write(prep.writer)
    previous = prep.previous_manifest or {}
    data = {**previous, **base_manifest(previous), **describe(prep)}
    data.update(state="batch files written", ended_at=now_iso(), updated_at=now_iso())
    data["batch"] = {"mode": "files_only", "folder": str(Path(folder).resolve()),
                     "shards": [r.shard_id for r in written], "ledger": str(ledger.path)}
    write_manifest(prep.cfg.out, data)
    return written, sink


def files_only_config(cfg: Any) -> Any:
    """The run's config with the stand-in key `prepare()` checks for (files-only sends nothing)."""
    return replace(cfg, api_key=cfg.api_key or FILES_ONLY_KEY)
