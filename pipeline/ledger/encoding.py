"""Whether the CSV files of an output folder start with a BOM: the one decision every CSV writer follows.

Plain UTF-8 without a BOM is the default, because that is what the users' own scripts read:
`csv.DictReader(open(p, encoding="utf-8"))` keeps a BOM in the first column name (`\\ufeffimage_id`), so
`row["image_id"]` would be missing from every row. `run --excel` writes a BOM at the start of a new file,
so Excel shows Chinese captions correctly (Excel takes a file without one for the local code page).

A folder keeps the encoding it was started with, so it never ends up mixed: if its CSV files start with a
BOM, new files and rewrites keep writing one even without `--excel`; a folder started without one stays
without even when `--excel` is given later (one note says so). A rewrite of an existing file (quarantine,
migration, a rebuilt part) keeps that file's own BOM-or-not; a file that is new or empty gets the folder's.
Our readers accept both (`pipeline.ledger.csvscan` skips a BOM; the others open with `utf-8-sig`).

`decide` is pure; `folder_bom` and `file_bom` only read the first bytes of a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.ledger.csvscan import BOM
from pipeline.ledger.outputs import ATTRIBUTES, CAPTIONS_ALL, ERRORS, PART_GLOB

# The folder's CSV files, in the order they speak for it: the record of what is done first.
_FIRST_NAMES = (CAPTIONS_ALL, ERRORS, ATTRIBUTES)


@dataclass(frozen=True)
class FolderEncoding:
    """The folder's decision: `bom` for every new file; `note` (one line) when `--excel` is not honoured."""

    bom: bool
    note: str | None = None


def file_bom(path: Path) -> bool | None:
    """Does this file start with a BOM? None when it is missing, empty or unreadable (it says nothing)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(BOM))
    except OSError:
        return None
    if not head:
        return None
    return head == BOM


def iter_csv_files(out_dir: Path) -> Iterator[Path]:
    """The CSV files a run writes in `out_dir` (captions_all.csv, errors, attributes, then the parts),
    lazily: the first file with bytes decides (`folder_bom`), so 50,000 parts are listed only when none
    of the first files has any."""
    out_dir = Path(out_dir)
    for name in _FIRST_NAMES:
        yield out_dir / name
    if out_dir.is_dir():
        yield from sorted(out_dir.glob(PART_GLOB))


def folder_bom(out_dir: Path, recorded: object = None) -> bool | None:
    """The encoding the folder was started with: its first CSV file with bytes in it decides; without
    one, what the manifest recorded (`csv_bom`, when a bool); None for a new folder."""
    return first_known((file_bom(p) for p in iter_csv_files(out_dir)), recorded)


def first_known(found: Iterable[bool | None], recorded: object = None) -> bool | None:
    """The first answer that is not None, else `recorded` when it is a bool, else None."""
    for bom in found:
        if bom is not None:
            return bom
    return recorded if isinstance(recorded, bool) else None


def decide(existing: bool | None, excel: bool, where: str = "the output folder") -> FolderEncoding:
    """BOM or not for the folder's files: the folder's own encoding if it has one, else `--excel`."""
    if existing is None:
        return FolderEncoding(bom=excel)
    if excel and not existing:
        return FolderEncoding(False, f"{where} keeps its encoding (no BOM); --excel applies to new folders")
    return FolderEncoding(bom=existing)


def bom_for(path: Path, folder: bool) -> bool:
    """For a (re)write of `path`: the file's own BOM-or-not when it has bytes, else the folder's."""
    own = file_bom(path)
    return folder if own is None else own

