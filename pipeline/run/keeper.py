"""Keeping manifest.json up to date during a run: the run's facts, then its counters and how it ended.

The file itself (reading, atomic writing, the money fields) is `pipeline.ledger.manifest`; this module is
the run's side of it, so the ledger never needs to know the run's counters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.ledger.costs import Spent
from pipeline.ledger.manifest import base_manifest, cost_fields, now_iso, write_manifest
from pipeline.providers.capabilities import merge_learned
from pipeline.run.stats import RunStats


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
        # what earlier runs learned of the server holds only for the same server and model
        same = bool(previous) and all(previous.get(k) == facts.get(k) for k in ("base_url", "model"))
        self.learned_before = previous.get("learned") if same and previous is not None else None
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
            "hedges": s.hedges,
            "rate_limited": s.rate_limited,
        }
        d["tokens"] = {"input": s.tokens_in, "output": s.tokens_out}
        d.update(cost_fields(Spent(self.cost_before, s.cost_before_unknown), s.spent_run, s.price_known,
                             s.cost_unknown))
        d["stop_reason"] = s.stop_reason
        d["learned_limits"] = {"rpm": s.rpm_limit, "tpm": s.tpm_limit}
        # what the server does with n, response_format, headers, usage: the dry-run reads it
        d["learned"] = merge_learned(self.learned_before, s.learned())
        # the adaptive concurrency limit (servers without rate-limit headers): where it ended, how high it went
        d["concurrency_limit"] = {"adaptive": s.concurrency_limit is not None, "ceiling": s.concurrency,
                                  "final": s.concurrency_limit, "max": s.concurrency_limit_max}
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
            "mode": self.data.get("mode") or "online",  # online or batch rows can share one folder
        }]
        self.save(state)
