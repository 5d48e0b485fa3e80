"""Batch mode: building the shards for 100,000 images, and the Batch API calls a batch run costs.

(a) build: `python -m pipeline run --mode batch --batch-files-only DIR` over N images (default 100,000):
    wall time, images/s, peak RSS of the process (os.wait4), bytes per JSONL line (base64 image included),
    shards written; and the same plan without writing (`--dry-run --mode batch`): wall time, peak RSS.
    Peak RSS must not grow with N (shards are streamed to disk): the --quick size is the comparison point.
(b) calls: `python -m pipeline run --mode batch` over M images (default 10,000) against the loopback
    server, which spends `--batch-step-s` per line (10,000 lines = about 10 s in flight, so the adaptive
    polling shows); the server's Batch API calls by kind (file lists, uploads, batch lists, creates,
    retrieves, contents, deletes) scaled to per 10,000 images; every image must be captioned exactly once.
    Done twice: one shard (the default 50,000 lines per shard) and `--batch-max-requests M/4` (4 shards).

One result line; detail lines above it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    DEFAULT_KEY,
    MODEL,
    PROMPT_FILE,
    Loopback,
    Workdir,
    detail,
    ensure_images,
    make_parser,
    outcome_check,
    run_measured,
    run_pipeline,
    say,
    write_index,
)

CALL_KINDS = ("file_list", "upload", "list", "create", "retrieve", "content", "delete")


def jsonl_stats(folder: Path) -> tuple[int, int, int]:
    """(files, lines, bytes) of the JSONL files in `folder` (lines counted by newline, in 1 MiB reads)."""
    files = lines = size = 0
    for path in sorted(folder.glob("*.jsonl")):
        files += 1
        size += path.stat().st_size
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                lines += chunk.count(b"\n")
    return files, lines, size


def build(index: Path, work: Path, n: int, timeout_s: float) -> dict:
    """`--batch-files-only` and `--dry-run --mode batch` over `index`, measured."""
    import os
    import subprocess

    base = [sys.executable, "-m", "pipeline", "run", "--index", str(index), "--prompt-file", str(PROMPT_FILE),
            "--no-dashboard", "--model", MODEL, "--mode", "batch"]
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)  # files-only and dry-run need no key: prove it
    env.pop("OPENAI_BASE_URL", None)
    files_dir = work / "shards"
    log = work / "build.log"
    with open(log, "wb") as fh:
        written = run_measured([*base, "--out", str(work / "out-files"), "--batch-files-only", str(files_dir)],
                               timeout_s=timeout_s, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if written.rc != 0:
        detail(f"WARNING --batch-files-only exit {written.rc}: {log.read_text(errors='replace')[-800:]}")
    shards, lines, size = jsonl_stats(files_dir)
    with open(work / "dry.log", "wb") as fh:
        dry = run_measured([*base, "--out", str(work / "out-dry"), "--dry-run"], timeout_s=timeout_s, env=env,
                           stdout=fh, stderr=subprocess.STDOUT)
    if dry.rc != 0:
        detail(f"WARNING --dry-run exit {dry.rc}: {(work / 'dry.log').read_text(errors='replace')[-800:]}")
    for path in files_dir.glob("*.jsonl"):  # hundreds of MB: gone as soon as measured
        path.unlink()
    return {"images": n, "wall_s": written.wall_s, "rss_mb": (written.maxrss_kb or 0) / 1024, "shards": shards,
            "lines": lines, "bytes": size, "dry_wall_s": dry.wall_s, "dry_rss_mb": (dry.maxrss_kb or 0) / 1024,
            "ok": written.rc == 0 and dry.rc == 0 and lines == n}


def calls_run(paths: list[Path], work: Path, name: str, step_s: float, timeout_s: float,
              extra: tuple[str, ...] = ()) -> dict:
    """A full batch run against a fresh loopback server; its Batch API calls per kind."""
    index = write_index(paths, work / f"index-{name}")
    with Loopback("--batch-step-s", str(step_s), "--no-headers") as server:
        t0 = time.monotonic()
        run = run_pipeline(index, work / f"out-{name}", server.url, key=DEFAULT_KEY,
                           extra=("--mode", "batch", *extra), timeout_s=timeout_s)
        wall = time.monotonic() - t0
        stats = server.stop()
    check = outcome_check(run.out, paths)
    calls = {k: int(stats.get("batch_calls", {}).get(k, 0)) for k in CALL_KINDS}
    return {"name": name, "images": len(paths), "wall_s": wall, "calls": calls, "total": sum(calls.values()),
            "batches": len(stats.get("batches_created", {})), "lines": stats.get("batch_lines", {}),
            "chat_requests": stats.get("requests", 0), "check": check,
            "ok": run.proc.rc == 0 and check["captioned"] == len(paths) and check["duplicates"] == 0
            and check["errors"] == 0}


def per_10k(value: float, images: int) -> float:
    return value * 10_000 / max(1, images)


def main() -> int:
    p = make_parser("batch", __doc__.splitlines()[0], images=100_000, quick_images=2_000)
    p.add_argument("--run-images", type=int, default=None,
                   help="images of the full batch run counting API calls (default 10,000; --quick 1,000)")
    p.add_argument("--batch-step-s", type=float, default=0.001,
                   help="loopback seconds per batch line (default 0.001: 10,000 lines ~ 10 s in flight)")
    a = p.parse_args()
    n_build = a.images if a.images is not None else (a._quick_images if a.quick else a._default_images)
    n_run = a.run_images if a.run_images is not None else (1_000 if a.quick else 10_000)
    paths = ensure_images(max(n_build, n_run))
    with Workdir("batch", a.keep) as work:
        b = build(write_index(paths[:n_build], work / "index-build"), work, n_build, a.run_timeout)
        bpl = b["bytes"] / max(1, b["lines"])
        detail(f"build: {b['images']:,} images -> {b['shards']} shard(s), {b['lines']:,} lines, "
               f"{b['bytes'] / 2**20:,.0f} MiB, {bpl:,.0f} bytes/line; {b['wall_s']:.1f} s "
               f"({b['images'] / max(b['wall_s'], 1e-9):,.0f} img/s incl. start-up), peak RSS {b['rss_mb']:.0f} MiB")
        detail(f"dry-run --mode batch: {b['dry_wall_s']:.1f} s, peak RSS {b['dry_rss_mb']:.0f} MiB")
        runs = [calls_run(paths[:n_run], work, "one-shard", a.batch_step_s, a.run_timeout),
                calls_run(paths[:n_run], work, "four-shards", a.batch_step_s, a.run_timeout,
                          ("--batch-max-requests", str(-(-n_run // 4))))]
        for r in runs:
            per = ", ".join(f"{k} {per_10k(v, r['images']):.1f}" for k, v in r["calls"].items())
            detail(f"run {r['name']}: {r['images']:,} images, {r['batches']} batch(es), {r['wall_s']:.1f} s; "
                   f"calls per 10,000 images: {per_10k(r['total'], r['images']):.1f} ({per}); "
                   f"chat requests {r['chat_requests']}; lines {r['lines']}; check {r['check']}")
    ok = b["ok"] and all(r["ok"] for r in runs)
    one, four = runs
    say(f"batch: build {b['images']:,} images {b['wall_s']:.1f} s ({b['images'] / max(b['wall_s'], 1e-9):,.0f} img/s), "
        f"peak RSS {b['rss_mb']:.0f} MiB, {bpl:,.0f} B/line, {b['shards']} shard(s); "
        f"API calls per 10,000 images {per_10k(one['total'], one['images']):.0f} (1 shard, "
        f"{per_10k(one['calls']['retrieve'], one['images']):.0f} retrieves in {one['wall_s']:.0f} s), "
        f"{per_10k(four['total'], four['images']):.0f} (4 shards); every image once: "
        f"{'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
