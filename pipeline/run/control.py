"""Stopping a run: Ctrl-C and SIGTERM, the budget, a fatal API answer, as state the tasks read.

No task needs to know who asked to stop. The signal handler only schedules `Controller.interrupt` on the
event loop: no exit and no I/O in the handler, and the same code serves Windows (SIGINT, SIGBREAK) and
POSIX (SIGINT, SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import anyio

from pipeline.errors import FatalAPIError


class Gate:
    """Holds new requests back while any reason to hold them stands (server unreachable, disk full).

    Each cause closes the gate under its own name and opens it again when it clears; workers wait at the
    gate before taking a rate-limit slot, so nothing is sent and no attempt is spent while it is shut.
    Requests already in flight are not touched.
    """

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._opened = anyio.Event()
        self._opened.set()

    @property
    def is_open(self) -> bool:
        return not self._reasons

    @property
    def reasons(self) -> dict[str, str]:
        """cause -> one-line explanation, for the views."""
        return dict(self._reasons)

    def close(self, cause: str, why: str = "") -> None:
        if not self._reasons:
            self._opened = anyio.Event()
        self._reasons[cause] = why or cause

    def open(self, cause: str) -> None:
        if self._reasons.pop(cause, None) is not None and not self._reasons:
            self._opened.set()

    async def wait_open(self) -> None:
        while self._reasons:
            await self._opened.wait()


class Controller:
    """Stop requests as state the tasks read, so no task needs to know who asked to stop."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.stopping = False
        self.stop_reason: str | None = None
        self.fatal: FatalAPIError | None = None
        self.interrupts = 0
        self.work_scope = anyio.CancelScope()
        self.interrupted = anyio.Event()
        self._waiting: set[anyio.CancelScope] = set()
        self.on_stop: list[Callable[[], None]] = []

    @contextmanager
    def before_send(self) -> Iterator[anyio.CancelScope]:
        """Scope around waiting for the limiter: a stop cancels it, since nothing has been sent yet."""
        scope = anyio.CancelScope()
        if self.stopping:
            scope.cancel()
        self._waiting.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._waiting.discard(scope)

    def request_stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        for scope in list(self._waiting):
            scope.cancel()
        for cb in self.on_stop:
            cb()

    def interrupt(self, signame: str = "SIGINT") -> None:
        """Ctrl-C / SIGTERM / SIGBREAK: the first stops gently, the second at once.

        The stop reason names the signal ("interrupted" for Ctrl-C, "interrupted: SIGTERM" otherwise) so
        the summary says what stopped the run.
        """
        self.interrupts += 1
        if self.interrupts == 1:
            self.request_stop("interrupted" if signame == "SIGINT" else f"interrupted: {signame}")
            self.interrupted.set()
        else:
            self.stop_reason = f"{self.stop_reason or 'interrupted'} (immediately)"
            self.work_scope.cancel()

    def fail(self, error: FatalAPIError) -> None:
        if self.fatal is None:
            self.fatal = error
        self.request_stop(f"fatal: {error}")
        self.work_scope.cancel()


@contextmanager
def signal_handlers(controller: Controller) -> Iterator[None]:
    """Route Ctrl-C (and SIGTERM/SIGBREAK where the platform has them) to the controller.

    The handler only schedules `controller.interrupt` on the event loop: no exit, no I/O in the handler.
    Works the same on Windows (SIGINT, SIGBREAK) and POSIX (SIGINT, SIGTERM).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import asyncio

    loop = asyncio.get_running_loop()

    def handler(signum, frame) -> None:  # noqa: ARG001
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "SIGINT"
        loop.call_soon_threadsafe(controller.interrupt, name)

    names = ["SIGINT", "SIGTERM", "SIGBREAK"]
    installed = {}
    for name in names:
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            installed[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


async def grace_watchdog(controller: Controller, grace_s: float, work_done: anyio.Event) -> None:
    """After the first Ctrl-C, give answers in flight `grace_s` to arrive, then cancel the workers."""
    await controller.interrupted.wait()
    with anyio.move_on_after(grace_s):
        await work_done.wait()
    controller.work_scope.cancel()


async def watch_until(finished: anyio.Event, controller: Controller, grace_s: float, work_done: anyio.Event) -> None:
    """Run the grace watchdog until the writer has finished (then the watchdog is no longer needed)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(grace_watchdog, controller, grace_s, work_done)
        await finished.wait()
        tg.cancel_scope.cancel()
