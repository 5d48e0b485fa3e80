"""Captions → the annotation files text-to-image ReID training code reads (IRRA, TBPS-CLIP, APTM).

Formats (`EXPORT_FORMATS`):

* `cuhk-pedes` — a JSON list like CUHK-PEDES `reid_raw.json`: {"split", "captions", "file_path",
  "processed_tokens", "id"}. IRRA trains on `id - 1` and asserts the train ids are contiguous from 0, so
  train persons get ids 1..N (in pid order); val persons continue at N+1.., test persons after them.
* `icfg-pedes` — the same fields, splits train/test only (IRRA would read any other split as val), ids
  from 0: train 0..N-1, test persons continue at N.
* `rstpreid` — a JSON list like RSTPReid `data_captions.json`: {"id", "img_path", "captions", "split"};
  IRRA uses the ids as they are, so train 0..N-1, then val, then test.
* `jsonl` — one object per line and per image, lossless: every caption with its prompt_name and
  caption_index, attributes, the original pid, camid and dataset split, and the export split.

Splits. train → train; query, gallery, test → test. A dataset's own `val` (MSMT17 list_val) holds
images of *training* identities, so it joins train: a val split that shares persons with train would
be useless. `val_from_train` carves a person-disjoint val split from train instead: that fraction of
the train persons (at least one, never all), chosen by a seeded stable hash. Images without a split
(a plain folder, e.g. unlabelled pretraining data) are train: captioning them is for training.

Persons. Ids are re-numbered per split group (train/val vs test): MSMT17 restarts its test pids at 0,
so test pid 5 is not train pid 5. Images whose pid is None or negative, or which the index marks junk
(Market-1501 -1 junk and 0000 distractors), have no person: they are left out of the id-based formats
and kept in jsonl.

Captions. Empty answers, refusals/apologies (`pipeline.providers.refusals`) and structured JSON answers never
reach an export; whitespace runs (newlines included) become one space. Images without a usable caption
are left out (jsonl keeps an image that has attributes). Captions of an image are ordered by prompt
name, then caption index; a key (image, prompt, caption index) seen twice keeps its last usable row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError, OutputError
from pipeline.data.index import load_index
from pipeline.ledger.manifest import read_manifest
from pipeline.ledger.outputs import ATTRIBUTE_META_COLUMNS, CAPTIONS_ALL, MANIFEST, read_attributes, read_captions
from pipeline.records import CaptionRow, IndexEntry
from pipeline.providers.refusals import clean_text, is_empty, looks_like_refusal

EXPORT_FORMATS = ("cuhk-pedes", "icfg-pedes", "rstpreid", "jsonl")
# The file names the training code opens (IRRA: <dataset>/<name>); the default export path is
# <out>/export_<format>.json[l], so rename or link it to this name in the training data folder.
TRAINING_FILE_NAMES = {
    "cuhk-pedes": "reid_raw.json",
    "icfg-pedes": "ICFG-PEDES.json",
    "rstpreid": "data_captions.json",
    "jsonl": "captions.jsonl",
}
SPLIT_ORDER = ("train", "val", "test")

# dataset split name (lowercase) -> export split group; "val" joins train (see module docstring)
_SPLIT_MAP = {
    "train": "train",
    "trainval": "train",
    "bounding_box_train": "train",
    "val": "train",
    "validation": "train",
    "query": "test",
    "gallery": "test",
    "bounding_box_test": "test",
    "test": "test",
    "gt_bbox": "test",  # Market-1501's hand-drawn boxes of the query persons
}

# lowercase words (an in-word apostrophe kept: "person's"), or one CJK character each
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u9fff\uf900-\ufaff]+(?:['’][^\W_]+)*")


# --- captions ----------------------------------------------------------------------------------------

def caption_kind(text: str | None) -> str:
    """"empty", "refusal", "structured" (a JSON object: an attribute answer, not a sentence) or "text"."""
    if is_empty(text):
        return "empty"
    if looks_like_refusal(text):
        return "refusal"
    t = (text or "").strip()
    if t.startswith("{") and t.endswith("}"):
        try:
            if isinstance(json.loads(t), dict):
                return "structured"
        except ValueError:
            pass
    return "text"


def usable_caption(text: str | None) -> bool:
    """A caption that may train a model: not empty, not a refusal, not a structured (JSON object) answer."""
    return caption_kind(text) == "text"


def clean_caption(text: str) -> str:
    """One line, single spaces, no control characters (rows from older runs may hold some): annotation
    files hold one-line captions."""
    return " ".join(clean_text(text).split())


def tokenize(text: str) -> list[str]:
    """CUHK-PEDES `processed_tokens`: lowercase words, punctuation dropped; CJK split per character."""
    return _TOKEN.findall(text.lower())


def captions_by_image(captions: list[CaptionRow]) -> dict[str, list[CaptionRow]]:
    """Usable captions per image, ordered by (prompt_name, caption_index).

    A key (image, prompt, caption index) written twice (a rerun) keeps its last usable row: a later
    refusal must not erase a good caption.
    """
    latest: dict[tuple[str, str, int], CaptionRow] = {}
    for row in captions:
        if usable_caption(row.caption):
            latest[row.key] = row
    grouped: dict[str, list[CaptionRow]] = defaultdict(list)
    for row in latest.values():
        grouped[row.image_id].append(row)
    for rows in grouped.values():
        rows.sort(key=lambda r: (r.prompt_name, r.caption_index))
    return dict(grouped)


# --- splits and persons ------------------------------------------------------------------------------

def split_group(split: str | None, image_id: str = "") -> str:
    """The dataset's split → "train" or "test" (None → train; see module docstring)."""
    if split is None or not split.strip():
        return "train"
    group = _SPLIT_MAP.get(split.strip().lower())
    if group is None:
        where = f" of {image_id}" if image_id else ""
        raise InputError(f"unknown split {split!r}{where}; export knows {', '.join(sorted(_SPLIT_MAP))}")
    return group


