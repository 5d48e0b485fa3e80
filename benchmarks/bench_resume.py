"""Resume: a 1,000,000-image index and a folder of 999,990 finished rows; time and peak RSS to finish the
last 10 images, against plain Python reading the same two files once (`json` for the index, `csv` for
captions_all.csv).

The folder is written directly with the `csv` module, as a finished run leaves it: captions_all.csv with
realistic rows (the bundled base prompt's full text in every row, a ~200-character caption), one
captions_part_NNNNN.csv per 20 images, manifest.json (from a real one-image run on the same index, so the
inputs match), and what a finished run leaves beside them: the parts' in-step record
(`pipeline.ledger.partstate`) and the done-keys snapshot of captions_all.csv (`pipeline.ledger.donesnap`).
Only the last 10 images exist as files; the run uses the offline backend (no server: the figure is the
tool's own start-up and resume cost). `--crash`: the folder a run killed near its end leaves: the records
of its start (999,000 rows), 990 rows appended since, the last batch in captions_all.csv but not in its
part; the start reads what the killed run added. `--crash-first`: a killed first run, no record at all:
the start reads captions_all.csv and every part (the worst case).

Targets (issue 12): time <= 2x the plain read, peak RSS <= 300 MB at 1M images, <= 1 GB at 5M
(`--images 5000000`, a few minutes and ~4 GB of disk).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package, from a checkout

import common  # noqa: E402

LEFT = 10  # images left to do
BATCH = 20
CAPTION = ("The person is a young adult man with short black hair, wearing a dark blue hooded jacket over a grey "
           "T-shirt, black trousers and white sneakers; he carries a black backpack on his right shoulder.")

BASELINE = r"""
import csv, json, sys, time
t0 = time.perf_counter()
with open(sys.argv[1], encoding="utf-8") as fh:
    index = json.load(fh)
n = 0
with open(sys.argv[2], encoding="utf-8", newline="") as fh:
    for row in csv.reader(fh):
        n += 1
