"""What a run does to its output folder before the first request, so nothing paid for is lost or doubled.

In this order, each step working on what the one before left:

1. repair every CSV the run writes (captions_all.csv, the parts, errors.csv, attributes.csv): damaged rows
   and a torn tail go to `<name>.rejected`, the good rows stay byte for byte (`read_table(repair=True)`);
2. migrate a file written with older columns (the earlier scripts' `image_id,prompt,caption,timestamp`,
   or ours before a column was added) to the current header, missing cells empty;
3. merge answers a previous run held but could not write (`pipeline.ledger.pending.merge_pending`), into
   files already repaired and migrated, so the merge never appends behind a torn tail or under an old
   header, and each repair is reported;
4. rebuild captions_all.csv as the union with the part files: captions_all.csv is the record of what is
   done, but a part is a copy of a paid answer too, so a row the part files hold and captions_all.csv
   lacks (deleted, damaged, lost) is added back to it, never dropped;
5. make the part files hold exactly captions_all.csv's rows, split by index position for the current
   `--batch-size` (re-split when it changed). Rows of images not in the current index stay in
   captions_all.csv and in no part. A part is removed only once captions_all.csv holds all its rows,
   which step 4 has made sure of. Part numbers have 4 digits, or as many as the index's largest part
   number needs (`part_digits`); an index grown past 10,000 parts renames every part to the new width
   (written under the new names first, then the old ones removed).

Every file written or rewritten here follows the folder's encoding (`pipeline.ledger.encoding`): a
rewrite keeps the file's own BOM-or-not (quarantine copies its bytes, a migration or a rebuilt part asks
`bom_for`), a new file gets the folder's (`bom`).

The fast path: when no pending file waits, the parts are as the last run's end recorded them in step
(`pipeline.ledger.partstate`: one `stat` per part) and captions_all.csv reads clean with the current header
in one streaming pass, steps 1-5 have nothing to do for the captions; that pass is also the done set
(`Recovery.captions`), so a resume reads captions_all.csv once and no part at all; when the done-keys
snapshot (`pipeline.ledger.donesnap`) still describes captions_all.csv, not even that file is read.

The streamed path (`_stream_captions`), for a folder whose parts are not recorded in step (a run killed,
a part deleted or edited): steps 1-5 without holding the rows. A killed run leaves the record of an
earlier moment behind; with it and the snapshot, only what the run added is read (the rows appended to
captions_all.csv since, the parts that changed: `_since_record`). Without them, one pass over
captions_all.csv sums what each part must hold (rows, digest sum) and every part is read and compared.
Only parts that differ are held and rebuilt, with the same notes and the same bytes as the full path.

Anything else (a pending file, a torn tail or damage in captions_all.csv, older columns, another
--batch-size or part number width) takes the steps above, holding the rows as dicts: the full path.

errors.csv is append-only across runs: it is repaired, never reset. The decisions are pure functions
(`missing_from`, `plan_parts`, `header_change`); `recover_folder` does the I/O around them.
"""

from __future__ import annotations

import csv
import io
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

from pipeline.errors import OutputError
from pipeline.ledger import appendfile, csvscan, donesnap, partstate
from pipeline.ledger.donekeys import key_digest
from pipeline.ledger.encoding import bom_for
from pipeline.ledger.pending import find_pending, merge_pending
from pipeline.ledger.outputs import (
    ATTRIBUTE_ROW_COLUMNS,
    ATTRIBUTES,
    CAPTION_COLUMNS,
    CAPTIONS_ALL,
    ERROR_COLUMNS,
    ERRORS,
    PART_GLOB,
    PART_PREFIX,
    ENCODING_READ,
    CaptionTally,
    Table,
    attribute_columns_for,
    part_digits,
    part_name,
    read_table,
    tally_clean_captions,
    write_csv_atomic,
)

