"""The image index: build it from a dataset folder, write it, load and validate it.

The index is the contract between "which images" and "caption them": its order fixes each image's
`position` and therefore its part file, so it is sorted by image_id when built and never reordered at
load. Paths in it are relative to the root, so an index built on Linux loads on Windows (and the root
can be overridden with `root=` when the images moved).

These forms load:
  (a) the JSON index written by `write_index`: {"root", "dataset", "images": [{"image_id", "path", ...}]};
  (b) a JSON list of path strings;
  (c) a text file with one path per line (blank lines and `#` comments ignored, BOM and CRLF tolerated);
  (d) a JSON list of objects, or a JSONL file of them (one per line, blank lines ignored), as the users'
      own prepare scripts write them: {"path", "image_id"?, "split"?, "pid"/"person_id"?,
      "camid"/"camera"?, "junk"?, ...}; see `_load_objects`.
For (b)/(c) the file's order is kept, relative paths are relative to `root` (else the index file's
folder), image_id is the path relative to the root, pid/camid/junk come from Market/Duke-style names,
split from a known folder name in the path (query, bounding_box_test, ...), and the dataset is guessed
from the names ("market1501", "dukemtmc", else "folder"). (d) is the same except that a given image_id
is kept exactly as written, given fields win over parsed ones, other fields are kept (`IndexEntry.extra`,
for the JSONL export), and relative paths resolve against `root`, else the current folder, else the
index file's folder, judged on a small sample of paths (two folders finding them, or none, is an error).

A loaded index is held compactly (`IndexEntries`: the ids, small ints and one-byte codes; about 110
bytes an image instead of about 900 with an `IndexEntry` and a `Path` each), and the index files this
tool writes, and text lists, are read one line at a time (`_stream_index`), so loading never holds
the whole text, its parsed tree and the entries at once.

Loading is lexical on purpose: no per-image stat or Path.resolve() (a million files on a network drive
would take minutes). Containment in the root is checked on normalised strings (os.path.normpath, after
turning `\\` into `/`), which catches `..` escapes and absolute paths elsewhere but not symlinks that
point out of the root; a missing image is a per-image error of the run, not an index error.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import json
import os
import re
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.datasets import (
    DatasetImage,
    check_splits,
    detect_dataset,
    normalise_dataset_name,
    parse_reid_name_styled,
    scan_dataset,
    split_from_parts,
)
from pipeline.errors import ConfigError, IndexFormatError, InputError
from pipeline.records import IndexEntry


@dataclass
class LoadedIndex:
    """A validated index: `entries[i].position == i`, paths absolute, image_ids unique.

    `entries` is an `IndexEntries` (compact) as loaded; a run's subset (--limit/--sample) replaces it
    with a plain list of the chosen `IndexEntry`s.
    """

    root: Path
    dataset: str
    entries: Sequence[IndexEntry]
    source: Path


# --------------------------------------------------------------------------------------------- entries

_NO_INT = -(2**31)  # "not given" (None) in the pid/camid arrays


class IndexEntries(Sequence[IndexEntry]):
    """The index's images held compactly: parallel arrays, one `IndexEntry` made only when asked for.

    A million `IndexEntry`s with a `Path` each cost about 880 bytes an image; here an image costs its
    image_id string and a few bytes (pid and camid as 32-bit ints, the split as a one-byte code, junk
    as one byte). The relative path is kept only when it differs from the image_id (indexes of objects
    that name their own ids); the absolute path is root + relative path, made in `path_of`, the one
    place an image's file is derived. `position` is the order itself.
    """

    __slots__ = ("root_sep", "ids", "_rels", "_pids", "_camids", "_split_codes", "_split_names", "_split_code",
                 "_junk", "_extras", "_sorted", "_where")

    def __init__(self, root: str) -> None:
        self.root_sep = root.rstrip("\\/") + os.sep
        self.ids: list[str] = []
        self._rels: list[str | None] | None = None  # None: every relative path is its image_id
        self._pids = array("i")
        self._camids = array("i")
        self._split_codes = bytearray()
        self._split_names: list[str | None] = []
        self._split_code: dict[str | None, int] = {}
        self._junk = bytearray()
        self._extras: dict[int, dict[str, Any]] | None = None
        self._sorted: bool | None = None
        self._where: dict[str, int] | None = None

    # -- building

    def add(self, image_id: str, rel: str, pid: int | None, camid: int | None, split: str | None,
            junk: bool = False, extra: dict[str, Any] | None = None) -> None:
        """Append one image; `rel` is its path relative to the root with `/` separators."""
        n = len(self.ids)
        self.ids.append(image_id)
        if rel != image_id:
            if self._rels is None:
                self._rels = [None] * n
            self._rels.append(rel)
        elif self._rels is not None:
            self._rels.append(None)
        try:
            self._pids.append(_NO_INT if pid is None else pid)
        except OverflowError:
            self._pids = _append_int(self._pids, pid)
        try:
            self._camids.append(_NO_INT if camid is None else camid)
        except OverflowError:
            self._camids = _append_int(self._camids, camid)
        code = self._split_code.get(split)
        if code is None:
            code = self._split_code[split] = len(self._split_names)
            if code > 255:
                raise IndexFormatError(f"more than 256 different splits (at image {image_id!r})")
            self._split_names.append(sys.intern(split) if split is not None else None)
        self._split_codes.append(code)
        self._junk.append(1 if junk else 0)
        if extra:
            if self._extras is None:
                self._extras = {}
            self._extras[n] = extra

    # -- reading

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._entry(k) for k in range(*i.indices(len(self.ids)))]
        n = len(self.ids)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("index entry out of range")
        return self._entry(i)

    def __iter__(self) -> Iterator[IndexEntry]:
        return (self._entry(i) for i in range(len(self.ids)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (IndexEntries, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"IndexEntries({len(self.ids):,} images under {self.root_sep!r})"

    def _entry(self, i: int) -> IndexEntry:
        pid, camid = self._pids[i], self._camids[i]
        return IndexEntry(self.ids[i], Path(self.path_of(i)), None if pid == _NO_INT else pid,
                          None if camid == _NO_INT else camid, self._split_names[self._split_codes[i]], i,
                          bool(self._junk[i]), None if self._extras is None else self._extras.get(i))

    def rel_of(self, i: int) -> str:
        """Image i's path relative to the root, `/`-separated."""
        if self._rels is not None:
            rel = self._rels[i]
            if rel is not None:
                return rel
        return self.ids[i]

    def path_of(self, i: int) -> str:
        """Image i's absolute path: root + relative path (the one place it is derived)."""
        rel = self.rel_of(i)
        return self.root_sep + (rel if os.sep == "/" else rel.replace("/", os.sep))

    def paths(self) -> Iterable[str]:
        """Every image's absolute path as a string, in order (no `Path` objects); iterable again and
        again, each time made afresh (never a list of a million paths)."""
        return _EntryPaths(self)

    def is_sorted(self) -> bool:
        """Are the ids strictly increasing (as `build_index` writes them)? Then they are unique and a
        position is found by bisection, with no id -> position dict."""
        if self._sorted is None:
            ids = self.ids
            self._sorted = all(a < b for a, b in zip(ids, itertools.islice(ids, 1, None)))
        return self._sorted

    def position_of(self, image_id: str) -> int | None:
        """The index position of `image_id`, None if it is not in the index."""
        if self.is_sorted():
            i = bisect.bisect_left(self.ids, image_id)
            return i if i < len(self.ids) and self.ids[i] == image_id else None
        if self._where is None:
            self._where = {image_id: i for i, image_id in enumerate(self.ids)}
        return self._where.get(image_id)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return self.position_of(item) is not None
        if isinstance(item, IndexEntry):
            pos = self.position_of(item.image_id)
            return pos is not None and self._entry(pos) == item
        return False

    def positions(self) -> IndexPositions:
        """image_id -> position as a read-only mapping answered by the index (no second big dict)."""
        return IndexPositions(self)


