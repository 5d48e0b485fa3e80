"""The writer: the only code that touches the output folder.

Start (`OutputWriter.open`, before any request): check the folder is writable, recover it
(`pipeline.ledger.recover`: held answers merged, damage quarantined, captions_all.csv rebuilt from the parts,
parts re-split), read what is done (one pass over captions_all.csv when the parts are recorded in step,
`pipeline.ledger.partstate`, which the writer records as a run ends with every answer written; no pass at
all while the done-keys snapshot, `pipeline.ledger.donesnap`, still describes the file). The snapshot is
saved at the start and again as the run ends, with the keys of every row this run appended.
errors.csv is append-only across runs, never reset.
During the run (`writer_task`): take results from the one receive stream, queue them per target file
(captions_all.csv and the image's part file, errors.csv, attributes.csv) and write every queue after each
batch, in one thread hop, so a kill -9 loses only answers still in flight.

A write that fails loses nothing: the file keeps its queue (the others go on), one warning line says so,
new requests are held back once more than a few answers are held, and the writer retries every few
seconds while it keeps receiving the answers still in flight. If the run ends first, what is held goes to
a pending file (`pipeline.ledger.pending`) that the next start merges. Every append goes through
`pipeline.ledger.appendfile.append_bytes`, which leaves a file whole or as it was.

Every new file starts as the folder's encoding says (`pipeline.ledger.encoding`: plain UTF-8 by default, a
BOM with `--excel` or in a folder started with one), decided once in `open` before anything is written.

Write order is captions_all.csv first, then the part: captions_all.csv is the record of what is done; if a
crash falls between the two writes, `open` on the next start rebuilds the part from captions_all.csv.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import anyio
from anyio.abc import ObjectReceiveStream

from pipeline.errors import ConfigError
from pipeline.ledger import appendfile
from pipeline.ledger.appendfile import describe_write_error
from pipeline.ledger.encoding import FolderEncoding, decide, folder_bom
from pipeline.ledger.pending import HeldFile, save_pending
from pipeline.ledger import donesnap, partstate
from pipeline.ledger.recover import Positions, last_position_of, recover_folder
from pipeline.ledger.outputs import (
    ATTRIBUTES,
    CAPTION_COLUMNS,
    CAPTIONS_ALL,
    CaptionTally,
    ERROR_COLUMNS,
    ERRORS,
    DoneRead,
    attribute_columns_for,
    attribute_row_record,
    caption_record,
    error_record,
    part_digits,
    part_name,
    read_done,
    tally_clean_captions,
)
from pipeline.records import AttributeRow, CaptionRow, ErrorRow

Key = tuple[str, str, int]
Result = CaptionRow | ErrorRow | AttributeRow
MAX_HELD_PART_ROWS = 10_000  # a part that stays unwritable is given up beyond this: it is rebuilt at next start


class Gate(Protocol):
    """What the writer needs of the run's request gate (`pipeline.run.control.Gate`): hold and release."""

    def close(self, cause: str, why: str = "") -> None: ...

    def open(self, cause: str) -> None: ...


@dataclass
class FileQueue:
    """Records waiting to be appended to one output file (all of them are written, or none)."""

    name: str
    columns: list[str]
    header: bytes  # header line (after a BOM if the folder has them), written first when the file is new or empty
    answers: bool = True  # False for a part file: derived from captions_all.csv, rebuilt at start
    records: list[list[str]] = field(default_factory=list)


@dataclass
class ResumeState:
    """What the output folder already holds when a run starts."""

    done: set[Key] = field(default_factory=set)
    captions_rows: int = 0
    cost_usd: float = 0.0
    repaired: list[str] = field(default_factory=list)  # human notes: torn tails cut, parts rebuilt
    read: DoneRead | None = None  # the rows behind it, for whoever needs more than the keys (dry-run)
    todo: object = None  # index positions with work left, once the run has counted them (`scan_work`)


