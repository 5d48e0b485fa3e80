"""A real full disk for tests and benchmarks: a small tmpfs mounted on a folder, filled to the last byte.

Linux and root only (mount); callers skip where `mount_tmpfs` says no.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path


def can_mount() -> bool:
    """Mounting needs Linux and root."""
    return sys.platform == "linux" and os.geteuid() == 0


def mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` (e.g. "4m") on `where`; None on success, else why it could not."""
    if not can_mount():
        return "a tmpfs mount needs Linux and root"
    Path(where).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def fill(path: Path) -> int:
    """Write zeros to `path` until the device is full; returns the bytes written."""
    n = 0
    with open(path, "wb", buffering=0) as fh:
        chunk = b"\0" * 65536
        while True:
            try:
                n += fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return n
