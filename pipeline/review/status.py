"""`status --out DIR`: how far an output folder has got, from its files alone.

Status may be run while a run is writing the same folder (from another terminal, or on a shared drive),
so everything here is read-only: no file is locked, repaired or rewritten, and a half-written last CSV row
is simply not counted (`read_table(..., repair=False)`). The manifest is written atomically by the
pipeline, so it is either the old or the new one; what is *done* is counted from captions_all.csv, which
is the pipeline's own record of it, never from the manifest's counters.

A manifest that says "running" is checked: if its process is gone from this machine, or its heartbeat
(`updated_at`) is older than `STALE_AFTER_S`, the run crashed or was killed and is reported as such.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.review.dashboard import fmt_int, fmt_spent, percent, reasons_text
from pipeline.errors import InputError, ReidPromptError, first_line
from pipeline.ledger.costs import Spent, open_failures
from pipeline.ledger.lock import pid_alive
from pipeline.ledger.manifest import read_manifest
from pipeline.ledger.outputs import (
    CAPTIONS_ALL,
    ERRORS,
    MANIFEST,
    error_from_dict,
    read_done,
)

STALE_AFTER_S = 120.0  # a running pipeline rewrites the manifest far more often than this
FINAL_STATES = ("finished", "interrupted", "budget", "failed")

Key = tuple[str, str, int]


# --- small readers -----------------------------------------------------------------------------------

def parse_time(value: object) -> datetime | None:
    """ISO-8601 from the manifest -> aware UTC datetime; 'Z' accepted (Python 3.10's fromisoformat lacks it)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _age(seconds: float, units: tuple[str, str, str, str]) -> str:
    """A duration in the largest unit that keeps it readable: seconds, minutes, hours (to 48), days."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{int(s)}{units[0]}"
    if s < 90 * 60:
        return f"{int(round(s / 60))}{units[1]}"
    if s < 48 * 3600:
        return f"{s / 3600:.1f}{units[2]}"
    return f"{int(s // 86400)}{units[3]}"


def ago(seconds: float | None) -> str:
    """'42s ago', '5 min ago', '3.2 h ago', '2 days ago': how long since the run was last seen."""
    return "unknown" if seconds is None else _age(seconds, ("s ago", " min ago", " h ago", " days ago"))


def local_time(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


# --- the report --------------------------------------------------------------------------------------

@dataclass
class StatusReport:
    """What an output folder holds, and whether the run that wrote it finished."""

    out_dir: Path
    state: str  # finished | interrupted | budget | failed | running | crashed | unknown
    state_detail: str  # one line for people: "crashed (last seen 2024-05-01 10:00:00, 5 min ago)"
    total: int | None  # work items (image x prompt x caption); None when nothing tells
    total_source: str  # "index" | "manifest" | "unknown"
    images_total: int | None
    captioned: int  # distinct (image_id, prompt_name, caption_index) in captions_all.csv + attributes.csv
    images_captioned: int  # distinct image_ids with at least one answer
    failed_by_reason: dict[str, int]  # errors.csv (any run): items that failed and are not captioned since
    cost_usd: float  # sum of cost_usd over captions_all.csv + attributes.csv + errors.csv (billed failures)
    updated_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    last_seen_s: float | None = None
    pid: int | None = None
    stop_reason: str | None = None
    model: str | None = None
    backend: str | None = None
    prompts: list[str] = field(default_factory=list)
    captions_per_image: int | None = None
    runs: int = 0
    torn_bytes: int = 0  # bytes of an incomplete last row (being written now, or torn by a crash)
    warnings: list[str] = field(default_factory=list)
    cost_unknown: int = 0  # billed rows whose cost is unknown (written at an unknown price)
    cost_errors_usd: float = 0.0  # the part of cost_usd paid for answers that were no caption (errors.csv)
    batches: list[dict[str, Any]] = field(default_factory=list)  # the folder's Batch API shards (`batch_rows`)

    @property
    def spent(self) -> Spent:
        return Spent(self.cost_usd, self.cost_unknown)

    @property
    def failed(self) -> int:
        return sum(self.failed_by_reason.values())

    @property
    def left(self) -> int | None:
        """Work items neither captioned nor failed (failed ones are retried by the next run)."""
        if self.total is None:
            return None
        return max(0, self.total - self.captioned - self.failed)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types for `status --json` (times as ISO-8601 UTC)."""

        def iso(dt: datetime | None) -> str | None:
            return None if dt is None else dt.astimezone(timezone.utc).isoformat(timespec="seconds")

        return {
            "out": str(self.out_dir),
            "state": self.state,
            "state_detail": self.state_detail,
            "finished": self.finished,
            "total": self.total,
            "total_source": self.total_source,
            "images_total": self.images_total,
            "captioned": self.captioned,
            "images_captioned": self.images_captioned,
            "failed": self.failed,
            "failed_by_reason": dict(self.failed_by_reason),
            "left": self.left,
            "cost_usd": self.spent.json_value(),  # null when some billed rows have an unknown cost
            "cost_usd_at_least": round(self.cost_usd, 8),
            "cost_unknown_rows": self.cost_unknown,
            "cost_usd_failures": round(self.cost_errors_usd, 8),
            "updated_at": iso(self.updated_at),
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "last_seen_s": None if self.last_seen_s is None else round(self.last_seen_s, 1),
            "pid": self.pid,
            "stop_reason": self.stop_reason,
            "model": self.model,
            "backend": self.backend,
            "prompts": list(self.prompts),
            "captions_per_image": self.captions_per_image,
            "runs": self.runs,
            "torn_bytes": self.torn_bytes,
            "warnings": list(self.warnings),
            "batches": [dict(b) for b in self.batches],
        }


# --- collecting ----------------------------------------------------------------------------------------

def batch_rows(out_dir: Path, now: datetime, warnings: list[str]) -> list[dict[str, Any]]:
    """Each shard of the folder's batch ledger (`pipeline.batch.ledger`, read only): its batch id, the
    ledger's state and the provider's, lines done/failed as the provider last counted them, and age."""
    from pipeline.batch.ledger import BatchLedger

    try:
        ledger = BatchLedger.load(out_dir)
    except ReidPromptError as exc:
        warnings.append(first_line(exc))
        return []
    found = []
    for rec in ledger.shards:
        counts = rec.request_counts or {}
        created = parse_time(rec.created_at)
        found.append({
            "shard": rec.shard_id,
            "batch_id": rec.batch_id,
            "state": rec.state,
            "batch_status": rec.batch_status,
            "round": rec.round,
            "lines": rec.lines,
            "done": _int_or_none(counts.get("completed")),
            "failed": _int_or_none(counts.get("failed")),
            "age_s": None if created is None else round((now - created).total_seconds(), 1),
            "est_cost_usd": rec.est_cost_usd,
        })
    return found


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decide_state(
    manifest: dict[str, Any] | None,
    now: datetime,
    alive: Callable[[int], bool | None] = pid_alive,
) -> tuple[str, str, float | None]:
    """(state, one-line detail, seconds since last heartbeat) from the manifest alone."""
    if manifest is None:
        return "unknown", f"unknown (no readable {MANIFEST})", None
    raw = manifest.get("state")
    updated = parse_time(manifest.get("updated_at"))
    age = None if updated is None else (now - updated).total_seconds()
    if raw != "running":
        state = raw if isinstance(raw, str) and raw else "unknown"
        return state, state, age
    pid = _int_or_none(manifest.get("pid"))
    host = manifest.get("host")
    same_host = not isinstance(host, str) or not host or host == socket.gethostname()
    is_alive = alive(pid) if (pid is not None and same_host) else None
    stale = age is None or age > STALE_AFTER_S
    if is_alive is False or stale:
        seen = f"{local_time(updated)}, {ago(age)}" if updated else "never"
        return "crashed", f"crashed (last seen {seen})", age
    where = "" if same_host else f" on {host}"
    return "running", f"running (pid {pid}{where}, updated {ago(age)})", age


def _resolve_index_path(raw: str, out_dir: Path) -> Path:
    """The manifest's index path; a relative one is tried as given, then next to the output folder."""
    path = Path(raw)
    if path.is_absolute() or path.exists():
        return path
    beside = out_dir / path
    return beside if beside.exists() else path


def _index_images(manifest: dict[str, Any], out_dir: Path, warnings: list[str]) -> int | None:
    """Number of images in the index the manifest names; None (with a warning) if it cannot be read."""
    raw = manifest.get("index")
    if not isinstance(raw, str) or not raw:
        return None
    try:
        from pipeline.data.index import load_index

        loaded = load_index(_resolve_index_path(raw, out_dir), follow_symlinks=True, require_files=False)
    except (ReidPromptError, OSError, ValueError, ImportError) as exc:
        warnings.append(f"index {raw} not readable ({first_line(exc)}); totals from {MANIFEST}")
        return None
    return len(loaded.entries)


def _totals(manifest: dict[str, Any] | None, out_dir: Path, warnings: list[str]) -> tuple[int | None, int | None, str]:
    """(work items, images, source). From the index when readable, scaled by the manifest's items per image."""
    if manifest is None:
        return None, None, "unknown"
    m_total = _int_or_none(manifest.get("work_items_total"))
    m_images = _int_or_none(manifest.get("index_images"))
    images = _index_images(manifest, out_dir, warnings)
    if images is None:
        return m_total, m_images, "manifest" if m_total is not None else "unknown"
    if m_total is not None and m_images:
        per_image = m_total / m_images  # prompts x captions, as the pipeline counted them
    else:
        prompts = manifest.get("prompts")
        n_prompts = len(prompts) if isinstance(prompts, list) and prompts else 1
        cpi = _int_or_none(manifest.get("captions_per_image")) or 1
        per_image = n_prompts * cpi
    return int(round(images * per_image)), images, "index"


def collect_status(
    out_dir: Path,
    *,
    now: datetime | None = None,
    alive: Callable[[int], bool | None] = pid_alive,
) -> StatusReport:
    """Read manifest.json, captions_all.csv, errors.csv and the index; change nothing."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"output folder not found: {out_dir}")
    captions_path = out_dir / CAPTIONS_ALL
    errors_path = out_dir / ERRORS
    manifest_exists = (out_dir / MANIFEST).exists()
    if not manifest_exists and not captions_path.exists() and not errors_path.exists():
        raise InputError(f"{out_dir} holds no reid-prompt run (no {MANIFEST}, {CAPTIONS_ALL} or {ERRORS})")
    now = now or datetime.now(timezone.utc)
    warnings: list[str] = []

    manifest = read_manifest(out_dir)
    if manifest_exists and manifest is None:
        warnings.append(f"{MANIFEST} is unreadable; state unknown")
    if manifest is not None and manifest.get("tool") not in (None, "reid-prompt"):
        warnings.append(f"{MANIFEST} was not written by reid-prompt (tool {manifest.get('tool')!r})")

    done = read_done(out_dir)  # captions, attributes and errors.csv (its billed answers are spent money)
    keys = done.keys
    # errors.csv is append-only across runs: failed = items with a failure row and no caption since
    last_reason = open_failures((error_from_dict(d) for d in done.error_rows), keys)
    by_reason: dict[str, int] = {}
    for reason in last_reason.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    torn = sum(done.cut_bytes.values())
    bad = done.bad_rows
    if bad:
        warnings.append(f"{bad} malformed CSV rows skipped")

    state, detail, age = decide_state(manifest, now, alive)
    total, images_total, source = _totals(manifest, out_dir, warnings)
    m = manifest or {}
    prompts = m.get("prompts")
    names = [p["name"] for p in prompts if isinstance(p, dict) and isinstance(p.get("name"), str)] if isinstance(prompts, list) else []
    runs = m.get("runs")
    stop = m.get("stop_reason")
    return StatusReport(
        out_dir=out_dir,
        state=state,
        state_detail=detail,
        total=total,
        total_source=source,
        images_total=images_total,
        captioned=len(keys),
        images_captioned=len(done.images),
        failed_by_reason=by_reason,
        cost_usd=done.cost_usd,
        cost_unknown=done.cost_unknown,
        cost_errors_usd=done.errors_cost_usd,
        updated_at=parse_time(m.get("updated_at")),
        started_at=parse_time(m.get("started_at")),
        ended_at=parse_time(m.get("ended_at")),
        last_seen_s=age,
        pid=_int_or_none(m.get("pid")),
        stop_reason=stop if isinstance(stop, str) and stop else None,
        model=m.get("model") if isinstance(m.get("model"), str) else None,
        backend=m.get("backend") if isinstance(m.get("backend"), str) else None,
        prompts=names,
        captions_per_image=_int_or_none(m.get("captions_per_image")),
        runs=len(runs) if isinstance(runs, list) else 0,
        torn_bytes=torn,
        warnings=warnings,
        batches=batch_rows(out_dir, now, warnings),
    )


# --- rendering ---------------------------------------------------------------------------------------

_STATE_STYLE = {
    "finished": "bold green",
    "running": "bold cyan",
    "interrupted": "bold yellow",
    "budget": "bold yellow",
    "failed": "bold red",
    "crashed": "bold red",
}


def render_status(report: StatusReport, console: Console) -> None:
    """Print the report as one table. Only file contents are shown; the manifest's base_url is left out
    on purpose (a URL can carry credentials)."""
    t = Table(title=Text(f"reid-prompt status: {report.out_dir}"), box=box.SIMPLE_HEAVY, show_header=False,
              title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    t.add_row("state", Text(report.state_detail, style=_STATE_STYLE.get(report.state, "")))
    if report.stop_reason:
        t.add_row("stop reason", Text(report.stop_reason))
    t.add_row("last run", Text(f"{local_time(report.updated_at)} ({ago(report.last_seen_s)})"
                               if report.updated_at else "-"))
    if report.started_at:
        t.add_row("started", local_time(report.started_at))
    if report.ended_at:
        t.add_row("ended", local_time(report.ended_at))
    if report.model or report.backend:
        t.add_row("model", Text(" / ".join(x for x in (report.backend, report.model) if x)))
    if report.prompts:
        cpi = f", {report.captions_per_image} caption(s) per image" if report.captions_per_image else ""
        t.add_row("prompts", Text(", ".join(report.prompts) + cpi))
    if report.total is None:
        t.add_row("work items", "unknown")
    else:
        imgs = f" ({fmt_int(report.images_total)} images)" if report.images_total is not None else ""
        t.add_row("work items", f"{fmt_int(report.total)}{imgs}, from the {report.total_source}")
    done_pct = f" ({percent(report.captioned, report.total):.1f}%)" if report.total else ""
    t.add_row("captioned", f"{fmt_int(report.captioned)}{done_pct}, {fmt_int(report.images_captioned)} images")
    failed = fmt_int(report.failed)
    if report.failed:
        failed += f" ({reasons_text(report.failed_by_reason)})"
    t.add_row("failed", Text(failed, style="red" if report.failed else ""))
    t.add_row("left", "unknown" if report.left is None else fmt_int(report.left))
    cost = fmt_spent(report.spent)
    if report.cost_errors_usd > 0:
        cost += f" (of which answers that were no caption {fmt_spent(Spent(report.cost_errors_usd))})"
    t.add_row("cost so far", cost)
    if report.runs:
        t.add_row("runs", fmt_int(report.runs))
    open_batches = [b for b in report.batches if b.get("state") in OPEN_BATCH_STATES]
    if open_batches:
        lines = sum(b.get("lines") or 0 for b in open_batches)
        t.add_row("next", f"{len(open_batches)} batch shard(s) not collected yet ({fmt_int(lines)} requests): run "
                          "the same command (--mode batch) to send, wait for and collect them; `cancel --out` "
                          "cancels them")
    elif report.state == "budget":
        t.add_row("next", "raise --max-cost and run the same command again: done items are skipped")
    elif report.state in ("crashed", "interrupted", "failed") or (report.left and report.state != "running"):
        t.add_row("next", "run the same command again to resume: done items are skipped, failed ones retried")
    if report.torn_bytes:
        t.add_row("note", f"last row incomplete ({fmt_int(report.torn_bytes)} bytes): being written, or torn by a crash")
    for w in report.warnings:
        t.add_row("warning", Text(w, style="yellow"))
    console.print(t)
    if report.batches:
        console.print(render_batches(report.batches))


OPEN_BATCH_STATES = frozenset({"planned", "uploaded", "submitted", "waiting", "ended"})  # the batch run's to finish


def short_age(seconds: float | None) -> str:
    """'42s', '5m', '3.2h', '2d': a batch's age in a narrow column (a batch lives up to 24 h or so)."""
    return "-" if seconds is None else _age(seconds, ("s", "m", "h", "d"))


def batch_state_text(b: dict[str, Any]) -> str:
    """A shard's state in a few words: the provider's status while its batch is in flight, ours otherwise
    (with the provider's last word when it was not `completed`: an expired or cancelled batch)."""
    state, status = b.get("state"), b.get("batch_status")
    if state == "submitted":
        return status or "submitted"
    if state == "ended":
        return f"{status or 'ended'}, to collect"
    if state == "collected":
        return "collected" if status in (None, "completed") else f"collected ({status})"
    return {"planned": "planned, not sent", "waiting": "waiting (token limit)",
            "local": "local file"}.get(state, str(state))


def render_batches(batches: list[dict[str, Any]]) -> Table:
    """The folder's batches, one row each: shard (`r2`: its round, for a re-submission), batch id, state,
    lines, done/failed, age. Fits 80 columns with OpenAI's 30-character batch ids: the ids and numbers
    never wrap, the state wraps if it must."""
    t = Table(title="batches (as a run of this folder last saw them)", box=box.SIMPLE_HEAVY, title_justify="left",
              show_edge=False, padding=(0, 0))  # (the box draws a space between columns)
    for name in ("shard", "batch", "state", "lines", "done", "failed", "age"):
        t.add_column(name, no_wrap=name != "state", justify="right" if name in ("lines", "done", "failed", "age")
                     else "left", min_width=11 if name == "state" else None)
    for b in batches:
        shard = b["shard"] if (b.get("round") or 1) <= 1 else f"{b['shard']} r{b['round']}"
        t.add_row(shard, Text(b.get("batch_id") or "-"), Text(batch_state_text(b)), fmt_int(b["lines"]),
                  "-" if b.get("done") is None else fmt_int(b["done"]),
                  "-" if b.get("failed") is None else fmt_int(b["failed"]), short_age(b.get("age_s")))
    return t