Row = dict[str, str]
Key = tuple[str, str, int]
MAX_PART_NOTES = 5  # more part files changed than this: one summary line instead of one line each
# image_id -> index position: a mapping, or a function making it (called only when parts must be planned)
Positions = Union[Mapping[str, int], Callable[[], Mapping[str, int]]]


@dataclass
class Recovery:
    """What `recover_folder` did: notes for the user, and the attribute columns the folder now has."""

    notes: list[str] = field(default_factory=list)
    attribute_fields: list[str] = field(default_factory=list)
    captions: CaptionTally | None = None  # the fast path's one pass over captions_all.csv (else None)


def row_key(d: Row) -> Key:
    """(image_id, prompt_name, caption_index) of a caption row, with the defaults `caption_from_dict` uses."""
    try:
        index = int(d.get("caption_index") or 0)
    except ValueError:
        index = 0
    return (d.get("image_id", ""), d.get("prompt_name") or "base", index)


# --- pure decisions ---------------------------------------------------------------------------------------

def header_change(have: list[str], want: list[str]) -> list[str] | None:
    """The columns a file with header `have` lacks to be written as `want` (None: nothing to change).

    Raises OutputError for a header that is not a set of our columns: without image_id it is not ours;
    with columns we do not write, rewriting would drop what someone put there.
    """
    if have == want:
        return None
    if "image_id" not in have:
        raise OutputError(f"not a reid-prompt CSV (no image_id column; columns: {', '.join(have[:6])})")
    unknown = [c for c in have if c not in want]
    if unknown:
        raise OutputError(
            f"has columns reid-prompt does not write ({', '.join(unknown[:4])}): "
            "move the file aside or use another --out"
        )
    return [c for c in want if c not in have]


def merged_attribute_fields(header: list[str], fields: list[str]) -> list[str]:
    """attributes.csv's schema fields: those already in the file, in its order, then this run's new ones."""
    old = [c for c in header if c not in ATTRIBUTE_ROW_COLUMNS]
    return old + [f for f in fields if f not in old]


def missing_from(all_rows: Iterable[Row], parts: Mapping[str, list[Row]]) -> list[Row]:
    """Rows the part files hold whose key captions_all.csv lacks: each key once, in part order."""
    have = {row_key(d) for d in all_rows}
    extra: list[Row] = []
    for name in sorted(parts):
        for d in parts[name]:
            key = row_key(d)
            if key not in have:
                have.add(key)
                extra.append(d)
    return extra


def plan_parts(all_rows: Iterable[Row], positions: Mapping[str, int], batch_size: int) -> dict[str, list[Row]]:
    """The rows each part file should hold: captions_all.csv's rows, by index position // batch_size.

    Part numbers have the width the whole index needs (`part_digits`), whatever rows are done yet."""
    digits = part_digits(last_position_of(positions), batch_size)
    plan: dict[str, list[Row]] = defaultdict(list)
    for d in all_rows:
        pos = positions.get(d.get("image_id", ""))
        if pos is not None:
            plan[part_name(pos, batch_size, digits)].append(d)
    return dict(plan)


def part_number_widths(names: Iterable[str]) -> set[int]:
    """The digit widths of part file names (`captions_part_0007.csv` -> 4); other names are ignored."""
    widths: set[int] = set()
    for name in names:
        number = name.removeprefix(PART_PREFIX).removesuffix(".csv")
        if name.startswith(PART_PREFIX) and name.endswith(".csv") and number.isdigit():
            widths.add(len(number))
    return widths


def same_rows(a: list[Row], b: list[Row]) -> bool:
    return len(a) == len(b) and Counter(map(row_key, a)) == Counter(map(row_key, b))


# --- the I/O ----------------------------------------------------------------------------------------------

