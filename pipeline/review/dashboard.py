"""The views of a run: the live dashboard, the plain progress lines and the final summary.

Every view is a pure function of a `Snapshot` (or a thin object that asks `RunStats.snapshot()` when told
to refresh), so a view can never slow down, block or break the pipeline: the pipeline only updates
counters and calls `refresh()` from its own event loop; nothing here starts a thread.

All text that comes from the outside world (captions, image ids, error reasons, stop reasons) is put on
screen as `rich.text.Text`, never as markup, so a caption holding `[bold]` or `:smile:` shows as written.
Nothing here reads the run configuration, so the API key cannot reach the screen through a view.
Only ASCII box styles and characters that Windows Terminal shows are used (no emoji).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Callable

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pipeline.ledger.costs import Spent
from pipeline.run.outage import outage_text
from pipeline.ledger.outputs import CAPTIONS_ALL, ERRORS, MANIFEST
from pipeline.run.stats import RunStats, Snapshot

CAPTION_CHARS = 80  # a caption on the dashboard is cut to one line of about this many characters
IMAGE_ID_CHARS = 44  # image ids are cut from the left: the file name is the part that tells images apart
_WS = re.compile(r"\s+")


# --- formatting (shared by the status and estimate views) ------------------------------------------

def fmt_int(n: int | float) -> str:
    """1234567 -> '1,234,567': large counts are read at a glance during a 100,000-image run."""
    return f"{int(round(n)):,}"


def fmt_usd(x: float) -> str:
    """Dollars: 4 decimals below $1 (a few images cost fractions of a cent), else 2."""
    return f"${x:,.4f}" if abs(x) < 1 else f"${x:,.2f}"


def fmt_spent(spent: Spent) -> str:
    """Money spent, honest about unknown prices: '$0.0412', 'cost unknown', 'at least $0.0412 (some unknown)'.

    ASCII only: a plain progress line may go to a Windows console in a code page without '≥'.
    """
    if spent.complete:
        return fmt_usd(spent.usd)
    if spent.usd <= 0:
        return "cost unknown"
    return f"at least {fmt_usd(spent.usd)} (some unknown)"


def fmt_hms(seconds: float | None, *, pad: bool = True) -> str:
    """Seconds as HH:MM:SS (pad) or H:MM:SS; '--:--:--' when unknown (no rate yet)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:02d}:{m:02d}:{sec:02d}" if pad else f"{h}:{m:02d}:{sec:02d}"


def fmt_rate(x: float) -> str:
    """A rate with one decimal below 100 (img/s), none above (req/min, tokens/min)."""
    return f"{x:,.1f}" if x < 100 else fmt_int(x)


def fmt_limit(limit: float | None) -> str:
    return "no limit" if limit is None else f"limit {fmt_int(limit)}"


def fmt_seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def one_line(text: str, limit: int = CAPTION_CHARS) -> str:
    """A caption as one short line: newlines and runs of spaces become one space, cut at `limit` with '…'.

    The ellipsis is the same character rich uses when a table column is narrower still, so a caption
    cut twice still ends in a single '…'.
    """
    flat = _WS.sub(" ", text).strip()
    flat = "".join(ch if ch.isprintable() else " " for ch in flat)
    if len(flat) <= limit:
        return flat
    return flat[: max(0, limit - 1)].rstrip() + "\u2026"


def keep_tail(text: str, limit: int = IMAGE_ID_CHARS) -> str:
    """'...0049_c1s1_000451_03.jpg': cut a long id from the left, keeping its distinctive end."""
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def items_finished(snap: Snapshot) -> int:
    """Work items that need nothing more from this run: done before, captioned now, or failed now."""
    return snap.skipped + snap.done + snap.failed


def percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else 100.0


def reasons_text(by_reason: dict[str, int]) -> str:
    """'timeout 2, refused 1', largest first; 'none' when empty."""
    if not by_reason:
        return "none"
    items = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{reason} {fmt_int(n)}" for reason, n in items)


def stop_reason_text(snap: Snapshot) -> str | None:
    """The stop reason in words: the pipeline stores a code ("interrupted", "budget", "fatal: ...")."""
    reason = snap.stop_reason
    if not reason:
        return None
    if reason.startswith("interrupted"):
        # "interrupted" (Ctrl-C), "interrupted: SIGTERM", either + " (immediately)" after a second signal
        rest = reason[len("interrupted") :]
        who = "Ctrl-C"
        if rest.startswith(":"):
            who, _, rest = rest[1:].strip().partition(" ")
        rest = rest.strip()
        return f"{who} {rest}" if rest else who
    if reason == "budget":
        if snap.max_cost is not None:
            return f"budget of {fmt_usd(snap.max_cost)} reached"
        return "budget reached"
    return reason


