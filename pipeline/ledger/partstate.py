"""Are the part files in step with captions_all.csv? Known without reading them, when nothing changed.

A run's start makes the part files hold exactly captions_all.csv's rows (`pipeline.ledger.recover`, step
5). Doing so reads every part: 50,000 files for a million images, a fifth of a resume's time. But when a
run ends with every answer written to captions_all.csv and to its part, the parts *are* in step, and
stay so until something touches a file. So the writer records, as the run ends, each part's size and
modification time, captions_all.csv's, the `--batch-size`, the part number width and the index's
fingerprint, in `.parts_state.json` (`record`). The next start compares (`in_step`): one `stat` per
part, no read. Any difference (a part deleted, appended, edited; captions_all.csv grown by a run that
was killed, rebuilt, edited; another batch size; another index) and the start takes the full recovery,
exactly as before. A missing or unreadable record is the same as a difference. The record is a cache:
deleting it costs one slow start, never a row.

A run killed before its end leaves the record of its start (or of the run before) behind: stale, but
still a description of the parts as they were in step then, and of captions_all.csv's bytes then (its
size, and hashes of its first and last 64 KiB). The start's recovery uses it to read only what the
killed run added (`pipeline.ledger.recover`): the rows appended to captions_all.csv after the recorded
size, and the parts whose size or time changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.ledger.donesnap import edge_hashes
from pipeline.ledger.outputs import CAPTIONS_ALL, PART_PREFIX

STATE_FILE = ".parts_state.json"
VERSION = 2  # 2: captions_all.csv's edges (hashes of its first and last 64 KiB, inode) recorded


def edges(path: Path, size: int, ino: int) -> list:
    """The record's "edges" of captions_all.csv at `path`: the hashes of its first `size` bytes' first and
    last 64 KiB (`pipeline.ledger.donesnap.edge_hashes`), then its inode. Raises OSError."""
    return [*edge_hashes(path, size), ino]


def part_stats(out_dir: Path) -> dict[str, list[int]]:
    """Each part file's [size, mtime_ns], by name: one `stat` per part, as the record holds them."""
    parts: dict[str, list[int]] = {}
    with os.scandir(out_dir) as it:
        for entry in it:
            if entry.name.startswith(PART_PREFIX) and entry.name.endswith(".csv") and entry.is_file():
                st = entry.stat()
                parts[entry.name] = [st.st_size, st.st_mtime_ns]
    return parts


def _snapshot(out_dir: Path, batch_size: int, digits: int, index_key: str) -> dict | None:
    path = out_dir / CAPTIONS_ALL
    try:
        st = path.stat()
        main_edges = edges(path, st.st_size, st.st_ino)
    except OSError:
        return None
    return {"version": VERSION, "batch_size": batch_size, "digits": digits, "index": index_key,
            CAPTIONS_ALL: [st.st_size, st.st_mtime_ns], "edges": main_edges, "parts": part_stats(out_dir)}


def record(out_dir: Path, *, batch_size: int, digits: int, index_key: str | None) -> None:
    """Say that the parts are in step now (call only when they are). Never raises: it is a cache."""
    path = Path(out_dir) / STATE_FILE
    try:
        snap = _snapshot(Path(out_dir), batch_size, digits, index_key) if index_key else None
        if snap is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(snap, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        forget(out_dir)


def forget(out_dir: Path) -> None:
    """Drop the record (the parts may be out of step); never raises."""
    try:
        (Path(out_dir) / STATE_FILE).unlink(missing_ok=True)
    except OSError:
        pass


def saved(out_dir: Path) -> dict | None:
    """The record as `record` left it (None: none, unreadable, another version). Never raises."""
    try:
        found = json.loads((Path(out_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("version") == VERSION else None


def in_step(out_dir: Path, *, batch_size: int, digits: int, index_key: str | None) -> bool:
    """True only when every part and captions_all.csv are as `record` left them, for this batch size,
    part width and index. Never raises."""
    if not index_key:
        return False
    rec = saved(out_dir)
    if rec is None:
        return False
    try:
        now = _snapshot(Path(out_dir), batch_size, digits, index_key)
    except OSError:
        return False
    return now is not None and rec == now
