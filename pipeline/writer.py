"""The writer: the only code that touches the output folder.

Start (`OutputWriter.open`, before any request): check the folder is writable, repair torn tails, read
what is done, make every part file agree with captions_all.csv, start a fresh errors.csv for this run.
During the run (`writer_task`): take results from the one receive stream, append whole rows to
captions_all.csv and the image's part file, errors to errors.csv, structured answers to attributes.csv,
and flush after every batch of results so a kill -9 loses only answers still in flight.

Write order is captions_all.csv first, then the part: captions_all.csv is the record of what is done; if a
crash falls between the two writes, `open` on the next start rebuilds the part from captions_all.csv.
"""

from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import aiofiles
import anyio
from anyio.abc import ObjectReceiveStream

from pipeline.errors import ConfigError
from pipeline.outputs import (
    ATTRIBUTES,
    CAPTION_COLUMNS,
    CAPTIONS_ALL,
    ERROR_COLUMNS,
    ERRORS,
    PART_GLOB,
    DoneRead,
    attribute_columns_for,
    attribute_row_record,
    caption_record,
    error_record,
    part_name,
    read_done,
    read_table,
    to_csv_text,
    write_csv_atomic,
)
from pipeline.records import AttributeRow, CaptionRow, ErrorRow

Key = tuple[str, str, int]
Result = CaptionRow | ErrorRow | AttributeRow
MAX_OPEN_PARTS = 16


@dataclass
class ResumeState:
    """What the output folder already holds when a run starts."""

    done: set[Key] = field(default_factory=set)
    captions_rows: int = 0
    cost_usd: float = 0.0
    repaired: list[str] = field(default_factory=list)  # human notes: torn tails cut, parts rebuilt
    read: DoneRead | None = None  # the rows behind it, for whoever needs more than the keys (dry-run)


