"""Synthetic person crops and dataset trees, for tests, benchmarks and the bundled sample.

Nothing is downloaded: every image is drawn here with Pillow, deterministically from a seed, so a test
knows the truth (which identity wears which colours) and two machines produce identical files. The
figure is a crude person (head, upper-body block, lower-body block, shoes) on a plain-ish background,
with the body blocks wide enough that a pixel-based describer reading the centre of the upper and
lower halves sees the clothing colour.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Mapping
from pathlib import Path

from PIL import Image, ImageDraw

Colour = tuple[int, int, int]

# Named colours; the names are the Market-1501/Duke attribute colour words.
PALETTE: dict[str, Colour] = {
    "black": (20, 20, 22),
    "white": (238, 238, 235),
    "red": (200, 30, 35),
    "purple": (120, 50, 150),
    "yellow": (235, 205, 40),
    "gray": (128, 128, 128),
    "blue": (35, 70, 185),
    "green": (40, 150, 60),
    "brown": (120, 75, 35),
    "pink": (240, 150, 180),
}

# Market-1501 attribute colour sets: upper has no pink/brown, lower has no red.
UPPER_COLOURS: tuple[str, ...] = ("black", "white", "red", "purple", "yellow", "gray", "blue", "green")
LOWER_COLOURS: tuple[str, ...] = ("black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown")

_FORMATS: dict[str, str] = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
    ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF",
}
_SKIN: tuple[Colour, ...] = ((224, 172, 140), (198, 134, 100), (141, 85, 60), (240, 200, 170))
_NOISE = 6  # +- per channel: enough to look like a photo, far too little to change a colour's name


def identity_colours(pid: int) -> tuple[str, str]:
    """The (upper, lower) palette names an identity wears in every synthetic tree; never equal."""
    upper = UPPER_COLOURS[(pid * 3) % len(UPPER_COLOURS)]
    lower = LOWER_COLOURS[(pid * 5 + 2) % len(LOWER_COLOURS)]
    if lower == upper:
        lower = LOWER_COLOURS[(pid * 5 + 3) % len(LOWER_COLOURS)]
    return upper, lower


def _format_for(path: Path, fmt: str | None) -> str:
    if fmt:
        name = fmt.upper().lstrip(".")
        return {"JPG": "JPEG", "TIF": "TIFF"}.get(name, name)
    try:
        return _FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"no image format for {path.name!r}; pass fmt=") from None


def _background(rnd: random.Random) -> Colour:
    """A pale, slightly tinted wall/pavement colour, distinct from the saturated clothing colours."""
    base = rnd.randint(175, 205)
    return (base + rnd.randint(-6, 6), base + rnd.randint(-6, 6), base - rnd.randint(0, 12))


def draw_person(*, upper: Colour, lower: Colour, size: tuple[int, int] = (64, 128), seed: int = 0) -> Image.Image:
    """The RGB figure itself (no file): used by make_crop and handy for in-memory tests."""
    w, h = size
    rnd = random.Random(seed)
    img = Image.new("RGB", size, _background(rnd))
    d = ImageDraw.Draw(img)
    dx = rnd.randint(-max(1, w // 32), max(1, w // 32))  # a little pose/position jitter
    cx = w // 2 + dx
    skin = _SKIN[rnd.randrange(len(_SKIN))]
    hair = (rnd.randint(20, 60),) * 3
    # head and hair
    hr = max(2, int(w * 0.13))
    hy = int(h * 0.12)
    d.ellipse([cx - hr, hy - hr, cx + hr, hy + hr], fill=skin)
    d.pieslice([cx - hr, hy - hr, cx + hr, hy + hr], 180, 360, fill=hair)
    # upper body with arms: rows 20%..56%
    top, waist = int(h * 0.20), int(h * 0.56)
    d.rectangle([cx - int(w * 0.28), top, cx + int(w * 0.28), waist], fill=upper)
    d.rectangle([cx - int(w * 0.38), top + 2, cx - int(w * 0.29), int(h * 0.50)], fill=upper)
    d.rectangle([cx + int(w * 0.29), top + 2, cx + int(w * 0.38), int(h * 0.50)], fill=upper)
    # lower body: rows 56%..92%, two legs with a hairline gap of a darker shade
    feet = int(h * 0.92)
    d.rectangle([cx - int(w * 0.24), waist, cx + int(w * 0.24), feet], fill=lower)
    shade = tuple(max(0, c - 25) for c in lower)
    d.line([cx, int(h * 0.66), cx, feet], fill=shade, width=1)
    # shoes
    d.rectangle([cx - int(w * 0.26), feet, cx + int(w * 0.26), min(h - 1, feet + int(h * 0.04))],
                fill=(35, 30, 30))
    return _add_noise(img, rnd)


def _add_noise(img: Image.Image, rnd: random.Random) -> Image.Image:
    """Seeded per-pixel noise (Image.effect_noise is not seedable, so it would break determinism)."""
    raw = img.tobytes()
    noise = rnd.randbytes(len(raw))
    span = 2 * _NOISE + 1
    out = bytes(min(255, max(0, v + n % span - _NOISE)) for v, n in zip(raw, noise))
    return Image.frombytes("RGB", img.size, out)


def encode(img: Image.Image, fmt: str) -> bytes:
    """Encoded bytes; JPEG/WebP at a fixed quality so output is small and reproducible."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=85, optimize=True)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=85, method=4)
    elif fmt == "GIF":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, "GIF")
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> Path:
    """Write only when the bytes differ, so regenerating a tree is idempotent (mtimes stay put)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    path.write_bytes(data)
    return path


def make_crop(path: Path, *, upper: Colour, lower: Colour, size: tuple[int, int] = (64, 128),
              seed: int = 0, fmt: str | None = None) -> Path:
    """Write a synthetic person crop to `path` (format from the extension unless `fmt`); returns it."""
    path = Path(path)
    img = draw_person(upper=upper, lower=lower, size=size, seed=seed)
    return _write_if_changed(path, encode(img, _format_for(path, fmt)))


def _crop_for(path: Path, pid: int, seed: int) -> Path:
    upper, lower = identity_colours(pid)
    return make_crop(path, upper=PALETTE[upper], lower=PALETTE[lower], seed=seed)


def _counts(per_split: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(per_split, int):
        return {"train": per_split, "query": 1, "gallery": per_split}
    return {"train": 2, "query": 1, "gallery": 2, **per_split}


def _ids(n_ids: int) -> tuple[list[int], list[int]]:
    """Disjoint train and test identities, as in the real sets (train 2, 4, ...; test 1, 3, ...)."""
    return [2 * i + 2 for i in range(n_ids)], [2 * i + 1 for i in range(n_ids)]


def _bounding_box_tree(base: Path, n_ids: int, per_split: int | Mapping[str, int],
                       name: Callable[[int, int, str], str], seed_offset: int) -> list[Path]:
    """The Market-1501/DukeMTMC-reID layout: bounding_box_train, query, bounding_box_test, named by `name`."""
    counts = _counts(per_split)
    train_ids, test_ids = _ids(n_ids)
    paths: list[Path] = []
    for folder, split, ids in (("bounding_box_train", "train", train_ids), ("query", "query", test_ids),
                               ("bounding_box_test", "gallery", test_ids)):
        for pid in ids:
            for k in range(counts[split]):
                seed = pid * 100 + k * 7 + len(split) + seed_offset
                paths.append(_crop_for(base / folder / name(pid, k, split), pid, seed=seed))
    return paths


def make_market_tree(root: Path, n_ids: int = 4, per_split: int | Mapping[str, int] = 2,
                     with_junk: bool = True, top_folder: str | None = None) -> list[Path]:
    """A small Market-1501 tree: `bounding_box_train`, `query`, `bounding_box_test`.

    `per_split` is images per identity: an int (train and gallery; query gets 1) or a mapping such as
    {"train": 4, "query": 1, "gallery": 3}. Train and test identities are disjoint; query and gallery
    share theirs and use different cameras. `with_junk` adds one `-1_...` junk and one `0000_...`
    distractor to bounding_box_test. `top_folder` nests everything in e.g. "Market-1501-v15.09.15".
    """
    base = Path(root) / top_folder if top_folder else Path(root)

    def market_name(pid: int, k: int, split: str) -> str:
        cam = 1 + (pid + k + (0 if split == "query" else 3)) % 6
        frame = 100 * pid + 25 * k + (7 if split == "query" else 0)
        return f"{pid:04d}_c{cam}s1_{frame:06d}_{k + 1:02d}.jpg"

    paths = _bounding_box_tree(base, n_ids, per_split, market_name, seed_offset=0)
    if with_junk:
        gal = base / "bounding_box_test"
        paths.append(make_crop(gal / "-1_c1s1_000401_03.jpg", upper=PALETTE["gray"], lower=PALETTE["gray"],
                               seed=9001))
        paths.append(make_crop(gal / "0000_c3s1_000551_01.jpg", upper=PALETTE["brown"],
                               lower=PALETTE["black"], seed=9002))
    return paths


def make_duke_tree(root: Path, n_ids: int = 4, per_split: int | Mapping[str, int] = 2) -> list[Path]:
    """A small DukeMTMC-reID tree (`0001_c2_f0046182.jpg`, cameras 1-8)."""

    def duke_name(pid: int, k: int, split: str) -> str:
        cam = 1 + (pid + k + (0 if split == "query" else 4)) % 8
        frame = 40000 + 1000 * pid + 37 * k + (11 if split == "query" else 0)
        return f"{pid:04d}_c{cam}_f{frame:07d}.jpg"

    return _bounding_box_tree(Path(root), n_ids, per_split, duke_name, seed_offset=50)


def _msmt_name(pid: int, k: int, cam: int) -> str:
    tod = ("morning", "noon", "afternoon")[k % 3]
    return f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303{tod}_{15 + 40 * k:04d}_{k % 2}.jpg"


def make_msmt_tree(root: Path, with_lists: bool = True, v2: bool = False, n_ids: int = 3,
                   per_id: int = 3) -> list[Path]:
    """A small MSMT17 tree: V1 `train/`,`test/` or V2 `mask_train_v2/`,`mask_test_v2/`.

    Images sit in per-identity folders (`train/0000/0000_000_01_0303morning_0015_0.jpg`); test ids
    restart at 0 as in the real set. With `with_lists`, `list_train.txt` gets all but the last image of
    each train id (that one goes to `list_val.txt`); `list_query.txt` gets the first image of each
    test id and `list_gallery.txt` the rest.
    """
    base = Path(root)
    train_dir = base / ("mask_train_v2" if v2 else "train")
    test_dir = base / ("mask_test_v2" if v2 else "test")
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    paths: list[Path] = []
    for pid in range(n_ids):
        for k in range(per_id):
            rel = _msmt_name(pid, k, cam=1 + (pid + k) % 15)
            paths.append(_crop_for(train_dir / rel, pid + 200, seed=3000 + pid * 10 + k))
            lists["val" if k == per_id - 1 else "train"].append(f"{rel} {pid}")
    for pid in range(n_ids):
        for k in range(per_id):
            rel = _msmt_name(pid, k, cam=1 + (pid + 2 * k) % 15)
            paths.append(_crop_for(test_dir / rel, pid + 300, seed=4000 + pid * 10 + k))
            lists["query" if k == 0 else "gallery"].append(f"{rel} {pid}")
    if with_lists:
        for split, lines in lists.items():
            path = base / f"list_{split}.txt"
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            paths.append(path)
    return paths


def make_cuhk03_tree(root: Path, np_layout: bool = False, pairs: int = 2, persons: int = 2,
                     images: int = 2) -> list[Path]:
    """Converted CUHK03: `images_detected/` and `images_labeled/` with `1_001_1_01.png` names.

    With `np_layout` a Market-style `cuhk03-np/{detected,labeled}/{bounding_box_train,query,
    bounding_box_test}/0001_c1_1.png` tree is added as well (what the re-ranking release ships).
    """
    base = Path(root)
    paths: list[Path] = []
    for kind in ("detected", "labeled"):
        for pair in range(1, pairs + 1):
            for person in range(1, persons + 1):
                for view in (1, 2):
                    for img in range(1, images + 1):
                        name = f"{pair}_{person:03d}_{view}_{img:02d}.png"
                        paths.append(_crop_for(base / f"images_{kind}" / name, pair * 1000 + person,
                                               seed=pair * 1000 + person * 10 + view * 3 + img))
    if np_layout:
        for kind in ("detected", "labeled"):
            np_dir = base / "cuhk03-np" / kind
            for folder, pid, cam, n in (("bounding_box_train", 1, 1, 1), ("bounding_box_train", 1, 2, 2),
                                        ("bounding_box_train", 3, 1, 1), ("query", 2, 1, 1),
                                        ("bounding_box_test", 2, 2, 2), ("bounding_box_test", 4, 2, 1)):
                paths.append(_crop_for(np_dir / folder / f"{pid:04d}_c{cam}_{n}.png", pid,
                                       seed=7000 + pid * 10 + cam + n))
    return paths


def make_folder_tree(root: Path) -> list[Path]:
    """A plain nested folder of crops in every supported format (no ReID names, no split folders)."""
    base = Path(root)
    names = ["a.jpg", "b.jpeg", "c.png", "sub/d.webp", "sub/e.bmp", "sub/deeper/f.gif", "sub/deeper/g.tif",
             "h.tiff"]
    return [_crop_for(base / name, pid=i + 11, seed=500 + i) for i, name in enumerate(names)]


# --------------------------------------------------------------------------------------------- bad files


def make_corrupt(path: Path, seed: int = 0, size: int = 2048) -> Path:
    """Random bytes under an image name (e.g. `.jpg`): not decodable at all."""
    path = Path(path)
    return _write_if_changed(path, random.Random(seed).randbytes(size))


def make_truncated(path: Path, seed: int = 0) -> Path:
    """A real JPEG cut in half: the header is valid, the pixel data ends early."""
    path = Path(path)
    data = encode(draw_person(upper=PALETTE["red"], lower=PALETTE["blue"], seed=seed), "JPEG")
    return _write_if_changed(path, data[: len(data) // 2])


def make_not_image(path: Path) -> Path:
    """A text file under an image name (e.g. `.png`)."""
    path = Path(path)
    return _write_if_changed(path, b"this is not an image, just text with an image extension\n")
