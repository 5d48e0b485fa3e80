"""Moving what `csvscan` found bad out of a CSV file, losing no byte and leaving a file every reader reads.

The bad bytes (damaged regions, a torn tail) are appended, byte for byte, to `<name>.rejected` beside the
file, which is only ever appended to, never overwritten: a user can always look at what was moved and
why. Then the file itself is made whole: a torn tail alone is cut by truncating (the rest of the file is
untouched), any damage makes the file rewritten from its good bytes through a temporary file and
`os.replace`, so a crash leaves either the old file or the new one, never half of one. `.rejected` is
written and synced first: a crash in between only means the same bytes are moved again next time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from pipeline.ledger.csvscan import Scan

REJECTED_SUFFIX = ".rejected"


def rejected_path(path: Path) -> Path:
    return path.with_name(path.name + REJECTED_SUFFIX)


def describe(name: str, found: Scan) -> str | None:
    """One human line for a file: which lines were moved where (None when the file was clean)."""
    where = f"{name}{REJECTED_SUFFIX}"
    torn = found.torn
    if found.damaged:
        lines = ", ".join(r.lines_text() for r in found.damaged)
        one_line = len(found.damaged) == 1 and found.damaged[0].first_line == found.damaged[0].last_line
        rows = found.damaged_rows
        moved = f"line{'' if one_line else 's'} {lines} ({rows} row{'s' if rows != 1 else ''})"
        if torn:
            moved += f" and a torn last row (line {torn.first_line})"
        return f"{name}: moved {moved} to {where}"
    if torn:
        return f"{name}: cut a torn last row (line {torn.first_line}, {torn.size} bytes) to {where}"
    return None


def quarantine(path: Path, data: bytes, found: Scan) -> None:
    """Move `found.bad` out of the file whose bytes are `data` (raises OSError if the disk refuses)."""
    bad = found.bad
    if not bad:
        return
    view = memoryview(data)
    with open(rejected_path(path), "ab") as fh:
        for region in bad:
            fh.write(view[region.start : region.end])
        fh.flush()
        os.fsync(fh.fileno())
    if not found.damaged:
        assert found.torn is not None
        with open(path, "r+b") as fh:  # only a torn tail: cut it, no need to copy the whole file
            fh.truncate(found.torn.start if found.header is not None else 0)
            fh.flush()
            os.fsync(fh.fileno())
        return
    replace_atomic(path, (view[a:b] for a, b in found.kept()))


def replace_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write `chunks` as the new content of `path`: a temporary file beside it, synced, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        replace_retrying(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_retrying(tmp: Path, path: Path) -> None:
    """`os.replace(tmp, path)`, tried again a few times on PermissionError: on Windows a reader (status,
    an editor, antivirus) holds the file a moment."""
    for attempt in range(5):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