def recover_folder(
    out_dir: Path,
    *,
    batch_size: int,
    positions: Positions,
    attribute_fields: list[str] | None = None,
    previous_batch_size: int | None = None,
    bom: bool = False,
    index_key: str | None = None,
    last_position: int | None = None,
) -> Recovery:
    """Bring the folder to a state a run can append to; see the module docstring for the steps.

    `attribute_fields`: this run's structured-prompt fields (attributes.csv keeps any older ones too; the
    result's `attribute_fields` is what the writer must write). `bom`: the folder's encoding, for files
    made new here (`pipeline.ledger.encoding.decide`). Raises OutputError (one line) for a file that is
    not ours or that cannot be rewritten.

    `index_key` (the index file's fingerprint) and `last_position` (the index's last position) allow
    the fast path (`_fast_captions`): nothing to recover is known from `stat`s and one clean pass over
    captions_all.csv, whose tally the result carries (`captions`) so the caller does not read it again.
    `positions` may be a function: the mapping is made only when parts must be planned.
    """
    out_dir = Path(out_dir)
    fields = list(attribute_fields or [])
    notes: list[str] = []
    fast = _fast_captions(out_dir, batch_size, positions, index_key, last_position)
    if fast is None:  # the parts are not known in step: check them against one pass (the common case)
        fast = _stream_captions(out_dir, batch_size, positions, index_key, last_position,
                                previous_batch_size, bom, notes)
    if fast is not None:
        all_rows, parts = [], {}
    else:
        all_rows, parts = _captions(out_dir, notes)
    errors = _repair(out_dir / ERRORS, notes)
    if errors:
        _migrate(out_dir / ERRORS, errors, ERROR_COLUMNS, notes)
    attrs = _repair(out_dir / ATTRIBUTES, notes, "their images are asked again" if fields else "")
    if attrs and fields:  # only a run that writes attributes.csv changes its columns
        fields = merged_attribute_fields(attrs.header, fields)
        _migrate(out_dir / ATTRIBUTES, attrs, attribute_columns_for(fields), notes)
    if fast is not None:  # no pending file (checked), parts in step, captions_all.csv clean: done
        return Recovery(notes, fields, captions=fast)
    merged = merge_pending(out_dir, bom)
    if merged:
        notes += merged
        all_rows, parts = _captions(out_dir, notes)

    positions = _positions(positions)
    all_rows = all_rows + _restore(out_dir, all_rows, parts, notes, bom)
    notes += _reconcile_parts(out_dir, all_rows, parts, positions, batch_size, previous_batch_size, bom)
    partstate.record(out_dir, batch_size=batch_size, digits=part_digits(last_position_of(positions), batch_size),
                     index_key=index_key)
    return Recovery(notes, fields)


def _positions(positions: Positions) -> Mapping[str, int]:
    return positions() if callable(positions) else positions


def last_position_of(positions: Mapping[str, int]) -> int:
    """The index's last position: positions are the whole index's, 0..n-1 (a dict is asked, in C)."""
    if isinstance(positions, dict):
        return max(positions.values(), default=0)
    return max(0, len(positions) - 1)


def _fast_captions(
    out_dir: Path, batch_size: int, positions: Positions, index_key: str | None, last_position: int | None
) -> CaptionTally | None:
    """The start's fast path: when no pending file waits, the parts are as the last run left them in
    step (`pipeline.ledger.partstate`) and captions_all.csv is clean with the current header, steps 1-5
    have nothing to do for the captions: one streaming pass over captions_all.csv gives what is done,
    and no part is read. None: take the full recovery."""
    if not index_key or find_pending(out_dir):
        return None
    if last_position is None:
        last_position = last_position_of(_positions(positions))
    digits = part_digits(last_position, batch_size)
    if not partstate.in_step(out_dir, batch_size=batch_size, digits=digits, index_key=index_key):
        return None
    return donesnap.load(out_dir) or tally_clean_captions(out_dir / CAPTIONS_ALL)


_MASK = (1 << 64) - 1