class _EntryPaths:
    """`IndexEntries.paths()`: a re-iterable view, one path string at a time."""

    __slots__ = ("_entries",)

    def __init__(self, entries: IndexEntries) -> None:
        self._entries = entries

    def __iter__(self) -> Iterator[str]:
        e = self._entries
        return (e.path_of(i) for i in range(len(e)))

    def folders(self) -> set[str]:
        """The distinct folders holding the images, found from the relative paths (neighbours in an
        index mostly share a folder, so most images cost one comparison)."""
        e = self._entries
        heads: set[str] = set()
        previous = None
        for i in range(len(e)):
            head = e.rel_of(i).rpartition("/")[0]
            if head != previous:
                heads.add(head)
                previous = head
        return {_parent_folder(e.root_sep + (h.replace("/", os.sep) + os.sep if h else "") + "x") for h in heads}


class IndexPositions(Mapping[str, int]):
    """image_id -> index position, answered by `IndexEntries.position_of`."""

    __slots__ = ("_entries",)

    def __init__(self, entries: IndexEntries) -> None:
        self._entries = entries

    def __getitem__(self, image_id: str) -> int:
        pos = self._entries.position_of(image_id) if isinstance(image_id, str) else None
        if pos is None:
            raise KeyError(image_id)
        return pos

    def get(self, image_id, default=None):  # type: ignore[override]
        pos = self._entries.position_of(image_id) if isinstance(image_id, str) else None
        return default if pos is None else pos

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and self._entries.position_of(image_id) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries.ids)

    def values(self) -> range:  # type: ignore[override]
        return range(len(self._entries))

    @property
    def ids(self) -> list[str]:
        """The image_ids in index order (position i holds ids[i]): a reader whose rows mostly follow the
        index guesses the next position before it searches."""
        return self._entries.ids


def image_ids(entries: Sequence[IndexEntry]) -> Sequence[str]:
    """The image_ids of entries in order, without making an `IndexEntry` each when they are compact."""
    return entries.ids if isinstance(entries, IndexEntries) else [e.image_id for e in entries]


def index_positions(entries: Sequence[IndexEntry]) -> Mapping[str, int]:
    """image_id -> position: answered by compact entries themselves, else a dict."""
    return entries.positions() if isinstance(entries, IndexEntries) else {e.image_id: e.position for e in entries}


def _append_int(values: array, value: int | None) -> array:
    """Append to a 32-bit array, widened to 64 bits when a value does not fit (the sentinel stays)."""
    v = _NO_INT if value is None else value
    if values.typecode == "q":
        raise IndexFormatError(f"integer field {value} does not fit in 64 bits")
    values = array("q", values)
    try:
        values.append(v)
    except OverflowError:
        raise IndexFormatError(f"integer field {value} does not fit in 64 bits") from None
    return values


# --------------------------------------------------------------------------------------------- build


def build_index(root: Path, dataset: str = "auto", splits: set[str] | None = None,
                skip_junk: bool = False, follow_symlinks: bool = False) -> dict:
    """Scan a dataset folder into a JSON-ready index sorted by image_id.

    `splits` None = the dataset's natural splits; `skip_junk` drops Market's -1/0000 crops (kept and
    marked `"junk": true` otherwise, since captioning them is harmless and a trainer can filter).
    """
    root_abs, name, images = scan_index(root, dataset, splits, skip_junk, follow_symlinks)
    return {"root": str(root_abs), "dataset": name, "images": [_image_json(im) for im in images]}


