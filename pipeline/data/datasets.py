"""Dataset layouts: file-name parsing and folder scanning for the common person ReID sets.

Everything here is a plain function over names and folders so the rules can be table-tested without a
real dataset. The index builder (`pipeline.data.index`) is the only caller that touches the disk through
`scan_dataset`; the list-index loader only uses the name parsers.

Layouts handled (as the datasets' readmes and the torchreid/fast-reid loaders describe them):

* Market-1501: `bounding_box_train` -> "train", `query` -> "query", `bounding_box_test` -> "gallery",
  `gt_bbox` -> "gt_bbox" (only when asked for). pid -1 (junk) and 0000 (distractor) are kept and marked
  `junk=True`.
* DukeMTMC-reID: the same folders; names `0001_c2_f0046182.jpg`; no junk ids.
* MSMT17 V1 (`train/`, `test/`) or V2 (`mask_train_v2/`, `mask_test_v2/`). With `list_*.txt` files the
  lists decide the split ("train", "val", "query", "gallery") and the pid; without them each folder is
  walked: the train folder gives "train", the test folder gives "test" (query and gallery cannot be told
  apart without the lists, so we do not pretend to).
* CUHK03: when a Market-style `cuhk03-np/{detected,labeled}/...` tree exists only that tree is indexed
  (it carries the split); otherwise `images_detected/` and `images_labeled/` are indexed with split None,
  because the official split lives in .mat files that would need scipy.
* Any other folder: every image below it (recursive), pid/camid None; the split is the first folder
  level when that folder is named train, val, query, gallery or test, else None.

Hidden files (`.foo.jpg`, macOS `._foo.jpg` resource forks) and `__MACOSX` folders are skipped: they
carry image extensions but are not images. Other non-image files are skipped silently; image files whose
names do not parse are kept with pid/camid None.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline.errors import InputError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

DATASETS: tuple[str, ...] = ("market1501", "dukemtmc", "msmt17", "cuhk03", "folder")

# Accepted spellings for --dataset, compared after lower-casing and dropping "-", "_", " " and ".".
_ALIASES: dict[str, str] = {
    "auto": "auto",
    "market1501": "market1501",
    "market": "market1501",
    "market1501v150915": "market1501",
    "dukemtmc": "dukemtmc",
    "dukemtmcreid": "dukemtmc",
    "duke": "dukemtmc",
    "msmt17": "msmt17",
    "msmt": "msmt17",
    "msmt17v1": "msmt17",
    "msmt17v2": "msmt17",
    "cuhk03": "cuhk03",
    "cuhk": "cuhk03",
    "cuhk03np": "cuhk03",
    "folder": "folder",
    "dir": "folder",
    "directory": "folder",
    "plain": "folder",
}

SPLITS: tuple[str, ...] = ("train", "val", "query", "gallery", "test", "gt_bbox")

# Market/Duke folder -> split. gt_bbox is hand-drawn boxes of the query people: opt-in only.
MARKET_FOLDERS: dict[str, str] = {
    "bounding_box_train": "train",
    "query": "query",
    "bounding_box_test": "gallery",
    "gt_bbox": "gt_bbox",
}
_MARKET_DEFAULT_SPLITS = frozenset({"train", "query", "gallery"})

MSMT_TRAIN_FOLDERS: tuple[str, ...] = ("train", "mask_train_v2")
MSMT_TEST_FOLDERS: tuple[str, ...] = ("test", "mask_test_v2")
MSMT_LISTS: dict[str, str] = {  # split -> list file; train/val are under the train folder
    "train": "list_train.txt",
    "val": "list_val.txt",
    "query": "list_query.txt",
    "gallery": "list_gallery.txt",
}

CUHK03_FOLDERS: tuple[str, ...] = ("images_detected", "images_labeled")
CUHK03_NP = "cuhk03-np"
CUHK03_NP_KINDS: tuple[str, ...] = ("detected", "labeled")

# Plain folders: a first-level folder with one of these names gives the split.
FOLDER_SPLITS: frozenset[str] = frozenset({"train", "val", "query", "gallery", "test"})

# Any folder name that tells the split of the images below it (used for list indexes).
_PATH_SPLITS: dict[str, str] = {
    **MARKET_FOLDERS,
    "train": "train",
    "mask_train_v2": "train",
    "val": "val",
    "gallery": "gallery",
    "test": "test",
    "mask_test_v2": "test",
}

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_")  # 0002_c1s1_000451_03
_DUKE_RE = re.compile(r"^(-?\d+)_c(\d+)_f\d+")  # 0001_c2_f0046182
_REID_RE = re.compile(r"^(-?\d+)_c(\d+)")  # the torchreid rule, also fits CUHK03-NP 0001_c1_1
_MSMT_RE = re.compile(r"^(\d+)_(\d+)_(\d+)_")  # 0000_000_01_0303morning_0015_0
_CUHK03_RE = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.")  # 1_001_1_01.png

_SAMPLE_NAMES = 64  # names looked at to tell Market from Duke; enough, and cheap on a network drive


class ParsedName(NamedTuple):
    """What a file name says about its image; None where the name does not say.

    A NamedTuple rather than a frozen dataclass: list indexes parse a million names at load and this
    is several times cheaper to build.
    """

    pid: int | None = None
    camid: int | None = None
    junk: bool = False


@dataclass(frozen=True)
class DatasetImage:
    """One image found in a dataset: `image_id` is relative to the root, `/`-separated."""

    image_id: str
    pid: int | None
    camid: int | None
    split: str | None
    junk: bool = False


UNPARSED = ParsedName()


# --------------------------------------------------------------------------------------------- names


def parse_market_name(name: str) -> ParsedName | None:
    """Market-1501 `0002_c1s1_000451_03.jpg`; pid -1 (junk) and 0 (distractor) come back junk=True.

    Only the torchreid rule (`pid_c<cam>`) is required, so hand-renamed files still parse; the
    `s<seq>` part is what `is_market_name` uses to tell Market from Duke.
    """
    m = _REID_RE.match(name)
    if m is None:
        return None
    pid = int(m.group(1))
    return ParsedName(pid=pid, camid=int(m.group(2)), junk=pid in (-1, 0))


def parse_duke_name(name: str) -> ParsedName | None:
    """DukeMTMC-reID `0001_c2_f0046182.jpg` (camera 1-8). Duke has no junk ids."""
    m = _REID_RE.match(name)
    if m is None:
        return None
    return ParsedName(pid=int(m.group(1)), camid=int(m.group(2)))


def is_market_name(name: str) -> bool:
    """True for the Market sequence form `c1s1`; Duke names have `_c2_f...` instead."""
    return _MARKET_RE.match(name) is not None


def is_duke_name(name: str) -> bool:
    return _DUKE_RE.match(name) is not None


_STYLED_RE = re.compile(r"^(-?\d+)_c(\d+)(?:(s\d)|(_f\d))?")


def parse_reid_name(name: str) -> ParsedName | None:
    """Market- or Duke-style name of unknown origin (list indexes): junk only for Market-style names."""
    styled = parse_reid_name_styled(name)
    return styled[0] if styled else None


def parse_reid_name_styled(name: str) -> tuple[ParsedName, str | None] | None:
    """Like parse_reid_name plus the style seen: "market1501" (`c1s1`), "dukemtmc" (`c2_f...`) or
    None (just `pid_c<cam>`, e.g. CUHK03-NP). One regex, because list indexes call it per image."""
    m = _STYLED_RE.match(name)
    if m is None:
        return None
    pid = int(m.group(1))
    if m.group(3):
        return ParsedName(pid, int(m.group(2)), pid in (-1, 0)), "market1501"
    return ParsedName(pid, int(m.group(2)), False), "dukemtmc" if m.group(4) else None


def parse_msmt_name(name: str) -> ParsedName | None:
    """MSMT17 `0000_000_01_0303morning_0015_0.jpg`: pid is the first field, camera the third."""
    m = _MSMT_RE.match(name)
    if m is None:
        return None
    return ParsedName(pid=int(m.group(1)), camid=int(m.group(3)))


def parse_msmt_list_line(line: str) -> tuple[str, int | None, int | None] | None:
    """One line of an MSMT17 `list_*.txt`: `0000/0000_000_01_0303morning_0015_0.jpg 0`.

    Returns (relative path with `/`, pid, camid), or None for a blank line. The pid comes from the
    line (the authority); a line without one falls back to the file name. Never raises: a strange
    line still names an image, which is better captioned without a pid than dropped.
    """
    fields = line.split()
    if not fields:
        return None
    rel = fields[0].replace("\\", "/")
    name = rel.rsplit("/", 1)[-1]
    parsed = parse_msmt_name(name)
    pid: int | None = parsed.pid if parsed else None
    if len(fields) > 1:
        try:
            pid = int(fields[1])
        except ValueError:
            pass
    return rel, pid, parsed.camid if parsed else None


def parse_cuhk03_name(name: str) -> ParsedName | None:
    """Converted CUHK03 `1_001_1_01.png`: camera pair 1-5, person, view 1-2, image.

    Person numbers restart in every camera pair, so pid = pair * 1000 + person (pair 1 person 1 ->
    1001): unique, stable and still readable. camid = (pair - 1) * 2 + view, i.e. 1..10, one per
    physical camera.
    """
    m = _CUHK03_RE.match(name)
    if m is None:
        return None
    pair, person, view = int(m.group(1)), int(m.group(2)), int(m.group(3))
    return ParsedName(pid=pair * 1000 + person, camid=(pair - 1) * 2 + view)


def split_from_parts(folders: list[str] | tuple[str, ...]) -> str | None:
    """The split named by the deepest known folder of a path (`.../query/x.jpg` -> "query")."""
    for folder in reversed(folders):
        split = _PATH_SPLITS.get(folder)
        if split is not None:
            return split
    return None


def is_image_name(name: str) -> bool:
    """An image by extension, and not a hidden file or a macOS `._` resource fork."""
    if name.startswith("."):
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------- options


def normalise_dataset_name(name: str) -> str:
    """`--dataset` value -> one of DATASETS or "auto"; accepts market, Market-1501, duke, ..."""
    key = re.sub(r"[-_ .]", "", name.strip().lower())
    canonical = _ALIASES.get(key)
    if canonical is None:
        raise InputError(f"unknown dataset {name!r}; use one of: auto, {', '.join(DATASETS)}")
    return canonical


def check_splits(splits: set[str] | frozenset[str] | None) -> frozenset[str] | None:
    """Reject unknown split names early, with the list of known ones."""
    if splits is None:
        return None
    unknown = sorted(s for s in splits if s not in SPLITS)
    if unknown:
        raise InputError(f"unknown split {', '.join(map(repr, unknown))}; use any of: {', '.join(SPLITS)}")
    return frozenset(splits)


# --------------------------------------------------------------------------------------------- walking


# Files listed so far, told after each folder while `scan_dataset(progress=...)` runs (a context
# variable rather than a parameter threaded through every dataset's scanner).
_SCAN_PROGRESS: ContextVar[Callable[[int], None] | None] = ContextVar("scan_progress", default=None)
_SCAN_SEEN: ContextVar[list[int] | None] = ContextVar("scan_seen", default=None)


def _walk_images(folder: Path, prefix: str) -> Iterator[str]:
    """Relative `/` paths (prefixed) of the images under `folder`, recursive.

    os.walk rather than Path.rglob: on a million files it builds no Path objects, which is several
    times faster; symlinked sub-folders are not followed (no cycles).
    """
    top = os.fspath(folder)
    progress, seen = _SCAN_PROGRESS.get(), _SCAN_SEEN.get()
    for dirpath, dirnames, filenames in os.walk(top):
        if progress is not None and seen is not None:
            seen[0] += len(filenames)
            progress(seen[0])
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        rel_dir = os.path.relpath(dirpath, top)
        rel_prefix = prefix if rel_dir == "." else prefix + rel_dir.replace(os.sep, "/") + "/"
        for name in filenames:
            if is_image_name(name):
                yield rel_prefix + name


def _sample_names(folder: Path, limit: int = _SAMPLE_NAMES) -> list[str]:
    """Up to `limit` image names directly in `folder`, without listing all of it."""
    names: list[str] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if is_image_name(entry.name):
                    names.append(entry.name)
                    if len(names) >= limit:
                        break
    except OSError:
        pass
    return names


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _rel(base: Path, root: Path) -> str:
    """`/` prefix of `base` relative to `root` ("" when equal)."""
    if base == root:
        return ""
    return base.relative_to(root).as_posix() + "/"


# --------------------------------------------------------------------------------------------- layouts


def _has_market_folders(base: Path) -> bool:
    """Any of the three Market/Duke folders (used when the user named the dataset)."""
    return any(_is_dir(base / f) for f in ("bounding_box_train", "bounding_box_test", "query"))


def _looks_market(base: Path) -> bool:
    """Market/Duke for detection: a `bounding_box_*` folder, or a `query` folder of ReID-style names
    (a plain train/query/gallery image folder must stay a "folder")."""
    if _is_dir(base / "bounding_box_train") or _is_dir(base / "bounding_box_test"):
        return True
    return any(parse_duke_name(n) for n in _sample_names(base / "query", 8))


def _msmt_folders(base: Path) -> tuple[Path | None, Path | None]:
    train = next((base / f for f in MSMT_TRAIN_FOLDERS if _is_dir(base / f)), None)
    test = next((base / f for f in MSMT_TEST_FOLDERS if _is_dir(base / f)), None)
    return train, test


def _looks_msmt(base: Path) -> bool:
    """MSMT17: a train/test folder pair plus either the list files or MSMT-style names.

    `train/` + `test/` alone is too common (any ImageFolder) to call it MSMT17.
    """
    train, test = _msmt_folders(base)
    if train is None and test is None:
        return False
    if any((base / n).is_file() for n in MSMT_LISTS.values()):
        return True
    if any(f.name.startswith("mask_") for f in (train, test) if f is not None):
        return True
    for folder in (train, test):
        if folder is None:
            continue
        try:
            with os.scandir(folder) as it:
                subdirs = sorted(e.name for e in it if e.is_dir())[:3]
        except OSError:
            continue
        for sub in subdirs:
            if any(parse_msmt_name(n) for n in _sample_names(folder / sub, 8)):
                return True
    return False


def _cuhk03_np_base(base: Path) -> Path | None:
    """The folder holding `detected/`/`labeled/` Market-style trees, if any."""
    for candidate in (base / CUHK03_NP, base):
        if any(_is_dir(candidate / k / "bounding_box_train") or _is_dir(candidate / k / "query")
               for k in CUHK03_NP_KINDS):
            return candidate
    return None


def _looks_cuhk03(base: Path) -> bool:
    return any(_is_dir(base / f) for f in CUHK03_FOLDERS) or _cuhk03_np_base(base) is not None


def _market_or_duke(base: Path) -> str:
    """Same folders, different names: a `c1s1` sequence part means Market, `c2_f...` means Duke."""
    duke = False
    for folder in MARKET_FOLDERS:
        for name in _sample_names(base / folder):
            if is_market_name(name):
                return "market1501"
            duke = duke or is_duke_name(name)
    return "dukemtmc" if duke else "market1501"


def _detect_here(base: Path) -> str | None:
    if _looks_cuhk03(base):
        return "cuhk03"
    if _looks_market(base):
        return _market_or_duke(base)
    if _looks_msmt(base):
        return "msmt17"
    return None


def dataset_base(root: Path) -> Path:
    """The folder that holds the dataset's folders: `root`, or its single sub-folder when the archive
    was unpacked with an extra top folder (`Market-1501-v15.09.15/`, `DukeMTMC-reID/`, `MSMT17_V1/`).
    """
    if _detect_here(root) is not None:
        return root
    try:
        with os.scandir(root) as it:
            subdirs = [e for e in it if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX"]
    except OSError:
        return root
    if len(subdirs) == 1 and _detect_here(Path(subdirs[0].path)) is not None:
        return Path(subdirs[0].path)
    return root


def detect_dataset(root: Path) -> str:
    """"market1501" | "dukemtmc" | "msmt17" | "cuhk03" | "folder", from folder names and a few file
    names (never a full listing, so it is quick on a network drive)."""
    return _detect_here(dataset_base(root)) or "folder"


# --------------------------------------------------------------------------------------------- scanning


def _scan_market_like(root: Path, base: Path, splits: frozenset[str] | None,
                      parse: Callable[[str], ParsedName | None], what: str,
                      strict: bool = True) -> list[DatasetImage]:
    """Market-style folders under `base`; `strict` raises when none exist (the user named the set)."""
    wanted = splits if splits is not None else _MARKET_DEFAULT_SPLITS
    if strict and not _has_market_folders(base):
        raise InputError(f"no {what} folders (bounding_box_train, query, bounding_box_test) in {root}")
    images: list[DatasetImage] = []
    for folder, split in MARKET_FOLDERS.items():
        if split not in wanted or not _is_dir(base / folder):
            continue
        for image_id in _walk_images(base / folder, _rel(base / folder, root)):
            parsed = parse(image_id.rsplit("/", 1)[-1]) or UNPARSED
            images.append(DatasetImage(image_id, parsed.pid, parsed.camid, split, parsed.junk))
    return images


def _scan_msmt(root: Path, base: Path, splits: frozenset[str] | None) -> list[DatasetImage]:
    train, test = _msmt_folders(base)
    if train is None and test is None:
        raise InputError(f"no MSMT17 folders (train/test or mask_train_v2/mask_test_v2) in {root}")
    images: list[DatasetImage] = []
    for folder, list_splits, walk_split in ((train, ("train", "val"), "train"),
                                            (test, ("query", "gallery"), "test")):
        if folder is None:
            continue
        prefix = _rel(folder, root)
        lists = [(s, base / MSMT_LISTS[s]) for s in list_splits if (base / MSMT_LISTS[s]).is_file()]
        if lists:
            for split, list_file in lists:
                if splits is not None and split not in splits:
                    continue
                images.extend(_read_msmt_list(list_file, prefix, split))
        elif splits is None or walk_split in splits:
            for image_id in _walk_images(folder, prefix):
                parsed = parse_msmt_name(image_id.rsplit("/", 1)[-1]) or UNPARSED
                images.append(DatasetImage(image_id, parsed.pid, parsed.camid, walk_split))
    return images


def _read_msmt_list(list_file: Path, prefix: str, split: str) -> list[DatasetImage]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read MSMT17 list {list_file}: {_reason(exc)}") from None
    images = []
    for line in text.splitlines():
        parsed = parse_msmt_list_line(line)
        if parsed is None:
            continue
        rel, pid, camid = parsed
        if is_image_name(rel.rsplit("/", 1)[-1]):
            images.append(DatasetImage(prefix + rel.lstrip("/"), pid, camid, split))
    return images


def _scan_cuhk03(root: Path, base: Path, splits: frozenset[str] | None) -> list[DatasetImage]:
    np_base = _cuhk03_np_base(base)
    images: list[DatasetImage] = []
    if np_base is not None:
        for kind in CUHK03_NP_KINDS:
            if _is_dir(np_base / kind):
                images.extend(_scan_market_like(root, np_base / kind, splits, parse_duke_name,
                                                "CUHK03-NP", strict=False))
        return images
    if not any(_is_dir(base / f) for f in CUHK03_FOLDERS):
        raise InputError(f"no CUHK03 folders (images_detected, images_labeled, cuhk03-np) in {root}")
    if splits is not None:  # no split information in this layout: nothing can match a split filter
        return images
    for folder in CUHK03_FOLDERS:
        if _is_dir(base / folder):
            for image_id in _walk_images(base / folder, _rel(base / folder, root)):
                parsed = parse_cuhk03_name(image_id.rsplit("/", 1)[-1]) or UNPARSED
                images.append(DatasetImage(image_id, parsed.pid, parsed.camid, None))
    return images


def _scan_folder(root: Path, splits: frozenset[str] | None) -> list[DatasetImage]:
    images = []
    for image_id in _walk_images(root, ""):
        first, sep, _ = image_id.partition("/")
        split = first if sep and first in FOLDER_SPLITS else None
        if splits is None or split in splits:
            images.append(DatasetImage(image_id, None, None, split))
    return images


def scan_dataset(root: Path, dataset: str, splits: set[str] | frozenset[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[DatasetImage]:
    """All images of `root` read as `dataset` (a name from DATASETS, not "auto"), sorted by image_id.

    `splits` None means the dataset's natural splits (everything except Market's gt_bbox). Duplicates
    (an MSMT17 image listed twice) keep their first occurrence, so image_id stays unique.
    `progress(files listed so far)` is called after each folder listed.
    """
    tokens = (_SCAN_PROGRESS.set(progress), _SCAN_SEEN.set([0]))
    try:
        return _scan_dataset(root, dataset, splits)
    finally:
        _SCAN_SEEN.reset(tokens[1])
        _SCAN_PROGRESS.reset(tokens[0])


def _scan_dataset(root: Path, dataset: str, splits: set[str] | frozenset[str] | None) -> list[DatasetImage]:
    wanted = check_splits(splits)
    base = dataset_base(root)
    if dataset == "market1501":
        images = _scan_market_like(root, base, wanted, parse_market_name, "Market-1501")
    elif dataset == "dukemtmc":
        images = _scan_market_like(root, base, wanted, parse_duke_name, "DukeMTMC-reID")
    elif dataset == "msmt17":
        images = _scan_msmt(root, base, wanted)
    elif dataset == "cuhk03":
        images = _scan_cuhk03(root, base, wanted)
    elif dataset == "folder":
        images = _scan_folder(root, wanted)
    else:
        raise InputError(f"unknown dataset {dataset!r}; use one of: auto, {', '.join(DATASETS)}")
    unique: dict[str, DatasetImage] = {}
    for image in images:
        unique.setdefault(image.image_id, image)
    return [unique[k] for k in sorted(unique)]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