def _stream_captions(
    out_dir: Path, batch_size: int, positions: Positions, index_key: str | None, last_position: int | None,
    previous_batch_size: int | None, bom: bool, notes: list[str],
) -> CaptionTally | None:
    """Steps 1-5 for the captions without holding a row of captions_all.csv (a killed run's folder).

    One clean pass over captions_all.csv gives the done set and, per part number, how many rows the part
    must hold and the sum of their key digests (mod 2**64). Each part file is then read (a small file)
    and compared on those two numbers; only a part that differs is held: its rows that captions_all.csv
    lacks are appended to it (step 4), and it is rebuilt from a second pass that collects the rows of
    the parts to rebuild only (step 5). A damaged part goes through the same repair as in the full path.
    Returns None, having changed nothing, when this does not apply: a pending file, captions_all.csv
    not clean with the current header (missing, torn, damaged, older columns), another --batch-size, or
    parts named with another number width; the full path then does everything as before.
    """
    if previous_batch_size not in (None, batch_size) or find_pending(out_dir):
        return None
    mapping = _positions(positions)
    last = last_position if last_position is not None else last_position_of(mapping)
    digits = part_digits(last, batch_size)
    names = sorted(p.name for p in out_dir.glob(PART_GLOB))
    if part_number_widths(names) - {digits} or not all(
            n.removeprefix(PART_PREFIX).removesuffix(".csv").isdigit() for n in names):
        return None  # renamed to another width, or a file that only matches the pattern: the full path
    nparts = last // batch_size + 1
    killed = _since_record(out_dir, batch_size, mapping, digits, nparts, index_key, notes, bom)
    if killed is not None:
        return killed
    counts = array("q", bytes(8 * nparts))
    sums = array("Q", bytes(8 * nparts))
    get = mapping.get
    ids = getattr(mapping, "ids", None)  # the compact index's ids in order: rows mostly follow them
    hint = [-1]

    def each(image_id: str, digest: int) -> None:
        guess = hint[0] + 1
        if ids is not None and guess < len(ids) and ids[guess] == image_id:
            pos = guess
        else:
            pos = get(image_id)
        if pos is not None:
            hint[0] = pos
            k = pos // batch_size
            counts[k] += 1
            sums[k] = (sums[k] + digest) & _MASK

    tally = tally_clean_captions(out_dir / CAPTIONS_ALL, each=each)
    if tally is None:
        return None
    differ: dict[str, list[list[str]]] = {}  # parts not as captions_all.csv says: their rows
    held: dict[str, int] = {}  # and the sum of their key digests
    present: set[int] = set()
    valid = csvscan.Validator(CAPTION_COLUMNS, csvscan.COLUMN_PATTERNS)
    for name in names:
        k = int(name.removeprefix(PART_PREFIX).removesuffix(".csv"))
        recs = _part_records(out_dir / name, valid, notes)
        total = 0
        for rec in recs:
            total = (total + _record_digest(rec)) & _MASK
        if k < nparts:
            present.add(k)
        if k >= nparts or not counts[k] or len(recs) != counts[k] or total != sums[k]:
            differ[name], held[name] = recs, total
    extra = _restore_records(out_dir, tally, differ, notes, bom)
    for rec in extra:
        each(rec[_I_ID], _record_digest(rec))
    rebuild = {k for k in range(nparts) if counts[k] and k not in present}  # missing parts
    for name, recs in differ.items():  # parts that differ still, now that their rows are all restored
        k = int(name.removeprefix(PART_PREFIX).removesuffix(".csv"))
        if k < nparts and counts[k] and (len(recs) != counts[k] or held[name] != sums[k]):
            rebuild.add(k)
    plan = _collect_parts(out_dir / CAPTIONS_ALL, mapping, batch_size, rebuild) if rebuild else {}
    changes: list[str] = []
    for k in sorted(rebuild):
        name = part_name(k * batch_size, batch_size, digits)
        _rewrite(out_dir / name, CAPTION_COLUMNS, plan.get(k, []), bom)
        changes.append(f"{name}: rebuilt from {CAPTIONS_ALL} ({len(differ.get(name, [])):,} -> {len(plan.get(k, [])):,} rows)")
    for name in sorted(differ):
        k = int(name.removeprefix(PART_PREFIX).removesuffix(".csv"))
        if k < nparts and counts[k]:
            continue
        try:
            (out_dir / name).unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot remove {out_dir / name}: {exc.strerror or exc}") from None
        changes.append(f"{name}: removed (no row of {CAPTIONS_ALL} belongs to it now)")
    notes += _part_notes(changes)
    partstate.record(out_dir, batch_size=batch_size, digits=digits, index_key=index_key)
    return tally