def cost_text(snap: Snapshot) -> str:
    """'$0.0412 (proj. $0.3296, folder $1.20, budget $5.00)': spent by this run, where it is heading, the
    folder's total when earlier runs spent there too (what the budget counts), and the cap.

    Every billed answer counts, refused and empty ones too; an unknown price reads 'cost unknown'.
    """
    extra = []
    if snap.projected_cost_usd is not None:
        extra.append(f"proj. {fmt_usd(snap.projected_cost_usd)}")
    if snap.cost_before_usd > 0 or snap.cost_before_unknown:
        extra.append(f"folder {fmt_spent(snap.spent_folder)}")
    if snap.max_cost is not None:
        extra.append(f"budget {fmt_usd(snap.max_cost)}")
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"{fmt_spent(snap.spent_run)}{tail}"


# --- the live dashboard ------------------------------------------------------------------------------

def _progress_row(snap: Snapshot) -> Table:
    finished = items_finished(snap)
    grid = Table.grid(padding=(0, 2), expand=True)
    grid.add_column(ratio=1)
    grid.add_column(no_wrap=True, justify="right")
    bar = ProgressBar(total=max(1, snap.total), completed=min(finished, max(1, snap.total)))
    label = Text(
        f"{fmt_int(finished)}/{fmt_int(snap.total)} ({percent(finished, snap.total):.1f}%)"
        f"  elapsed {fmt_hms(snap.elapsed_s)}  ETA {fmt_hms(snap.eta_s)}"
    )
    grid.add_row(bar, label)
    return grid


WIDE = 100  # from this many columns the figures go two pairs per row, else one


def _figure_pairs(snap: Snapshot) -> list[tuple[str, Text]]:
    """(label, value) of every figure, in reading order: what the run is doing and against which limits."""
    done_txt = Text(
        f"{fmt_int(snap.done)} captioned, {fmt_int(snap.skipped)} skipped (already done), "
        f"{fmt_int(snap.failed)} failed, {fmt_int(snap.remaining)} left"
    )
    throughput = Text(f"{fmt_rate(snap.images_per_s)} img/s")
    rpm = Text(f"{fmt_rate(snap.requests_per_min)} req/min ({fmt_limit(snap.rpm_limit)})")
    tpm = Text(f"{fmt_rate(snap.tokens_per_min)} tokens/min ({fmt_limit(snap.tpm_limit)})")
    cost = Text(cost_text(snap))
    if snap.max_cost is not None and snap.spent_folder.usd >= snap.max_cost:
        cost.stylize("bold red")
    flight = Text(flight_text(snap))
    retries = Text(f"{fmt_int(snap.retries)} retries, {fmt_int(snap.rate_limited)} x 429")
    if snap.paused_s > 0:
        retries.append(f", paused {math.ceil(snap.paused_s)}s", style="bold yellow")
    errors = Text(reasons_text(snap.failed_by_reason), style="red" if snap.failed else "")
    latency = Text(f"p50 {fmt_seconds(snap.latency_p50)}  p95 {fmt_seconds(snap.latency_p95)}")
    tokens = Text(f"{fmt_int(snap.tokens_in)} in / {fmt_int(snap.tokens_out)} out")
    return [
        ("items", done_txt),
        ("images/s", throughput),
        ("requests", rpm),
        ("tokens", tpm),
        ("cost", cost),
        ("in flight", flight),
        ("retries", retries),
        ("latency", latency),
        ("errors", errors),
        ("tokens used", tokens),
    ]


class _Figures:
    """The figures grid, laid out when rich knows the width: two pairs per row on a wide terminal."""

    def __init__(self, snap: Snapshot) -> None:
        self.pairs = _figure_pairs(snap)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        per_row = 2 if options.max_width >= WIDE else 1
        t = Table.grid(padding=(0, 2))
        for _ in range(per_row):
            t.add_column(style="bold", no_wrap=True)
            t.add_column()
        for i in range(0, len(self.pairs), per_row):
            cells: list[RenderableType] = []
            for label, value in self.pairs[i : i + per_row]:
                cells.extend([label, value])
            t.add_row(*cells)
        yield t


def stopping_text(snap: Snapshot, reason: str) -> str:
    """'stopping: Ctrl-C — finishing 12 answers in flight' while answers are still due, 'stopped: ...' after."""
    waits = not reason.startswith("fatal") and "immediately" not in reason
    if snap.in_flight > 0 and waits:
        return f"stopping: {reason} — finishing {fmt_int(snap.in_flight)} answers in flight"
    return f"stopped: {reason}"


