"""Gallery: time to build (`python -m pipeline gallery`) and to open (headless Chromium, first page rendered)
for folders of 10,000 and 100,000 captioned images.

The folder is synthetic and written directly, as a finished run leaves it: images (64x128 JPEG crops drawn
by `pipeline/testing/synth.py`: a pool of 1,000 distinct crops, two per identity colour pair, copied to one
file per image, so every image is a file the thumbnailer really decodes), an index of objects with pid and
camid, manifest.json naming it, and captions_all.csv written with the `csv` module: two prompts per image,
~150-character captions whose colours follow the identity, with a few refusals, short answers and one image
in 25 described in another upper colour (identity conflicts) so the flags have something to find.

Figures per size: the first build (thumbnails made, in as many processes as cores), a rebuild (thumbnails
reused: two stats each), so the thumbnails' share is the difference; the page's size on disk; then in
Chromium (`/usr/bin/chromium` through Playwright, file://, no server): time from navigation to the first
page rendered (`body[data-state=ready]`) and to its first thumbnail decoded, then a flag filter, the next
page, a person search and the Marks filter (its first use loads every image id). `--screenshot` saves
the first page of the first size as a PNG.

    python benchmarks/bench_gallery.py [--quick] [--images 10000,100000] [--screenshot /tmp/gallery_screenshot.png]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package, from a checkout

import common  # noqa: E402

REPO = common.REPO
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PER_PERSON = 20  # Market-1501 has ~21 images per identity
POOL_IDS = 500
CAPTIONS = {
    "base": "A young man with short black hair, wearing a {upper} jacket over a T-shirt and {lower} trousers, "
            "with white sneakers; he carries a black backpack on his right shoulder.",
    "detailed": "The pedestrian is walking away from the camera. Upper body: a {upper} long-sleeved top. Lower "
                "body: long {lower} pants. Shoes: dark. Carrying: a backpack. Hair: short.",
}


def make_pool(folder: Path) -> list[list[bytes]]:
    """Two distinct crops per identity of POOL_IDS identities, drawn once (cached under $TMPDIR)."""
    from pipeline.testing import synth

    folder.mkdir(parents=True, exist_ok=True)
    pool = []
    for pid in range(1, POOL_IDS + 1):
        upper, lower = synth.identity_colours(pid)
        crops = []
        for k in range(2):
            path = folder / f"{pid:04d}_{k}.jpg"
            if not path.exists():
                synth.make_crop(path, upper=synth.PALETTE[upper], lower=synth.PALETTE[lower], seed=pid * 10 + k)
            crops.append(path.read_bytes())
        pool.append(crops)
    return pool


def write_folder(base: Path, n: int, pool: list[list[bytes]]) -> Path:
    """index.json, root/ with n image files, out/ with manifest.json and captions_all.csv."""
    from pipeline.ledger.outputs import CAPTION_COLUMNS
    from pipeline.testing import synth

    root = base / "root"
    images = []
    for i in range(n):
        pid = i // PER_PERSON + 1
        k = i % PER_PERSON
        cam = 1 + (pid + k) % 6
        image_id = f"bounding_box_test/{pid:04d}_c{cam}s1_{100 * k:06d}_{k + 1:02d}.jpg"
        images.append((image_id, pid, cam))
    (root / "bounding_box_test").mkdir(parents=True, exist_ok=True)
    for i, (image_id, pid, _) in enumerate(images):
        with open(root / image_id, "wb") as fh:
            fh.write(pool[(pid - 1) % POOL_IDS][i % 2])
    index = base / "index.json"
    index.write_text(json.dumps({"root": str(root), "dataset": "market1501", "images": [
        {"image_id": im, "path": im, "pid": pid, "camid": cam, "split": "gallery"} for im, pid, cam in images]}),
        encoding="utf-8")
    out = base / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"index": str(index), "root": str(root), "state": "finished"}),
                                       encoding="utf-8")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CAPTION_COLUMNS)
    for i, (image_id, pid, _) in enumerate(images):
        upper, lower = synth.identity_colours(pid)
        if i % 25 == 7:
            upper = "green" if upper != "green" else "red"
        for prompt, template in CAPTIONS.items():
            text = template.format(upper=upper, lower=lower)
            if i % 211 == 3 and prompt == "base":
                text = "I'm sorry, but I can't help with identifying people in images."
            elif i % 197 == 5 and prompt == "detailed":
                text = "A person."
            w.writerow([image_id, f"prompt {prompt}", text, "2027-01-01T00:00:00+00:00", "gpt-4o-mini", 150, 40,
                        "0.0000465", prompt, 0, 1, "0.8", "abcd1234abcd1234"])
    (out / "captions_all.csv").write_text(buf.getvalue(), encoding="utf-8", newline="")
    return out


def build(out: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "gallery", "--out", str(out)], capture_output=True,
                          text=True, timeout=3600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"gallery failed ({proc.returncode}): {proc.stderr.strip()}")
    return took, proc.stdout


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes of the page and its data without thumbnails, bytes of thumbnails)."""
    data = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "thumbs" not in p.parts)
    thumbs = sum(p.stat().st_size for p in (folder / "thumbs").rglob("*.jpg"))
    return data, thumbs