def _since_record(
    out_dir: Path, batch_size: int, mapping: Mapping[str, int], digits: int, nparts: int,
    index_key: str | None, notes: list[str], bom: bool,
) -> CaptionTally | None:
    """The folder a killed run leaves, read from what it added only: the parts' record of an earlier
    moment when they were in step (`pipeline.ledger.partstate`) still describes captions_all.csv's first
    bytes (same size there, same hashes of its first and last 64 KiB, same file), the done-keys snapshot
    gives the done set (`pipeline.ledger.donesnap`), and the writer only appends. So a part whose size
    and time are as recorded holds what it held then, and must hold in addition exactly the rows appended
    to captions_all.csv since that belong to it; a part that grew must have grown by exactly those rows
    (compared by count and digest sum, its appended bytes read clean); a part made since must hold them
    alone. A part short of its rows (a kill between the two writes) is rebuilt: its old rows, then the
    new ones. Anything else (no usable record or snapshot, a part shrunk, deleted, damaged, or holding a
    row captions_all.csv lacks, appended bytes not clean): None, changing nothing, and the whole
    folder is checked instead.
    """
    rec = partstate.saved(out_dir)
    if not rec or rec.get("batch_size") != batch_size or rec.get("digits") != digits or rec.get("index") != index_key:
        return None
    path = out_dir / CAPTIONS_ALL
    try:
        size = int(rec[CAPTIONS_ALL][0])
        st = path.stat()
        if st.st_size < size or partstate.edges(path, size, st.st_ino) != rec.get("edges"):
            return None
        old_parts: dict[str, list[int]] = rec["parts"]  # name -> [size, mtime_ns], as recorded
        if not isinstance(old_parts, dict):
            return None
    except (OSError, KeyError, TypeError, ValueError, IndexError):
        return None
    tally = donesnap.load(out_dir)
    if tally is None:
        return None
    counts: dict[int, int] = defaultdict(int)  # per part: rows appended to captions_all.csv since
    sums: dict[int, int] = defaultdict(int)
    get = mapping.get

    def each(image_id: str, digest: int) -> None:
        pos = get(image_id)
        if pos is not None:
            k = pos // batch_size
            counts[k] += 1
            sums[k] = (sums[k] + digest) & _MASK

    if st.st_size > size and tally_clean_captions(path, start=size, into=CaptionTally(), each=each) is None:
        return None
    valid = csvscan.Validator(CAPTION_COLUMNS, csvscan.COLUMN_PATTERNS)
    now = partstate.part_stats(out_dir)
    if set(old_parts) - set(now):
        return None  # a part deleted: the whole check
    rebuild: dict[int, list[list[str]]] = {}  # part number -> its rows as they are (the new ones follow)
    held: dict[int, int] = {}  # part number -> rows its file holds now
    for name, stat_now in now.items():
        number = name.removeprefix(PART_PREFIX).removesuffix(".csv")
        if not number.isdigit() or len(number) != digits or int(number) >= nparts:
            return None
        k = int(number)
        old = old_parts.get(name)
        if old is not None and not (isinstance(old, list) and len(old) == 2 and all(type(v) is int for v in old)):
            return None  # a record edited by hand: not trusted
        if old == stat_now:
            if counts.get(k):
                rows = _clean_part(out_dir / name, 0, valid)
                if rows is None:
                    return None
                rebuild[k], held[k] = rows, len(rows)
            continue
        if old is None and not counts.get(k):
            return None  # a part made since that no new row belongs to: the whole check removes it
        start = int(old[0]) if old is not None else 0
        if stat_now[0] <= start and old is not None:
            return None  # rewritten or cut, not appended to
        grown = _clean_part(out_dir / name, start, valid)
        if grown is None or any(not tally.keys.has_digest(_record_digest(r)) for r in grown):
            return None
        total = 0
        for r in grown:
            total = (total + _record_digest(r)) & _MASK
        if len(grown) == counts.get(k, 0) and total == sums.get(k, 0):
            continue
        # short of rows (or holding others captions_all.csv also has): its old rows, then the new ones
        whole = _clean_part(out_dir / name, 0, valid)
        if whole is None or len(whole) < len(grown):
            return None
        rebuild[k], held[k] = whole[: len(whole) - len(grown)], len(whole)
    for k in counts:  # parts with new rows that have no file yet (the kill came before its first write)
        if part_name(k * batch_size, batch_size, digits) not in now:
            rebuild[k], held[k] = [], 0
    if any(not rows and not counts.get(k) for k, rows in rebuild.items()):
        return None  # a part left with no row at all: the whole check removes it
    if rebuild:
        new_rows = _collect_parts(path, mapping, batch_size, set(rebuild), start=size)
        changes = []
        for k in sorted(rebuild):
            name = part_name(k * batch_size, batch_size, digits)
            want = rebuild[k] + new_rows.get(k, [])
            _rewrite(out_dir / name, CAPTION_COLUMNS, want, bom)
            changes.append(f"{name}: rebuilt from {CAPTIONS_ALL} ({held[k]:,} -> {len(want):,} rows)")
        notes += _part_notes(changes)
    partstate.record(out_dir, batch_size=batch_size, digits=digits, index_key=index_key)
    return tally


