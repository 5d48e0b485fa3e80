"""`python -m pipeline gallery`: a static HTML gallery of an output folder, grouped by person and camera.

Why static files: a researcher opens it by double-clicking `index.html` (file://), on a laptop without
the pipeline, with no server and no network. Under file:// a page may not `fetch()` its own files, but it
may add `<script src>` tags: so the data is JavaScript (`galleryCatalog({...})`, `galleryChunk(k, {...})`)
split into chunk files of `CHUNK_IMAGES` images loaded only when the visible page needs them. What the
page needs before any chunk is small and goes in `data/catalog.js`: the prompts, the flags, each person's
range of images, and sparse lists of which images have which flag or error per prompt, so that filtering
100,000 images needs no chunk at all.

Layout of the gallery folder (default `<out>/gallery/`):
    index.html              the page (a copy of pipeline/review/page/index.html)
    assets/gallery.js, gallery.css
    data/catalog.js, data/chunk_00000.js, ..., data/ids.js (image ids, for the review-mark filter)
    thumbs/ab/<hash>.jpg    thumbnails, made once with Pillow and reused while newer than their image

Images are ordered by person (positive ids ascending, then 0/-1 junk and distractors, then names, then
images without a person), then camera, then image_id. Everything here except `index_places`,
`make_thumbnail(s)`, `build_gallery` and its writers is pure. Nothing from the environment reaches the
page: it holds the folder's captions, attributes, errors and flags, the image ids, and links to the images
(relative; a file:// URI only for an image on another drive than the gallery, on Windows).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote

from pipeline.errors import InputError, OutputError, ReidPromptError
from pipeline.ledger.manifest import read_manifest
from pipeline.review.flags import (
    FLAG_NAMES,
    FLAG_TITLES,
    CaptionItem,
    ErrorItem,
    Flag,
    compute_flags,
    is_junk_name,
    load_items,
    only_prompts,
)

CHUNK_IMAGES = 200  # images per data/chunk_NNNNN.js: ~100 KB of captions, parsed in a few ms
THUMB_BOX = (128, 256)  # the largest thumbnail (w, h): twice the 64x128 shown, sharp on a high-DPI screen
THUMB_QUALITY = 85
PARALLEL_THUMBS = 400  # below this many thumbnails to make, threads are not worth starting
SAY_THUMBS = 2000  # from this many thumbnails to make (a few seconds), the command says so before it starts
ASSETS = ("gallery.js", "gallery.css")

Key = tuple[str, str, int]


# --- records ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Place:
    """Where an image belongs: its person and camera (display labels) and its file, from the index (a
    path string: 100,000 `Path` objects cost seconds here)."""

    person: str | None
    camera: str | None
    source: str | None
    junk: bool = False  # Market's junk (-1) and distractor (0) crops: not a person (the flags' rule too)


@dataclass(frozen=True)
class Thumb:
    """A thumbnail made or reused (`rel` inside the gallery folder), or why there is none (`note`)."""

    rel: str | None
    note: str | None = None
    made: bool = False


@dataclass
class GalleryImage:
    """One image of the gallery with everything shown beside it."""

    image_id: str
    person: str | None
    camera: str | None
    source: str | None
    items: list[CaptionItem] = field(default_factory=list)
    junk: bool = False
    errors: list[ErrorItem] = field(default_factory=list)


@dataclass
class GalleryResult:
    """What `build_gallery` wrote, for the command's summary line."""

    path: Path
    images: int
    persons: int
    captions: int
    attributes: int
    errors: int
    flagged: dict[str, int]
    chunks: int
    thumbs_made: int
    thumbs_reused: int
    unreadable: int
    warnings: list[str] = field(default_factory=list)


# --- pure: labels and order ------------------------------------------------------------------------------

