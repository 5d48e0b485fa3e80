"""The run's views: dashboard, plain lines, summary. Figures must be on screen; nothing may read the config."""

from __future__ import annotations

import inspect
import io
import re
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

import pipeline.review.dashboard as dashboard
from pipeline.review.dashboard import (
    LiveView,
    PlainView,
    make_view,
    one_line,
    progress_line,
    render_dashboard,
    render_summary,
    summary_line,
)
from pipeline.run.stats import RunStats, Snapshot

ANSI = re.compile(r"\x1b\[")


def snap(**kw: object) -> Snapshot:
    """A Snapshot with fixed figures (no clock involved), overridden by `kw`."""
    base = RunStats(total=10_000).snapshot()
    fixed = dict(
        skipped=0,
        done=0,
        failed=0,
        failed_by_reason={},
        in_flight=0,
        concurrency=16,
        elapsed_s=65.0,
        images_per_s=0.0,
        requests_per_min=0.0,
        tokens_per_min=0.0,
        projected_cost_usd=None,
        latency_p50=None,
        latency_p95=None,
        last_captions=[],
        paused_s=0.0,
    )
    fixed.update(kw)
    return replace(base, **fixed)


def draw(renderable: object, width: int = 120) -> str:
    console = Console(record=True, width=width, force_terminal=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- the dashboard -----------------------------------------------------------------------------------

def test_dashboard_shows_the_figures_of_runstats() -> None:
    stats = RunStats(total=1_000, skipped=100, concurrency=8, max_cost=2.0)
    stats.rpm_limit = 500
    stats.tpm_limit = 200_000
    for i in range(20):
        stats.request_sent()
        stats.usage(3_000, 60, 0.001)
        stats.captioned(f"query/{i:04d}_c1s1_000451_03.jpg", f"caption number {i}\nsecond line", 1.0 + i / 10)
    stats.failed("timeout", 2)
    stats.failed("refused")
    stats.retry()
    stats.got_429()
    stats.in_flight = 3
    text = draw(render_dashboard(stats.snapshot()))

    assert "123/1,000" in text  # 100 skipped + 20 done + 3 failed
    assert "20 captioned" in text and "100 skipped" in text and "877 left" in text
    assert "limit 500" in text
    assert "limit 200,000" in text
    assert "$0.0200" in text and "budget $2.00" in text and "proj." in text
    assert "3 / 8" in text
    assert "timeout 2, refused 1" in text
    assert "1 retries, 1 x 429" in text
    assert "p50" in text and "p95" in text
    assert "caption number 19 second line" in text  # newline gone, one line
    assert "query/0019_c1s1_000451_03.jpg" in text
    assert "caption number 14" not in text  # only the last few (keep_captions=5)
    assert "paused" not in text


def test_dashboard_rates_limits_eta_and_pause() -> None:
    s = snap(
        done=1_234,
        images_per_s=18.9,
        requests_per_min=1_130,
        rpm_limit=1_200,
        tokens_per_min=45_000,
        tpm_limit=None,
        paused_s=4.2,
        latency_p50=1.234,
        latency_p95=3.4,
    )
    text = draw(render_dashboard(s, title="market1501 run"))
    assert "market1501 run" in text
    assert "1,234/10,000 (12.3%)" in text
    assert "18.9 img/s" in text
    assert "1,130 req/min (limit 1,200)" in text
    assert "45,000 tokens/min (no limit)" in text
    assert "paused 5s" in text
    assert "ETA 00:07:44" in text  # 8,766 left at 18.9/s
    assert "p50 1.23s" in text and "p95 3.40s" in text
    assert "errors" in text and "none" in text


def test_dashboard_without_limits_or_rate_says_so() -> None:
    text = draw(render_dashboard(snap(rpm_limit=None, tpm_limit=None)))
    assert "req/min (no limit)" in text
    assert "tokens/min (no limit)" in text
    assert "ETA --:--:--" in text


def test_captions_are_shortened_to_one_line_and_shown_literally() -> None:
    long = "A woman in a [bold]red[/bold] coat :smile:\n\nwith a black   bag " + "and more words " * 20
    s = snap(last_captions=[("img/a.jpg", long)])
    text = draw(render_dashboard(s), width=200)
    line = next(ln for ln in text.splitlines() if "img/a.jpg" in ln)
    assert "A woman in a [bold]red[/bold] coat :smile: with a black bag" in line  # no markup, no emoji
    assert "\u2026" in line and ".\u2026" not in line
    assert len(one_line(long)) <= 80


def test_one_line() -> None:
    assert one_line("a\nb  c\td\r\n") == "a b c d"
    assert one_line("x" * 200).endswith("\u2026") and len(one_line("x" * 200)) == 80
    assert one_line("short") == "short"


def test_long_image_ids_keep_their_file_name() -> None:
    image_id = "some/very/long/folder/structure/of/a/dataset/bounding_box_train/0002_c1s1_000451_03.jpg"
    text = draw(render_dashboard(snap(last_captions=[(image_id, "a man")])))
    assert "0002_c1s1_000451_03.jpg" in text


@pytest.mark.parametrize(
    "reason, in_flight, expected",
    [
        ("interrupted", 2, "stopping: Ctrl-C — finishing 2 answers in flight"),
        ("interrupted", 0, "stopped: Ctrl-C"),
        ("interrupted (immediately)", 3, "stopped: Ctrl-C (immediately)"),
        ("budget", 1, "stopping: budget of $5.00 reached — finishing 1 answers in flight"),
        ("fatal: 401 invalid key", 4, "stopped: fatal: 401 invalid key"),
    ],
)
def test_stop_reason_is_shown(reason: str, in_flight: int, expected: str) -> None:
    text = draw(render_dashboard(snap(stop_reason=reason, in_flight=in_flight, max_cost=5.0)))
    assert expected in text


def test_dashboard_fits_a_narrow_terminal_without_error() -> None:
    s = snap(done=5, last_captions=[("a.jpg", "x " * 100)], failed_by_reason={"timeout": 1}, failed=1)
    text = draw(render_dashboard(s), width=60)
    assert all(len(line) <= 60 for line in text.splitlines())


# --- plain lines -------------------------------------------------------------------------------------

def test_progress_line_format() -> None:
    s = snap(
        done=1_234,
        images_per_s=18.9,
        requests_per_min=1_130,
        rpm_limit=1_200,
        cost_usd=0.0412,
        projected_cost_usd=0.33,
    )
    assert progress_line(s) == (
        "[00:01:05] 1,234/10,000 done (12.3%) | 0 failed | 18.9 img/s | 1,130 req/min (limit 1,200)"
        " | $0.0412 (proj. $0.3300) | ETA 00:07:44"
    )
    stopped = progress_line(replace(s, stop_reason="interrupted", paused_s=2.0, rpm_limit=None))
    assert "(no limit)" in stopped and "paused 2s" in stopped and stopped.endswith("stopping: Ctrl-C")


def test_plain_view_rate_limits_lines_and_prints_no_ansi() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=40)  # narrow: lines must still not wrap
    stats = RunStats(total=100, concurrency=4)
    clock = Clock()
    view = PlainView(stats, console, every_s=5.0, clock=clock)
    view.refresh()  # before start: nothing
    view.start()
    view.refresh()
    assert out.getvalue() == ""
    clock.t += 5.0
    stats.captioned("a.jpg", "[red]a man[/red]", 1.0)
    view.refresh()
    clock.t += 1.0
    view.refresh()  # too soon
    clock.t += 4.0
    view.refresh()
    view.stop()
    view.stop()  # idempotent
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # two timed lines + the final one
    assert not ANSI.search(out.getvalue())
    assert all(re.match(r"^\[\d\d:\d\d:\d\d\] 1/100 done \(1\.0%\) \| 0 failed \| ", ln) for ln in lines)