def _clean_part(path: Path, start: int, valid: csvscan.Validator) -> list[list[str]] | None:
    """The records of a part from byte `start` on (0: after its header, which must be ours), if they
    read clean and whole; None for anything else."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return None
    return _clean_records(data, start, valid)


def _clean_records(data: bytes, start: int, valid: csvscan.Validator) -> list[list[str]] | None:
    """The records in a part's bytes from `start` on (`_clean_part`), if clean and whole; else None."""
    if start == 0 and not data:
        return []
    if data and not data.endswith(b"\n"):
        return None
    try:
        reader = csv.reader(io.StringIO(data.decode(ENCODING_READ if start == 0 else "utf-8"), newline=""),
                            strict=True)
        if start == 0 and next(reader, None) != CAPTION_COLUMNS:
            return None
        recs = [r for r in reader if r]
    except (csv.Error, UnicodeDecodeError):
        return None
    return recs if all(valid(r) for r in recs) else None


_I_ID, _I_PNAME, _I_INDEX = (CAPTION_COLUMNS.index(c) for c in ("image_id", "prompt_name", "caption_index"))


def _record_digest(rec: list[str]) -> int:
    """The key digest of a record in CAPTION_COLUMNS order, with `row_key`'s defaults."""
    try:
        index = int(rec[_I_INDEX] or 0)
    except ValueError:
        index = 0
    return key_digest(rec[_I_ID], rec[_I_PNAME] or "base", index)


