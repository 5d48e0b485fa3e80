"""Memory: peak RSS of the pipeline process for a 20,000-image index at latency 0, per image, and the
time and memory of loading a 200,000-line text index alone.

Peak RSS is the child's own ru_maxrss from os.wait4 (Linux: KiB), the same figure
resource.getrusage(RUSAGE_CHILDREN) gives when the pipeline is the only child reaped (it is not here:
the loopback server is a child too, and RUSAGE_CHILDREN keeps the largest of them). "Per image" is
peak / images, and marginal: (peak - peak of a run of 1/20 the images) / the difference in images, which
leaves the interpreter, imports and pools out.

Index load: `python -c` imports pipeline.data.index, notes ru_maxrss, loads the text index with
`load_index`, and prints the load time and ru_maxrss after (the paths need not exist: loading is lexical).

`--index-only` (issue 12) skips the pipeline runs and loads synthetic indexes of `--index-lines` lines
(a comma list, e.g. 1000000,5000000) in both forms: the JSON `prepare` writes (sorted, one image a line)
and a text list of absolute paths. Each prints the load time, the peak RSS of the loading process, the
memory still held after (resident, after gc) per entry (Linux /proc), and the ratio to plain Python's `csv` module
just reading the same file (its rows dropped as read) in a fresh process.
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


LOAD_HELD_SNIPPET = r"""
import gc, json, resource, sys, time
from pathlib import Path
from pipeline.data.index import load_index
def status_kb(field):  # VmHWM, not ru_maxrss: ru_maxrss keeps the parent's peak across fork + exec
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))
rss_kb = lambda: status_kb("VmRSS")
before = rss_kb()
t0 = time.perf_counter()
idx = load_index(Path(sys.argv[1]))
dt = time.perf_counter() - t0
gc.collect()
held = rss_kb()
print(json.dumps({"entries": len(idx.entries), "load_s": dt, "before_kb": before, "held_kb": held,
                  "peak_kb": status_kb("VmHWM")}))
"""

CSV_SNIPPET = r"""
import csv, json, sys, time
t0 = time.perf_counter()
with open(sys.argv[1], newline="", encoding="utf-8") as fh:
    n = sum(1 for _ in csv.reader(fh))
print(json.dumps({"rows": n, "read_s": time.perf_counter() - t0}))
"""


def write_synthetic_indexes(folder: Path, lines: int) -> dict[str, Path]:
    """A JSON index as `prepare` writes it (sorted ids, one image a line) and a text list of absolute
    paths, `lines` Market-style images each; the root folder exists, the images do not."""
    from pipeline.data.index import write_index

    root = folder / f"market_{lines}"
    root.mkdir(parents=True, exist_ok=True)
    splits = [("bounding_box_train", "train"), ("query", "query"), ("bounding_box_test", "gallery")]

    def image(i: int) -> dict:
        pid, k = divmod(i, 10)
        sub, split = splits[i % 3]
        iid = f"{sub}/{pid % 10000:04d}_c{1 + k % 6}s{1 + pid // 10000}_{i:07d}_{k + 1:02d}.jpg"
        return {"image_id": iid, "path": iid, "pid": pid % 10000, "camid": 1 + k % 6, "split": split}

    order = sorted(range(lines), key=lambda i: image(i)["image_id"])  # ids sorted, as prepare writes them
    json_path = folder / f"index_{lines}.json"
    write_index({"root": str(root), "dataset": "market1501", "images": (image(i) for i in order)}, json_path)
    text_path = folder / f"index_{lines}.txt"
    with open(text_path, "w", encoding="utf-8") as fh:
        for i in range(lines):
            fh.write(f"{root}/{image(i)['image_id']}\n")
    return {"json": json_path, "text": text_path}


def _child_json(snippet: str, arg: Path, timeout_s: float) -> dict:
    with tempfile.TemporaryFile() as out:
        proc = common.run_measured([sys.executable, "-c", snippet, str(arg)], timeout_s=timeout_s,
                                   stdout=out, stderr=subprocess.STDOUT)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    common.detail(f"WARNING child failed (rc={proc.rc}): {text[-500:]}")
    return {}


def index_only(a, work: Path) -> int:
    sizes = [int(x) for x in (a.index_lines or ("100000" if a.quick else "1000000,5000000")).split(",")]
    for lines in sizes:
        files = write_synthetic_indexes(work, lines)
        for form, path in files.items():
            load = _child_json(LOAD_HELD_SNIPPET, path, a.run_timeout)
            base = _child_json(CSV_SNIPPET, path, a.run_timeout)
            if not load or not base:
                continue
            held = (load["held_kb"] - load["before_kb"]) * 1024 / load["entries"]
            ratio = load["load_s"] / max(base["read_s"], 1e-9)
            common.say(
                f"index_load: form={form} lines={load['entries']} time={load['load_s']:.2f}s "
                f"csv_read={base['read_s']:.2f}s ratio={ratio:.2f}x peak_rss={load['peak_kb'] / 1024:.0f}MiB "
                f"held={(load['held_kb'] - load['before_kb']) / 1024:.0f}MiB ({held:.0f} B/entry) "
                f"file={path.stat().st_size / 2**20:.0f}MiB"
            )
        for path in files.values():
            path.unlink()
    return 0


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
    p.add_argument("--index-lines", default=None, help="lines of the text index loaded alone "
                   "(default 200,000; --quick 50,000); with --index-only a comma list "
                   "(default 1000000,5000000; --quick 100000)")
    p.add_argument("--index-only", action="store_true", help="only the index load figures (issue 12)")
    a = p.parse_args(argv)
    if a.index_only:
        with common.Workdir("memory", a.keep) as work:
            return index_only(a, work)
    n = common.images_wanted(a)
    lines = int(a.index_lines) if a.index_lines else (50_000 if a.quick else 200_000)
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
