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
from pipeline.outputs import MANIFEST
from pipeline.records import Prompt

if TYPE_CHECKING:
    from pipeline.runner import Prepared
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
    """Builds manifest.json from the config and the counters; only the writer task calls `save`."""

    def __init__(self, prep: "Prepared", stats: "RunStats") -> None:
        cfg = prep.cfg
        self.prep = prep
        self.stats = stats
        previous = read_manifest(cfg.out)
        self.data = base_manifest(previous)
        self.data.update({
            "index": str(Path(cfg.index).resolve()),
            "root": str(prep.index.root),
            "index_images": len(prep.index.entries),
            "work_items_total": prep.total,
            "out": str(Path(cfg.out).resolve()),
            "prompts": [
                {"name": p.name, "path": str(p.path) if p.path else None, "sha256": _sha(p)} for p in prep.prompts
            ],
            "backend": cfg.model.backend,
            "model": cfg.model.model,
            "base_url": cfg.model.base_url,
            "detail": cfg.model.detail,
            "max_tokens": cfg.model.max_tokens,
            "temperature": cfg.model.temperature,
            "captions_per_image": cfg.model.captions_per_image,
            "batch_size": cfg.batch_size,
            "concurrency": cfg.limits.concurrency,
            "rpm": cfg.limits.rpm,
            "tpm": cfg.limits.tpm,
            "max_cost": cfg.limits.max_cost,
            "max_attempts": cfg.limits.max_attempts,
            "price": {"model": prep.price.model, "input": prep.price.input, "output": prep.price.output,
                      "cached_input": prep.price.cached_input},
            "cost_usd_before": round(prep.resume.cost_usd, 8),
            "stop_reason": None,
            "repaired": prep.resume.repaired,
        })

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
        d["cost_usd_this_run"] = round(s.cost_usd, 8)
        d["cost_usd_total"] = round(self.prep.resume.cost_usd + s.cost_usd, 8)
        d["stop_reason"] = s.stop_reason
        d["learned_limits"] = {"rpm": s.rpm_limit, "tpm": s.tpm_limit}
        write_manifest(self.prep.cfg.out, d)

    def finish(self, state: str) -> None:
        self.data["runs"] = self.data.get("runs", []) + [{
            "started_at": self.data["started_at"],
            "ended_at": now_iso(),
            "state": state,
            "captioned": self.stats.done,
            "failed": self.stats.failed_total,
            "cost_usd": round(self.stats.cost_usd, 8),
        }]
        self.save(state)


def _sha(p: Prompt) -> str:
    import hashlib

    return hashlib.sha256(p.text.encode("utf-8")).hexdigest()[:16]