def _part_records(path: Path, valid: csvscan.Validator, notes: list[str]) -> list[list[str]]:
    """A part's records in CAPTION_COLUMNS order: a clean file read as it is, anything else repaired
    and migrated first (step 1 and 2 for one part, as in the full path)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from None
    recs = _clean_records(data, 0, valid)
    if recs is not None:
        return recs
    part = _repair(path, notes, "the part is rebuilt from captions_all.csv")
    if part is None:
        return []
    rows = _migrate(path, part, CAPTION_COLUMNS, notes).rows
    return [[d.get(c, "") for c in CAPTION_COLUMNS] for d in rows]


def _restore_records(
    out_dir: Path, tally: CaptionTally, parts: Mapping[str, list[list[str]]], notes: list[str], bom: bool
) -> list[list[str]]:
    """Step 4 with the done set as digests: the parts' records whose key captions_all.csv lacks, each key
    once in part order, appended to it and counted in `tally`; returns them."""
    extra: list[list[str]] = []
    seen: set[int] = set()
    for name in sorted(parts):
        for rec in parts[name]:
            digest = _record_digest(rec)
            if not tally.keys.has_digest(digest) and digest not in seen:
                seen.add(digest)
                extra.append(rec)
    if not extra:
        return []
    path = out_dir / CAPTIONS_ALL
    try:
        appendfile.append_bytes(path, appendfile.records_bytes(extra), appendfile.header_bytes(CAPTION_COLUMNS, bom))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    for rec in extra:
        tally.add(rec)
    notes.append(f"{CAPTIONS_ALL}: restored {len(extra):,} row{'s' if len(extra) != 1 else ''} that only the part files held")
    return extra


def _collect_parts(path: Path, positions: Mapping[str, int], batch_size: int, wanted: set[int],
                   start: int = 0) -> dict[int, list[list[str]]]:
    """captions_all.csv's records of the parts in `wanted` (by part number), in file order: one streaming
    pass that keeps only those rows (the file was read clean just before); from byte `start` on if given
    (a record boundary after the header)."""
    plan: dict[int, list[list[str]]] = defaultdict(list)
    get = positions.get
    try:
        with open(path, "rb") as fb:
            fb.seek(start)
            fh = io.TextIOWrapper(fb, encoding=ENCODING_READ if start == 0 else "utf-8", newline="")
            reader = csv.reader(fh, strict=True)
            if start == 0:
                next(reader, None)
            for rec in reader:
                if not rec:
                    continue
                pos = get(rec[_I_ID])
                if pos is not None and pos // batch_size in wanted:
                    plan[pos // batch_size].append(rec)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from None
    return plan


def _captions(out_dir: Path, notes: list[str]) -> tuple[list[Row], dict[str, list[Row]]]:
    """Steps 1 and 2 for captions_all.csv and every part: their rows, repaired and migrated."""
    captions = _repair(out_dir / CAPTIONS_ALL, notes, "rows no part file holds are asked again")
    all_rows = _migrate(out_dir / CAPTIONS_ALL, captions, CAPTION_COLUMNS, notes).rows if captions else []
    parts: dict[str, list[Row]] = {}
    for path in sorted(out_dir.glob(PART_GLOB)):
        part = _repair(path, notes, "the part is rebuilt from captions_all.csv")
        parts[path.name] = _migrate(path, part, CAPTION_COLUMNS, notes).rows if part else []
    return all_rows, parts


def _repair(path: Path, notes: list[str], consequence: str = "") -> Table | None:
    """Step 1 for one file: quarantine damage and a torn tail. None when there is no file or no header."""
    if not path.exists():
        return None
    table = read_table(path, repair=True)
    notes += [f"{n}; {consequence}" if consequence else n for n in table.notes if n]
    return table if path.stat().st_size > 0 else None


def _migrate(path: Path, table: Table, columns: list[str], notes: list[str]) -> Table:
    """Step 2 for one file: rewrite it with the current header when it has older columns."""
    try:
        added = header_change(table.header, columns)
    except OutputError as exc:
        raise OutputError(f"{path}: {exc}") from None
    if added is None:
        return table
    _rewrite(path, columns, ([d.get(c, "") for c in columns] for d in table.rows))
    what = f"added {', '.join(added)}" if added else "columns reordered"
    notes.append(f"{path.name}: rewritten with the current columns ({what}; {len(table.rows):,} rows kept)")
    return Table(columns, table.rows)


def _rewrite(path: Path, columns: list[str], records: Iterable[list[str]], bom: bool = False) -> None:
    """Write `path` anew with `records` (in `columns` order): a file keeps its own BOM-or-not (a migrated
    one has bytes: it has a header), a new one gets the folder's (`bom`)."""
    try:
        write_csv_atomic(path, columns, records, bom=bom_for(path, bom))
    except OSError as exc:
        raise OutputError(f"cannot rewrite {path}: {exc.strerror or exc}") from None


