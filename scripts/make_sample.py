"""Write the bundled synthetic Market-1501 sample to samples/Market-1501-sample/.

Deterministic and idempotent: files are drawn from fixed seeds by pipeline.testing.synth and only
rewritten when their bytes would change, so running it again leaves git clean. The sample lets a new
user try `reid-prompt` end to end without downloading a dataset (Market-1501 is licence-restricted).

    python scripts/make_sample.py [--out samples/Market-1501-sample]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from pipeline.testing.synth import identity_colours, make_market_tree  # noqa: E402

DEFAULT_OUT = REPO / "samples" / "Market-1501-sample"
N_IDS = 4
PER_SPLIT = {"train": 4, "query": 1, "gallery": 3}

README = """\
Market-1501-sample: SYNTHETIC images, not real people and not part of Market-1501.

Every crop was drawn by pipeline/testing/synth.py (a head, an upper-body block and a lower-body block
on a plain background, with a little seeded noise) and written by:

    python scripts/make_sample.py

The script is deterministic: running it again reproduces the same bytes. File names follow the
Market-1501 convention 0002_c1s1_000451_03.jpg (person id, camera, sequence, frame, box), in
bounding_box_train/ (train), query/ and bounding_box_test/ (gallery). bounding_box_test/ also holds one
junk crop (-1_...) and one distractor (0000_...), which reid-prompt keeps and marks junk
(skipping junk at index time leaves them out).

Each identity wears the same colours in every crop (upper / lower):
{table}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="sample folder to (re)write")
    args = parser.parse_args(argv)
    out: Path = args.out
    paths = make_market_tree(out, n_ids=N_IDS, per_split=PER_SPLIT, with_junk=True)
    pids = sorted({int(p.name.split("_")[0]) for p in paths} - {-1, 0})
    table = "\n".join(f"    {pid:04d}: {' / '.join(identity_colours(pid))}" for pid in pids)
    readme = out / "README.txt"
    text = README.format(table=table)
    if not readme.is_file() or readme.read_text(encoding="utf-8") != text:
        readme.write_text(text, encoding="utf-8", newline="\n")
    size = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} images ({size / 1024:.0f} KB) in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
