"""Memory: peak RSS of the pipeline process for a 20,000-image index at latency 0, per image, and the
time and memory of loading a 200,000-line text index alone.

Peak RSS is the child's own ru_maxrss from os.wait4 (Linux: KiB), the same figure
resource.getrusage(RUSAGE_CHILDREN) gives when the pipeline is the only child reaped (it is not here:
the loopback server is a child too, and RUSAGE_CHILDREN keeps the largest of them). "Per image" is
peak / images, and marginal: (peak - peak of a run of 1/20 the images) / the difference in images, which
leaves the interpreter, imports and pools out.

Index load: `python -c` imports pipeline.data.index, notes ru_maxrss, loads the text index with
`load_index`, and prints the load time and ru_maxrss after (the paths need not exist: loading is lexical).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LOAD_SNIPPET = r"""
import json, resource, sys, time
from pathlib import Path
from pipeline.data.index import load_index
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
idx = load_index(Path(sys.argv[1]))
dt = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"entries": len(idx.entries), "load_s": dt, "maxrss_before_kb": r0, "maxrss_after_kb": r1}))
"""


def write_big_index(folder: Path, lines: int) -> Path:
    """`lines` distinct Market-1501-style absolute paths under three split folders (files need not exist)."""
    base = common.CACHE / "market"
    folders = [base / "bounding_box_train", base / "query", base / "bounding_box_test"]
    path = folder / "index_big.txt"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(lines):
            pid, k = divmod(i, 10)
            fh.write(f"{folders[i % 3]}/{pid % 10000:04d}_c{1 + k % 6}s{1 + pid // 10000}_{i:07d}_{k + 1:02d}.jpg\n")
    return path


def pipeline_peak(paths, work: Path, tag: str, a) -> tuple[common.PipelineRun, dict]:
    index = common.write_index(paths, work / tag)
    with common.Loopback("--latency", a.latency) as srv:
        run = common.run_pipeline(index, work / tag / "out", srv.url, concurrency=a.concurrency,
                                  extra=["--fixed-concurrency"], timeout_s=a.run_timeout)
    return run, srv.stats


def main(argv=None) -> int:
    p = common.make_parser("memory", __doc__.splitlines()[0], images=20000, quick_images=2000, concurrency=64,
                           latency=0.0)
    p.add_argument("--index-lines", type=int, default=None, help="lines of the text index loaded alone "
                   "(default 200,000; --quick 50,000)")
    a = p.parse_args(argv)
    n = common.images_wanted(a)
    lines = a.index_lines or (50_000 if a.quick else 200_000)
    paths = common.ensure_images(n)
    small_n = max(1, n // 20)
    with common.Workdir("memory", a.keep) as work:
        small, _ = pipeline_peak(paths[:small_n], work, "small", a)
        big, st = pipeline_peak(paths, work, "big", a)
        for tag, run, k in (("small", small, small_n), ("full", big, n)):
            common.detail(
                f"pipeline {k:,} images: peak RSS {run.proc.maxrss_kb / 1024:.1f} MiB, "
                f"wall {run.proc.wall_s:.1f} s, captioned {run.counts.get('captioned_this_run')}, rc={run.proc.rc}"
            )
        big_index = write_big_index(work, lines)
        with tempfile.TemporaryFile() as out:
            proc = common.run_measured([sys.executable, "-c", LOAD_SNIPPET, str(big_index)], timeout_s=a.run_timeout,
                                       stdout=out, stderr=subprocess.STDOUT)
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
        load = {}
        for line in text.splitlines():
            if line.startswith("{"):
                load = json.loads(line)
        if not load:
            common.detail(f"WARNING index load failed (rc={proc.rc}): {text[-500:]}")
    peak = big.proc.maxrss_kb or 0.0
    peak_small = small.proc.maxrss_kb or 0.0
    per_image = peak / n
    marginal = (peak - peak_small) / (n - small_n) if n > small_n else 0.0
    load_part = "index_load=n/a"
    if load:
        grew = load["maxrss_after_kb"] - load["maxrss_before_kb"]
        common.detail(
            f"index load: {load['entries']:,} lines in {load['load_s']:.2f} s "
            f"({load['entries'] / max(load['load_s'], 1e-9):,.0f} lines/s), ru_maxrss {load['maxrss_before_kb'] / 1024:.1f}"
            f" -> {load['maxrss_after_kb'] / 1024:.1f} MiB (+{grew / 1024:.1f} MiB, {grew * 1024 / load['entries']:.0f} B/line)"
            f"; whole process {proc.wall_s:.2f} s wall"
        )
        load_part = (f"index_load: lines={load['entries']} time={load['load_s']:.2f}s "
                     f"rss=+{grew / 1024:.1f}MiB ({grew * 1024 / load['entries']:.0f} B/line) "
                     f"peak={load['maxrss_after_kb'] / 1024:.1f}MiB")
    common.say(
        f"memory: images={n} peak_rss={peak / 1024:.1f}MiB per_image={per_image:.2f}KB "
        f"marginal_per_image={marginal:.2f}KB (vs {small_n} images: {peak_small / 1024:.1f}MiB) "
        f"concurrency={a.concurrency} latency={a.latency:g}s | {load_part}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