def _part_notes(changes: list[str]) -> list[str]:
    """The notes for part files rebuilt or removed: one each, or one summary line for many."""
    if len(changes) > MAX_PART_NOTES:
        return [f"part files: {len(changes)} rebuilt or removed to match {CAPTIONS_ALL}"]
    return changes


def _restore(
    out_dir: Path, all_rows: list[Row], parts: Mapping[str, list[Row]], notes: list[str], bom: bool = False
) -> list[Row]:
    """Step 4: append to captions_all.csv the rows only the parts hold; returns them."""
    extra = missing_from(all_rows, parts)
    if not extra:
        return []
    path = out_dir / CAPTIONS_ALL
    was_missing = not path.exists()
    records = [[d.get(c, "") for c in CAPTION_COLUMNS] for d in extra]
    try:
        header = appendfile.header_bytes(CAPTION_COLUMNS, bom)  # written only if the file is new or empty
        appendfile.append_bytes(path, appendfile.records_bytes(records), header)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    rows = f"{len(extra):,} row{'s' if len(extra) != 1 else ''}"
    if was_missing:
        notes.append(f"{CAPTIONS_ALL} was missing: rebuilt from {len(parts)} part files ({rows}); nothing is asked again")
    else:
        notes.append(f"{CAPTIONS_ALL}: restored {rows} that only the part files held")
    return extra


def _reconcile_parts(
    out_dir: Path,
    all_rows: list[Row],
    parts: Mapping[str, list[Row]],
    positions: Mapping[str, int],
    batch_size: int,
    previous_batch_size: int | None,
    bom: bool = False,
) -> list[str]:
    """Step 5: rewrite each part whose rows differ from the plan; then remove parts the plan has no rows for.

    Writing comes first, so parts renamed to a wider number (an index grown past 10,000 parts) exist under
    their new names before the old ones go. A rebuilt part keeps its own BOM-or-not; a new one gets the
    folder's (`bom`)."""
    plan = plan_parts(all_rows, positions, batch_size)
    changes: list[str] = []
    for name in sorted(plan):
        want = plan[name]
        have = parts.get(name)
        if have is not None and same_rows(have, want):
            continue
        _rewrite(out_dir / name, CAPTION_COLUMNS, ([d.get(c, "") for c in CAPTION_COLUMNS] for d in want), bom)
        changes.append(f"{name}: rebuilt from {CAPTIONS_ALL} ({len(have or []):,} -> {len(want):,} rows)")
    for name in sorted(set(parts) - set(plan)):
        path = out_dir / name
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot remove {path}: {exc.strerror or exc}") from None
        changes.append(f"{name}: removed (no row of {CAPTIONS_ALL} belongs to it now)")
    if not changes:
        return []
    if previous_batch_size is not None and previous_batch_size != batch_size:
        return [f"re-split parts for --batch-size {batch_size} (was {previous_batch_size})"]
    digits = part_digits(last_position_of(positions), batch_size)
    if part_number_widths(parts) - {digits}:
        return [f"part files renamed to {digits}-digit numbers ({part_name(0, batch_size, digits)}, ...) so they "
                f"still sort: the index now needs {last_position_of(positions) // batch_size + 1:,} parts"]
    return _part_notes(changes)