def check_writable(out_dir: Path) -> None:
    """Create the folder and prove a file can be written there, before any request is paid for."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {out_dir} is not writable: {exc.strerror or exc}") from None


class OutputWriter:
    def __init__(
        self,
        out_dir: Path,
        batch_size: int,
        positions: Positions,
        attribute_fields: list[str] | None = None,
        *,
        excel: bool = False,
        recorded_bom: object = None,
        index_key: str | None = None,
        last_position: int | None = None,
    ) -> None:
        """`excel`: start new files with a BOM (`run --excel`), if the folder has no encoding yet;
        `recorded_bom`: the manifest's `csv_bom`, for a folder whose CSV files say nothing (none yet).
        `positions`: image_id -> index position (or a function making it, asked only when the parts must
        be re-planned); `last_position` the index's last position (else asked of `positions`);
        `index_key`: the index file's fingerprint, for the parts' in-step record (`pipeline.ledger.partstate`)."""
        self.out_dir = Path(out_dir)
        self.excel = excel
        self.recorded_bom = recorded_bom
        self.encoding = FolderEncoding(bom=excel)  # decided from the folder in read_done / open
        self.batch_size = batch_size
        self.positions = positions
        self.index_key = index_key
        if last_position is None:
            last_position = last_position_of(positions() if callable(positions) else positions)
        self.last_position = last_position
        # one width for every part of the folder, from the whole index (as recover's re-split plans them)
        self.part_digits = part_digits(last_position, batch_size)
        self.attribute_fields = attribute_fields or []
        self._queues: dict[str, FileQueue] = {}
        self.rows_written = 0  # answer rows (captions_all.csv, errors.csv, attributes.csv) on disk
        self.given_up_parts: set[str] = set()  # parts left to the next start's rebuild
        self.pending_path: Path | None = None  # where held answers went when the run ended holding them
        self.lost_answers = 0  # held answers that could be saved nowhere (should stay 0)
        self.pending_answers = 0  # answers saved to the pending file instead of the CSV files
        # the done-keys snapshot (`pipeline.ledger.donesnap`): captions_all.csv's tally at the start, the
        # rows this run appended to it and the size they make, saved again as the run ends
        self._captions_tally: CaptionTally | None = None
        self._appended = CaptionTally()
        self._captions_size: int | None = None

    # --- start ------------------------------------------------------------------------------------
    def read_done(self) -> ResumeState:
        """What is done, read-only (dry-run, status): nothing on disk changes."""
        self.decide_encoding()
        return self._read()

    def decide_encoding(self) -> FolderEncoding:
        """BOM or not for this folder's new files: its own encoding if it has one, else `--excel`."""
        existing = folder_bom(self.out_dir, self.recorded_bom)
        self.encoding = decide(existing, self.excel, f"output folder {self.out_dir}")
        return self.encoding

    @property
    def bom(self) -> bool:
        return self.encoding.bom

    def _read(self, captions: CaptionTally | None = None) -> ResumeState:
        """What the folder holds, read without changing it (`open` has repaired it first, if a run).
        `captions`: recovery's pass over captions_all.csv, if it made one (not read twice); else the
        done-keys snapshot when it still describes the file (`pipeline.ledger.donesnap`)."""
        if captions is None:
            captions = donesnap.load(self.out_dir)
        done = read_done(self.out_dir, attributes=bool(self.attribute_fields), captions=captions,
                         count_images=False)
        return ResumeState(done=done.keys, captions_rows=done.caption_count, cost_usd=done.cost_usd, read=done)

    def open(self, previous_batch_size: int | None = None) -> ResumeState:
        """Before the first request: a writable folder, every file recovered (`recover_folder`: held
        answers merged, damage quarantined, old headers migrated, captions_all.csv rebuilt from the parts,
        parts re-split), then what is done. errors.csv is kept: it is append-only across runs.

        `previous_batch_size`: the folder's last `--batch-size` (from the manifest), to name a re-split.
        """
        check_writable(self.out_dir)
        self.check_appendable()
        self.decide_encoding()  # before recovery writes anything: the folder as it was started
        recovery = recover_folder(
            self.out_dir,
            batch_size=self.batch_size,
            positions=self.positions,
            attribute_fields=self.attribute_fields,
            previous_batch_size=previous_batch_size,
            bom=self.bom,
            index_key=self.index_key,
            last_position=self.last_position,
        )
        self.attribute_fields = recovery.attribute_fields
        captions = recovery.captions or donesnap.load(self.out_dir) or tally_clean_captions(self.out_dir / CAPTIONS_ALL)
        state = self._read(captions)
        state.repaired[:0] = recovery.notes
        self._keep_snapshot(captions)
        return state

    def _keep_snapshot(self, captions: CaptionTally | None) -> None:
        """At the start: save the done-keys snapshot of captions_all.csv as recovery left it (so even a
        run killed later starts fast next time) and count from its size what this run appends."""
        try:
            size = (self.out_dir / CAPTIONS_ALL).stat().st_size
        except FileNotFoundError:
            size = 0
        except OSError:
            captions, size = None, -1
        if captions is None and size == 0:
            captions = CaptionTally()  # no file yet (or an empty one): nothing is done, exactly
        self._captions_tally = captions
        if captions is None:  # not read clean (cannot happen after recovery): no snapshot
            donesnap.forget(self.out_dir)
            return
        if size and not captions.saved:
            saved = donesnap.save(self.out_dir, captions, expect_size=size)
            if saved is None:
                self._captions_tally = None
                return
        self._captions_size = size

    def save_snapshot(self) -> None:
        """As the run ends: the start's tally plus every row this run appended, if the file's size is
        exactly what those appends make (anything else: the snapshot is dropped, the next start reads)."""
        base, expect = self._captions_tally, self._captions_size
        if base is None or expect is None:
            return
        if self._appended.rows:
            base.merge(self._appended)
            self._appended = CaptionTally()
        elif base.saved:
            return
        if donesnap.save(self.out_dir, base, expect_size=expect) is None:
            self._captions_tally = None

    def check_appendable(self) -> None:
        """Pre-flight: every answer file this run may append to can be opened for append (ConfigError).

        The parts are not opened (50,000 of them for a million images): they are copies, and a part that
        cannot be written is held, then given up and rebuilt from captions_all.csv at the next start."""
        names = [CAPTIONS_ALL, ERRORS] + ([ATTRIBUTES] if self.attribute_fields else [])
        appendfile.check_appendable(self.out_dir, names)

    # --- appends ----------------------------------------------------------------------------------
    def _queue(self, name: str, columns: list[str], *, answers: bool = True) -> FileQueue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = FileQueue(name, columns, appendfile.header_bytes(columns, self.bom), answers)
        return q

    def queue(self, results: Iterable[Result]) -> None:
        """Queue a batch of results per target file; nothing is written until `flush`."""
        for r in results:
            if isinstance(r, CaptionRow):
                rec = caption_record(r)
                self._queue(CAPTIONS_ALL, CAPTION_COLUMNS).records.append(rec)
                part = part_name(r.position, self.batch_size, self.part_digits)
                if part not in self.given_up_parts:
                    self._queue(part, CAPTION_COLUMNS, answers=False).records.append(rec)
            elif isinstance(r, ErrorRow):
                self._queue(ERRORS, ERROR_COLUMNS).records.append(error_record(r))
            else:
                columns = attribute_columns_for(self.attribute_fields)
                self._queue(ATTRIBUTES, columns).records.append(attribute_row_record(r, self.attribute_fields))

    @property
    def held_answers(self) -> int:
        """Answer rows queued but not yet on disk (parts not counted: they are copies)."""
        return sum(len(q.records) for q in self._queues.values() if q.answers)

    def _ordered(self) -> list[FileQueue]:
        """captions_all.csv first (the record of what is done), then its parts, errors.csv, attributes.csv."""
        rank = {CAPTIONS_ALL: 0, ERRORS: 2, ATTRIBUTES: 3}
        return sorted((q for q in self._queues.values() if q.records), key=lambda q: (rank.get(q.name, 1), q.name))

    def _write_queues(self, queues: list[FileQueue]) -> dict[str, int | OSError]:
        """In a worker thread: append each queue whole; parts wait while captions_all.csv holds rows."""
        outcome: dict[str, int | OSError] = {}
        main = self._queues.get(CAPTIONS_ALL)
        main_held = main is not None and bool(main.records)
        for q in queues:  # captions_all.csv comes first
            if not q.answers and main_held and not isinstance(outcome.get(CAPTIONS_ALL), int):
                continue
            n = len(q.records)
            try:
                data = appendfile.records_bytes(q.records[:n])
                appendfile.append_bytes(self.out_dir / q.name, data, q.header)
                outcome[q.name] = n
            except OSError as exc:
                outcome[q.name] = exc
                continue
            if q.name == CAPTIONS_ALL and self._captions_size is not None:
                self._captions_size += len(data) + (len(q.header) if self._captions_size == 0 else 0)
                for rec in q.records[:n]:
                    self._appended.add(rec)
        return outcome

    async def flush(self, exclude: frozenset[str] = frozenset()) -> dict[str, OSError]:
        """Write every queued record (one thread hop), except to the files in `exclude` (not due for a
        retry). A file that fails keeps its queue; returns the errors (empty: all written that was tried).
        """
        queues = [q for q in self._ordered() if q.name not in exclude]
        if not queues:
            return {}
        outcome = await anyio.to_thread.run_sync(self._write_queues, queues)
        failures: dict[str, OSError] = {}
        for q in queues:
            done = outcome.get(q.name)
            if isinstance(done, int):
                del q.records[:done]
                if q.answers:
                    self.rows_written += done
                else:
                    del self._queues[q.name]  # parts are many: keep no empty queue for them
            elif isinstance(done, OSError):
                failures[q.name] = done
                if not q.answers and len(q.records) > MAX_HELD_PART_ROWS:
                    self.give_up_part(q.name)
        return failures

    def record_parts(self) -> None:
        """As the run ends: if every answer reached captions_all.csv and its part, say the parts are in
        step, so the next start reads no part (`pipeline.ledger.partstate`); else drop that record."""
        self.save_snapshot()
        clean = not self.given_up_parts and not self.pending_answers and not self.lost_answers and not any(
            q.records for q in self._queues.values())
        if clean:
            partstate.record(self.out_dir, batch_size=self.batch_size, digits=self.part_digits,
                             index_key=self.index_key)
        else:
            partstate.forget(self.out_dir)

    def give_up_part(self, name: str) -> None:
        """Stop writing a part for this run; the next start rebuilds it from captions_all.csv."""
        self._queues.pop(name, None)
        self.given_up_parts.add(name)

    async def write(self, results: Iterable[Result]) -> dict[str, OSError]:
        """Queue and flush one batch (see `flush`)."""
        self.queue(results)
        return await self.flush()

    def held_files(self) -> list[HeldFile]:
        """What is still held for the answer files, as a pending file stores it."""
        return [HeldFile(q.name, q.columns, list(q.records)) for q in self._ordered() if q.answers]

    def save_held(self) -> Path:
        """Write every held answer to a pending file (folder, else temp) and forget it. Raises OSError."""
        held = self.held_answers
        path = save_pending(self.out_dir, self.held_files())
        self.pending_answers += held
        for q in self._queues.values():
            if q.answers:
                q.records.clear()
        self.pending_path = path
        return path