def scan_index(root: Path, dataset: str = "auto", splits: set[str] | None = None, skip_junk: bool = False,
               follow_symlinks: bool = False, progress: Callable[[int], None] | None = None,
               ) -> tuple[Path, str, list[DatasetImage]]:
    """(absolute root, dataset name, images sorted by image_id): `build_index` before the JSON, so
    `prepare` can stream the images to the file without a dict per image held at once.
    `progress(files listed so far)` is called while the folders are listed."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"dataset root not found: {root}")
    if not root.is_dir():
        raise InputError(f"dataset root is not a folder: {root}")
    name = normalise_dataset_name(dataset)
    wanted = check_splits(splits)
    root_abs = root.resolve()
    if name == "auto":
        name = detect_dataset(root_abs)
    images = scan_dataset(root_abs, name, wanted, progress=progress)
    if skip_junk:
        images = [im for im in images if not im.junk]
    if not images:
        where = f" in splits {', '.join(sorted(wanted))}" if wanted else ""
        raise InputError(f"no images found{where} under {root} (read as {name})")
    if not follow_symlinks:
        refuse_escaping_symlinks(root_abs, _ScannedPaths(root_abs, images), f"dataset {root}")
    return root_abs, name, images


class _ScannedPaths:
    """The absolute paths of scanned images as strings, re-iterable (see `escaping_symlinks`)."""

    def __init__(self, root: Path, images: list[DatasetImage]) -> None:
        self.prefix = str(root).rstrip("\\/") + os.sep
        self.images = images

    def __iter__(self) -> Iterator[str]:
        prefix, sep = self.prefix, os.sep
        return (prefix + (im.image_id if sep == "/" else im.image_id.replace("/", sep)) for im in self.images)


def image_json(im: DatasetImage) -> dict[str, Any]:
    """One image as the index file holds it."""
    return _image_json(im)


def _image_json(im: DatasetImage) -> dict[str, Any]:
    item: dict[str, Any] = {"image_id": im.image_id, "path": im.image_id, "pid": im.pid,
                            "camid": im.camid, "split": im.split}
    if im.junk:
        item["junk"] = True
    return item


# --------------------------------------------------------------------------------------------- write


def write_index(index: dict, out: Path, progress: Callable[[int], None] | None = None) -> int:
    """Write atomically (temp file + os.replace) so a crash never leaves half an index behind.

    One image per line: valid JSON, diff-able, and about a third of the size of indent=2, and the
    layout `load_index` reads a line at a time. Streamed: `index["images"]` may be any iterable
    (a generator), and no text of the whole index is built. `progress(n)` is called every 10,000
    images. Returns the number of images written.
    """
    out = Path(out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8", newline="\n") as fh:
            count = _write_index_lines(index, fh, progress)
        os.replace(tmp, out)
        return count
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ConfigError(f"cannot write index {out}: {exc.strerror or exc}") from None


def _write_index_lines(index: dict, fh: Any, progress: Callable[[int], None] | None) -> int:
    """`{`, one `"key": value,` per line, `"images": [`, one image per line, `]`, `}`."""
    keys = [k for k in index if k != "images"] + (["images"] if "images" in index else [])
    count = 0
    fh.write("{\n")
    for i, key in enumerate(keys):
        comma = "," if i < len(keys) - 1 else ""
        head = f"  {json.dumps(key)}: "
        if key != "images":
            fh.write(f"{head}{json.dumps(index[key], ensure_ascii=False)}{comma}\n")
            continue
        for im in index["images"]:
            fh.write(f"{head}[\n    " if count == 0 else ",\n    ")
            fh.write(json.dumps(im, ensure_ascii=False))
            count += 1
            if progress is not None and count % 10_000 == 0:
                progress(count)
        fh.write(f"{head}[]{comma}\n" if count == 0 else f"\n  ]{comma}\n")
    fh.write("}\n")
    return count


# --------------------------------------------------------------------------------------------- load


def load_index(path: Path, root: Path | None = None, *, follow_symlinks: bool = False,
               require_files: bool = True) -> LoadedIndex:
    """Read and validate an index in any of its forms; `root` overrides the image root.

    Images that are symlinks to files outside the root are refused unless `follow_symlinks`.
    `require_files=False` (export, status: they read ids, not images) lets an index of objects whose
    relative paths are found from nowhere load anyway, when every object gives its own image_id (the ids
    then do not depend on where the paths point).
    """
    path = Path(path)
    root_path = None if root is None else Path(root)
    with _gc_paused():
        loaded = _stream_index(path, root_path)
        if loaded is None:
            loaded = _parse_index(path, _read_text(path), root_path, require_files)
    if not follow_symlinks:
        refuse_escaping_symlinks(loaded.root, loaded.entries.paths(), f"index {path}")
    return loaded


def escaping_symlinks(root: Path, paths: Iterable[Path], limit: int = 3) -> list[tuple[str, str]]:
    """(path, target) of images that are symlinks resolving outside `root`; at most `limit` of them.

    One `os.scandir` per folder, not a stat per image: the directory entry already says whether a name
    is a symlink, so a million images in a few folders cost a few listings. Only the symlinks are resolved.
    Two passes when `paths` can be iterated twice: the folders first, then (only if a folder holds
    symlinks at all) the names, so a million images never cost a set of a million names.
    """
    root_real = os.path.realpath(root)
    if iter(paths) is paths:  # a one-shot iterator: keep it
        paths = list(paths)
    folders: set[str] = set()
    if isinstance(paths, _EntryPaths):
        folders = paths.folders()
    else:
        for p in paths:
            folders.add(_parent_folder(os.fspath(p)))
    symlinks: dict[str, dict[str, str]] = {}  # folder -> {name: path} of its symlinks
    for folder in sorted(folders):
        try:
            with os.scandir(folder or ".") as it:
                here = {e.name: e.path for e in it if e.is_symlink()}
        except OSError:
            continue  # a missing folder is a per-image error of the run, not an index error
        if here:
            symlinks[folder] = here
    if not symlinks:
        return []
    links: list[str] = []
    for p in paths:
        full = os.fspath(p)
        link = symlinks.get(_parent_folder(full), {}).get(full.rpartition(os.sep)[2])
        if link is not None:
            links.append(link)
    found: list[tuple[str, str]] = []
    for link in links:
        target = os.path.realpath(link)
        if not _inside(root_real, target):
            found.append((link, target))
            if len(found) >= limit:
                return found
    return found


def _inside(root_real: str, target: str) -> bool:
    """Is the resolved `target` inside the resolved root? (Different Windows drives: no.)"""
    if os.path.splitdrive(root_real)[0].lower() != os.path.splitdrive(target)[0].lower():
        return False
    return os.path.commonpath([root_real, target]) == root_real


def refuse_escaping_symlinks(root: Path, paths: Iterable[Path], where: str) -> None:
    """One-line InputError if any image is a symlink to a file outside the root."""
    found = escaping_symlinks(root, paths)
    if found:
        link, target = found[0]
        more = " (and others)" if len(found) > 1 else ""
        raise InputError(
            f"{where}: image {link} is a symlink to {target}, outside the image root {root}{more}; "
            "pass --follow-symlinks to use such images anyway"
        )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building a million entries triggers many full cyclic-GC passes over objects that cannot form
    cycles; pausing the collector cuts load time by about a third. Restored even on error."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_index(path: Path, text: str, root: Path | None, require_files: bool = True) -> LoadedIndex:
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if head == "{" and _first_line_is_object(text):
                return _load_objects(path, _jsonl_objects(path, text), root, "line", require_files)
            raise IndexFormatError(
                f"index {path}: malformed JSON at line {exc.lineno}:{exc.colno}: {exc.msg}") from None
        if isinstance(data, dict):
            if "images" not in data and "path" in data:  # a JSONL file of one object
                return _load_objects(path, [(1, data)], root, "line", require_files)
            return _load_json_index(path, data, root)
        if data and isinstance(data[0], dict):
            objects = []
            for i, item in enumerate(data):
                if not isinstance(item, dict):
                    raise IndexFormatError(f"index {path}: item {i} is {_kind(item)}, expected an object like item 0")
                objects.append((i, item))
            return _load_objects(path, objects, root, "item", require_files)
        items = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise IndexFormatError(
                    f"index {path}: item {i} is {_kind(item)}, expected a path string")
            if item.strip():
                items.append((i, item.strip()))
        return _load_path_list(path, items, root, "item")
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            items.append((lineno, line))
    return _load_path_list(path, items, root, "line")



class _NotStreamable(Exception):
    """The file is not laid out as the line reader expects: the general reader takes it."""


class _TextLines:
    """Form (c) read from the file line by line, each time it is iterated: (line number, path) of the
    lines that are not blank or `#` comments. Never the whole text and a list of its lines at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[tuple[int, str]]:
        try:
            with self.path.open(encoding="utf-8-sig", newline=None) as fh:
                for lineno, line in enumerate(fh, start=1):
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield lineno, line
        except (OSError, UnicodeDecodeError) as exc:
            raise _NotStreamable from exc


