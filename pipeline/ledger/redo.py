"""`run --redo review.csv`: ask rejected captions again, and keep the rejected rows, never lose or double one.

The gallery's review (`review.csv`: image_id, prompt_name, caption_index, verdict = accept | reject)
names captions a person judged bad. For each rejected (image_id, prompt_name, caption_index) the folder
holds, the old row *moves*: out of captions_all.csv and its part file (or out of attributes.csv, for a
structured prompt) into `captions_replaced.csv`, so the done set no longer holds the key and the run asks
it again like any missing caption. captions_replaced.csv has captions_all.csv's columns plus `replaced_at`,
`review_file` and `review_sha256` (a structured answer's fields go into `caption` as compact JSON, the
columns attributes.csv lacks stay empty). It is only ever appended to. Its rows were paid for, so they
count in the folder's spent total (`pipeline.ledger.outputs.read_done`): `--max-cost`, `status`, the
manifest and the dashboard keep counting money already paid. export reads captions_all.csv only, so a
replaced caption never reaches the training data.

**A move no kill can cut in half.** A move touches several files (captions_replaced.csv, the parts,
captions_all.csv, attributes.csv) and no file system changes several files at once, so it is journalled:

1. the journal `.redo_journal.json` is written whole (temporary file, fsync, `os.replace`): every row to
   move, exactly as read from its file, and its captions_replaced.csv record;
2. the records go to captions_replaced.csv (appended, fsync), each one unless a record equal to it in every
   column is there already;
3. each part file holding one of the rows is rewritten without it (temporary file, fsync, `os.replace`);
4. then captions_all.csv, then attributes.csv, the same way;
5. the journal is removed.

A kill at any moment leaves the journal (steps 1-4) or a finished move (after 5). Every run's start looks
for the journal, with or without `--redo`, *before* recovery and before the done set is read, and does
steps 2-5 again: step 2 skips records already appended (by key and content); step 4 removes only rows equal
to the journal's (key and every shared column), so a row is neither appended twice nor taken twice, and a
new answer for the same key is never touched. Step 3 removes every row of a moved key from the parts: they
are copies, and the copy of a row since edited by hand in captions_all.csv still holds the old text
(recovery compares parts by key); no new answer can be in a part yet, as the journal is finished before any
request. Parts go before captions_all.csv because the start's recovery (`pipeline.ledger.recover`) rebuilds
captions_all.csv from the union with the parts: a row still in a part would come back. Once a row is out of
every part and of captions_all.csv, recovery has nothing to bring it back from; answers held in a pending
file are merged before the rows are chosen, so a later merge cannot bring an old row back either. Before
step 2 a row is in its file only; between 2 and 4 it is in captions_replaced.csv and still in its file (a
`status` read in that window counts its cost twice, until the next start finishes the move); after 4 it is
in captions_replaced.csv only.

**Rerunning the same review is a no-op.** A key already moved by a review with the same content (its
sha256 is in `review_sha256`) is not moved again: the row now at that key is the new answer, which that
review never saw. (A second review that rejects the new answer is another file, with another hash. One
byte-identical to the first is taken for the first; add a line, e.g. an `accept` of anything.)

**What a review may hold.** Any other columns are ignored; the last row of a key wins. Bad input is one
line and exit 2, nothing moved: a missing or unreadable file, a missing column, a verdict other than
accept/reject, a caption_index that is not a whole number, a rejected caption of a prompt this run does not
ask (its new answer would never come), or of a slot it does not ask (`--captions-per-image`). Rejected keys
the folder does not hold (a failed item, a row already gone) are skipped with one note, because a review
made from this folder's gallery can fall behind the folder; but a review *none* of whose rejected keys is in
the folder is refused: it was made from another folder. A review that rejects nothing: one note, a plain
resume. With `--dry-run` nothing moves: the note says how many would be asked again, and the estimate counts
them as not done.

`parse_review`, `check_review`, `plan_redo` and `replaced_record` are pure; `apply_redo` does the I/O.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pipeline.errors import InputError, OutputError
from pipeline.ledger import appendfile, outputs, partstate
from pipeline.ledger.appendfile import describe_write_error
from pipeline.ledger.encoding import bom_for, folder_bom
from pipeline.ledger.manifest import now_iso
from pipeline.ledger.outputs import (
    ATTRIBUTE_ROW_COLUMNS,
    ATTRIBUTES,
    CAPTION_COLUMNS,
    CAPTIONS_ALL,
    CAPTIONS_REPLACED,
    PART_GLOB,
    REPLACED_COLUMNS,
    read_table,
)
from pipeline.ledger.pending import merge_pending
from pipeline.ledger.recover import row_key

Key = tuple[str, str, int]
Row = dict[str, str]

REVIEW_COLUMNS = ("image_id", "prompt_name", "caption_index", "verdict")
ACCEPT, REJECT = "accept", "reject"
JOURNAL = ".redo_journal.json"
JOURNAL_VERSION = 1
MAX_NAMED = 3  # keys named in one note


# --- the review (pure) ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Review:
    """What a review.csv says: the rejected keys (file order, each once), how many it accepts, its hash."""

    name: str  # the path as the user gave it: notes and the review_file column
    sha256: str
    rejected: tuple[Key, ...]
    accepted: int = 0


def parse_review(data: bytes, name: str) -> Review:
    """Parse review.csv's bytes (UTF-8, a BOM tolerated) with the `csv` module. Raises InputError (one line)."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"--redo {name}: not UTF-8 text (save the review as UTF-8 CSV)") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"--redo {name}: the file is empty (expected columns {', '.join(REVIEW_COLUMNS)})")
        header = [h.strip() for h in header]
        missing = [c for c in REVIEW_COLUMNS if c not in header]
        if missing:
            raise InputError(f"--redo {name}: no column {', '.join(missing)} (expected columns "
                             f"{', '.join(REVIEW_COLUMNS)}; found {', '.join(header[:6]) or 'none'})")
        at = {c: header.index(c) for c in REVIEW_COLUMNS}
        verdicts: dict[Key, str] = {}
        for rec in reader:
            if not any(cell.strip() for cell in rec):
                continue  # a blank line
            line = reader.line_num
            if len(rec) < len(header):
                raise InputError(f"--redo {name} line {line}: {len(rec)} fields, the header has {len(header)}")
            image_id, prompt_name = rec[at["image_id"]], rec[at["prompt_name"]].strip()
            index_cell, verdict = rec[at["caption_index"]].strip(), rec[at["verdict"]].strip().lower()
            if not image_id or not prompt_name:
                raise InputError(f"--redo {name} line {line}: image_id and prompt_name must not be empty")
            if not index_cell.isdigit():
                raise InputError(f"--redo {name} line {line}: caption_index {index_cell!r} is not a whole number")
            if verdict not in (ACCEPT, REJECT):
                raise InputError(f"--redo {name} line {line}: verdict {rec[at['verdict']]!r} is not "
                                 f"{ACCEPT} or {REJECT}")
            key = (image_id, prompt_name, int(index_cell))
            verdicts.pop(key, None)  # the last mark of a key wins, in its place
            verdicts[key] = verdict
    except csv.Error as exc:
        raise InputError(f"--redo {name} line {reader.line_num}: not valid CSV ({exc})") from None
    rejected = tuple(k for k, v in verdicts.items() if v == REJECT)
    return Review(name, sha, rejected, accepted=len(verdicts) - len(rejected))