def label_of(value: object) -> str | None:
    """A person or camera as shown and searched: integers without padding ("0002" -> "2"), text as is."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        return str(int(text))
    except ValueError:
        return text


def person_sort_key(person: str | None) -> tuple:
    """Positive ids ascending, then 0 and -1 (Market's distractors and junk), then names, then none."""
    if person is None:
        return (3, 0, "")
    try:
        n = int(person)
    except ValueError:
        return (2, 0, person)
    return (0, n, "") if n > 0 else (1, -n, "")


def camera_sort_key(camera: str | None) -> tuple:
    if camera is None:
        return (2, 0, "")
    try:
        return (0, int(camera), "")
    except ValueError:
        return (1, 0, camera)


def group_images(items: Iterable[CaptionItem], errors: Iterable[ErrorItem],
                 places: Mapping[str, Place]) -> list[GalleryImage]:
    """Every image with an answer or an error, in gallery order, its items by (prompt, caption index).

    The index's person and camera win over the ones parsed from the image_id (an index of objects may
    give its own); an image the index does not list keeps the parsed ones and has no file. Junk and
    distractor crops (`Place.junk`) keep their label (-1, 0: searchable) but are marked not a person.
    """
    images: dict[str, GalleryImage] = {}

    def image(image_id: str, person: str | None, camera: str | None) -> GalleryImage:
        found = images.get(image_id)
        if found is None:
            place = places.get(image_id)
            if place is not None:
                found = GalleryImage(image_id, place.person if place.person is not None else label_of(person),
                                     place.camera if place.camera is not None else label_of(camera), place.source,
                                     junk=place.junk)
            else:
                found = GalleryImage(image_id, label_of(person), label_of(camera), None)
            images[image_id] = found
        return found

    for item in items:
        image(item.image_id, item.person_id, item.camera).items.append(item)
    for err in errors:
        image(err.image_id, None, None).errors.append(err)
    for im in images.values():
        im.items.sort(key=lambda it: (it.prompt_name, it.caption_index, it.kind))
        im.errors.sort(key=lambda e: (e.prompt_name, e.caption_index, e.reason))
    return sorted(images.values(),
                  key=lambda im: (person_sort_key(im.person), camera_sort_key(im.camera), im.image_id))


def prompt_order(images: Sequence[GalleryImage], wanted: Sequence[str] | None = None) -> list[str]:
    """The prompts shown: as asked with --prompt (in that order), else every prompt found, sorted."""
    if wanted:
        return list(dict.fromkeys(wanted))
    names = {it.prompt_name for im in images for it in im.items}
    names |= {e.prompt_name for im in images for e in im.errors if e.prompt_name}
    return sorted(names)


def thumb_rel(image_id: str) -> str:
    """The thumbnail's path inside the gallery folder: a hash of the image_id, 256 sub-folders."""
    digest = hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:20]
    return f"thumbs/{digest[:2]}/{digest}.jpg"


def gallery_id(out_dir: Path) -> str:
    """Names the page's review marks in the browser's storage: one set of marks per output folder, kept
    across rebuilds of its gallery."""
    return hashlib.sha256(str(Path(out_dir).resolve()).encode("utf-8")).hexdigest()[:16]


def source_links(sources: Iterable[tuple[str, str]], gallery_dir: Path) -> dict[str, str]:
    """image_id -> the original image as a link from the gallery folder: relative and URL-quoted (the two
    folders move together; a `#` or `%` in a name stays part of it), else a file:// URI (another drive on
    Windows). One relpath per folder of images, not per image."""
    base = os.path.abspath(gallery_dir)
    folders: dict[str, str | None] = {}
    links: dict[str, str] = {}
    for image_id, source in sources:
        folder, name = os.path.split(source)
        if folder not in folders:
            try:
                folders[folder] = Path(os.path.relpath(folder, base)).as_posix()
            except ValueError:
                folders[folder] = None
        rel = folders[folder]
        if rel is None:
            links[image_id] = Path(source).resolve().as_uri()
        else:
            links[image_id] = quote(name if rel == "." else f"{rel}/{name}")
    return links


# --- pure: the data the page reads -----------------------------------------------------------------------

def _item_record(item: CaptionItem, prompt_ix: Mapping[str, int], flag_ix: Mapping[str, int],
                 flags: Sequence[Flag]) -> dict[str, Any]:
    rec: dict[str, Any] = {"p": prompt_ix[item.prompt_name], "i": item.caption_index, "k": item.kind,
                           "t": item.text, "m": item.model}
    if item.fields is not None:
        rec["f"] = dict(item.fields)
    if flags:
        rec["fl"] = [[flag_ix[f.name], f.detail] for f in flags if f.name in flag_ix]
    return rec