def _captions_table(snap: Snapshot) -> Table:
    t = Table(box=box.SIMPLE, show_edge=False, expand=True, title="last captions", title_justify="left")
    t.add_column("image", no_wrap=True, overflow="ellipsis", max_width=IMAGE_ID_CHARS)
    t.add_column("caption", no_wrap=True, overflow="ellipsis", ratio=1)
    for image_id, caption in reversed(snap.last_captions):  # newest first
        t.add_row(Text(keep_tail(image_id)), Text(one_line(caption)))
    return t


def render_dashboard(snap: Snapshot, *, title: str = "reid-prompt") -> RenderableType:
    """The whole dashboard as one renderable, rebuilt on every refresh (so nothing flickers or drifts)."""
    parts: list[RenderableType] = [_progress_row(snap), _Figures(snap)]
    if snap.last_captions:
        parts.append(_captions_table(snap))
    if snap.outage_s is not None:
        parts.append(Text(outage_text(snap.outage_s, snap.outage_why), style="bold yellow"))
    if snap.write_warning:
        parts.append(Text(snap.write_warning, style="bold red"))
    reason = stop_reason_text(snap)
    if reason:
        parts.append(Text(stopping_text(snap, reason), style="bold yellow"))
    return Panel(Group(*parts), title=Text(title), title_align="left", box=box.ROUNDED)


# --- views the runner drives ---------------------------------------------------------------------------