def has_person(entry: IndexEntry) -> bool:
    """False for junk, distractors and images without a pid: they cannot carry an identity label."""
    return entry.pid is not None and entry.pid >= 0 and not entry.junk


def carve_val(pids: list[int], fraction: float, seed: int = 0) -> set[int]:
    """The train pids that become val: `fraction` of them, at least one and never all (if fraction > 0).

    Chosen by ranking pids on a stable hash of (seed, pid), so the choice does not depend on input order.
    """
    if fraction <= 0 or len(pids) < 2:
        return set()
    unique = sorted(set(pids))
    n_val = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    ranked = sorted(unique, key=lambda pid: hashlib.sha256(f"{seed}\x1fval\x1f{pid}".encode()).digest())
    return set(ranked[:n_val])


def _check_options(fmt: str, val_from_train: float) -> None:
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not 0.0 <= val_from_train < 1.0:
        raise InputError(f"--val-from-train must be a fraction in [0, 1), got {val_from_train}")
    if fmt == "icfg-pedes" and val_from_train > 0:
        raise InputError("icfg-pedes has train and test splits only; use cuhk-pedes or rstpreid for a val split")


# --- building ----------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    """The records and what was left out, so the CLI can say so in one summary line."""

    records: list[dict]
    captions: int = 0  # captions written
    persons: dict[str, int] = field(default_factory=dict)  # persons per split (id formats)
    no_person: int = 0  # captioned images left out for junk/distractor/no pid (id formats)
    no_caption: int = 0  # index images without a usable caption, left out
    not_in_index: int = 0  # captioned image_ids that the index does not list, left out


def build_export(
    fmt: str,
    captions: list[CaptionRow],
    entries: list[IndexEntry],
    attributes: list[dict[str, str]] | None = None,
    *,
    val_from_train: float = 0.0,
    seed: int = 0,
) -> list[dict]:
    """The records of one export format (see the module docstring for ids, splits and what is left out)."""
    return run_export(fmt, captions, entries, attributes, val_from_train=val_from_train, seed=seed).records


