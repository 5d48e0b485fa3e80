"""manifest.json: what a run was and how it ended. Written atomically; never holds the API key.

The manifest is informational (status, provenance). What is done is decided by captions_all.csv, never
by the manifest, so a crash between the two loses nothing.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.outputs import MANIFEST


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
    os.replace(tmp, path)


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