print(json.dumps({"images": len(index["images"]), "rows": n - 1, "s": time.perf_counter() - t0}))
"""


def image_id(i: int) -> str:
    """Market-style names that sort in index order, as `prepare` writes them (sorted by image_id)."""
    pid, k = divmod(i, 10)
    return f"bounding_box_train/{pid:06d}_c{1 + k // 2}s1_{i:07d}_01.jpg"


def write_index(path: Path, root: Path, n: int) -> None:
    """The index as `prepare` writes it (one image a line, streamed), so the load is the one users get."""
    from pipeline.data.index import write_index as write_prepared

    def images():
        for i in range(n):
            iid = image_id(i)
            pid, k = divmod(i, 10)
            yield {"image_id": iid, "path": iid, "pid": pid, "camid": 1 + k // 2, "split": "train"}

    write_prepared({"root": str(root), "dataset": "market1501", "images": images()}, path)


def run_cli(args: list[str], timeout_s: float, log: Path) -> common.ProcResult:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as fh:
        return common.run_measured([sys.executable, "-m", "pipeline", *args], timeout_s=timeout_s, env=env,
                                   stdout=fh, stderr=subprocess.STDOUT)


KILLED = 990  # --crash: rows the killed run appended after its start (its last batch missing from the parts)


def write_folder(out: Path, n: int, prompt_text: str, phash: str, at_start=None) -> tuple[int, float]:
    """captions_all.csv and the parts for images 0..n-LEFT-1, a batch at a time as a run appends them;
    returns (captions_all.csv bytes, part count). `at_start()` is called once the first n-LEFT-KILLED rows
    are written (the killed run's start); after it, the last batch reaches captions_all.csv only."""
    from pipeline.ledger.outputs import CAPTION_COLUMNS, part_digits, part_name

    digits = part_digits(n - 1, BATCH)
    done = n - LEFT
    parts = set()
    fa = open(out / "captions_all.csv", "w", encoding="utf-8", newline="")
    try:
        wa = csv.writer(fa, lineterminator="\r\n")
        wa.writerow(CAPTION_COLUMNS)
        for start in range(0, done, BATCH):
            if at_start is not None and start == done - KILLED:
                fa.close()
                at_start()
                fa = open(out / "captions_all.csv", "a", encoding="utf-8", newline="")
                wa = csv.writer(fa, lineterminator="\r\n")
            recs = []
            for i in range(start, min(done, start + BATCH)):
                recs.append([image_id(i), prompt_text, f"{CAPTION} ({i})", "2026-11-26T05:00:00.123456+00:00",
                             common.MODEL, "2915", "48", "0.00046605", "base", "0", "1", "0.842", phash])
            wa.writerows(recs)
            if at_start is not None and start + BATCH >= done:
                break  # killed between captions_all.csv and the parts of its last batch
            name = part_name(start, BATCH, digits)
            with open(out / name, "a", encoding="utf-8", newline="") as fp:
                wp = csv.writer(fp, lineterminator="\r\n")
                if name not in parts:
                    wp.writerow(CAPTION_COLUMNS)
                wp.writerows(recs)
            parts.add(name)
    finally:
        fa.close()
    return (out / "captions_all.csv").stat().st_size, len(parts)


def main(argv=None) -> int:
    p = common.make_parser("resume", __doc__.splitlines()[0], images=1_000_000, quick_images=100_000,
                           timeout=1800.0)
    p.add_argument("--crash", action="store_true",
                   help=f"a killed run's folder: its start's records, {KILLED} rows appended since, its last batch "
                        "in captions_all.csv only")
    p.add_argument("--crash-first", action="store_true",
                   help="a killed first run's folder: no record of the parts, no done-keys snapshot")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds, median reported (default 3; --quick 1)")
    a = p.parse_args(argv)
    n = common.images_wanted(a)
    a.repeat = a.repeat or (1 if a.quick else 3)
    from pipeline.data.prompts import load_prompts
    from pipeline.ledger import donesnap, partstate
    from pipeline.ledger.inputs import fingerprint_file
    from pipeline.ledger.outputs import part_digits, part_name, tally_clean_captions

    prompt = load_prompts([common.PROMPT_FILE])[0]
    real = common.ensure_images(LEFT)
    with common.Workdir("resume", a.keep) as work:
        root = work / "root"
        (root / "bounding_box_train").mkdir(parents=True)
        for k, src in enumerate(real):
            shutil.copyfile(src, root / image_id(n - LEFT + k))
        index = work / "index.json"
        write_index(index, root, n)
        out = work / "out"
        base = ["run", "--index", str(index), "--out", str(out), "--prompt-file", str(common.PROMPT_FILE),
                "--backend", "offline", "--no-dashboard", "--batch-size", str(BATCH)]
        # a manifest for these inputs: one real image asked (the last), then the folder written around it
        first = run_cli(base + ["--limit", "1"], a.run_timeout, work / "first.log")
        for name in ("captions_all.csv", "errors.csv"):
            (out / name).unlink(missing_ok=True)
        for part in out.glob("captions_part_*.csv"):
            part.unlink()
        partstate.forget(out)  # what the setup run left describes its own one-row folder
        donesnap.forget(out)
        index_key = fingerprint_file(index).sha256
        digits = part_digits(n - 1, BATCH)

        def records() -> None:  # what a start (or a finished run) leaves beside the CSV files
            donesnap.save(out, tally_clean_captions(out / "captions_all.csv"))
            partstate.record(out, batch_size=BATCH, digits=digits, index_key=index_key)

        size, parts = write_folder(out, n, prompt.text, prompt.fingerprint, records if a.crash else None)
        if not a.crash and not a.crash_first:
            records()
        kept = {name: (out / name).read_bytes() for name in (partstate.STATE_FILE, donesnap.SNAP_FILE)
                if (out / name).exists()}
        path = "killed run" if a.crash else "killed first run" if a.crash_first else "clean"
        common.detail(f"folder ({path}): {n - LEFT:,} rows, captions_all.csv {size / 1e6:,.0f} MB "
                      f"({size / (n - LEFT) * 1e6 / 1e6:,.0f} MB per million rows), {parts:,} parts; "
                      f"index {index.stat().st_size / 1e6:,.0f} MB; setup run rc={first.rc}")
        last_part = out / part_name(n - 1, BATCH, digits)
        saved_part = last_part.read_bytes() if last_part.exists() else None
        rounds = []
        for r in range(a.repeat):
            if r:  # back to 999,990 rows: cut the 10 new ones, the last part and the records as they were
                with open(out / "captions_all.csv", "r+b") as fh:
                    fh.truncate(size)
                if saved_part is None:
                    last_part.unlink(missing_ok=True)
                else:
                    last_part.write_bytes(saved_part)
                (out / "errors.csv").unlink(missing_ok=True)
                partstate.forget(out)
                donesnap.forget(out)
                for name, data in kept.items():
                    (out / name).write_bytes(data)
                if not a.crash and not a.crash_first:
                    records()  # the clean folder's records name captions_all.csv's size and time: anew
            with tempfile.TemporaryFile() as fh:
                base_proc = common.run_measured(
                    [sys.executable, "-c", BASELINE, str(index), str(out / "captions_all.csv")],
                    timeout_s=a.run_timeout, stdout=fh, stderr=subprocess.STDOUT)
                fh.seek(0)
                text = fh.read().decode("utf-8", "replace")
            base_line = next((json.loads(ln) for ln in text.splitlines() if ln.startswith("{")), {})
            log = work / "resume.log"
            run = run_cli(base, a.run_timeout, log)
            tail = log.read_text(encoding="utf-8", errors="replace")
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            captioned = (manifest.get("counts") or {}).get("captioned_this_run")
            if run.rc != 0:
                common.detail(f"WARNING resume exit {run.rc}: {tail[-800:]}")
            common.detail(f"round {r + 1}: plain json+csv read {base_proc.wall_s:.2f} s wall "
                          f"({base_line.get('s', 0):.2f} s reading), peak {(base_proc.maxrss_kb or 0) / 1024:.0f} MiB; "
                          f"resume {run.wall_s:.2f} s wall, cpu {run.cpu_s or 0:.2f} s, "
                          f"peak {(run.maxrss_kb or 0) / 1024:.0f} MiB, captioned {captioned}, rc={run.rc}")
            rounds.append((run.wall_s / base_proc.wall_s, run, base_proc, captioned))
        rounds.sort(key=lambda t: t[0])
        ratio, run, base_proc, captioned = rounds[len(rounds) // 2]  # the median round
        peak = max((t[1].maxrss_kb or 0) for t in rounds) / 1024
        common.say(
            f"resume: images={n} done_rows={n - LEFT} left={LEFT} time={run.wall_s:.2f}s plain_read={base_proc.wall_s:.2f}s "
            f"ratio={ratio:.2f} (median of {len(rounds)}; target <=2) peak_rss={peak:.0f}MiB "
            f"(target {'<=300' if n <= 1_000_000 else '<=1024'}) captions_all={size / (n - LEFT) * 1e6 / 2**20:.0f}MiB/1M rows "
            f"captioned={captioned} path={path.replace(' ', '_')}"
        )
    return 0 if run.rc == 0 and captioned == LEFT else 1


if __name__ == "__main__":
    sys.exit(main())
