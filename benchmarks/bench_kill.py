"""kill -9 at random moments: is anything finished lost, doubled or mixed?

A run of N images (default 600) is started against the loopback server and killed with SIGKILL at a
random moment, K times (default 20), each time restarted with the same command; then it runs to the end.
After every kill the folder is read (read-only, as `status` reads it) and compared with what was seen
before:

- rows lost: a (image_id, prompt_name, caption_index) seen in captions_all.csv after an earlier kill that is
  missing (or has another caption) later: must be 0;
- rows doubled: keys present more than once in the final captions_all.csv: must be 0;
- rows mixed: final captions that are not the server's caption for their own image's bytes: must be 0;
- paid answers lost: answers the server sent (`ok_answers`) that are not rows in the end: the server
  finished them, the killed client never read them; reported, not a target;
- requests cut off in flight: requests the server received but never finished answering because the
  client died first (a provider may still bill them). Bounded by concurrency x kills.

POSIX only (SIGKILL). One result line, detail lines above it.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
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
    make_parser,
    images_wanted,
    say,
    write_index,
)


def read_rows(out: Path) -> list[dict[str, str]]:
    from pipeline.ledger.outputs import CAPTIONS_ALL, read_table

    return read_table(out / CAPTIONS_ALL).rows


def main() -> int:
    p = make_parser("kill", __doc__.splitlines()[0], images=600, quick_images=120, concurrency=16, latency=0.3)
    p.add_argument("--kills", type=int, default=20, help="kill -9s before the run may finish (default 20)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    if not hasattr(signal, "SIGKILL"):
        say("kill: skipped (no SIGKILL on this platform)")
        return 0
    n = images_wanted(a)
    kills = 4 if a.quick else a.kills
    rng = random.Random(a.seed)
    paths = ensure_images(n)
    from pipeline.testing.loopback import expected_caption

    with Workdir("kill", a.keep) as work, Loopback("--latency", str(a.latency)) as server:
        index = write_index(paths, work)
        out = work / "out"
        env = {**__import__("os").environ, "OPENAI_API_KEY": DEFAULT_KEY, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "pipeline", "run", "--index", str(index), "--out", str(out),
               "--prompt-file", str(PROMPT_FILE), "--no-dashboard", "--base-url", server.url,
               "--concurrency", str(a.concurrency)]
        seen: dict[tuple[str, str, str], str] = {}
        lost = 0
        killed = 0
        finished_early = 0
        t0 = time.monotonic()
        while killed < kills:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 2.0))  # start-up is ~0.5 s: some kills land before the first request
            if proc.poll() is not None:
                finished_early += 1
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            killed += 1
            now = {(r["image_id"], r["prompt_name"], r["caption_index"]): r["caption"] for r in read_rows(out)}
            lost += sum(1 for k, cap in seen.items() if now.get(k) != cap)
            seen.update(now)
        final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.run_timeout)
        wall = time.monotonic() - t0
        rows = read_rows(out)
        keys = Counter((r["image_id"], r["prompt_name"], r["caption_index"]) for r in rows)
        doubled = sum(c - 1 for c in keys.values() if c > 1)
        now = {(r["image_id"], r["prompt_name"], r["caption_index"]): r["caption"] for r in rows}
        lost += sum(1 for k, cap in seen.items() if now.get(k) != cap)
        import json

        root = Path(json.loads((out / "manifest.json").read_text(encoding="utf-8"))["root"])
        mixed = 0
        for r in rows:
            img = root / r["image_id"]
            try:
                if r["caption"] != expected_caption(img.read_bytes()):
                    mixed += 1
            except OSError:
                mixed += 1
        stats = server.stop()
        answered = int(stats.get("ok_answers", 0))
        detail(f"final run exit {final.returncode}; {len(keys):,} of {n:,} images captioned; wall {wall:.1f} s")
        detail(f"server: {stats.get('requests', 0):,} requests, {answered:,} answers sent")
        if final.returncode != 0:
            detail("final run stderr: " + final.stderr.strip().replace("\n", " | ")[-500:])
        paid_lost = max(0, answered - len(keys))
        cut_off = max(0, int(stats.get("requests", 0)) - answered)
        say(f"kill: {killed} kill -9s on {n:,} images (c={a.concurrency}, latency {a.latency}s): rows lost={lost} "
            f"doubled={doubled} mixed={mixed} missing={n - len(keys)} | paid answers lost={paid_lost} "
            f"({paid_lost / max(1, killed):.1f} per kill) | requests cut off in flight={cut_off} "
            f"({cut_off / max(1, killed):.1f} per kill; a provider may bill these)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
