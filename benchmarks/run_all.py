"""Run every benchmark (defaults, or `--quick` for a smoke run) and print their one-line results.

    python benchmarks/run_all.py            # full size: several minutes on 2 cores
    python benchmarks/run_all.py --quick    # about a minute and a half
    python benchmarks/run_all.py --only ceiling,overhead --verbose

Each benchmark runs as its own process, bounded by --timeout seconds; its detail lines are shown with
--verbose, its result line always. Exit code 1 if a benchmark failed to print its result line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("saturation", "overhead", "ceiling", "faults", "memory", "kill", "full_disk", "adaptive", "realserver", "resume", "batch", "gallery")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run_all.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a fast smoke run of each benchmark")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--verbose", action="store_true", help="show each benchmark's detail lines as well")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds one benchmark may take (default 1200)")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",")] if a.only else list(BENCHMARKS)
    for n in names:
        if n not in BENCHMARKS:
            p.error(f"unknown benchmark {n!r}")
    results: list[str] = []
    failed = 0
    for name in names:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py")] + (["--quick"] if a.quick else [])
        print(f"# {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=a.timeout, cwd=str(HERE.parent), stdin=subprocess.DEVNULL)
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rc = "timeout"
        line = next((ln for ln in out.splitlines() if ln.startswith(f"{name}:")), None)
        if a.verbose:
            for ln in out.splitlines():
                if ln is not line:
                    print(ln, file=sys.stderr)
        print(f"# {name}: {time.monotonic() - t0:.0f} s, exit {rc}", file=sys.stderr, flush=True)
        if line is None or rc != 0:
            failed += 1
            results.append(line or f"{name}: FAILED (exit {rc}): {' '.join(out.splitlines()[-3:])[:300]}")
        else:
            results.append(line)
        print(results[-1], file=sys.stderr, flush=True)
    for line in results:  # stdout: the result lines only
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