def _error_record(err: ErrorItem, prompt_ix: Mapping[str, int]) -> dict[str, Any]:
    return {"p": prompt_ix.get(err.prompt_name, -1), "i": err.caption_index, "r": err.reason, "d": err.detail}


def chunk_record(images: Sequence[GalleryImage], start: int, prompts: Sequence[str],
                 flags: Mapping[Key, Sequence[Flag]], thumbs: Mapping[str, Thumb],
                 links: Mapping[str, str | None]) -> dict[str, Any]:
    """One data chunk: the images [start, start + len(images)) with their captions, flags and errors."""
    prompt_ix = {p: i for i, p in enumerate(prompts)}
    flag_ix = {f: i for i, f in enumerate(FLAG_NAMES)}
    out = []
    for im in images:
        thumb = thumbs.get(im.image_id, Thumb(None, "no thumbnail"))
        out.append({
            "id": im.image_id,
            "person": im.person,
            "camera": im.camera,
            "thumb": thumb.rel,
            "src": links.get(im.image_id),
            "note": thumb.note,
            "items": [_item_record(it, prompt_ix, flag_ix, flags.get((it.image_id, it.prompt_name, it.caption_index), ()))
                      for it in sorted((it for it in im.items if it.prompt_name in prompt_ix),
                                       key=lambda it: (prompt_ix[it.prompt_name], it.caption_index))],
            "errors": [_error_record(e, prompt_ix) for e in im.errors if not e.prompt_name or e.prompt_name in prompt_ix],
        })
    return {"start": start, "images": out}


def catalog_record(images: Sequence[GalleryImage], prompts: Sequence[str], flags: Mapping[Key, Sequence[Flag]],
                   *, title: str, gallery_key: str, chunk_images: int = CHUNK_IMAGES,
                   not_computed: Sequence[str] = ()) -> dict[str, Any]:
    """What the page reads first: counts, prompts, flags, persons' ranges and sparse filter lists.

    `flagged[flag][prompt]` and `errored[prompt]` list image positions (ascending); `errored["*"]` are
    errors with no prompt (a missing image fails every prompt). `prompt_images[prompt]` is given only
    for a prompt some image lacks: the page shows an image under a prompt filter only when it has an
    answer or an error of that prompt. `not_persons`: the labels of the groups of junk and distractor
    images (Market's -1 and 0), shown apart and not counted in `n_persons`, as the flags never take them
    for one person.
    """
    prompt_ix = {p: i for i, p in enumerate(prompts)}
    flagged: dict[str, dict[str, list[int]]] = {name: {} for name in FLAG_NAMES}
    flag_counts = dict.fromkeys(FLAG_NAMES, 0)
    errored: dict[str, list[int]] = {}
    has_prompt: dict[int, list[int]] = defaultdict(list)
    persons: list[list[Any]] = []
    not_persons: list[str] = []
    counts = {"captions": 0, "attributes": 0, "errors": 0}
    for pos, im in enumerate(images):
        if im.junk and im.person is not None and im.person not in not_persons:
            not_persons.append(im.person)
        if not persons or persons[-1][0] != im.person:
            persons.append([im.person, pos, 0, 0])
        persons[-1][2] += 1
        seen_prompts: set[int] = set()
        for it in im.items:
            p = prompt_ix.get(it.prompt_name)
            if p is None:
                continue
            seen_prompts.add(p)
            counts["captions" if it.kind == "caption" else "attributes"] += 1
            # a caption counts once per flag however many findings it has (as `compare` counts them)
            for name in dict.fromkeys(f.name for f in flags.get((it.image_id, it.prompt_name, it.caption_index), ())):
                if name in flagged:
                    flag_counts[name] += 1
                    ids = flagged[name].setdefault(str(p), [])
                    if not ids or ids[-1] != pos:
                        ids.append(pos)
        for e in im.errors:
            p = prompt_ix.get(e.prompt_name)
            if e.prompt_name and p is None:
                continue
            counts["errors"] += 1
            key = "*" if p is None else str(p)
            seen_prompts.update(prompt_ix.values() if p is None else (p,))  # no prompt: it failed every one
            ids = errored.setdefault(key, [])
            if not ids or ids[-1] != pos:
                ids.append(pos)
        for p in seen_prompts:
            has_prompt[p].append(pos)
    for row in persons:  # cameras per person, for its header
        row[3] = len({images[k].camera for k in range(row[1], row[1] + row[2])})
    n = len(images)
    return {
        "format": 1,
        "title": title,
        "gallery_id": gallery_key,
        "n_images": n,
        "chunk_images": chunk_images,
        "n_chunks": (n + chunk_images - 1) // chunk_images,
        "prompts": list(prompts),
        # `computed` False: a flag this build could not look for (labels_disagree without --attributes),
        # so the page says so rather than "0"
        "flags": [{"name": f, "label": FLAG_TITLES.get(f, f.replace("_", " ")), "count": flag_counts[f],
                   "computed": f not in not_computed} for f in FLAG_NAMES],
        "counts": counts,
        "persons": persons,
        "n_persons": sum(1 for row in persons if row[0] is not None and row[0] not in not_persons),
        "not_persons": not_persons,
        "flagged": {f: v for f, v in flagged.items() if v},
        "errored": errored,
        "prompt_images": {str(p): has_prompt[p] for p in range(len(prompts)) if len(has_prompt[p]) < n},
    }