def check_writable(out_dir: Path) -> None:
    """Create the folder and prove a file can be written there, before any request is paid for."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {out_dir} is not writable: {exc.strerror or exc}") from None


def _header_text(columns: list[str]) -> str:
    return to_csv_text([columns])


class OutputWriter:
    def __init__(
        self,
        out_dir: Path,
        batch_size: int,
        positions: dict[str, int],
        attribute_fields: list[str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size
        self.positions = positions
        self.attribute_fields = attribute_fields or []
        self._files: dict[str, Any] = {}
        self._parts: OrderedDict[str, Any] = OrderedDict()
        self.rows_written = 0

    # --- start ------------------------------------------------------------------------------------
    def read_done(self) -> ResumeState:
        """What is done, read-only (dry-run, status): nothing on disk changes."""
        return self._read(repair=False)

    def _read(self, *, repair: bool) -> ResumeState:
        done = read_done(self.out_dir, repair=repair, attributes=bool(self.attribute_fields))
        state = ResumeState(done=done.keys, captions_rows=len(done.caption_rows), cost_usd=done.cost_usd, read=done)
        if repair:
            state.repaired += [f"{name}: cut a torn last row ({cut} bytes)" for name, cut in done.cut_bytes.items() if cut]
        return state

    def open(self) -> ResumeState:
        """Before the first request: writable folder, repaired files, parts in line, a fresh errors.csv."""
        check_writable(self.out_dir)
        state = self._read(repair=True)
        assert state.read is not None
        state.repaired += self._reconcile_parts(state.read.caption_rows)
        (self.out_dir / ERRORS).write_text(_header_text(ERROR_COLUMNS), encoding="utf-8-sig", newline="")
        return state

    def _reconcile_parts(self, all_rows: list[dict[str, str]]) -> list[str]:
        """Make the part files hold exactly the rows of captions_all.csv, split by index position."""
        expected: dict[str, list[dict[str, str]]] = defaultdict(list)
        for d in all_rows:
            pos = self.positions.get(d["image_id"])
            if pos is not None:
                expected[part_name(pos, self.batch_size)].append(d)
        notes: list[str] = []
        existing = {p.name for p in self.out_dir.glob(PART_GLOB)}
        for name in sorted(existing | set(expected)):
            want = expected.get(name, [])
            path = self.out_dir / name
            have = read_table(path, repair=True).rows if name in existing else []
            want_keys = [(d["image_id"], d.get("prompt_name"), d.get("caption_index")) for d in want]
            have_keys = [(d["image_id"], d.get("prompt_name"), d.get("caption_index")) for d in have]
            if sorted(want_keys) == sorted(have_keys) and len(have) == len(want):
                continue
            if not want:
                path.unlink(missing_ok=True)
                notes.append(f"{name}: removed (no rows of captions_all.csv belong to it)")
                continue
            write_csv_atomic(path, CAPTION_COLUMNS, ([d.get(c, "") for c in CAPTION_COLUMNS] for d in want))
            notes.append(f"{name}: rebuilt from {CAPTIONS_ALL} ({len(have)} -> {len(want)} rows)")
        return notes

    # --- appends ----------------------------------------------------------------------------------
    async def _open_append(self, name: str, columns: list[str]) -> Any:
        """Open a CSV for appending; a new (or empty) file first gets the BOM and the header."""
        path = self.out_dir / name
        new = not path.exists() or path.stat().st_size == 0
        fh = await aiofiles.open(path, "a", encoding="utf-8", newline="")
        if new:
            await fh.write("\ufeff" + _header_text(columns))
        return fh

    async def _handle(self, name: str, columns: list[str]) -> Any:
        fh = self._files.get(name)
        if fh is None:
            fh = self._files[name] = await self._open_append(name, columns)
        return fh

    async def _part_handle(self, name: str) -> Any:
        """Part files are many: keep the most recently used open, close the oldest beyond MAX_OPEN_PARTS."""
        fh = self._parts.get(name)
        if fh is not None:
            self._parts.move_to_end(name)
            return fh
        fh = self._parts[name] = await self._open_append(name, CAPTION_COLUMNS)
        if len(self._parts) > MAX_OPEN_PARTS:
            _, old = self._parts.popitem(last=False)
            await old.close()
        return fh

    async def write(self, results: Iterable[Result]) -> None:
        """Append a batch of results, captions_all.csv first, then parts, then flush everything touched."""
        captions: list[CaptionRow] = []
        errors: list[ErrorRow] = []
        attrs: list[AttributeRow] = []
        for r in results:
            if isinstance(r, CaptionRow):
                captions.append(r)
            elif isinstance(r, ErrorRow):
                errors.append(r)
            else:
                attrs.append(r)
        touched = []
        if captions:
            fh = await self._handle(CAPTIONS_ALL, CAPTION_COLUMNS)
            await fh.write(to_csv_text(caption_record(r) for r in captions))
            await fh.flush()
            by_part: dict[str, list[CaptionRow]] = defaultdict(list)
            for r in captions:
                by_part[part_name(r.position, self.batch_size)].append(r)
            for name, rows in by_part.items():
                ph = await self._part_handle(name)
                await ph.write(to_csv_text(caption_record(r) for r in rows))
                touched.append(ph)
        if errors:
            fh = await self._handle(ERRORS, ERROR_COLUMNS)
            await fh.write(to_csv_text(error_record(r) for r in errors))
            touched.append(fh)
        if attrs:
            fh = await self._handle(ATTRIBUTES, attribute_columns_for(self.attribute_fields))
            await fh.write(to_csv_text(attribute_row_record(r, self.attribute_fields) for r in attrs))
            touched.append(fh)
        for fh in touched:
            await fh.flush()
        self.rows_written += len(captions) + len(errors) + len(attrs)

    async def close(self) -> None:
        for fh in list(self._files.values()) + list(self._parts.values()):
            try:
                await fh.flush()
                await fh.close()
            except OSError:
                pass
        self._files.clear()
        self._parts.clear()


async def writer_task(
    writer: OutputWriter,
    results: ObjectReceiveStream[list[Result]],
    on_written: Callable[[list[Result]], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_every: float = 5.0,
) -> None:
    """Drain the results stream until every worker has closed its end; write in batches.

    The writer is never in the scope that a Ctrl-C or a fatal error cancels: the workers are, and when
    they end their send ends close, so the writer drains what they sent and then ends by itself. Writes
    are shielded all the same, so no answer already paid for is lost half-way through a write.
    """
    last_beat = anyio.current_time()
    try:
        async with results:
            async for batch in results:
                pending = list(batch)
                while True:  # take everything already waiting: one write + flush for many rows
                    try:
                        pending.extend(results.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                with anyio.CancelScope(shield=True):
                    await writer.write(pending)
                if on_written:
                    on_written(pending)
                if heartbeat and anyio.current_time() - last_beat >= heartbeat_every:
                    heartbeat()
                    last_beat = anyio.current_time()
    finally:
        with anyio.CancelScope(shield=True):
            await writer.close()