def check_review(review: Review, wanted: Mapping[str, int]) -> None:
    """Refuse a review whose rejected captions this run would not ask again (InputError, one line).

    `wanted`: prompt name -> captions the run asks per image (1 for a structured prompt)."""
    for image_id, prompt_name, index in review.rejected:
        if prompt_name not in wanted:
            asked = ", ".join(sorted(wanted)) or "none"
            raise InputError(f"--redo {review.name} rejects captions of prompt {prompt_name!r}, which this run "
                             f"does not ask (its prompts: {asked}): add --prompt-file {prompt_name}, or leave "
                             "those rows out of the review")
        if index >= wanted[prompt_name]:
            raise InputError(f"--redo {review.name} rejects caption {index} of {image_id} under prompt "
                             f"{prompt_name!r}, but this run asks {wanted[prompt_name]} per image: give "
                             f"--captions-per-image {index + 1} or more")


# --- the plan (pure) -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Move:
    """One row leaving `source` (captions_all.csv with its part, or attributes.csv), as read from it."""

    source: str
    row: Row

    @property
    def key(self) -> Key:
        return row_key(self.row)


@dataclass
class RedoPlan:
    review: Review
    moves: list[Move] = field(default_factory=list)
    already: list[Key] = field(default_factory=list)  # moved before by this same review: left alone
    missing: list[Key] = field(default_factory=list)  # no row in the folder: nothing to move

    @property
    def keys(self) -> frozenset[Key]:
        return frozenset(m.key for m in self.moves)