def open_in_chromium(page_path: Path, screenshot: Path | None, person: int) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            t0 = time.perf_counter()
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-state=ready]", timeout=60_000)
            ready = time.perf_counter() - t0
            page.wait_for_function("() => document.images.length && document.images[0].complete "
                                   "&& document.images[0].naturalWidth > 0", timeout=60_000)
            thumb = time.perf_counter() - t0
            in_page = page.evaluate("() => performance.now()")

            def timed(action) -> float:
                start = time.perf_counter()
                action()
                page.wait_for_selector("body[data-state=ready]", timeout=60_000)
                return time.perf_counter() - start

            if screenshot is not None:  # with one caption accepted and one rejected, as a reviewer sees it
                page.keyboard.press("a")
                page.keyboard.press("r")
                page.screenshot(path=str(screenshot))
            flag = timed(lambda: page.check("input[data-flag=identity_conflict]"))
            flag_info = page.inner_text("#pageinfo")
            page.uncheck("input[data-flag=identity_conflict]")
            page.wait_for_selector("body[data-state=ready]")
            nxt = timed(lambda: page.keyboard.press("ArrowRight"))

            def search() -> None:
                page.fill("#person", str(person))
                page.press("#person", "Enter")

            search_s = timed(search)
            search_info = page.inner_text("#pageinfo")
            page.fill("#person", "")
            page.press("#person", "Enter")
            page.wait_for_selector("body[data-state=ready]")
            # the Marks filter loads data/ids.js (every image id) the first time
            marks_s = timed(lambda: page.select_option("#review", "unmarked"))
            marks_info = page.inner_text("#pageinfo")
            return {"ready_s": ready, "first_thumb_s": thumb, "in_page_ms": in_page, "flag_s": flag,
                    "next_s": nxt, "search_s": search_s, "flag_info": flag_info, "search_info": search_info,
                    "marks_s": marks_s, "marks_info": marks_info}
        finally:
            browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="10000,100000", help="comma-separated folder sizes")
    ap.add_argument("--quick", action="store_true", help="1,000 and 5,000 images")
    ap.add_argument("--screenshot", type=Path, default=None, help="PNG of the first size's first page")
    ap.add_argument("--keep", action="store_true", help="keep the folders (printed)")
    a = ap.parse_args()
    sizes = [1000, 5000] if a.quick else [int(s) for s in a.images.split(",") if s.strip()]
    if not Path(CHROMIUM).is_file():
        common.say(f"gallery: {CHROMIUM} not found (apt-get install chromium); skipped")
        return 0
    pool = make_pool(common.CACHE / "gallery-pool")
    work = Path(tempfile.mkdtemp(prefix="bench-gallery-"))
    results = []
    try:
        for n, size in enumerate(sizes):
            base = work / f"n{size}"
            t0 = time.perf_counter()
            out = write_folder(base, size, pool)
            common.detail(f"{size:,} images: folder written in {time.perf_counter() - t0:.1f} s")
            first, stdout = build(out)
            again, _ = build(out)
            data, thumbs = folder_size(out / "gallery")
            common.detail(f"{size:,} images: build {first:.1f} s (thumbnails made), rebuild {again:.1f} s "
                          f"(thumbnails reused) -> thumbnails ~{first - again:.1f} s; page + data "
                          f"{data / 1e6:.1f} MB, thumbnails {thumbs / 1e6:.1f} MB")
            for line in stdout.strip().splitlines()[:2]:
                common.detail("  " + line)
            shot = a.screenshot if n == 0 else None
            o = open_in_chromium(out / "gallery" / "index.html", shot, person=size // PER_PERSON // 2)
            common.detail(f"{size:,} images: open -> first page rendered {o['ready_s']:.2f} s, first thumbnail "
                          f"{o['first_thumb_s']:.2f} s; flag filter {o['flag_s'] * 1000:.0f} ms ({o['flag_info']}), "
                          f"next page {o['next_s'] * 1000:.0f} ms, person search {o['search_s'] * 1000:.0f} ms "
                          f"({o['search_info']}), marks filter {o['marks_s'] * 1000:.0f} ms ({o['marks_info']})")
            if shot is not None:
                common.detail(f"screenshot: {shot}")
            results.append((size, first, again, o["ready_s"]))
    finally:
        if a.keep:
            common.detail(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    common.say("gallery: " + "; ".join(f"{s:,} images build {b:.1f} s (rebuild {r:.1f} s), open {o:.2f} s"
                                       for s, b, r, o in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
