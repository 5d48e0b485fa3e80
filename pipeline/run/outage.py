"""An outage is not a thousand failures: what a run does while its server cannot be reached.

A request that fails because no connection could be made (refused, host name not found, TLS failed:
`ErrorKind.UNREACHABLE`) says nothing about its image, so it must not spend one of the image's attempts
nor land in errors.csv. Instead:

- before the server has given any HTTP answer in this run, the address is most likely wrong or the server
  is not started: the run stops at once with "cannot reach URL: connection refused" (exit 3);
- once it has answered, the server went away: the whole pool waits at the gate, a probe asks again with
  backoff (0.5 s doubling to 15 s), the gate opens when the server answers, and after `--outage-timeout`
  seconds without an answer the run stops with "cannot reach URL since HH:MM:SS (5 min): ...".

The outage clock starts at the first unreachable failure and stops only at a real answer to a request,
not at a successful probe: a server whose port accepts but whose every request fails still times out
instead of being probed and retried for ever.

The decisions (next probe delay, time left, the messages) are pure functions; `OutageTracker` is the
state, touched only from the event loop; `watch_outages` is the probing task, run inside the run's task
group and cancelled when the run ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import anyio

if TYPE_CHECKING:
    from pipeline.run.control import Gate
    from pipeline.run.stats import RunStats

__all__ = [
    "DEFAULT_BASE_URL",
    "GATE_CAUSE",
    "Outage",
    "OutagePolicy",
    "OutageTracker",
    "cannot_reach_message",
    "display_url",
    "fmt_span",
    "gave_up_message",
    "next_probe_delay",
    "outage_text",
    "time_left",
    "watch_outages",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the SDK's own default
GATE_CAUSE = "outage"  # the name under which an outage holds the gate


@dataclass(frozen=True)
class OutagePolicy:
    """How long to wait out an outage and how often to ask whether it is over."""

    timeout_s: float = 300.0  # --outage-timeout: continuous unreachability that stops the run
    first_probe_s: float = 0.5
    max_probe_s: float = 15.0


@dataclass
class Outage:
    """One outage: since when (monotonic and wall clock), why, and how many probes were sent."""

    since: float
    since_wall: datetime
    why: str
    probes: int = 0


# --- pure decisions ------------------------------------------------------------------------------------

def next_probe_delay(probes: int, policy: OutagePolicy) -> float:
    """Seconds before probe number `probes` + 1: first_probe_s doubling, at most max_probe_s."""
    exponent = min(max(0, probes), 64)  # no overflow however long the outage
    return min(policy.max_probe_s, policy.first_probe_s * 2.0**exponent)


def time_left(since: float, now: float, policy: OutagePolicy) -> float:
    """Seconds of unreachability the run still tolerates (<= 0: stop)."""
    return policy.timeout_s - (now - since)


def display_url(url: str) -> str:
    """The base URL as shown to the user: no user:password@, no query, no trailing slash."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        shown = url
    return shown.rstrip("/") or url