def _stream_index(path: Path, root: Path | None) -> LoadedIndex | None:
    """Read the layouts this tool writes, or a text list, one line at a time; None = anything else.

    `write_index` puts one image per line, so a million-image index is parsed one small object at a
    time instead of the whole text, its parsed tree and the entries all at once (the peak that loading
    used to cost). Whatever does not fit that layout exactly (or cannot be read) goes to the general
    reader, which also gives the error messages.
    """
    head = ""
    try:
        with path.open(encoding="utf-8-sig", newline=None) as fh:
            for line in fh:
                if line.strip():
                    head = line.lstrip()[:1]
                    break
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    try:
        if head == "{":
            return _stream_json_index(path, root)
        if head and head != "[":
            return _load_path_list(path, _TextLines(path), root, "line")
    except (_NotStreamable, UnicodeDecodeError):
        return None
    return None


def _stream_json_index(path: Path, root: Path | None) -> LoadedIndex:
    """Form (a) as `write_index` lays it out: `{`, one `"key": value,` per line, `"images": [`, one
    image object per line (a comma after each but the last), `]`, `}`."""
    with path.open(encoding="utf-8-sig", newline=None) as fh:
        lines = iter(fh)
        try:
            if next(lines).strip() != "{":
                raise _NotStreamable
            header: dict[str, Any] = {}
            for line in lines:
                text = line.strip()
                if text == '"images": [':
                    break
                if not text.endswith(","):
                    raise _NotStreamable
                header.update(json.loads("{" + text[:-1] + "}"))
            else:
                raise _NotStreamable
        except (json.JSONDecodeError, UnicodeDecodeError, StopIteration):
            raise _NotStreamable from None
        if "images" in header:
            raise _NotStreamable
        return _load_json_index(path, header, root, _streamed_images(lines))


