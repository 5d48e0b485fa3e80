"""A full disk mid-run: is anything finished lost, doubled, or paid for and not on the books?

The output folder is a small tmpfs (default 4 MB). A run of N images (default 600) starts against the
loopback server (a few refused answers mixed in, so billed failures are counted too); once some rows are
written a filler file takes every free byte. Then, per mode:

- `free`: the filler is deleted after `--hold` seconds; the run must write what it held and finish;
- `interrupt`: the run gets SIGINT (Ctrl-C) while the disk is still full; what it holds must go to a pending
  file (the folder is full, so the system temp folder), then the disk is freed and the same command run
  again must merge it first and finish the rest.

Figures, read from the folder and the server's own counters at the end:
- rows lost: images in neither captions_all.csv nor errors.csv (as a final failure): must be 0;
- rows doubled: keys more than once in captions_all.csv, or identical errors.csv rows: must be 0;
- paid answers lost: answers the server sent (captions + refused/empty) minus caption rows minus billed
  errors.csv rows: must be 0 (no kill here: nothing is in flight when a process dies);
- asked twice: requests for images that already had an answer (server requests minus distinct answers
  minus refusal retries): 0 means no answer was paid for twice.

Linux and root only (it mounts a tmpfs); otherwise one line says it was skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    DEFAULT_KEY,
    PROMPT_FILE,
    REPO,
    Loopback,
    Workdir,
    detail,
    ensure_images,
    images_wanted,
    make_parser,
    say,
    write_index,
)

from pipeline.testing.disk import can_mount, fill, mount_tmpfs, umount  # noqa: E402

BILLED_OUTCOMES = ("refusal", "apology", "content_filter", "empty")


def count_rows(path: Path) -> int:
    from pipeline.ledger.outputs import read_table

    return len(read_table(path).rows) if path.exists() else 0


def figures(out: Path, n: int, stats: dict) -> dict[str, int]:
    from pipeline.ledger.outputs import CAPTIONS_ALL, ERRORS, read_table

    caps = read_table(out / CAPTIONS_ALL).rows
    errs = read_table(out / ERRORS).rows
    keys = Counter((r["image_id"], r["prompt_name"], r["caption_index"]) for r in caps)
    err_rows = Counter(tuple(sorted(r.items())) for r in errs)
    final_errors = {r["image_id"] for r in errs if not r.get("reason", "").endswith("_retried")}
    accounted = {k[0] for k in keys} | final_errors
    billed_errors = sum(1 for r in errs if int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens") or 0) > 0)
    outcomes = stats.get("outcomes", {})
    answered = int(stats.get("ok_answers", 0)) + sum(int(outcomes.get(k, 0)) for k in BILLED_OUTCOMES)
    return {
        "captions": len(keys),
        "errors_final": len(final_errors),
        "lost": n - len(accounted),
        "doubled": sum(c - 1 for c in keys.values() if c > 1) + sum(c - 1 for c in err_rows.values() if c > 1),
        "answered": answered,
        "paid_lost": answered - len(caps) - billed_errors,
        "requests": int(stats.get("requests", 0)),
    }


def one_mode(mode: str, a, work: Path, index: Path, n: int) -> str:
    disk = work / f"disk-{mode}"
    temp = work / f"tmp-{mode}"
    disk.mkdir()
    temp.mkdir()
    why = mount_tmpfs(disk, a.disk_size)
    if why is not None:
        return f"{mode}: skipped ({why})"
    try:
        with Loopback("--latency", str(a.latency), "--p-refusal", str(a.p_refusal), "--seed", "3") as server:
            out = disk / "out"
            env = {**os.environ, "OPENAI_API_KEY": DEFAULT_KEY, "PYTHONPATH": str(REPO), "TMPDIR": str(temp),
                   "PYTHONUNBUFFERED": "1"}
            env.pop("OPENAI_BASE_URL", None)
            cmd = [sys.executable, "-m", "pipeline", "run", "--index", str(index), "--out", str(out),
                   "--prompt-file", str(PROMPT_FILE), "--no-dashboard", "--base-url", server.url,
                   "--concurrency", str(a.concurrency), "--hold-retry", str(a.retry)]
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            err: list[str] = []
            reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while count_rows(out / "captions_all.csv") < a.fill_after and time.monotonic() < deadline:
                time.sleep(0.02)
            filler = disk / "filler"
            fill(filler)
            rows_at_fill = count_rows(out / "captions_all.csv")
            time.sleep(a.hold)
            if mode == "interrupt":
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=a.run_timeout)
                filler.unlink()
                rc1 = proc.returncode
                again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.run_timeout)
                err.append("--- second run ---\n")
                err.extend(again.stderr.splitlines(keepends=True))
                rc = again.returncode
            else:
                filler.unlink()
                proc.wait(timeout=a.run_timeout)
                rc1 = rc = proc.returncode
            reader.join(timeout=5)
            wall = time.monotonic() - t0
            stats = server.stop()
        f = figures(out, n, stats)
        notes = [ln.strip() for ln in err if any(w in ln for w in ("cannot be written", "written again", "saved to",
                                                                 "merged held", "error", "Traceback"))]
        for ln in notes[:8]:
            detail(f"  {mode}: {ln[:200]}")
        detail(f"  {mode}: exit {rc1}{'' if mode == 'free' else f' then {rc}'}; rows when the disk filled "
               f"{rows_at_fill}; wall {wall:.1f} s; server requests {f['requests']:,}, answers {f['answered']:,}")
        return (f"{mode}: rows lost={f['lost']} doubled={f['doubled']} paid answers lost={f['paid_lost']} "
                f"(captioned {f['captions']:,}, failed {f['errors_final']:,} of {n:,})")
    finally:
        umount(disk)


def main() -> int:
    p = make_parser("full_disk", __doc__.splitlines()[0], images=600, quick_images=150, concurrency=16,
                    latency=0.05)
    p.add_argument("--mode", choices=["free", "interrupt", "both"], default="both")
    p.add_argument("--disk-size", default="4m", help="tmpfs size for the output folder (default 4m)")
    p.add_argument("--fill-after", type=int, default=100, help="rows written before the disk fills (default 100)")
    p.add_argument("--hold", type=float, default=3.0, help="seconds the disk stays full (default 3)")
    p.add_argument("--retry", type=float, default=1.0, help="the run's --hold-retry (default 1 s)")
    p.add_argument("--p-refusal", type=float, default=0.03, help="share of refused (billed) answers")
    a = p.parse_args()
    if not can_mount():
        say("full_disk: skipped (needs Linux and root to mount a tmpfs)")
        return 0
    n = images_wanted(a)
    paths = ensure_images(n)
    results = []
    with Workdir("full_disk", a.keep) as work:
        index = write_index(paths, work)
        for mode in (["free", "interrupt"] if a.mode == "both" else [a.mode]):
            results.append(one_mode(mode, a, work, index, n))
    say(f"full_disk: {n:,} images, c={a.concurrency}, disk {a.disk_size} full for {a.hold:g} s | "
        + " | ".join(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