def run_export(
    fmt: str,
    captions: list[CaptionRow],
    entries: list[IndexEntry],
    attributes: list[dict[str, str]] | None = None,
    *,
    val_from_train: float = 0.0,
    seed: int = 0,
) -> ExportResult:
    """`build_export` plus the counts of what was left out."""
    _check_options(fmt, val_from_train)
    by_image = captions_by_image(captions)
    attrs = attributes_by_image(attributes or [])
    groups = {e.image_id: split_group(e.split, e.image_id) for e in entries}
    train_pids = [e.pid for e in entries if has_person(e) and groups[e.image_id] == "train" and e.image_id in by_image]
    val_pids = carve_val([p for p in train_pids if p is not None], val_from_train, seed)

    def split_of(entry: IndexEntry) -> str:
        group = groups[entry.image_id]
        return "val" if group == "train" and has_person(entry) and entry.pid in val_pids else group

    known = set(groups)
    result = ExportResult(records=[], not_in_index=sum(1 for image_id in by_image if image_id not in known))
    if fmt == "jsonl":
        for e in entries:
            if e.image_id in by_image or e.image_id in attrs:
                rows = by_image.get(e.image_id, [])
                result.records.append(_jsonl_record(e, split_of(e), rows, attrs.get(e.image_id, {})))
                result.captions += len(rows)
            else:
                result.no_caption += 1
        return result

    result.no_caption = sum(1 for e in entries if e.image_id not in by_image)
    chosen = [e for e in entries if e.image_id in by_image]
    result.no_person = sum(1 for e in chosen if not has_person(e))
    chosen = [e for e in chosen if has_person(e)]
    splits = {e.image_id: split_of(e) for e in chosen}
    ids = assign_ids(chosen, splits, first_id=1 if fmt == "cuhk-pedes" else 0)
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    chosen.sort(key=lambda e: order[splits[e.image_id]])  # stable: index order within a split
    for e in chosen:
        texts = [clean_caption(r.caption) for r in by_image[e.image_id]]
        result.records.append(_id_record(fmt, e.image_id, splits[e.image_id], ids[e.image_id], texts))
        result.captions += len(texts)
    for split in SPLIT_ORDER:
        n = len({ids[e.image_id] for e in chosen if splits[e.image_id] == split})
        if n:
            result.persons[split] = n
    return result


def assign_ids(chosen: list[IndexEntry], splits: dict[str, str], first_id: int) -> dict[str, int]:
    """image_id → export id: persons numbered contiguously from `first_id`, train first (in pid order),
    then val, then test. A pid is one person within its split group only (train+val vs test)."""
    keys: dict[str, set[int]] = {s: set() for s in SPLIT_ORDER}
    for e in chosen:
        keys[splits[e.image_id]].add(e.pid)  # type: ignore[arg-type]
    number: dict[tuple[str, int], int] = {}
    next_id = first_id
    for split in SPLIT_ORDER:
        for pid in sorted(keys[split]):
            number[(split, pid)] = next_id
            next_id += 1
    return {e.image_id: number[(splits[e.image_id], e.pid)] for e in chosen}  # type: ignore[index]


def _id_record(fmt: str, image_id: str, split: str, pid: int, texts: list[str]) -> dict:
    if fmt == "rstpreid":
        return {"id": pid, "img_path": image_id, "captions": texts, "split": split}
    return {
        "split": split,
        "captions": texts,
        "file_path": image_id,
        "processed_tokens": [tokenize(t) for t in texts],
        "id": pid,
    }