def plan_redo(review: Review, captions: Iterable[Row], attributes: Iterable[Row], replaced: Iterable[Row]) -> RedoPlan:
    """Which rows move: every row of a rejected key (a hand-made folder may hold a key twice)."""
    images = {key[0] for key in review.rejected}  # a cheap first test: a million rows, a few rejected
    by_key: dict[Key, list[Move]] = {}
    for source, rows in ((CAPTIONS_ALL, captions), (ATTRIBUTES, attributes)):
        for d in rows:
            if d.get("image_id") in images:
                by_key.setdefault(row_key(d), []).append(Move(source, d))
    done_by_this = {row_key(d) for d in replaced if d.get("review_sha256") == review.sha256}
    plan = RedoPlan(review)
    for key in review.rejected:
        if key in done_by_this:
            plan.already.append(key)
        elif key in by_key:
            plan.moves += by_key[key]
        else:
            plan.missing.append(key)
    return plan


def fields_json(row: Row) -> str:
    """A structured answer's fields (attributes.csv's schema columns) as compact JSON, in column order."""
    fields = {c: v for c, v in row.items() if c not in ATTRIBUTE_ROW_COLUMNS}
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def replaced_record(move: Move, replaced_at: str, review_file: str, review_sha256: str) -> list[str]:
    """The captions_replaced.csv record of a move, in REPLACED_COLUMNS order."""
    d = move.row
    if move.source == ATTRIBUTES:
        d = {**{c: d.get(c, "") for c in ("image_id", "timestamp", "model", "prompt_tokens", "completion_tokens",
                                           "cost_usd", "prompt_name", "caption_index", "prompt_hash")},
             "caption": fields_json(move.row)}
    return [d.get(c) or "" for c in CAPTION_COLUMNS] + [replaced_at, review_file, review_sha256]


def same_row(d: Row, old: Row) -> bool:
    """Is `d` the row the journal moves? Same key and equal in every column both have."""
    return row_key(d) == row_key(old) and all(d[c] == v for c, v in old.items() if c in d)


def without(rows: Sequence[Row], moving: Mapping[Key, list[Row]], *, copies: bool = False) -> list[Row]:
    """`rows` minus those the journal moves. `copies` (a part file): every row of a moved key goes, whatever
    its content: a part is a copy of captions_all.csv, and the copy of a row edited there by hand keeps the
    old text (recovery compares parts by key), which must not come back once the key is gone."""
    if copies:
        return [d for d in rows if row_key(d) not in moving]
    return [d for d in rows if not any(same_row(d, old) for old in moving.get(row_key(d), ()))]


def describe_keys(keys: Sequence[Key]) -> str:
    shown = ", ".join(f"{i} / {p} / {n}" for i, p, n in keys[:MAX_NAMED])
    return shown + (f" and {len(keys) - MAX_NAMED:,} more" if len(keys) > MAX_NAMED else "")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# --- the journal and the move (I/O) --------------------------------------------------------------------------

@dataclass(frozen=True)
class Journal:
    """A move to carry out: each row as read from its file, and its captions_replaced.csv record."""

    review_file: str
    moves: tuple[tuple[str, Row, list[str]], ...]  # (source file, row, record)

    def to_json(self) -> bytes:
        body = {"version": JOURNAL_VERSION, "review_file": self.review_file,
                "moves": [{"file": s, "row": r, "record": rec} for s, r, rec in self.moves]}
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "Journal":
        body = json.loads(data.decode("utf-8"))
        if body.get("version") != JOURNAL_VERSION:
            raise ValueError(f"version {body.get('version')!r}")
        moves = tuple((m["file"], {str(k): str(v) for k, v in m["row"].items()}, [str(c) for c in m["record"]])
                      for m in body["moves"])
        return cls(str(body.get("review_file", "")), moves)


def journal_for(plan: RedoPlan, replaced_at: str) -> Journal:
    r = plan.review
    return Journal(r.name, tuple((m.source, m.row, replaced_record(m, replaced_at, r.name, r.sha256))
                                 for m in plan.moves))