def js_call(function: str, *args: Any) -> str:
    """`function(arg, ...);` with each argument as JSON: the data as a script the page may load from file://.

    U+2028/2029 are escaped (older engines end a string at them); `</script>` needs nothing, the data is
    never inline.
    """
    text = ",".join(json.dumps(a, ensure_ascii=False, separators=(",", ":")) for a in args)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"{function}({text});\n"


def chunk_name(k: int) -> str:
    return f"chunk_{k:05d}.js"


# --- I/O: the index, thumbnails, files ------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def index_places(out_dir: Path, wanted: set[str], warnings: list[str]) -> dict[str, Place]:
    """Person, camera and file of each wanted image, from the index the folder's manifest names.

    An index that cannot be found or read is a warning, not a failure: the gallery is still built, with
    persons and cameras parsed from the image ids and a placeholder for every image.
    """
    from pipeline.data.index import load_index
    from pipeline.export import run_index_path

    manifest = read_manifest(out_dir) or {}
    root = manifest.get("root")
    try:
        path = run_index_path(out_dir)
        entries = load_index(path, Path(root) if isinstance(root, str) and root else None,
                             follow_symlinks=True, require_files=False).entries
    except (ReidPromptError, OSError, ValueError) as exc:
        warnings.append(f"index not readable ({_one_line(exc)}): images shown as placeholders")
        return {}
    position_of = getattr(entries, "position_of", None)  # a compact index: look the wanted ones up
    if position_of is not None:
        found = (entries[pos] for pos in map(position_of, sorted(wanted)) if pos is not None)
    else:
        found = (entry for entry in entries if entry.image_id in wanted)
    # junk as the index marks it, or as the flags see the name (a hand-made index may not say)
    return {e.image_id: Place(label_of(e.pid), label_of(e.camid), str(e.path), bool(e.junk) or is_junk_name(e.image_id))
            for e in found}