def say(line: str) -> None:
    """One line to stderr (a live dashboard lets it through above itself)."""
    print(line, file=sys.stderr, flush=True)


@dataclass
class HoldPolicy:
    """What the writer does while an output file cannot be written (full disk, Excel, permissions)."""

    limit: int = 64  # answers held beyond which no new request is sent (the gate closes)
    retry_s: float = 3.0  # seconds between attempts while holding
    final_s: float = 30.0  # once the last answer is in: how long to keep trying before the pending file
    gate: "Gate | None" = None
    interrupted: anyio.Event | None = None  # set on the user's Ctrl-C / SIGTERM: stop trying, save now
    notify: Callable[[str], None] = say
    on_warning: Callable[[str | None], None] | None = None  # the current warning for the views, or None


GATE_CAUSE = "disk"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def n_answers(n: int) -> str:
    return f"{n:,} {_plural(n, 'answer')}"


MIN_RETRY_S = 0.05  # never spin on a file that cannot be written


class _Holding:
    """The writer's state while some file cannot be written: the one warning, the gate, the retries.

    A file that fails is retried every `retry_s`; the others are written with every batch as usual (a
    part waits while captions_all.csv holds rows, so it never runs ahead of the record of what is done).
    """

    def __init__(self, writer: OutputWriter, policy: HoldPolicy) -> None:
        self.writer = writer
        self.policy = policy
        self.failing: dict[str, str] = {}  # file name -> reason, first failure first
        self.next_try = 0.0
        self.gate_closed = False
        self.parts_noted: set[str] = set()
        self.failed_parts: set[str] = set()  # parts that failed themselves (not only waiting on captions_all)

    def due(self) -> bool:
        return anyio.current_time() >= self.next_try

    def wait_s(self) -> float | None:
        """How long the writer may wait for the next batch before it must retry (None: no limit)."""
        return max(0.0, self.next_try - anyio.current_time()) if self.failing else None

    def _held_in(self, names: Iterable[str]) -> int:
        queues = self.writer._queues
        return sum(len(queues[n].records) for n in names if n in queues)

    def warning(self) -> str:
        name, reason = next(iter(self.failing.items()))
        w = self.writer
        held = w.held_answers or self._held_in(self.failing)
        return f"{name} cannot be written: {reason}; holding {n_answers(held)}, retrying"

    async def flush(self) -> None:
        """Write what is queued; a failing file only when its retry is due."""
        w, p = self.writer, self.policy
        exclude = frozenset() if self.due() else frozenset(self.failing)
        was = dict(self.failing)
        held_before = self._held_in(was)
        with anyio.CancelScope(shield=True):  # answers already paid for are never dropped half-way
            failures = await w.flush(exclude)
        self.failing = {n: r for n, r in was.items() if n in exclude}
        for name, exc in failures.items():
            self.failing.setdefault(name, describe_write_error(exc))
            if name not in (CAPTIONS_ALL, ERRORS, ATTRIBUTES):
                self.failed_parts.add(name)
        if failures:
            self.next_try = anyio.current_time() + max(MIN_RETRY_S, p.retry_s)
        for part in sorted(w.given_up_parts - self.parts_noted):
            p.notify(f"{part} cannot be written; it is rebuilt from {CAPTIONS_ALL} at the next start")
            self.parts_noted.add(part)
            self.failing.pop(part, None)
        if self.failing and not was:
            p.notify(self.warning())
        elif was and not self.failing:
            name = next(iter(was))
            p.notify(f"{name} written again; {held_before:,} held {_plural(held_before, 'answer')} saved")
            self.clear()
        self.update()

    def update(self) -> None:
        """While holding: refresh the views' warning, and hold new requests back beyond the bound."""
        p, w = self.policy, self.writer
        if not self.failing:
            return
        if p.on_warning:
            p.on_warning(self.warning())
        if p.gate is not None and not self.gate_closed and w.held_answers > p.limit:
            name, reason = next(iter(self.failing.items()))
            p.gate.close(GATE_CAUSE, f"{name} cannot be written: {reason}")
            self.gate_closed = True

    def clear(self) -> None:
        p = self.policy
        self.failing.clear()
        if p.on_warning:
            p.on_warning(None)
        if p.gate is not None and self.gate_closed:
            p.gate.open(GATE_CAUSE)
            self.gate_closed = False

    async def last_tries(self) -> None:
        """The run has ended with answers held: keep trying a short while (or until Ctrl-C)."""
        p, w = self.policy, self.writer
        if not w.held_answers:
            return
        stop = p.interrupted
        if stop is None or not stop.is_set():
            name = next(iter(self.failing), CAPTIONS_ALL)
            p.notify(f"{name} still cannot be written; trying {p.final_s:g} s more, then the "
                     f"{n_answers(w.held_answers)} held go to a pending file (Ctrl-C: now)")
        deadline = anyio.current_time() + p.final_s
        while w.held_answers and (stop is None or not stop.is_set()):
            left = deadline - anyio.current_time()
            if left <= 0:
                break
            with anyio.move_on_after(min(max(MIN_RETRY_S, p.retry_s), left)):
                if stop is not None:
                    await stop.wait()
                else:
                    await anyio.sleep_forever()
            self.next_try = 0.0  # due now
            await self.flush()

    def save_pending(self) -> None:
        """Held answers that could not be written go to a pending file; one line says where."""
        w, p = self.writer, self.policy
        n = w.held_answers
        if n:
            names = ", ".join(h.name for h in w.held_files())
            try:
                path = w.save_held()
            except OSError as exc:
                w.lost_answers += n
                p.notify(f"error: {n_answers(n)} could not be written to {names} nor saved to a pending file "
                         f"({describe_write_error(exc)}); they are lost")
            else:
                p.notify(f"{n_answers(n)} could not be written to {names}; saved to {path} "
                         f"(the next run on this folder merges them first)")
        for part in sorted(q.name for q in w._queues.values() if not q.answers and q.records):
            w.give_up_part(part)  # a copy of rows in captions_all.csv or the pending file: rebuilt at start
            if part in self.failed_parts and part not in self.parts_noted:
                p.notify(f"{part} cannot be written; it is rebuilt from {CAPTIONS_ALL} at the next start")
        self.clear()


