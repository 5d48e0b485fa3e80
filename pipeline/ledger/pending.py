"""Answers that could not be written before the run stopped: saved to a pending file, merged at next start.

When captions_all.csv (or errors.csv, attributes.csv) stays unwritable until a run ends, the writer saves
the rows it holds to `pending-<timestamp>-<pid>.jsonl` in the output folder or, if that cannot be
written either (the disk is full), to the system temp folder as
`reid-prompt-pending-<folder hash>-<timestamp>-<pid>.jsonl`, where the hash is of the resolved output
folder path, so the next run on the same folder finds it. One JSON object per line:
`{"file": "captions_all.csv", "header": [...], "records": [[...], ...], "out_dir": "..."}` with records
already formatted as CSV fields.

`merge_pending(out_dir)` runs first thing at the next start: it appends each pending file's records to
their target files and deletes the pending file. It is crash-safe: a record whose key
(image_id, prompt_name, caption_index) is already in captions_all.csv, a part or attributes.csv is
skipped, and an errors.csv record is skipped only when the very same row is already there, so a merge
killed half-way and run again never doubles a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.ledger import appendfile
from pipeline.ledger.appendfile import describe_write_error, header_bytes, records_bytes
from pipeline.ledger.outputs import ATTRIBUTES, CAPTIONS_ALL, ERRORS, read_table

PENDING_GLOB = "pending-*.jsonl"
TEMP_PREFIX = "reid-prompt-pending-"
_TARGET = re.compile(r"^(captions_all|errors|attributes|captions_part_\d+)\.csv$")


@dataclass
class HeldFile:
    """Rows held for one output file: its header and the records not yet written."""

    name: str
    header: list[str]
    records: list[list[str]]


def folder_tag(out_dir: Path) -> str:
    """A short stable name for an output folder (its resolved path), for pending files in the temp folder."""
    resolved = str(Path(out_dir).resolve())
    return hashlib.sha256(resolved.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def pending_locations(out_dir: Path) -> list[tuple[Path, str]]:
    """(folder, glob) pairs where pending files for `out_dir` can be: the folder itself, then temp."""
    return [
        (Path(out_dir), PENDING_GLOB),
        (Path(tempfile.gettempdir()), f"{TEMP_PREFIX}{folder_tag(out_dir)}-*.jsonl"),
    ]


def find_pending(out_dir: Path) -> list[Path]:
    """Pending files for this folder, oldest first within each location."""
    found: list[Path] = []
    for folder, pattern in pending_locations(out_dir):
        if folder.is_dir():
            found += sorted(p for p in folder.glob(pattern) if p.is_file())
    return found


def pending_bytes(out_dir: Path, held: list[HeldFile]) -> bytes:
    lines = [
        json.dumps({"file": h.name, "header": h.header, "records": h.records, "out_dir": str(out_dir)},
                   ensure_ascii=False)
        for h in held
        if h.records
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def save_pending(out_dir: Path, held: list[HeldFile]) -> Path:
    """Write the held rows to a pending file in the folder, else in the temp folder; return its path.

    Raises OSError (the last one) if neither can be written.
    """
    out_dir = Path(out_dir)
    data = pending_bytes(out_dir, held)
    stamp, pid = _stamp(), os.getpid()
    targets = [
        out_dir / f"pending-{stamp}-{pid}.jsonl",
        Path(tempfile.gettempdir()) / f"{TEMP_PREFIX}{folder_tag(out_dir)}-{stamp}-{pid}.jsonl",
    ]
    last: OSError | None = None
    for path in targets:
        try:
            appendfile.write_new_file(path, data)
            return path
        except OSError as exc:
            last = exc
    assert last is not None
    raise last


class PendingFormatError(ValueError):
    """A pending file that is not what `save_pending` writes."""


def load_pending(path: Path) -> list[HeldFile]:
    """Read a pending file; raise PendingFormatError if any line is not a held file's rows."""
    held: list[HeldFile] = []
    text = Path(path).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
            name, header, records = obj["file"], obj["header"], obj["records"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PendingFormatError(f"line {n}: {type(exc).__name__}") from None
        ok = (
            isinstance(name, str) and _TARGET.match(name) is not None
            and isinstance(header, list) and all(isinstance(c, str) for c in header)
            and isinstance(records, list)
            and all(isinstance(r, list) and all(isinstance(c, str) for c in r) for r in records)
        )
        if not ok:
            raise PendingFormatError(f"line {n}: not a held file's rows")
        held.append(HeldFile(name, header, records))
    return held


def _key(d: dict[str, str]) -> tuple[str, str, int]:
    try:
        index = int(d.get("caption_index") or 0)
    except ValueError:
        index = 0
    return (d.get("image_id", ""), d.get("prompt_name") or "", index)


def merge_into(out_dir: Path, held: HeldFile, bom: bool = False) -> tuple[int, int]:
    """Append a held file's records to its target, skipping what is already there. (added, skipped).

    `bom`: the folder's encoding, for a target that is new or empty (an existing one keeps its own).
    """
    path = Path(out_dir) / held.name
    table = read_table(path, repair=True)  # a torn tail (a merge killed mid-write) is cut, not buried
    existing_header = table.header if path.exists() and path.stat().st_size > 0 else []
    header = existing_header or held.header
    by_name = held.name == ERRORS
    seen: set[Any] = {
        tuple(d.get(c, "") for c in header) if by_name else _key(d) for d in table.rows
    }
    out: list[list[str]] = []
    skipped = 0
    for rec in held.records:
        d = dict(zip(held.header, rec))
        mark = tuple(d.get(c, "") for c in header) if by_name else _key(d)
        if mark in seen:
            skipped += 1
            continue
        seen.add(mark)
        out.append([d.get(c, "") for c in header])
    if out:
        appendfile.append_bytes(path, records_bytes(out), header_bytes(header, bom))
    return len(out), skipped


_ORDER = {CAPTIONS_ALL: 0, ERRORS: 2, ATTRIBUTES: 3}


def merge_pending(out_dir: Path, bom: bool = False) -> list[str]:
    """Merge every pending file of this folder into its target files, then delete it. Returns notes.

    `bom`: the folder's encoding (`pipeline.ledger.encoding`), for a target file that is new or empty.

    Called before anything else at the start of a run, so what was paid for and held counts as done.
    A pending file that cannot be merged (its target still unwritable) stops the run before any request
    (ConfigError) and is kept; one that is not a pending file is moved aside to `<name>.rejected`.
    """
    out_dir = Path(out_dir)
    notes: list[str] = []
    for path in find_pending(out_dir):
        try:
            held = load_pending(path)
        except PendingFormatError as exc:
            rejected = path.with_name(path.name + ".rejected")
            try:
                os.replace(path, rejected)
            except OSError:
                pass
            notes.append(f"{path}: not a pending file ({exc}); moved aside to {rejected.name}")
            continue
        except OSError as exc:
            raise ConfigError(f"held answers in {path} cannot be read: {describe_write_error(exc)}") from None
        held.sort(key=lambda h: _ORDER.get(h.name, 1))  # captions_all.csv first, then parts, errors, attributes
        added: dict[str, int] = {}
        skipped = 0
        for h in held:
            try:
                if not (out_dir / h.name).parent.is_dir():
                    out_dir.mkdir(parents=True, exist_ok=True)
                n, s = merge_into(out_dir, h, bom)
            except OSError as exc:
                raise ConfigError(
                    f"held answers in {path} cannot be merged: {h.name} cannot be written: "
                    f"{describe_write_error(exc)}"
                ) from None
            added[h.name] = added.get(h.name, 0) + n
            skipped += s
        try:
            path.unlink()
        except OSError as exc:
            raise ConfigError(f"merged {path} but cannot delete it: {describe_write_error(exc)}") from None
        what = ", ".join(f"{n:,} into {name}" for name, n in added.items() if n) or "nothing new"
        extra = f" ({skipped:,} already there)" if skipped else ""
        notes.append(f"merged held answers from {path}: {what}{extra}")
    return notes