def test_make_view_picks_plain_unless_an_interactive_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    stats = RunStats(total=1)
    not_tty = Console(file=io.StringIO(), force_terminal=False)
    tty = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(make_view(stats, not_tty), PlainView)
    assert isinstance(make_view(stats, tty, dashboard=False), PlainView)
    assert isinstance(make_view(stats, tty), LiveView)
    plain = make_view(stats, not_tty, every_s=2.5)
    assert isinstance(plain, PlainView) and plain.every_s == 2.5
    monkeypatch.setenv("TERM", "dumb")
    assert isinstance(make_view(stats, Console(file=io.StringIO(), force_terminal=True)), PlainView)


class CountingStats(RunStats):
    snapshots: int = 0

    def snapshot(self) -> Snapshot:
        self.snapshots += 1
        return super().snapshot()


def test_live_view_redraws_on_refresh_at_most_at_its_rate() -> None:
    console = Console(record=True, width=120, force_terminal=True, file=io.StringIO())
    stats = CountingStats(total=50, concurrency=2)
    clock = Clock()
    view = LiveView(stats, console, refresh_per_second=4.0, clock=clock)
    view.refresh()  # not started: no-op
    assert stats.snapshots == 0
    view.start()
    first = stats.snapshots
    stats.captioned("cam1/0001.jpg", "a person in a grey hoodie", 0.5)
    view.refresh()  # within 0.25 s of the first draw: skipped
    assert stats.snapshots == first
    clock.t += 0.25
    view.refresh()
    assert stats.snapshots == first + 1
    view.stop()
    view.stop()
    text = console.export_text()
    assert "1/50" in text
    assert "a person in a grey hoodie" in text