async def writer_task(
    writer: OutputWriter,
    results: ObjectReceiveStream[list[Result]],
    heartbeat: Callable[[], None] | None = None,
    heartbeat_every: float = 5.0,
    hold: HoldPolicy | None = None,
) -> None:
    """Drain the results stream until every worker has closed its end; write in batches.

    The writer is never in the scope that a Ctrl-C or a fatal error cancels: the workers are, and when
    they end their send ends close, so the writer drains what they sent and then ends by itself. Writes
    are shielded all the same, so no answer already paid for is lost half-way through a write.

    While a file cannot be written the writer keeps receiving (a worker's send never waits on the disk):
    answers are queued, new requests stop at the gate once more than `hold.limit` are held, and the
    failing file is retried every `hold.retry_s`. Whatever is still held when the run ends (after
    `hold.final_s` more tries) goes to a pending file, even if this task is cancelled.
    """
    holding = _Holding(writer, hold or HoldPolicy())
    last_beat = anyio.current_time()
    ended = False
    try:
        async with results:
            try:
                while not ended:
                    got: list[Result] = []
                    try:
                        wait = holding.wait_s()
                        if wait is None:
                            got.extend(await results.receive())
                        else:
                            with anyio.move_on_after(wait):
                                got.extend(await results.receive())
                        while True:  # take everything already waiting: one write for many rows
                            got.extend(results.receive_nowait())
                    except anyio.WouldBlock:
                        pass
                    except anyio.EndOfStream:
                        ended = True
                    writer.queue(got)
                    await holding.flush()
                    if heartbeat and anyio.current_time() - last_beat >= heartbeat_every:
                        _beat(heartbeat)
                        last_beat = anyio.current_time()
            except BaseException:
                with anyio.CancelScope(shield=True):  # cancelled (a crash elsewhere): keep what is waiting
                    try:
                        while True:
                            writer.queue(results.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        pass
                    await holding.flush()  # what cannot be written now goes to the pending file below
                raise
        await holding.last_tries()
    finally:
        with anyio.CancelScope(shield=True):
            holding.save_pending()
            writer.record_parts()


def _beat(heartbeat: Callable[[], None]) -> None:
    """The heartbeat saves manifest.json, which is informational: a full disk must not stop the writer."""
    try:
        heartbeat()
    except OSError:
        pass