def make_thumbnail(job: tuple[str, str]) -> tuple[str | None, bool]:
    """(source, target) -> (note, made). Reuses a target newer than its source; writes atomically, so an
    interrupted build never leaves half a thumbnail that the next one would reuse.

    The image is always decoded in full (a broken file fails here, whatever its header says). A JPEG
    already within THUMB_BOX with no EXIF (a ReID crop: 64x128) is its own thumbnail: its bytes are
    copied rather than encoded again. Any failure of the decoder is a note under a placeholder, never a
    crash: a gallery of 100,000 images is still worth opening when a few files are broken.
    """
    source, target = job
    try:
        src_mtime = os.stat(source).st_mtime
    except OSError as exc:
        return f"image not found: {source} ({exc.strerror or type(exc).__name__})", False
    try:
        if os.stat(target).st_mtime >= src_mtime:
            return None, False
    except OSError:
        pass
    from PIL import Image, ImageOps

    tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(source, "rb") as fh:
            data = fh.read()
        with Image.open(io.BytesIO(data)) as img:
            small = img.width <= THUMB_BOX[0] and img.height <= THUMB_BOX[1]
            as_is = small and img.format == "JPEG" and img.mode in ("RGB", "L") and "exif" not in img.info
            if not small:
                img.draft("RGB", THUMB_BOX)  # JPEG: decode at a reduced scale, much faster for large photos
            img.load()
            if not as_is:
                shown = ImageOps.exif_transpose(img) if "exif" in img.info else img
                shown = shown.convert("RGB")
                shown.thumbnail(THUMB_BOX)
                buf = io.BytesIO()
                shown.save(buf, "JPEG", quality=THUMB_QUALITY)
                data = buf.getvalue()
        folder = os.path.dirname(target)
        if folder not in _MADE_DIRS:
            os.makedirs(folder, exist_ok=True)
            _MADE_DIRS.add(folder)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file; each is a note
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, Image.UnidentifiedImageError):  # its message names the in-memory buffer
            return "image not readable: not an image format Pillow knows", False
        return f"image not readable: {_one_line(exc)}", False
    return None, True


_MADE_DIRS: set[str] = set()  # thumbnail folders known to exist (256 of them): one makedirs each


def make_thumbnails(jobs: Sequence[tuple[str, str]], workers: int | None = None,
                    say: Callable[[str], None] | None = None) -> list[tuple[str | None, bool]]:
    """(note, made) for every (source, target), in order. Thumbnails newer than their image are reused
    (two stats each); the rest are made by a few threads when there are many: reading, decoding and
    writing release the GIL, and a 64x128 crop is too little work to pay for processes (on 2 cores, 4
    threads measured 1.2-1.8x faster than one; a process pool was slower than one thread)."""
    stale = [k for k, (source, target) in enumerate(jobs) if not _fresh(source, target)]
    results: list[tuple[str | None, bool]] = [(None, False)] * len(jobs)
    workers = workers or min(2 * (os.cpu_count() or 1), 8)
    if say is not None and len(stale) >= SAY_THUMBS:
        say(f"making {len(stale):,} thumbnails ({len(jobs) - len(stale):,} reused)...")
    if workers > 1 and len(stale) >= PARALLEL_THUMBS:
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            done = list(pool.map(make_thumbnail, [jobs[k] for k in stale]))
        finally:  # Ctrl-C: drop the queued ones, wait only for the few being made
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        done = [make_thumbnail(jobs[k]) for k in stale]
    for k, res in zip(stale, done):
        results[k] = res
    return results


def _fresh(source: str, target: str) -> bool:
    try:
        return os.stat(target).st_mtime >= os.stat(source).st_mtime
    except OSError:
        return False


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def bundled_assets() -> Path:
    return Path(str(resources.files("pipeline.review").joinpath("page")))


def gallery_target(out_dir: Path, to: Path | None) -> Path:
    """The page to write: `--to` as given when it names an .html file, `<to>/index.html` for a folder,
    `<out>/gallery/index.html` by default."""
    if to is None:
        return Path(out_dir) / "gallery" / "index.html"
    to = Path(to)
    return to if to.suffix.lower() in (".html", ".htm") else to / "index.html"


