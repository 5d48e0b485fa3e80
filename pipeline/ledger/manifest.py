"""manifest.json: what a run was and how it ended. Written atomically; never holds the API key.

The manifest is informational (status, provenance) and the record of the folder's inputs. What is done is
decided by captions_all.csv, never by the manifest, so a crash between the two loses nothing. The run
keeps it up to date through `pipeline.run.keeper.ManifestKeeper`.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.ledger.costs import Spent
from pipeline.ledger.outputs import MANIFEST
from pipeline.ledger.quarantine import replace_retrying


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
    replace_retrying(tmp, path)


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