def carry_out(out_dir: Path, journal: Journal) -> list[str]:
    """Steps 2-5 of the move (module docstring); safe to repeat after a kill at any point. Returns notes
    of any damage quarantined on the way. Raises OSError."""
    notes: list[str] = []
    _append_replaced(out_dir, [rec for _, _, rec in journal.moves], notes)
    partstate.forget(out_dir)  # the parts change: the next start reads them all, once
    moving: dict[str, dict[Key, list[Row]]] = {CAPTIONS_ALL: {}, ATTRIBUTES: {}}
    for source, row, _ in journal.moves:
        moving.setdefault(source, {}).setdefault(row_key(row), []).append(row)
    captions = moving[CAPTIONS_ALL]
    if captions:
        needles = {_csv_needle(key[0]) for key in captions}
        for part in sorted(out_dir.glob(PART_GLOB)):
            data = part.read_bytes()
            if any(n in data for n in needles):  # only a part naming one of the images is parsed
                _drop(part, captions, notes, copies=True)
        _drop(out_dir / CAPTIONS_ALL, captions, notes)
    if moving[ATTRIBUTES]:
        _drop(out_dir / ATTRIBUTES, moving[ATTRIBUTES], notes)
    (out_dir / JOURNAL).unlink(missing_ok=True)
    return notes


def _csv_needle(image_id: str) -> bytes:
    """The bytes an image id has inside a CSV record (a quote doubled, as the csv module writes it)."""
    return image_id.replace('"', '""').encode("utf-8")


def _append_replaced(out_dir: Path, records: list[list[str]], notes: list[str]) -> None:
    """Step 2: append the records captions_replaced.csv lacks, and sync them to the disk."""
    path = out_dir / CAPTIONS_REPLACED
    table = read_table(path, repair=True)  # a torn tail (a kill mid-append) is cut, never buried
    notes += [n for n in table.notes if n]
    if path.exists() and path.stat().st_size > 0 and table.header != REPLACED_COLUMNS:
        raise OutputError(f"{path} has other columns than reid-prompt writes: move it aside")
    have = {tuple(d.get(c, "") for c in REPLACED_COLUMNS) for d in table.rows}
    new: list[list[str]] = []
    for rec in records:
        if tuple(rec) not in have:
            have.add(tuple(rec))
            new.append(rec)
    if not new:
        return
    bom = bom_for(path, bool(folder_bom(out_dir)))
    appendfile.append_bytes(path, appendfile.records_bytes(new), appendfile.header_bytes(REPLACED_COLUMNS, bom))
    with open(path, "ab") as fh:
        os.fsync(fh.fileno())


def _drop(path: Path, moving: Mapping[Key, list[Row]], notes: list[str], *, copies: bool = False) -> None:
    """Steps 3-4 for one file: rewrite it atomically without the rows the journal moves (if it holds any)."""
    if not path.exists():
        return
    table = read_table(path, repair=True)
    notes += [n for n in table.notes if n]
    keep = without(table.rows, moving, copies=copies)
    if len(keep) == len(table.rows):
        return
    outputs.write_csv_atomic(path, table.header, ([d.get(c, "") for c in table.header] for d in keep),
                             bom=bom_for(path, False))


def read_journal(out_dir: Path) -> Journal | None:
    path = out_dir / JOURNAL
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {describe_write_error(exc)}") from None
    try:
        return Journal.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OutputError(f"{path} is not a reid-prompt redo journal ({exc}): move it aside") from None


def finish_unfinished(out_dir: Path, say: Callable[[str], None]) -> None:
    """A move a kill cut short (its journal is still there): finish it, before anything reads the folder."""
    journal = read_journal(out_dir)
    if journal is None:
        return
    try:
        notes = carry_out(out_dir, journal)
    except OSError as exc:
        raise OutputError(f"cannot finish the --redo move a previous run started: {_why(exc)}; nothing is "
                          "lost: run again once it can be written") from None
    for note in notes:
        say(f"repaired: {note}")
    say(f"note: finished moving {plural(len(journal.moves), 'rejected row')} of --redo {journal.review_file} "
        f"to {CAPTIONS_REPLACED} (a previous run stopped half-way)")


# --- the entry point -----------------------------------------------------------------------------------------

class KeysExcept:
    """The done set less the keys a dry run of `--redo` would move (the rows stay where they are)."""

    def __init__(self, done: Any, removed: frozenset[Key]) -> None:
        self.done, self.removed = done, removed

    def __contains__(self, key: object) -> bool:
        return key not in self.removed and key in self.done

    def __len__(self) -> int:
        return len(self.done)