# --- summary -----------------------------------------------------------------------------------------

def test_summary_line() -> None:
    s = snap(done=1_200, skipped=300, failed=3, failed_by_reason={"timeout": 3}, elapsed_s=62.0, cost_usd=0.0123)
    assert summary_line(s) == "captioned 1,200, skipped 300 (already done), failed 3, elapsed 0:01:02, cost $0.0123"
    assert summary_line(replace(s, stop_reason="interrupted")).endswith(" — stopped: Ctrl-C")
    assert summary_line(replace(s, stop_reason="budget", max_cost=1.0)).endswith(" — stopped: budget of $1.00 reached")
    assert "\n" not in summary_line(replace(s, elapsed_s=3 * 3600 + 5))


def test_summary_table(tmp_path: Path) -> None:
    s = snap(
        done=1_200,
        skipped=300,
        failed=3,
        failed_by_reason={"timeout": 2, "refused": 1},
        requests=1_250,
        retries=50,
        rate_limited=7,
        tokens_in=3_400_000,
        tokens_out=72_000,
        cost_usd=0.5532,
        elapsed_s=62.0,
        stop_reason="budget",
        max_cost=0.55,
    )
    text = draw(render_summary(s, tmp_path / "out"), width=200)
    for expected in [
        "captioned this run",
        "1,200",
        "skipped (already done)",
        "300",
        "timeout 2, refused 1",
        "1,250",
        "429 answers",
        "3,400,000 / 72,000",
        "$0.5532 (budget $0.5500)",
        "0:01:02",
        "19.4 img/s",
        "budget of $0.5500 reached",
        str(tmp_path / "out" / "captions_all.csv"),
        str(tmp_path / "out" / "errors.csv"),
        str(tmp_path / "out" / "manifest.json"),
    ]:
        assert expected in text, expected


def test_summary_of_a_clean_run_has_no_errors_file_and_no_stop_reason(tmp_path: Path) -> None:
    text = draw(render_summary(snap(done=10, elapsed_s=5.0), tmp_path), width=200)
    assert "errors.csv" not in text
    assert "none (ran to the end)" in text


# --- the API key ---------------------------------------------------------------------------------------

def test_views_never_read_the_config() -> None:
    source = inspect.getsource(dashboard)
    assert "api_key" not in source
    assert "pipeline.config" not in source
    # A key-like string in a caption is the model's text, shown as is; nothing else could carry a key.
    text = draw(render_dashboard(snap(last_captions=[("a.jpg", "sk-test-123 on a sign")])))
    assert "sk-test-123 on a sign" in text