def fmt_span(seconds: float) -> str:
    """A duration in words: '2 s', '90 s', '5 min', '1.5 min', '2 h'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60 or (seconds < 600 and seconds % 60):
        return f"{seconds:g} s" if seconds < 10 else f"{round(seconds):d} s"
    if seconds < 7200:
        return f"{round(seconds / 60, 1):g} min"
    return f"{round(seconds / 3600, 1):g} h"


def cannot_reach_message(url: str, why: str) -> str:
    """Before any answer: 'cannot reach http://127.0.0.1:9/v1: connection refused'."""
    return f"cannot reach {display_url(url)}: {why}"


def gave_up_message(url: str, outage: Outage, policy: OutagePolicy) -> str:
    """After --outage-timeout: 'cannot reach URL since 14:02:11 (5 min): connection refused'."""
    return (
        f"cannot reach {display_url(url)} since {outage.since_wall:%H:%M:%S} "
        f"({fmt_span(policy.timeout_s)}): {outage.why}"
    )


def outage_text(seconds: float, why: str) -> str:
    """For the views: 'server unreachable for 12 s (connection refused); probing'."""
    return f"server unreachable for {max(0, round(seconds)):d} s ({why}); probing"


# --- state -----------------------------------------------------------------------------------------------

class OutageTracker:
    """Whether the server can be reached, as the workers and the probe see it. Event loop only.

    `heard` turns true at the run's first HTTP answer of any status. `current` is the outage under way
    (kept until a request is answered again); `holding` is whether it holds the gate right now (a probe
    that gets an answer opens the gate, but the outage only ends with a request's answer).
    """

    def __init__(
        self,
        gate: Gate,
        url: str,
        policy: OutagePolicy | None = None,
        *,
        stats: RunStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gate = gate
        self.url = url
        self.policy = policy or OutagePolicy()
        self.stats = stats
        self.clock = clock
        self.heard = False
        self.current: Outage | None = None
        self.holding = False
        self._held = anyio.Event()

    def heard_from_server(self) -> None:
        """A request got an HTTP answer: the server is there, any outage is over."""
        self.heard = True
        if self.current is not None:
            self.current = None
            self._release()

    def unreachable(self, why: str) -> Outage:
        """A request found no server: hold every new request until a probe gets an answer."""
        if self.current is None:
            self.current = Outage(self.clock(), datetime.now(), why)
        else:
            self.current.why = why
        if not self.holding:
            self.holding = True
            self.gate.close(GATE_CAUSE, f"server unreachable ({why})")
            self._held.set()
        if self.stats is not None:
            self.stats.outage_since = self.current.since
            self.stats.outage_why = why
        return self.current

    def probe_answered(self) -> None:
        """The probe got an answer: let requests go again (the outage clock runs on until one is answered)."""
        self._release()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self._held = anyio.Event()
            self.gate.open(GATE_CAUSE)
        if self.stats is not None:
            self.stats.outage_since = None

    async def wait_held(self) -> Outage:
        """Until an outage holds the gate; returns it."""
        while not (self.holding and self.current is not None):
            await self._held.wait()
        return self.current


# --- the probing task ------------------------------------------------------------------------------------

async def probe_until_answer(
    tracker: OutageTracker,
    probe: Callable[[], Awaitable[bool]],
    give_up: Callable[[str], None],
) -> None:
    """While outages hold the gate: probe with backoff, open the gate on an answer, give up after the timeout.

    `give_up(message)` is called once, when an outage has lasted `policy.timeout_s`; the task then ends.
    """
    policy = tracker.policy
    while True:
        outage = await tracker.wait_held()
        while tracker.holding and tracker.current is outage:
            left = time_left(outage.since, tracker.clock(), policy)
            if left <= 0:
                if tracker.stats is not None:
                    tracker.stats.outage_since = None  # no longer probing: the views show the stop instead
                give_up(gave_up_message(tracker.url, outage, policy))
                return
            await anyio.sleep(min(next_probe_delay(outage.probes, policy), left))
            if not (tracker.holding and tracker.current is outage):
                break  # a request was answered meanwhile
            if time_left(outage.since, tracker.clock(), policy) <= 0:
                continue  # the check at the top gives up
            outage.probes += 1
            answered = False
            with anyio.move_on_after(max(0.05, time_left(outage.since, tracker.clock(), policy))):
                answered = await probe()
            if answered:
                tracker.probe_answered()


async def watch_outages(
    tracker: OutageTracker,
    probe: Callable[[], Awaitable[bool]],
    give_up: Callable[[str], None],
    finished: anyio.Event,
) -> None:
    """Run the probe loop until the run has finished (like `control.watch_until`: it never outlives the run)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe_until_answer, tracker, probe, give_up)
        await finished.wait()
        tg.cancel_scope.cancel()
