"""The file layer of every append to an output CSV: one small function each, so a fault is seen whole.

`append_bytes` is the only way a row reaches captions_all.csv, a part file, errors.csv or attributes.csv
during a run (and when held answers are merged at the next start). It opens the file for each batch
(so a file Excel holds, or one replaced on disk, is met afresh every time), writes every byte, and on any
`OSError` cuts the file back to its size before the write, so a half-written record never stays in the
middle of a file where the next append would bury it. Tests inject disk-full, permission-denied and
sharing-violation faults here (monkeypatch `open_append` or `append_bytes`), never in the SDK.

`header_bytes` / `records_bytes` are the one place rows become bytes: a new file starts with its header,
after a BOM only when the folder's encoding says so (`pipeline.ledger.encoding`: `run --excel`, or a
folder started with one); appended records are plain UTF-8.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO, Iterable

from pipeline.ledger.csvscan import BOM
from pipeline.ledger.outputs import ENCODING_WRITE, to_csv_text

ENCODING_APPEND = "utf-8"  # rows after the header: no second BOM

# Windows error codes (OSError.winerror) a write can meet; Python maps them to errno values too, but the
# sharing violation (Excel holds the file) and a full disk deserve their own words.
_WIN_SHARING = (32, 33)  # ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION
_WIN_DISK_FULL = (39, 112)  # ERROR_HANDLE_DISK_FULL, ERROR_DISK_FULL
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def header_bytes(columns: list[str], bom: bool = False) -> bytes:
    """The start of a new CSV file: the header line, after a BOM when `bom` (the folder's encoding)."""
    return (BOM if bom else b"") + to_csv_text([columns]).encode(ENCODING_WRITE)


def records_bytes(records: Iterable[list[str]]) -> bytes:
    """Whole CSV records, each ended by the line terminator, as appended after the header."""
    return to_csv_text(records).encode(ENCODING_APPEND)


def open_append(path: Path) -> BinaryIO:
    """Open an output file for appending: binary, unbuffered, so a failed write leaves nothing to flush."""
    return open(path, "ab", buffering=0)


def probe_append(path: Path) -> None:
    """Prove an existing file can be opened for append (pre-flight); writes nothing."""
    open_append(path).close()


def check_appendable(out_dir: Path, names: Iterable[str]) -> None:
    """Pre-flight, before the first request: every existing output file can be opened for append.

    Files that do not exist yet are created in a folder already proven writable. Raises ConfigError
    (exit 2) naming the first file that cannot be opened, and why.
    """
    from pipeline.errors import ConfigError

    for name in names:
        path = Path(out_dir) / name
        if not path.exists():
            continue
        try:
            probe_append(path)
        except OSError as exc:
            raise ConfigError(f"{name} cannot be opened for writing: {describe_write_error(exc)}") from None


def append_bytes(path: Path, data: bytes, header: bytes = b"") -> None:
    """Append `data` (after `header` when the file is new or empty); all of it or, on OSError, none of it.

    On failure the file is truncated back to its size before this call and the error is raised again.
    """
    fh = open_append(path)
    try:
        start = fh.seek(0, os.SEEK_END)
        payload = memoryview(header + data if header and start == 0 else data)
        try:
            while payload:
                n = fh.write(payload)
                if not n:  # nothing written and no error: treat as a full device rather than spin
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                payload = payload[n:]
        except OSError:
            _cut_back(fh, start)
            raise
    finally:
        try:
            fh.close()
        except OSError:
            pass  # unbuffered: every byte was already handed to the OS (or cut back above)


def _cut_back(fh: BinaryIO, size: int) -> None:
    try:
        fh.truncate(size)
    except OSError:
        pass  # nothing better to do; the next start quarantines a damaged row, and the rows are still held


def write_new_file(path: Path, data: bytes) -> None:
    """Write a whole new file via a temporary name, so it exists complete or not at all."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def describe_write_error(exc: OSError) -> str:
    """A short reason for a failed write, chosen by errno / winerror (never by matching message text)."""
    winerror = getattr(exc, "winerror", None)
    if winerror in _WIN_SHARING:
        return "the file is in use by another program (is it open in Excel?)"
    if exc.errno in _DISK_FULL or winerror in _WIN_DISK_FULL:
        return "no space left on the disk"
    if exc.errno == errno.EROFS:
        return "the disk is read-only"
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return "Permission denied (is it open in Excel?)"
    return exc.strerror or str(exc) or type(exc).__name__