@dataclass(frozen=True)
class Redo:
    """What `apply_redo` did: the keys asked again (moved; in a dry run, that would be moved)."""

    keys: frozenset[Key] = frozenset()
    readonly: bool = False

    def exclude_from(self, resume: Any) -> None:
        """A dry run moved nothing: take the keys out of the done set it read, so the estimate counts them.
        `resume`: `pipeline.ledger.writer.ResumeState`. (A real run's done set never holds them.)"""
        if not (self.readonly and self.keys):
            return
        resume.done = KeysExcept(resume.done, self.keys)
        if resume.read is not None:
            resume.read.keys = resume.done


def _why(exc: OSError) -> str:
    """`<file name>: <reason>` of a failed write (the reason by errno, never the message text)."""
    name = Path(exc.filename).name if exc.filename else ""
    return f"{name}: {describe_write_error(exc)}" if name else describe_write_error(exc)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_review(path: Path) -> Review:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"--redo {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--redo {path}: is a folder, not a review CSV") from None
    except OSError as exc:
        raise InputError(f"--redo {path}: cannot read it: {exc.strerror or exc}") from None
    return parse_review(data, str(path))


def apply_redo(
    out_dir: Path,
    review_path: Path | None,
    wanted: Mapping[str, int],
    *,
    readonly: bool = False,
    say: Callable[[str], None] = _say,
) -> Redo:
    """Called by `runner.prepare` with the folder locked, before recovery and the done set are read.

    Finishes a move a kill cut short (every run, `--redo` or not: one `stat` when there is none); then,
    with `review_path`, reads and checks the review, and moves its rejected rows (module docstring).
    `wanted`: prompt name -> captions asked per image. `readonly` (dry run): changes nothing, says what
    would move. Raises InputError (bad review) or OutputError (a file that cannot be written).
    """
    out_dir = Path(out_dir)
    if readonly:
        if (out_dir / JOURNAL).exists():
            say(f"note: a --redo move was cut short in {out_dir}; the next run finishes it")
    else:
        finish_unfinished(out_dir, say)
    if review_path is None:
        return Redo()
    review = read_review(review_path)
    check_review(review, wanted)
    if not review.rejected:
        say(f"note: --redo {review.name} rejects nothing ({plural(review.accepted, 'caption')} accepted): "
            "a plain resume")
        return Redo(readonly=readonly)
    try:
        if not readonly:  # held answers first: a merge after the move must not bring an old row back
            for note in merge_pending(out_dir, bool(folder_bom(out_dir))):
                say(f"repaired: {note}")
        captions = read_table(out_dir / CAPTIONS_ALL).rows
        attributes = read_table(out_dir / ATTRIBUTES).rows
        replaced = read_table(out_dir / CAPTIONS_REPLACED).rows
    except OSError as exc:
        raise OutputError(f"cannot read {out_dir}: {describe_write_error(exc)}") from None
    plan = plan_redo(review, captions, attributes, replaced)
    if not plan.moves and not plan.already:
        raise InputError(f"--redo {review.name}: none of its {plural(len(review.rejected), 'rejected caption')} "
                         f"is in {out_dir} (e.g. {describe_keys(plan.missing)}): is the review from another "
                         "output folder?")
    if plan.missing:
        say(f"note: --redo {review.name}: {plural(len(plan.missing), 'rejected caption')} not in {out_dir}, "
            f"skipped: {describe_keys(plan.missing)}")
    if plan.already:
        say(f"note: --redo {review.name}: {plural(len(plan.already), 'rejected caption')} already moved to "
            f"{CAPTIONS_REPLACED} by this same review, not moved again (missing ones are asked as usual)")
    if not plan.moves:
        return Redo(readonly=readonly)
    n = len(plan.keys)
    if readonly:
        say(f"note: --redo {review.name}: {plural(n, 'rejected caption')} would be asked again "
            f"(dry run: nothing is moved)")
        return Redo(plan.keys, readonly=True)
    journal = journal_for(plan, now_iso())
    try:
        appendfile.write_new_file(out_dir / JOURNAL, journal.to_json())
        notes = carry_out(out_dir, journal)
    except OSError as exc:
        raise OutputError(f"cannot move rejected captions to {CAPTIONS_REPLACED}: {_why(exc)}; nothing is "
                          "lost: the next run finishes the move") from None
    for note in notes:
        say(f"repaired: {note}")
    say(f"note: --redo {review.name}: {plural(n, 'rejected caption')} moved to {CAPTIONS_REPLACED}; "
        "asked again now")
    return Redo(plan.keys)