def _streamed_images(lines: Iterator[str], chunk_size: int = 4096) -> Iterator[Any]:
    """The image objects, parsed a few thousand lines at a time (one json.loads per chunk: much faster
    than one per line, and the memory stays that of one chunk)."""
    chunk: list[str] = []
    comma = True
    for line in lines:
        text = line.strip()
        if text == "]":
            break
        if not comma:
            raise _NotStreamable
        comma = text.endswith(",")
        chunk.append(text[:-1] if comma else text)
        if len(chunk) >= chunk_size:
            yield from _parse_chunk(chunk)
            chunk = []
    else:
        raise _NotStreamable
    if comma:
        raise _NotStreamable  # "[ ]" empty, or a comma after the last image
    yield from _parse_chunk(chunk)
    try:
        rest = [t for t in (line.strip() for line in lines) if t]
    except UnicodeDecodeError:
        raise _NotStreamable from None
    if rest != ["}"]:
        raise _NotStreamable


def _parse_chunk(chunk: list[str]) -> list[Any]:
    try:
        values = json.loads("[" + ",".join(chunk) + "]")
    except json.JSONDecodeError:
        raise _NotStreamable from None
    if len(values) != len(chunk):  # a line that held two values
        raise _NotStreamable
    return values


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexFormatError(f"index file not found: {path}") from None
    except IsADirectoryError:
        raise IndexFormatError(f"index {path} is a folder, not a file") from None
    except OSError as exc:
        if path.is_dir():
            raise IndexFormatError(f"index {path} is a folder, not a file") from None
        raise IndexFormatError(f"cannot read index {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"index {path} is not UTF-8 text (bad byte at offset {exc.start})") from None


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


class _Root:
    """The image root as a normalised absolute string plus the prefix used for containment."""

    def __init__(self, root: str) -> None:
        self.path = os.path.normpath(os.path.abspath(root))
        self.prefix = os.path.normcase(self.path).rstrip("\\/") + os.sep

    def contains(self, folder: str) -> bool:
        return (os.path.normcase(folder).rstrip("\\/") + os.sep).startswith(self.prefix)

    def inside(self, raw: str, base: str) -> str | None:
        """Absolute normalised path of `raw` (relative to `base`) if it lies inside the root, else None.

        `\\` is read as a separator on every platform so Windows-made indexes load on Linux.
        """
        p = raw.replace("\\", "/") if "\\" in raw else raw
        full = os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))
        if not os.path.normcase(full).startswith(self.prefix):
            return None
        return full

    def relative(self, full: str) -> str:
        rel = full[len(self.prefix):]
        return rel.replace(os.sep, "/") if os.sep != "/" else rel


def _is_plain_relative(p: str) -> bool:
    """A `/`-separated relative path that normpath would leave as is: no `.`/`..` parts, no empty
    parts, no drive or root. Such a path joined to a folder inside the root stays inside, so the
    common case skips normpath and the containment test (about half the load time of a big list)."""
    return (p[:1] not in ("", "/", ".") and "/." not in p and "//" not in p and ":" not in p
            and "\\" not in p and p[-1] != "/")


def _existing_root(root: str, index: Path, origin: str) -> _Root:
    """One stat for the whole index: a wrong root would fail every image, so say it once, early."""
    r = _Root(root)
    if not os.path.isdir(r.path):
        hint = "; pass --root to point at the images" if origin == "index" else ""
        raise IndexFormatError(f"image root {r.path} (from {origin} of index {index}) is not a folder{hint}")
    return r


def _load_json_index(path: Path, data: dict, root: Path | None,
                     streamed: Iterable[Any] | None = None) -> LoadedIndex:
    """Form (a). `streamed`: the images read one line at a time (then `data` holds the other keys)."""
    images = data.get("images") if streamed is None else streamed
    if streamed is None and "images" not in data:
        raise IndexFormatError(f"index {path}: no 'images' list (expected {{\"root\", \"dataset\", \"images\"}})")
    if streamed is None and not isinstance(images, list):
        raise IndexFormatError(f"index {path}: 'images' must be a list, got {_kind(images)}")
    index_dir = os.path.abspath(path.parent)
    stored_root = data.get("root")
    if stored_root is not None and not isinstance(stored_root, str):
        raise IndexFormatError(f"index {path}: 'root' must be a string, got {_kind(stored_root)}")
    if root is not None:
        r = _existing_root(os.fspath(root), path, "--root")
    elif stored_root:
        r = _existing_root(os.path.join(index_dir, stored_root), path, "index")
    else:
        r = _existing_root(index_dir, path, "folder")
    dataset = data.get("dataset") or "folder"
    if not isinstance(dataset, str):
        raise IndexFormatError(f"index {path}: 'dataset' must be a string, got {_kind(dataset)}")
    entries = IndexEntries(r.path)
    for i, item in enumerate(images):
        # the checks in order; `where` is built only for an error (a million f-strings cost a second)
        if type(item) is not dict:
            raise IndexFormatError(f"index {path}: images[{i}] is {_kind(item)}, expected an object")
        image_id = item.get("image_id")
        if type(image_id) is not str or not image_id:
            raise IndexFormatError(f"index {path}: images[{i}] has no 'image_id' string")
        raw = item.get("path")
        if type(raw) is not str or not raw:
            raise IndexFormatError(f"index {path}: images[{i}] ({image_id!r}) has no 'path' string")
        pid, camid = item.get("pid"), item.get("camid")
        if (pid is not None and type(pid) is not int) or (camid is not None and type(camid) is not int):
            where = f"index {path}: images[{i}] ({image_id!r})"
            pid, camid = _opt_int(item, "pid", where), _opt_int(item, "camid", where)
        split = item.get("split")
        if split is not None and type(split) is not str:
            raise IndexFormatError(f"index {path}: images[{i}] ({image_id!r}): 'split' must be a string or null, "
                                   f"got {_kind(split)}")
        junk = item.get("junk", False)
        if type(junk) is not bool:
            raise IndexFormatError(f"index {path}: images[{i}] ({image_id!r}): 'junk' must be true or false, "
                                   f"got {_kind(junk)}")
        if _is_plain_relative(raw):
            rel = raw
        else:
            full = r.inside(raw, r.path)
            if full is None:
                raise IndexFormatError(f"index {path}: images[{i}] ({image_id!r}): path {raw!r} is outside the "
                                       f"image root {r.path}")
            rel = r.relative(full)
        entries.add(image_id, rel, pid, camid, split, junk)
    if not entries:
        raise IndexFormatError(f"index {path} has no images")
    _check_unique(path, entries)
    return LoadedIndex(Path(r.path), dataset, entries, path)


