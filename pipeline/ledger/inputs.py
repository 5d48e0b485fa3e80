"""What an output folder's rows were made from, and refusing to mix other work into them.

A rerun on the same `--out` resumes: what is done is skipped. That is only right if the rerun would ask
the same thing. An edited prompt under the same name, another model or `--detail`, or another image root
(the same ids with other pixels) would leave old and new answers side by side, indistinguishable. So the
manifest records the inputs (`Inputs`), and a rerun compares (`changes_between`) before any request:
a change is refused with one line naming it and two ways forward; `--allow-changes` keeps the old rows
as done and records the change in the manifest.

Extending the work is not a change: another prompt, more captions per image, more images in the index,
another `--max-tokens` just proceed (the last is recorded, not refused).

Pure functions here; the runner reads the manifest and the index file.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import InputError
from pipeline.records import Prompt


class ChangedInputs(InputError):
    """A rerun would mix other work into the folder's rows (exit 2: nothing was sent)."""


@dataclass(frozen=True)
class IndexFingerprint:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Inputs:
    """What the folder's rows are made from (the manifest's `inputs`)."""

    root: str
    dataset: str
    index: IndexFingerprint | None
    prompts: dict[str, str]  # prompt name -> Prompt.fingerprint
    model: str
    detail: str
    max_tokens: int | None
    captions_per_image: int
    backend: str = "openai"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Inputs | None":
        """Inputs from a manifest's `inputs` (None if absent or malformed: the folder is then adopted)."""
        if not isinstance(d, dict):
            return None
        idx = d.get("index")
        try:
            fp = IndexFingerprint(str(idx["path"]), int(idx["size"]), str(idx["sha256"])) if isinstance(idx, dict) else None
            prompts = {str(k): str(v) for k, v in (d.get("prompts") or {}).items()}
            mt = d.get("max_tokens")
            return Inputs(
                root=str(d.get("root") or ""),
                dataset=str(d.get("dataset") or ""),
                index=fp,
                prompts=prompts,
                model=str(d.get("model") or ""),
                detail=str(d.get("detail") or ""),
                max_tokens=int(mt) if mt is not None else None,
                captions_per_image=int(d.get("captions_per_image") or 1),
                backend=str(d.get("backend") or "openai"),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def legacy_inputs(manifest: dict[str, Any]) -> Inputs | None:
    """Inputs from a manifest written before `inputs` existed (model, detail and root were recorded)."""
    if not isinstance(manifest, dict) or "model" not in manifest:
        return None
    return Inputs(
        root=str(manifest.get("root") or ""),
        dataset="",
        index=None,
        prompts={},  # its prompt hashes were of the text only: not comparable, so not compared
        model=str(manifest.get("model") or ""),
        detail=str(manifest.get("detail") or ""),
        max_tokens=manifest.get("max_tokens"),
        captions_per_image=int(manifest.get("captions_per_image") or 1),
        backend=str(manifest.get("backend") or "openai"),
    )


def previous_inputs(manifest: dict[str, Any] | None) -> Inputs | None:
    if not manifest:
        return None
    if "inputs" in manifest:
        return Inputs.from_dict(manifest["inputs"])
    return legacy_inputs(manifest)


def fingerprint_file(path: Path, chunk: int = 1 << 20) -> IndexFingerprint:
    """Size and sha256 of the index file, read in chunks (a million-line index is ~100 MB)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            size += len(block)
            h.update(block)
    return IndexFingerprint(str(Path(path).resolve()), size, h.hexdigest())


def current_inputs(
    *,
    root: Path,
    dataset: str,
    index: IndexFingerprint | None,
    prompts: Iterable[Prompt],
    model: str,
    detail: str,
    max_tokens: int | None,
    captions_per_image: int,
    backend: str,
) -> Inputs:
    return Inputs(
        root=str(Path(root).resolve()),
        dataset=dataset or "",
        index=index,
        prompts={p.name: p.fingerprint for p in prompts},
        model=model,
        detail=detail,
        max_tokens=max_tokens,
        captions_per_image=captions_per_image,
        backend=backend,
    )


@dataclass(frozen=True)
class Change:
    what: str  # "prompt", "model", "detail", "root", "dataset", "backend"
    before: str
    after: str
    name: str = ""  # the prompt's name, for a prompt change

    def describe(self) -> str:
        if self.what == "prompt":
            return f"the text of prompt {self.name!r} changed ({self.before} -> {self.after})"
        if self.what == "root":
            return f"the image root changed ({self.before} -> {self.after})"
        return f"{self.what} changed ({self.before} -> {self.after})"


def changes_between(before: Inputs, after: Inputs) -> list[Change]:
    """What would mix different work into the folder. Additions (prompts, captions, images) are not changes.

    Only what is known on both sides is compared: a legacy manifest without prompt hashes or dataset name
    is not held against a rerun.
    """
    out: list[Change] = []
    for name, fp in sorted(after.prompts.items()):
        old = before.prompts.get(name)
        if old and old != fp:
            out.append(Change("prompt", old, fp, name))
    if before.backend and before.backend != after.backend:
        out.append(Change("backend", before.backend, after.backend))
    elif before.model and before.model != after.model:
        out.append(Change("model", before.model, after.model))
    if before.detail and before.detail != after.detail and after.backend != "offline":
        out.append(Change("detail", before.detail, after.detail))
    if before.root and not roots_compatible(before.root, after.root):
        out.append(Change("root", before.root, after.root))
    elif before.dataset and after.dataset and before.dataset != after.dataset:
        out.append(Change("dataset", before.dataset, after.dataset))
    return out


def _norm(path: str) -> str:
    return str(Path(path)).rstrip("/\\").casefold() if path else ""


def roots_compatible(before: str, after: str) -> bool:
    """Is `after` the same image root as `before`, or one that only widens or narrows it?

    An index that grows (the query split first, then the gallery) moves its common root up a folder
    (`.../market1501/query` -> `.../market1501`); a subset moves it down. Neither changes which files the
    done ids are. Another root that is neither (a copy of the dataset elsewhere) is a change.
    """
    a, b = Path(_norm(before)), Path(_norm(after))
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def refusal(changes: list[Change], out_dir: Path) -> ChangedInputs:
    """The one-line refusal: what changed, and the two ways forward."""
    what = "; ".join(c.describe() for c in changes)
    return ChangedInputs(
        f"{out_dir} holds answers made from other inputs: {what}. "
        f"Use a new --out for the new work, or --allow-changes to keep the old rows as done and go on"
    )


@dataclass
class InputCheck:
    """The outcome of comparing a rerun with its folder: notes to print, changes accepted."""

    notes: list[str] = field(default_factory=list)
    accepted: list[Change] = field(default_factory=list)


def check_inputs(
    previous_manifest: dict[str, Any] | None,
    current: Inputs,
    *,
    has_rows: bool,
    allow_changes: bool,
    out_dir: Path,
) -> InputCheck:
    """Refuse (raise ChangedInputs), adopt, or accept changes; never touches a file."""
    check = InputCheck()
    if not has_rows:
        return check
    before = previous_inputs(previous_manifest)
    if before is None:
        check.notes.append(
            f"adopted {out_dir}: it holds answers but no manifest (written by an earlier script or by hand); "
            "they count as done"
        )
        return check
    changes = changes_between(before, current)
    if changes and not allow_changes:
        raise refusal(changes, out_dir)
    if changes:
        check.accepted = changes
        check.notes.append("--allow-changes: " + "; ".join(c.describe() for c in changes) + " (old rows kept as done)")
    return check


def folder_has_rows(out_dir: Path, names: Iterable[str]) -> bool:
    """Does any of these CSV files hold at least one record after its header? Reads two records at most."""
    for name in names:
        path = Path(out_dir) / name
        try:
            with open(path, encoding="utf-8-sig", newline="", errors="replace") as fh:
                reader = csv.reader(fh)
                if next(reader, None) is not None and next(reader, None) is not None:
                    return True
        except (OSError, csv.Error):
            continue
    return False
