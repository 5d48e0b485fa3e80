"""One run per output folder: an OS-level lock that the kernel releases when the holder dies.

Two `run`s on one `--out` would both read the same "done" set and caption everything twice (doubled rows,
doubled bills). The lock is `filelock`'s: `fcntl.flock` on POSIX, `msvcrt.locking` on Windows; both are
released by the operating system when the process ends, however it ends, so a `kill -9` never leaves a
stale lock behind. Who holds it (pid, host, start time) is written beside it after it is taken, so the
second run can name the holder in its one-line refusal; that file is read only when the lock is refused,
so a stale one from a killed run is never believed on its own.

Only `run` takes the lock. `status`, `report`, `export` and a dry-run read the folder and never take it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.errors import ConfigError

LOCK_NAME = ".reid-prompt.lock"
HOLDER_NAME = ".reid-prompt.lock.json"  # who holds it: a file of its own (Windows locks the lock file's bytes)


class FolderLocked(ConfigError):
    """Another run holds the output folder (exit 2: nothing was sent)."""


@dataclass(frozen=True)
class Holder:
    pid: int | None
    host: str
    started_at: str

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "another process"
        where = f" on {self.host}" if self.host else ""
        since = f", started {self.started_at}" if self.started_at else ""
        return f"{pid}{where}{since}"


def pid_alive(pid: int) -> bool | None:
    """Is process `pid` alive on this machine? None when it cannot be told (then the heartbeat decides)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    if sys.platform == "win32":
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)  # signal 0: existence check only, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return None
    return True


def _pid_alive_windows(pid: int) -> bool | None:
    """OpenProcess + GetExitCodeProcess: os.kill(pid, 0) on Windows would terminate the process."""
    try:
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        process_query_limited_information = 0x1000
        still_active = 259
        error_access_denied = 5
        error_invalid_parameter = 87  # what OpenProcess says for a pid that does not exist
        handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
        if not handle:
            err = ctypes.get_last_error()
            if err == error_invalid_parameter:
                return False
            return True if err == error_access_denied else None
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return None
            return code.value == still_active
        finally:
            kernel32.CloseHandle(handle)
    except Exception:  # noqa: BLE001 - any failure here only means "cannot tell"
        return None


def read_holder(out_dir: Path) -> Holder | None:
    """Who holds (or last held) the folder's lock, from the lock file; None if it says nothing."""
    try:
        data = json.loads((Path(out_dir) / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    return Holder(pid if isinstance(pid, int) else None, str(data.get("host") or ""), str(data.get("started_at") or ""))


def wait_for_holder(out_dir: Path, wait_s: float = 1.0) -> Holder | None:
    """The live holder of a lock we were refused, waiting a moment for it to write its name.

    The winner writes the holder file just after taking the lock, so a run refused at the same instant may
    find no file yet, or a stale one from a run killed earlier; a holder whose process is known to be gone
    is not believed.
    """
    deadline = time.monotonic() + wait_s
    while True:
        holder = read_holder(out_dir)
        if holder is not None and (holder.pid is None or pid_alive(holder.pid) is not False):
            return holder
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


class FolderLock:
    """The output folder's lock for the length of one run. Use as a context manager or acquire/release."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        # A non-singleton lock: each FolderLock is its own OS lock, even within one process (tests start
        # two runs in one interpreter; the second must be refused as a second process would be).
        # No soft (file-exists) fallback: such a lock would outlive a kill -9.
        self._lock = FileLock(
            str(self.path), timeout=0, is_singleton=False, thread_local=False,
            fallback_to_soft=False, preserve_lock_file=True,
        )

    def acquire(self) -> None:
        """Take the lock or raise FolderLocked naming the holder. Never waits."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:  # before OSError: filelock's Timeout is a TimeoutError, an OSError
            holder = wait_for_holder(self.out_dir)
            who = holder.describe() if holder else "another process"
            raise FolderLocked(
                f"output folder {self.out_dir} is in use by another run ({who}); "
                "wait for it to finish or use another --out"
            ) from None
        except OSError as exc:
            raise ConfigError(f"output folder {self.out_dir} is not writable: {exc.strerror or exc}") from None
        self._write_holder()

    def _write_holder(self) -> None:
        """Record who holds the lock (a courtesy for the refusal message; the OS lock is what counts)."""
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        target = self.out_dir / HOLDER_NAME
        tmp = target.with_name(f"{HOLDER_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(info), encoding="utf-8")
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)  # the holder's name is a courtesy; the lock itself is held

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