def _jsonl_record(entry: IndexEntry, split: str, rows: list[CaptionRow], attrs: dict[str, dict[str, str]]) -> dict:
    """One image's record; the index object's own other fields (`entry.extra`) follow, never replacing
    one of these keys."""
    record = {
        "image_id": entry.image_id,
        "pid": entry.pid,
        "camid": entry.camid,
        "split": split,
        "dataset_split": entry.split,
        "junk": entry.junk or not has_person(entry),
        "captions": [
            {"prompt_name": r.prompt_name, "caption_index": r.caption_index, "caption": clean_caption(r.caption)}
            for r in rows
        ],
        "attributes": attrs,
    }
    if entry.extra:
        for key, value in entry.extra.items():
            record.setdefault(key, value)
    return record


def attributes_by_image(rows: list[dict[str, str]]) -> dict[str, dict[str, dict[str, str]]]:
    """attributes.csv rows → image_id → prompt_name → {field: value} (meta columns dropped)."""
    meta = set(ATTRIBUTE_META_COLUMNS)
    out: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    for row in rows:
        image_id = row.get("image_id")
        if not image_id:
            continue
        fields = {k: v for k, v in row.items() if k not in meta and k is not None}
        out[image_id][row.get("prompt_name") or "attributes"] = fields
    return dict(out)


# --- writing -----------------------------------------------------------------------------------------

def write_export(records: list[dict], fmt: str, path: Path) -> None:
    """Write records as one JSON list (jsonl: one object per line), UTF-8 without BOM (json.load chokes
    on a BOM), via a temporary file so a half-written export never replaces a good one."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            if fmt == "jsonl":
                for record in records:
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                json.dump(records, fh, ensure_ascii=False)
                fh.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"cannot write export {path}: {exc.strerror or exc}") from None


def default_export_path(out_dir: Path, fmt: str) -> Path:
    """`<out>/export_<format>.json` (`.jsonl` for jsonl): next to the captions it was made from."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    suffix = ".jsonl" if fmt == "jsonl" else ".json"
    return Path(out_dir) / f"export_{fmt.replace('-', '_')}{suffix}"


def run_index_path(out_dir: Path) -> Path:
    """The index a run used, from its manifest.json (relative: as given, else next to the output folder)."""
    manifest = read_manifest(Path(out_dir))
    raw = (manifest or {}).get("index")
    if not isinstance(raw, str) or not raw:
        raise InputError(f"no index recorded in {Path(out_dir) / MANIFEST}: is {out_dir} a reid-prompt output folder?")
    path = Path(raw)
    if path.is_absolute() or path.exists():
        return path
    beside = Path(out_dir) / path
    return beside if beside.exists() else path


def export_folder(
    out_dir: Path,
    fmt: str,
    to: Path | None = None,
    *,
    val_from_train: float = 0.0,
    seed: int = 0,
    index: Path | None = None,
) -> tuple[Path, int]:
    """`python -m pipeline export`: read the folder's captions, attributes and index, write one export.

    Returns (path written, records written). The index is the one manifest.json names unless `index`
    is given. No usable caption at all → InputError, rather than an empty training file.
    """
    out_dir = Path(out_dir)
    _check_options(fmt, val_from_train)
    captions = read_captions(out_dir)
    if not any(usable_caption(r.caption) for r in captions):
        raise InputError(f"no usable captions in {out_dir / CAPTIONS_ALL}; nothing to export")
    recorded_root = (read_manifest(out_dir) or {}).get("root") if index is None else None
    entries = load_index(
        index if index is not None else run_index_path(out_dir),
        Path(recorded_root) if isinstance(recorded_root, str) and recorded_root else None,
        follow_symlinks=True,  # export reads ids and splits; the run already decided which images to use
        require_files=False,  # an index of objects giving their own ids loads even where its paths don't resolve
    ).entries
    attributes = read_attributes(out_dir) if fmt == "jsonl" else None
    result = run_export(fmt, captions, entries, attributes, val_from_train=val_from_train, seed=seed)
    path = Path(to) if to is not None else default_export_path(out_dir, fmt)
    write_export(result.records, fmt, path)
    return path, len(result.records)