def build_gallery(out_dir: Path, to: Path | None = None, prompts: Sequence[str] | None = None,
                  *, labels_path: Path | None = None, workers: int | None = None,
                  chunk_images: int = CHUNK_IMAGES, say: Callable[[str], None] | None = None) -> GalleryResult:
    """Read the folder, compute the flags, make thumbnails, write the page; returns what was written.

    `labels_path`: the dataset's attribute labels (.mat), for the labels_disagree flag. `say`: where a
    progress line goes before a long step (many thumbnails to make).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"output folder {out_dir} does not exist")
    labels = None
    if labels_path is not None:
        from pipeline.data.labels import load_attribute_labels

        labels = load_attribute_labels(Path(labels_path))
    # Flags over every prompt of the folder, as `compare` computes them (a caption against another
    # prompt's structured answer), whichever prompts the page shows.
    items, errors = load_items(out_dir)
    flags = compute_flags(items, labels)
    if prompts:
        items, errors = only_prompts(items, errors, prompts, out_dir)
    if not items and not errors:
        raise InputError(f"nothing to show: no captions, attributes or errors in {out_dir}")
    warnings: list[str] = []
    wanted = {it.image_id for it in items} | {e.image_id for e in errors}
    images = group_images(items, errors, index_places(out_dir, wanted, warnings))
    shown_prompts = prompt_order(images, prompts)

    page = gallery_target(out_dir, to)
    folder = page.parent
    try:
        return _write_gallery(out_dir, page, folder, images, shown_prompts, flags, warnings, workers, chunk_images,
                              say, () if labels is not None else ("labels_disagree",))
    except OSError as exc:
        raise OutputError(f"cannot write the gallery in {folder}: {exc.strerror or exc}") from None


def _write_gallery(out_dir: Path, page: Path, folder: Path, images: list[GalleryImage], prompts: list[str],
                   flags: Mapping[Key, Sequence[Flag]], warnings: list[str], workers: int | None,
                   chunk_images: int, say: Callable[[str], None] | None,
                   not_computed: Sequence[str] = ()) -> GalleryResult:
    data_dir = folder / "data"
    assets_dir = folder / "assets"
    for d in (folder, data_dir, assets_dir):
        d.mkdir(parents=True, exist_ok=True)

    with_file = [im for im in images if im.source is not None]
    base = str(folder)
    jobs = [(im.source, os.path.join(base, thumb_rel(im.image_id))) for im in with_file]
    results = make_thumbnails(jobs, workers, say)
    thumbs: dict[str, Thumb] = {}
    for im, (note, made) in zip(with_file, results):
        thumbs[im.image_id] = Thumb(None if note else thumb_rel(im.image_id), note, made)
    for im in images:
        if im.source is None:
            thumbs[im.image_id] = Thumb(None, "not in the run's index: no image file")
    links = source_links(((im.image_id, im.source) for im in with_file), folder)

    catalog = catalog_record(images, prompts, flags, title=out_dir.resolve().name or str(out_dir),
                             gallery_key=gallery_id(out_dir), chunk_images=chunk_images, not_computed=not_computed)
    written = set()
    for k in range(catalog["n_chunks"]):
        start = k * chunk_images
        rec = chunk_record(images[start:start + chunk_images], start, prompts, flags, thumbs, links)
        _write_text(data_dir / chunk_name(k), js_call("galleryChunk", k, rec))
        written.add(chunk_name(k))
    for stale in data_dir.glob("chunk_*.js"):  # a previous, larger build's chunks
        if stale.name not in written:
            stale.unlink()
    source = bundled_assets()
    for name in ASSETS:
        shutil.copyfile(source / name, assets_dir / name)
    # image ids in gallery order, loaded only by the review-mark filter (marks are kept by image id)
    _write_text(data_dir / "ids.js", js_call("galleryIds", [im.image_id for im in images]))
    _write_text(data_dir / "catalog.js", js_call("galleryCatalog", catalog))
    shutil.copyfile(source / "index.html", page)  # last: the page appears once its data is there

    flagged = {f["name"]: f["count"] for f in catalog["flags"]}
    return GalleryResult(
        path=page,
        images=len(images),
        persons=catalog["n_persons"],
        captions=catalog["counts"]["captions"],
        attributes=catalog["counts"]["attributes"],
        errors=catalog["counts"]["errors"],
        flagged=flagged,
        chunks=catalog["n_chunks"],
        thumbs_made=sum(1 for t in thumbs.values() if t.made),
        thumbs_reused=sum(1 for t in thumbs.values() if t.rel and not t.made),
        unreadable=sum(1 for t in thumbs.values() if t.rel is None),
        warnings=warnings,
    )