def _opt_int(item: dict, key: str, where: str) -> int | None:
    value = item.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise IndexFormatError(f"{where}: '{key}' must be an integer or null, got {value!r}")


def _load_path_list(path: Path, items: Iterable[tuple[int, str]], root: Path | None, unit: str) -> LoadedIndex:
    """Forms (b) and (c): relative paths against `root` (else the index folder); without `root`,
    absolute paths make the root their common parent folder. `items` are (line or item number, path),
    iterable twice (a list, or `_TextLines` reading the file again); `unit` ("line"/"item") names the
    number in error messages."""
    if next(iter(items), None) is None:
        raise IndexFormatError(f"index {path} has no images")
    index_dir = os.path.normpath(os.path.abspath(path.parent))
    if root is not None:
        r = _existing_root(os.fspath(root), path, "--root")
        base = r.path
    else:
        r = _Root(_common_root(path, index_dir, (raw for _, raw in items)))
        base = index_dir
    # Relative paths without `.`/`..` parts: image_id is the path itself when base is the root.
    fast_prefix = base.rstrip("\\/") + os.sep
    fast_id_prefix = r.relative(fast_prefix) if r.contains(base) and base != r.path else ""
    fast = r.contains(base)
    # Absolute paths under the root (POSIX): the id is the rest of the path when that is plain.
    abs_prefix = r.prefix if os.sep == "/" else None
    entries = IndexEntries(r.path)
    styles: set[str] = set()
    split_of: dict[str, str | None] = {}
    for number, raw in items:
        p = raw.replace("\\", "/") if "\\" in raw else raw
        if fast and _is_plain_relative(p):
            image_id = fast_id_prefix + p
        elif abs_prefix is not None and p.startswith(abs_prefix) and _is_plain_relative(p[len(abs_prefix):]):
            image_id = p[len(abs_prefix):]
        else:
            full = r.inside(p, base)
            if full is None:
                raise IndexFormatError(f"index {path} {unit} {number}: path {raw!r} is outside the image root {r.path}")
            image_id = r.relative(full)
        folder, _, name = image_id.rpartition("/")
        split = split_of.get(folder, "?")
        if split == "?":
            split = split_of[folder] = split_from_parts(folder.split("/")) if folder else None
        styled = parse_reid_name_styled(name)
        if styled is None:
            entries.add(image_id, image_id, None, None, split)
            continue
        parsed, style = styled
        if style:
            styles.add(style)
        entries.add(image_id, image_id, parsed.pid, parsed.camid, split, parsed.junk)
    _check_unique(path, entries)
    dataset = "market1501" if "market1501" in styles else "dukemtmc" if "dukemtmc" in styles else "folder"
    return LoadedIndex(Path(r.path), dataset, entries, path)


def _common_root(path: Path, index_dir: str, raws: Iterable[str]) -> str:
    """Index folder if every path is relative, else the common parent of the absolute paths'
    folders (and of the index folder when relative paths are mixed in)."""
    folders: set[str] = set()
    relative = False
    heads: set[str] = set()  # folders as written, seen already: normalised once each
    for raw in raws:
        p = raw.replace("\\", "/") if "\\" in raw else raw
        head, _, name = p.rpartition("/")
        if head and name not in ("", ".", ".."):
            if head in heads:
                continue
            heads.add(head)
        if os.path.isabs(p):
            folders.add(os.path.dirname(os.path.normpath(p)))
        else:
            relative = True
    if not folders:
        return index_dir
    if relative:
        folders.add(index_dir)
    try:
        return os.path.commonpath(sorted(folders))
    except ValueError:  # Windows: different drives
        raise IndexFormatError(f"index {path}: paths on different drives have no common root; pass --root") from None


def _check_unique(path: Path, entries: IndexEntries) -> None:
    """Sorted ids (what `build_index` writes) are unique by that alone: no set of a million ids."""
    if entries.is_sorted():
        return
    ids = entries.ids
    if len(set(ids)) == len(ids):
        return
    counts = Counter(ids)
    dup = next(i for i in ids if counts[i] > 1)
    raise IndexFormatError(f"index {path}: duplicate image_id {dup!r} ({counts[dup]} times)")


# --------------------------------------------------------------------------------------------- objects

# The fields of an index object the loader reads; any other field is carried to the JSONL export.
OBJECT_FIELDS = frozenset({"path", "image_id", "split", "pid", "person_id", "camid", "camera", "junk"})
_INT_TEXT = re.compile(r"[+-]?\d+")
_SAMPLE_HEAD, _SAMPLE_SPREAD = 3, 5


