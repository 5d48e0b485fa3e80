"""manifest.json: what a run was and how it ended. Written atomically; never holds the API key.

The manifest is informational (status, provenance). What is done is decided by captions_all.csv, never
by the manifest, so a crash between the two loses nothing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.ledger.costs import Spent
from pipeline.outputs import MANIFEST

if TYPE_CHECKING:
    from pipeline.stats import RunStats


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(out_dir: Path, data: dict[str, Any]) -> None:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(MANIFEST + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    for attempt in range(5):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:  # Windows: a reader (status, an editor, antivirus) holds the file a moment
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def base_manifest(previous: dict[str, Any] | None) -> dict[str, Any]:
    """Fields every manifest has; `runs` carries the history of earlier runs into this folder."""
    return {
        "tool": "reid-prompt",
        "version": __version__,
        "state": "running",
        "started_at": now_iso(),
        "updated_at": now_iso(),
        "ended_at": None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "runs": list((previous or {}).get("runs", [])),
    }


class ManifestKeeper:
    """Keeps manifest.json: what the run is (`facts`, fixed at start) and the counters as it goes.

    The runner describes the run (`facts`: index, inputs, prompts, model, limits, price); the keeper adds
    the history, the state and the counters. Only the writer's heartbeat and the run's end call `save`.
    """

    def __init__(self, out_dir: Path, facts: dict[str, Any], stats: "RunStats", cost_before: float,
                 previous: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.stats = stats
        self.cost_before = cost_before
        self.data = base_manifest(previous)
        if previous and isinstance(previous.get("changes"), list):
            self.data["changes"] = list(previous["changes"])
        self.data.update(facts)
        self.data.setdefault("stop_reason", None)
        self.data["cost_usd_before"] = round(cost_before, 8)
        self.data["run_id"] = stats.run_id

    def record_changes(self, changes: list[dict[str, Any]]) -> None:
        """--allow-changes: what changed, kept with the history of the folder."""
        if changes:
            self.data.setdefault("changes", []).append({"at": now_iso(), "changes": changes})

    def save(self, state: str | None = None) -> None:
        s = self.stats
        d = self.data
        d["updated_at"] = now_iso()
        if state is not None:
            d["state"] = state
            d["ended_at"] = now_iso() if state != "running" else None
        d["counts"] = {
            "captioned_this_run": s.done,
            "skipped_done": s.skipped,
            "failed_this_run": s.failed_total,
            "failed_by_reason": dict(s.failed_by_reason),
            "requests": s.requests,
            "retries": s.retries,
            "rate_limited": s.rate_limited,
        }
        d["tokens"] = {"input": s.tokens_in, "output": s.tokens_out}
        d.update(cost_fields(Spent(self.cost_before, s.cost_before_unknown), s.spent_run, s.price_known,
                             s.cost_unknown))
        d["stop_reason"] = s.stop_reason
        d["learned_limits"] = {"rpm": s.rpm_limit, "tpm": s.tpm_limit}
        write_manifest(self.out_dir, d)

    def finish(self, state: str) -> None:
        self.data["runs"] = self.data.get("runs", []) + [{
            "started_at": self.data["started_at"],
            "ended_at": now_iso(),
            "state": state,
            "captioned": self.stats.done,
            "failed": self.stats.failed_total,
            "cost_usd": self.stats.spent_run.json_value(),
            "run_id": self.stats.run_id,
        }]
        self.save(state)


def cost_fields(before: Spent, this_run: Spent, price_known: bool, unknown_answers: int = 0) -> dict[str, Any]:
    """The manifest's money: spent before this run, by this run, and the folder's total.

    Each is a number when every billed row's cost is known, else null (never a false 0), with
    `cost_usd_total_at_least` (the known part) and `cost_unknown_rows` beside it. Billed failures
    (errors.csv) are in all three, as in `outputs.read_done`. `unknown_answers`: this run's answers of
    unknown cost.
    """
    total = before + this_run
    fields: dict[str, Any] = {
        "price_known": price_known,
        "cost_usd_before": before.json_value(),
        "cost_usd_this_run": this_run.json_value(),
        "cost_usd_total": total.json_value(),
    }
    if not total.complete:
        fields["cost_usd_total_at_least"] = round(total.usd, 8)
        fields["cost_unknown_rows"] = before.unknown + unknown_answers
    return fields