class LiveView:
    """A rich Live dashboard redrawn only when `refresh()` is called (no thread of its own).

    The pipeline's event loop calls `refresh()` as often as it likes; redraws are capped at
    `refresh_per_second`, so a tight loop costs one timestamp comparison per call.
    """

    def __init__(
        self,
        stats: RunStats,
        console: Console,
        refresh_per_second: float = 4.0,
        *,
        title: str = "reid-prompt",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.console = console
        self.interval_s = 1.0 / refresh_per_second if refresh_per_second > 0 else 0.0
        self.title = title
        self._clock = clock
        self._last_draw: float | None = None
        self._live: Live | None = None

    def _render(self) -> RenderableType:
        return render_dashboard(self.stats.snapshot(), title=self.title)

    def start(self) -> None:
        if self._live is not None:
            return
        self._live = Live(
            self._render(), console=self.console, auto_refresh=False, transient=False
        )
        self._live.start(refresh=True)
        self._last_draw = self._clock()

    def refresh(self, *, force: bool = False) -> None:
        """Redraw from a fresh snapshot, unless the last redraw was less than one interval ago."""
        if self._live is None:
            return
        now = self._clock()
        # 10 % slack: a caller ticking at exactly the interval must not lose every other frame to jitter
        if not force and self._last_draw is not None and now - self._last_draw < 0.9 * self.interval_s:
            return
        self._live.update(self._render(), refresh=True)
        self._last_draw = now

    def stop(self) -> None:
        """Draw the final state once more and leave it on screen."""
        if self._live is None:
            return
        live, self._live = self._live, None
        try:
            live.update(self._render(), refresh=True)
        finally:
            live.stop()  # always give the terminal back (cursor, line discipline), even if drawing failed

    def __enter__(self) -> "LiveView":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def flight_text(snap: Snapshot) -> str:
    """'3 / 16', or with the adaptive limit of a server without rate-limit headers '3 / limit 5 of 16'."""
    if snap.concurrency_limit is None:
        return f"{fmt_int(snap.in_flight)} / {fmt_int(snap.concurrency)}"
    return f"{fmt_int(snap.in_flight)} / limit {fmt_int(snap.concurrency_limit)} of {fmt_int(snap.concurrency)}"


def progress_line(snap: Snapshot) -> str:
    """One plain progress line, for logs and terminals without a dashboard."""
    finished = items_finished(snap)
    parts = [
        f"[{fmt_hms(snap.elapsed_s)}] {fmt_int(finished)}/{fmt_int(snap.total)} done "
        f"({percent(finished, snap.total):.1f}%)",
        f"{fmt_int(snap.failed)} failed",
        f"{fmt_rate(snap.images_per_s)} img/s",
        f"{fmt_rate(snap.requests_per_min)} req/min ({fmt_limit(snap.rpm_limit)})",
        cost_text(snap),
        f"ETA {fmt_hms(snap.eta_s)}",
    ]
    if snap.concurrency_limit is not None:
        parts.append(f"in flight {flight_text(snap)}")
    if snap.paused_s > 0:
        parts.append(f"paused {math.ceil(snap.paused_s)}s after 429")
    if snap.outage_s is not None:
        parts.append(outage_text(snap.outage_s, snap.outage_why))
    if snap.write_warning:
        parts.append(snap.write_warning)
    reason = stop_reason_text(snap)
    if reason:
        parts.append(f"stopping: {reason}")
    return " | ".join(parts)


class PlainView:
    """Plain progress lines: at most one every `every_s` seconds, and one final line on `stop()`.

    Printed without markup or highlighting, so a log file or a CI console gets exactly the text.
    """

    def __init__(
        self,
        stats: RunStats,
        console: Console,
        every_s: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.console = console
        self.every_s = every_s
        self.interval_s = every_s  # how often the runner needs to call refresh()
        self._clock = clock
        self._last_print: float | None = None
        self._started = False

    def _print(self) -> None:
        line = progress_line(self.stats.snapshot())
        self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        self._last_print = self._clock()

    def start(self) -> None:
        """Start the clock; the first line comes `every_s` seconds later (a run that ends sooner gets only the final one)."""
        self._started = True
        self._last_print = self._clock()

    def refresh(self, *, force: bool = False) -> None:
        if not self._started:
            return
        now = self._clock()
        if force or self._last_print is None or now - self._last_print >= self.every_s:
            self._print()

    def stop(self) -> None:
        if not self._started:
            return
        self._print()
        self._started = False

    def __enter__(self) -> "PlainView":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_view(
    stats: RunStats,
    console: Console | None = None,
    *,
    dashboard: bool = True,
    every_s: float = 5.0,
) -> LiveView | PlainView:
    """The dashboard on an interactive terminal, plain lines everywhere else (pipes, logs, CI, dumb terminals).

    The default console writes to stderr so that stdout stays free for anything a user pipes.
    """
    console = console if console is not None else Console(stderr=True)
    if dashboard and console.is_terminal and not console.is_dumb_terminal:
        return LiveView(stats, console)
    return PlainView(stats, console, every_s=every_s)


async def refresh_until_cancelled(view: LiveView | PlainView) -> None:
    """Call `view.refresh()` every interval; start it in the run's task group and cancel it at the end."""
    import anyio

    interval = max(0.05, min(view.interval_s or 0.25, 1.0))
    while True:
        view.refresh()
        await anyio.sleep(interval)


# --- the end of a run -------------------------------------------------------------------------------

def _cost_words(spent: Spent) -> str:
    """After 'cost ': '$0.0412', 'unknown', 'at least $0.0412 (some unknown)'."""
    text = fmt_spent(spent)
    return "unknown" if text == "cost unknown" else text


def summary_line(snap: Snapshot) -> str:
    """ONE plain line for the end of a run (also what a log keeps)."""
    line = (
        f"captioned {fmt_int(snap.done)}, skipped {fmt_int(snap.skipped)} (already done), "
        f"failed {fmt_int(snap.failed)}, elapsed {fmt_hms(snap.elapsed_s, pad=False)}, "
        f"cost {_cost_words(snap.spent_run)}"
    )
    reason = stop_reason_text(snap)
    if reason:
        line += f" — stopped: {reason}"
    return line


def render_summary(snap: Snapshot, out_dir: Path) -> RenderableType:
    """The final table: what this run did, what it cost, why it stopped, and where the files are."""
    out_dir = Path(out_dir)
    t = Table(title="reid-prompt run summary", box=box.SIMPLE_HEAVY, show_header=False, title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    rate = snap.done / snap.elapsed_s if snap.elapsed_s > 0 else 0.0
    t.add_row("captioned this run", fmt_int(snap.done))
    t.add_row("skipped (already done)", fmt_int(snap.skipped))
    t.add_row("failed", Text(f"{fmt_int(snap.failed)}" + (f" ({reasons_text(snap.failed_by_reason)})" if snap.failed else "")))
    t.add_row("left", fmt_int(snap.remaining))
    t.add_row("requests", fmt_int(snap.requests))
    t.add_row("retries", fmt_int(snap.retries))
    t.add_row("429 answers", fmt_int(snap.rate_limited))
    t.add_row("tokens in / out", f"{fmt_int(snap.tokens_in)} / {fmt_int(snap.tokens_out)}")
    cost = fmt_spent(snap.spent_run)
    if snap.cost_before_usd > 0 or snap.cost_before_unknown:
        cost += f" (folder total {fmt_spent(snap.spent_folder)})"
    if snap.max_cost is not None:
        cost += f" (budget {fmt_usd(snap.max_cost)})"
    t.add_row("cost", cost)
    t.add_row("elapsed", fmt_hms(snap.elapsed_s, pad=False))
    t.add_row("rate", f"{fmt_rate(rate)} img/s")
    reason = stop_reason_text(snap)
    t.add_row("stop reason", Text(reason) if reason else Text("none (ran to the end)"))
    t.add_row("captions", Text(str(out_dir / CAPTIONS_ALL)))
    if snap.failed:
        t.add_row("errors", Text(str(out_dir / ERRORS)))
    t.add_row("manifest", Text(str(out_dir / MANIFEST)))
    return t