@dataclass(frozen=True, slots=True)
class _Object:
    """One index object, checked: `raw` is its path with `/` separators; None = not given."""

    raw: str
    image_id: str | None
    pid: int | None
    camid: int | None
    split: str | None
    junk: bool | None
    extra: dict[str, Any] | None


def sample_positions(n: int, head: int = _SAMPLE_HEAD, spread: int = _SAMPLE_SPREAD) -> list[int]:
    """A few deterministic positions of a list of `n`: the first `head` and `spread` more evenly through
    the rest (the last included). Enough to tell where relative paths point without a stat per image."""
    picks = set(range(min(head, n)))
    if n > head:
        picks.update(head + (n - 1 - head) * k // spread for k in range(1, spread + 1))
    return sorted(picks)


def finds_files(base: str, sample: list[str], exists: Callable[[str], bool] = os.path.exists) -> bool:
    """Would `base` find the files? At least half of the sampled relative paths exist under it (a few
    missing images stay per-image errors of the run, not a reason to look elsewhere)."""
    hits = sum(1 for p in sample if exists(os.path.join(base, p)))
    return hits > 0 and 2 * hits >= len(sample)


def _first_line_is_object(text: str) -> bool:
    """Does the first non-blank line hold a whole JSON object on its own? (JSONL, not broken JSON.)"""
    for line in text.splitlines():
        if line.strip():
            try:
                return isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                return False
    return False


def _jsonl_objects(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) of a JSONL file, blank lines skipped. One json.loads over the whole file
    (much faster than one per line); only if that fails are the lines parsed one by one, to name the bad one."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    try:
        values = json.loads("[" + ",".join(line for _, line in lines) + "]")
    except json.JSONDecodeError:
        values = None
    if values is None or len(values) != len(lines):  # a line holding two values would shift the count
        values = []
        for n, line in lines:
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise IndexFormatError(
                    f"index {path} line {n}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    out: list[tuple[int, dict]] = []
    for (n, _), value in zip(lines, values):
        if not isinstance(value, dict):
            raise IndexFormatError(f"index {path} line {n} is {_kind(value)}, expected an object")
        out.append((n, value))
    return out


def _as_int(value: object, prefix: str = "") -> int | None:
    """An integer field as such tools write it: 7, 7.0, "0007" (and "c1" for a camera); None if not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if prefix and text[:1].lower() == prefix:
            text = text[1:]
        if _INT_TEXT.fullmatch(text):
            return int(text)
    return None


def _alias_int(obj: dict, keys: tuple[str, str], where: str, prefix: str = "") -> int | None:
    """The value of a field that has two names (`pid`/`person_id`); both given must agree."""
    value: int | None = None
    seen = ""
    for key in keys:
        raw = obj.get(key)
        if raw is None:
            continue
        number = _as_int(raw, prefix)
        if number is None:
            raise IndexFormatError(f"{where}: '{key}' must be an integer, got {raw!r}")
        if value is not None and number != value:
            raise IndexFormatError(f"{where}: '{seen}' {value} and '{key}' {number} disagree")
        value, seen = number, key
    return value


def _read_object(obj: dict, where: str) -> _Object:
    raw = obj.get("path")
    if not isinstance(raw, str) or not raw.strip():
        raise IndexFormatError(f"{where} has no 'path' string")
    image_id = obj.get("image_id")
    if image_id is not None:
        if not isinstance(image_id, str) or not image_id:
            raise IndexFormatError(f"{where}: 'image_id' must be a non-empty string, got {image_id!r}")
        where = f"{where} ({image_id!r})"
    pid = _alias_int(obj, ("pid", "person_id"), where) if "pid" in obj or "person_id" in obj else None
    camid = _alias_int(obj, ("camid", "camera"), where, prefix="c") if "camid" in obj or "camera" in obj else None
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        raise IndexFormatError(f"{where}: 'split' must be a string or null, got {_kind(split)}")
    junk = obj.get("junk")
    if junk is not None and not isinstance(junk, bool):
        raise IndexFormatError(f"{where}: 'junk' must be true or false, got {_kind(junk)}")
    extra = None if obj.keys() <= OBJECT_FIELDS else {k: v for k, v in obj.items() if k not in OBJECT_FIELDS}
    p = raw.strip()
    return _Object(p.replace("\\", "/") if "\\" in p else p, image_id, pid, camid, split or None, junk, extra)


def _distinct(*candidates: tuple[str, str]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for label, folder in candidates:
        key = os.path.normcase(folder)
        if key not in seen:
            seen.add(key)
            out.append((label, folder))
    return out


def _same_files(a: str, b: str, sample: list[str]) -> bool:
    """Do two folders reach the same files (one links to the other)? Judged on the first sampled path
    both find; then either base gives the same images, so there is nothing to choose."""
    for p in sample:
        fa, fb = os.path.join(a, p), os.path.join(b, p)
        if os.path.exists(fa) and os.path.exists(fb):
            try:
                return os.path.samefile(fa, fb)
            except OSError:
                return False
    return False


def _objects_base(path: Path, sample: list[str], given: _Root | None, index_dir: str, strict: bool) -> str:
    """The folder the objects' relative paths resolve against: --root if given, else the current folder
    (as the scripts that write such indexes assume), else the index's folder. Decided on a small sample
    of paths; finding them from two different folders, or from none, is one line (unless not `strict`:
    then the first candidate is taken)."""
    cwd = os.path.normpath(os.getcwd())
    if not sample:  # every path is absolute: no base is used
        return given.path if given is not None else cwd
    example = sample[0]
    others = _distinct(("the current folder", cwd), ("the index's folder", index_dir))
    if given is not None:
        if finds_files(given.path, sample):
            return given.path
        # Paths written relative to the run folder, with --root naming the image root they lie in
        # (this is also how export reloads such an index with the root its run recorded).
        finders = [(label, f) for label, f in others
                   if os.path.normcase(f) != os.path.normcase(given.path) and finds_files(f, sample)]
        candidates = [(label, f) for label, f in finders if any(  # each path's containment is checked later
            os.path.normcase(os.path.normpath(os.path.join(f, s))).startswith(given.prefix) for s in sample)]
        if len(candidates) == 1 or (candidates and not strict):
            return candidates[0][1]
        if not strict:
            return given.path
        if not candidates:
            found = f" (from {finders[0][0]} {finders[0][1]} they are, but outside it)" if finders else ""
            raise IndexFormatError(
                f"index {path}: its relative paths (e.g. {example!r}) are not found under --root {given.path}"
                f"{found}; pass the folder they are relative to as --root")
    else:
        candidates = [(label, f) for label, f in others if finds_files(f, sample)]
        if len(candidates) == 1:
            return candidates[0][1]
        if not strict:
            return (candidates or others)[0][1]
        if not candidates:
            tried = "; ".join(f"{label} {f}" for label, f in others)
            raise IndexFormatError(
                f"index {path}: its relative paths (e.g. {example!r}) are found from none of: {tried}; "
                "run from the folder they are relative to, or pass it as --root")
    (la, a), (lb, b) = candidates[0], candidates[1]
    if _same_files(a, b, sample):
        return a
    raise IndexFormatError(
        f"index {path}: its relative paths (e.g. {example!r}) are found both from {la} {a} and from {lb} {b}; "
        "pass --root to say which")


def _parent_folder(full: str) -> str:
    folder = full.rpartition(os.sep)[0]
    # "" (POSIX root) and "C:" (Windows drive) keep their separator to stay absolute
    return folder + os.sep if not folder or folder.endswith(":") else folder


def _common_folder(path: Path, fulls: list[str]) -> str:
    """The deepest folder holding every image: the root of an index of objects given without --root."""
    folders = {_parent_folder(f) for f in fulls}
    if len(folders) == 1:
        return folders.pop()
    try:
        return os.path.commonpath(sorted(folders))
    except ValueError:  # Windows: different drives
        raise IndexFormatError(f"index {path}: paths on different drives have no common root; pass --root") from None


def _load_objects(path: Path, items: list[tuple[int, dict]], root: Path | None, unit: str,
                  require_files: bool) -> LoadedIndex:
    """A JSON list or JSONL file of objects {"path", "image_id"?, "split"?, "pid"/"person_id"?,
    "camid"/"camera"?, ...}, as the users' own prepare scripts write them.

    A given image_id is kept exactly as written (their scripts key on it); without one it is the path
    relative to the root. The root is --root if given (paths must stay inside it), else the deepest
    folder holding every image, so it names where the images are, not where the command ran. pid and
    camid come from Market/Duke-style names when the object lacks them; split from the object, else
    from the folder names written in the path. Other fields go to `IndexEntry.extra`.
    """
    if not items:
        raise IndexFormatError(f"index {path} has no images")
    prefix = f"index {path} {unit}"
    objects = [_read_object(obj, f"{prefix} {n}") for n, obj in items]
    index_dir = os.path.normpath(os.path.abspath(path.parent))
    given = _existing_root(os.fspath(root), path, "--root") if root is not None else None
    relative = [o.raw for o in objects if not os.path.isabs(o.raw)]
    sample = [relative[i] for i in sample_positions(len(relative))]
    strict = require_files or any(o.image_id is None for o in objects)
    base = _objects_base(path, sample, given, index_dir, strict)

    base_sep = base.rstrip("\\/") + os.sep
    # A path that stays below a base inside the root is inside it: no normcase per image then.
    base_inside = given is not None and given.contains(base)
    fulls: list[str] = []
    for (number, _), o in zip(items, objects):
        p = o.raw
        while p.startswith("./"):
            p = p[2:]
        if _is_plain_relative(p):
            full = base_sep + (p if os.sep == "/" else p.replace("/", os.sep))
        else:
            full = os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))
        if given is not None and not (base_inside and full.startswith(base_sep)) \
                and not os.path.normcase(full).startswith(given.prefix):
            raise IndexFormatError(
                f"index {path} {unit} {number}: path {o.raw!r} is outside the image root {given.path}")
        fulls.append(full)
    r = given if given is not None else _Root(_common_folder(path, fulls))

    entries = IndexEntries(r.path)
    styles: set[str] = set()
    split_of: dict[str, str | None] = {}
    for o, full in zip(objects, fulls):
        pid, camid, junk = o.pid, o.camid, o.junk
        styled = parse_reid_name_styled(full.rpartition(os.sep)[2])
        if styled is not None:
            parsed, style = styled
            if style:
                styles.add(style)
            pid = parsed.pid if pid is None else pid
            camid = parsed.camid if camid is None else camid
            if junk is None:
                junk = parsed.junk and pid == parsed.pid
        split = o.split
        if split is None:
            folder = o.raw.rpartition("/")[0]
            split = split_of.get(folder, "?")
            if split == "?":
                split = split_of[folder] = split_from_parts(folder.split("/")) if folder else None
        rel = r.relative(full)
        entries.add(rel if o.image_id is None else o.image_id, rel, pid, camid, split, bool(junk), o.extra)
    _check_unique(path, entries)
    dataset = "market1501" if "market1501" in styles else "dukemtmc" if "dukemtmc" in styles else "folder"
    return LoadedIndex(Path(r.path), dataset, entries, path)
