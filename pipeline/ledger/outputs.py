"""The output folder's files and their CSV format: names, columns, and the one reader everybody uses.

Every CSV here is real CSV (the `csv` module, `newline=""`), plain UTF-8 without a BOM, so the users'
own `csv.DictReader(open(p, encoding="utf-8"))` and pandas read it; `run --excel` starts new files with a
BOM for Excel, and a folder keeps the encoding it was started with (`pipeline.ledger.encoding` decides).
Readers accept both: the scanner skips a BOM, so it never reaches a column name. Rows are
written whole and terminated by `\\r\\n`; captions keep their own `\\n` inside quoted fields.

`read_table` is also the repair: a writer killed mid-row leaves a torn tail (a record without its
terminator, or a quoted field never closed); a hand edit can damage a row in the middle. Only the bad
bytes are given up: `read_table(..., repair=True)` moves them to `<name>.rejected` and keeps every good
row byte for byte (see `pipeline.ledger.csvscan` and `pipeline.ledger.quarantine`).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pipeline.errors import OutputError
from pipeline.ledger import csvscan, quarantine
from pipeline.ledger.cells import answer_cell as _cell
from pipeline.ledger.cells import cost_cell, cost_value
from pipeline.ledger.cells import float_cell as _float
from pipeline.ledger.cells import int_cell as _int
from pipeline.ledger.costs import Spent, rows_spent
from pipeline.ledger.donekeys import SEP, DistinctStrings, DoneKeys, stable_digest
from pipeline.records import AttributeRow, CaptionRow, ErrorRow

CAPTIONS_ALL = "captions_all.csv"
ERRORS = "errors.csv"
ATTRIBUTES = "attributes.csv"
CAPTIONS_REPLACED = "captions_replaced.csv"  # rows moved out by `run --redo` (pipeline.ledger.redo)
MANIFEST = "manifest.json"
PART_PATTERN = "captions_part_{:0{digits}d}.csv"
PART_GLOB = "captions_part_*.csv"
PART_PREFIX = "captions_part_"
PART_DIGITS = 4  # captions_part_0000.csv: the width while a folder has at most 10,000 parts

# The first four are the names and order existing scripts expect; the rest may grow at the end only.
CAPTION_COLUMNS = [
    "image_id",
    "prompt",
    "caption",
    "timestamp",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "prompt_name",
    "caption_index",
    "attempts",
    "latency_s",
    "prompt_hash",
]
ERROR_COLUMNS = [
    "image_id",
    "reason",
    "detail",
    "attempts",
    "timestamp",
    "prompt_name",
    "caption_index",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "run_id",
]
ATTRIBUTE_META_COLUMNS = [
    "image_id",
    "prompt_name",
    "timestamp",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
]

# attributes.csv: the meta columns, the slot and prompt version, then one column per schema field.
ATTRIBUTE_ROW_COLUMNS = ATTRIBUTE_META_COLUMNS + ["caption_index", "prompt_hash"]

# captions_replaced.csv (`run --redo`): a replaced row as it was, when, and by which review
REPLACED_COLUMNS = CAPTION_COLUMNS + ["replaced_at", "review_file", "review_sha256"]

ENCODING_WRITE = "utf-8"  # never a BOM from the codec: `bom=True` writes one, at a file's start only
ENCODING_READ = "utf-8-sig"  # a BOM, if there is one, never reaches a column name
LINE_END = "\r\n"


def output_csv_names(out_dir: Path) -> list[str]:
    """The CSV files of a folder that hold finished answers: captions_all.csv, attributes.csv, the parts."""
    parts = sorted(p.name for p in Path(out_dir).glob(PART_GLOB)) if Path(out_dir).is_dir() else []
    return [CAPTIONS_ALL, ATTRIBUTES, *parts]


def part_digits(last_position: int, batch_size: int) -> int:
    """How many digits every part number of a folder has: 4, or as many as its largest part number needs.

    The largest part number is `last_position // batch_size` (the index's last position), so the width
    depends only on the index and `--batch-size`, never on which rows are done. One width for all parts of
    a folder keeps `sorted()` and a file browser in part order past 9,999 parts (5,000 parts for 100,000
    images at the default 20; 50,000 for a million: 5 digits). When the width changes between runs
    (a larger index), the start's re-split renames the parts (`pipeline.ledger.recover`).
    """
    return max(PART_DIGITS, len(str(max(0, last_position) // batch_size)))


def part_name(position: int, batch_size: int, digits: int = PART_DIGITS) -> str:
    """The part file of the image at index position `position`: part k holds [k*B, (k+1)*B); its number
    has `digits` digits (`part_digits`)."""
    return PART_PATTERN.format(position // batch_size, digits=digits)


# --- rows <-> CSV records ----------------------------------------------------------------------------

def caption_record(row: CaptionRow) -> list[str]:
    return [
        row.image_id,
        row.prompt,
        row.caption,
        row.timestamp,
        row.model,
        str(row.prompt_tokens),
        str(row.completion_tokens),
        cost_cell(row.cost_usd),
        row.prompt_name,
        str(row.caption_index),
        str(row.attempts),
        f"{row.latency_s:.3f}",
        row.prompt_hash,
    ]


def error_record(row: ErrorRow) -> list[str]:
    return [
        row.image_id,
        row.reason,
        row.detail,
        str(row.attempts),
        row.timestamp,
        row.prompt_name,
        str(row.caption_index),
        row.model,
        str(row.prompt_tokens),
        str(row.completion_tokens),
        cost_cell(row.cost_usd),
        row.run_id,
    ]


def caption_from_dict(d: dict[str, str]) -> CaptionRow:
    """Rebuild a CaptionRow from a CSV dict; files written before a column existed get its default."""
    return CaptionRow(
        image_id=d["image_id"],
        prompt=d.get("prompt", ""),
        caption=d.get("caption", ""),
        timestamp=d.get("timestamp", ""),
        model=d.get("model") or "",
        prompt_tokens=_int(d.get("prompt_tokens")),
        completion_tokens=_int(d.get("completion_tokens")),
        cost_usd=cost_value(d.get("cost_usd")),
        prompt_name=d.get("prompt_name") or "base",
        caption_index=_int(d.get("caption_index")),
        attempts=_int(d.get("attempts"), 1),
        latency_s=_float(d.get("latency_s")),
        prompt_hash=d.get("prompt_hash") or "",
    )


def error_from_dict(d: dict[str, str]) -> ErrorRow:
    return ErrorRow(
        image_id=d["image_id"],
        reason=d.get("reason", ""),
        detail=d.get("detail", ""),
        attempts=_int(d.get("attempts")),
        timestamp=d.get("timestamp", ""),
        prompt_name=d.get("prompt_name") or "base",
        caption_index=_int(d.get("caption_index")),
        model=d.get("model") or "",
        prompt_tokens=_int(d.get("prompt_tokens")),
        completion_tokens=_int(d.get("completion_tokens")),
        cost_usd=cost_value(d.get("cost_usd")),
        run_id=d.get("run_id") or "",
    )


def attribute_record(row: AttributeRow, field_names: list[str]) -> list[str]:
    meta = [
        row.image_id,
        row.prompt_name,
        row.timestamp,
        row.model,
        str(row.prompt_tokens),
        str(row.completion_tokens),
        cost_cell(row.cost_usd),
    ]
    return meta + [_cell(row.fields.get(name)) for name in field_names]


def attribute_columns_for(field_names: list[str]) -> list[str]:
    """The header of attributes.csv for these schema fields."""
    return ATTRIBUTE_ROW_COLUMNS + list(field_names)


def attribute_row_record(row: AttributeRow, field_names: list[str]) -> list[str]:
    """A row of attributes.csv, in the order of `attribute_columns_for(field_names)`."""
    rec = attribute_record(row, field_names)
    n = len(ATTRIBUTE_META_COLUMNS)
    return rec[:n] + [str(row.caption_index), row.prompt_hash] + rec[n:]


def to_csv_text(records: Iterable[list[str]]) -> str:
    """Format records as CSV text (for one buffered write)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=LINE_END)
    w.writerows(records)
    return buf.getvalue()


# --- reading, with quarantine of damage ---------------------------------------------------------------

@dataclass
class Table:
    header: list[str]
    rows: list[dict[str, str]]
    cut_bytes: int = 0  # bytes of torn tail removed (repair=True) or ignored (repair=False)
    bad_rows: int = 0  # rows in damaged regions: moved to <name>.rejected (repair=True) or skipped
    notes: list[str] = field(default_factory=list)  # repair=True: one line saying what was moved where
    damaged_lines: list[tuple[int, int]] = field(default_factory=list)  # (first, last) physical lines, 1-based


def read_table(path: Path, *, repair: bool = False, expect_columns: list[str] | None = None) -> Table:
    """Read a CSV written by this package. Missing file -> empty table.

    A row counts only if it is whole (terminated), parses as strict CSV, has the header's width and its
    typed columns hold their types (`pipeline.ledger.csvscan`). Anything else is a torn tail (the last
    record, unfinished) or a damaged region, which never costs the good rows around it. With
    `repair=True` the bad bytes are appended to `<name>.rejected` and the file is made whole on disk
    (`pipeline.ledger.quarantine`); without it nothing on disk changes and the same good rows are returned.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Table(header=list(expect_columns or []), rows=[])
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from None
    found = csvscan.scan(data)
    if found.header is not None and "image_id" not in found.header and (expect_columns is not None or repair):
        raise OutputError(f"{path} is not a reid-prompt CSV (no image_id column; columns: {', '.join(found.header[:6])})")
    header = found.header if found.header is not None else list(expect_columns or [])
    rows = [dict(zip(header, rec)) for rec in found.records]
    notes: list[str] = []
    if repair and not found.clean:
        try:
            quarantine.quarantine(path, data, found)
        except OSError as exc:
            raise OutputError(f"cannot repair {path}: {exc.strerror or exc}") from None
        notes.append(quarantine.describe(path.name, found) or "")
    return Table(
        header=header,
        rows=rows,
        cut_bytes=found.torn.size if found.torn else 0,
        bad_rows=found.damaged_rows,
        notes=notes,
        damaged_lines=[(r.first_line, r.last_line) for r in found.damaged],
    )


Key = tuple[str, str, int]  # (image_id, prompt_name, caption_index)

# positions of the columns read for the done set, in CAPTION_COLUMNS order
_I_ID, _I_PTOK, _I_CTOK, _I_COST, _I_PNAME, _I_INDEX = (
    CAPTION_COLUMNS.index(c)
    for c in ("image_id", "prompt_tokens", "completion_tokens", "cost_usd", "prompt_name", "caption_index")
)


@dataclass
class CaptionTally:
    """What captions_all.csv says, gathered row by row without keeping a row: the done keys (as
    digests, `pipeline.ledger.donekeys`), the distinct images, the spent money and the answer lengths."""

    keys: DoneKeys = field(default_factory=DoneKeys)
    images: DistinctStrings | None = None  # distinct images, when asked for (status): 8 bytes each
    rows: int = 0
    usd: float = 0.0
    unknown: int = 0
    completion_tokens: int = 0  # sum over rows with completion_tokens > 0 (the dry-run's answer length)
    measured_rows: int = 0  # rows with completion_tokens > 0
    saved: bool = False  # already on disk as the done-keys snapshot of the file as it is (`donesnap`)

    def add(self, rec: list[str]) -> None:
        """One record in CAPTION_COLUMNS order (a file with older columns is mapped first)."""
        image_id = rec[_I_ID]
        self.keys.add((image_id, rec[_I_PNAME] or "base", _int(rec[_I_INDEX])))
        if self.images is not None:
            self.images.add(image_id)
        self.rows += 1
        ctok = _int(rec[_I_CTOK])
        if ctok > 0:
            self.completion_tokens += ctok
            self.measured_rows += 1
        cost = cost_value(rec[_I_COST])
        if cost is None:
            if ctok > 0 or _int(rec[_I_PTOK]) > 0:
                self.unknown += 1
        else:
            self.usd += cost

    def add_dicts(self, rows: Iterable[dict[str, str]]) -> None:
        for d in rows:
            self.add([d.get(c) or "" for c in CAPTION_COLUMNS])

    def merge(self, other: "CaptionTally") -> None:
        """Add what `other` counted (rows appended after this tally was made) to this one."""
        for digest in other.keys.sorted_digests():
            self.keys.add_digest(digest)
        self.rows += other.rows
        self.usd += other.usd
        self.unknown += other.unknown
        self.completion_tokens += other.completion_tokens
        self.measured_rows += other.measured_rows
        self.saved = False


def tally_clean_captions(path: Path, *, count_images: bool = False, start: int = 0,
                         into: CaptionTally | None = None,
                         each: Callable[[str, int], None] | None = None) -> CaptionTally | None:
    """One streaming pass of the `csv` module over captions_all.csv, keeping no row (the fast path).

    Returns None when the file is not clean with the current header: missing, another header (older
    columns: a migration), a row that fails the scanner's validation (damage), a torn tail or bytes that
    are not UTF-8. The caller then takes the careful path (`read_table`, which holds the file's bytes),
    so damage is handled exactly as before; a clean file is read in one pass in about the time the
    `csv` module needs, with memory for the digests only. `count_images`: also count distinct images.

    `start` > 0: read only the rows from that byte offset on (a record boundary after the header) and
    add them to `into` (the done-keys snapshot's tally, `pipeline.ledger.donesnap`); on None, `into`
    may hold some of them and must be dropped. `each(image_id, key digest)` is called for every row
    (the start's recovery sums what each part file must hold, `pipeline.ledger.recover`).
    """
    try:
        size = path.stat().st_size
        if size == 0 or size < start:
            return None
        if size > start:
            with open(path, "rb") as fb:
                fb.seek(size - 1)
                if fb.read(1) != b"\n":
                    return None  # a torn tail (or no terminator at all): the careful path cuts it
        tally = into if into is not None else CaptionTally(images=DistinctStrings() if count_images else None)
        with open(path, "rb") as fb:
            fb.seek(start)
            fh = io.TextIOWrapper(fb, encoding=ENCODING_READ if start == 0 else ENCODING_WRITE, newline="")
            reader = csv.reader(fh, strict=True)
            if start == 0 and next(reader, None) != CAPTION_COLUMNS:
                return None
            valid = csvscan.Validator(CAPTION_COLUMNS, csvscan.COLUMN_PATTERNS)
            # `CaptionTally.add` inlined (a million rows): the validator has checked every typed cell, so
            # a number cell is digits or empty and a cost cell a float or empty
            add_digest = tally.keys.add_digest
            add_image = tally.images.add if tally.images is not None else None
            rows = measured = ctoks = unknown = 0
            usd = 0.0
            i_id, i_pn, i_ix, i_pt, i_ct, i_cost = _I_ID, _I_PNAME, _I_INDEX, _I_PTOK, _I_CTOK, _I_COST
            for rec in reader:
                if not rec:
                    continue
                if not valid(rec):
                    return None
                image_id, index = rec[i_id], rec[i_ix]
                digest = stable_digest(f"{image_id}{SEP}{rec[i_pn] or 'base'}{SEP}{int(index) if index else 0}")
                add_digest(digest)
                if each is not None:
                    each(image_id, digest)
                if add_image is not None:
                    add_image(image_id)
                rows += 1
                ct = rec[i_ct]
                ctok = int(ct) if ct else 0
                if ctok > 0:
                    ctoks += ctok
                    measured += 1
                cost = rec[i_cost]
                if cost:
                    usd += float(cost)
                elif ctok > 0 or (rec[i_pt] and int(rec[i_pt]) > 0):
                    unknown += 1
            tally.rows += rows
            tally.measured_rows += measured
            tally.completion_tokens += ctoks
            tally.usd += usd
            tally.unknown += unknown
        return tally
    except (OSError, csv.Error, UnicodeDecodeError, ValueError):
        return None


@dataclass
class DoneRead:
    """What an output folder already holds: the work items done, and what they cost.

    Done means a row in captions_all.csv or, for structured prompts, in attributes.csv; errors.csv rows
    are never done (they are retried) but their billed answers are spent money, so `cost_usd` (and
    `spent`) is the sum over captions, attributes *and* errors (see `pipeline.ledger.costs`). The writer
    reads this on start (resume, the budget), and status and the dry-run read it too, so all count alike.
    No caption row is kept: the keys are digests (`pipeline.ledger.donekeys`, 8 bytes a key) and what
    status and the dry-run need of the rows (counts, sums) is gathered in the same pass.
    """

    keys: DoneKeys
    images: DistinctStrings | None  # distinct images captioned (None: not counted, `count_images=False`)
    cost_usd: float  # known part of the folder's spent total (captions + attributes + errors + replaced)
    caption_count: int  # whole rows of captions_all.csv
    attribute_rows: int
    cut_bytes: dict[str, int]  # file name -> torn tail cut (repair) or skipped
    bad_rows: int
    cost_unknown: int = 0  # billed rows whose cost cell is empty (price unknown when they were written)
    errors_cost_usd: float = 0.0  # the part of cost_usd paid for answers that are in errors.csv
    error_rows: list[dict[str, str]] = field(default_factory=list)  # errors.csv, whole rows only
    completion_tokens: int = 0  # sum of completion_tokens over caption rows that have some
    measured_rows: int = 0  # caption rows with completion_tokens > 0

    @property
    def spent(self) -> "Spent":
        """The folder's spent total as a `Spent` (known amount, rows of unknown cost)."""
        return Spent(self.cost_usd, self.cost_unknown)

    @property
    def rows(self) -> int:
        return self.caption_count + self.attribute_rows


def read_done(
    out_dir: Path,
    *,
    repair: bool = False,
    attributes: bool = True,
    captions: CaptionTally | None = None,
    count_images: bool = True,
) -> DoneRead:
    """Read captions_all.csv (and attributes.csv unless `attributes` is False) into a DoneRead.

    captions_all.csv takes the one-pass fast path when it is clean (`tally_clean_captions`), else the
    careful scan. `captions`: the tally already made of it (recovery's pass), so it is not read again.
    `count_images`: count distinct images too (status); a run does not need it.
    """
    out_dir = Path(out_dir)
    if captions is not None and count_images and captions.images is None:
        captions = None  # made without the images: read again
    tally = captions if captions is not None else tally_clean_captions(out_dir / CAPTIONS_ALL,
                                                                          count_images=count_images)
    cut, bad = 0, 0
    if tally is None:
        table = read_table(out_dir / CAPTIONS_ALL, repair=repair, expect_columns=CAPTION_COLUMNS)
        tally = CaptionTally(images=DistinctStrings() if count_images else None)
        tally.add_dicts(table.rows)
        cut, bad = table.cut_bytes, table.bad_rows
    done = DoneRead(tally.keys, tally.images, 0.0, tally.rows, 0, {CAPTIONS_ALL: cut}, bad,
                    completion_tokens=tally.completion_tokens, measured_rows=tally.measured_rows)
    spent = Spent(tally.usd, tally.unknown)
    if attributes:
        attrs = read_table(out_dir / ATTRIBUTES, repair=repair)
        for d in attrs.rows:
            image_id = d.get("image_id", "")
            done.keys.add((image_id, d.get("prompt_name") or "", _int(d.get("caption_index"))))
            if done.images is not None:
                done.images.add(image_id)
        spent += rows_spent(attrs.rows)
        done.attribute_rows = len(attrs.rows)
        done.cut_bytes[ATTRIBUTES] = attrs.cut_bytes
        done.bad_rows += attrs.bad_rows
    # errors.csv is append-only across runs: its billed answers (refused, empty, invalid) are spent money
    errors = read_table(out_dir / ERRORS, repair=repair, expect_columns=ERROR_COLUMNS)
    errors_spent = rows_spent(errors.rows)
    spent += errors_spent
    done.error_rows = errors.rows
    done.errors_cost_usd = errors_spent.usd
    done.cut_bytes[ERRORS] = errors.cut_bytes
    done.bad_rows += errors.bad_rows
    # rows `run --redo` replaced were paid for too: they stay on the books (pipeline.ledger.redo)
    spent += rows_spent(read_table(out_dir / CAPTIONS_REPLACED).rows)
    done.cost_usd, done.cost_unknown = spent.usd, spent.unknown
    return done


def read_captions(out_dir: Path, *, repair: bool = False) -> list[CaptionRow]:
    t = read_table(Path(out_dir) / CAPTIONS_ALL, repair=repair, expect_columns=CAPTION_COLUMNS)
    return [caption_from_dict(d) for d in t.rows]


def read_errors(out_dir: Path) -> list[ErrorRow]:
    t = read_table(Path(out_dir) / ERRORS, expect_columns=ERROR_COLUMNS)
    return [error_from_dict(d) for d in t.rows]


def read_attributes(out_dir: Path) -> list[dict[str, str]]:
    return read_table(Path(out_dir) / ATTRIBUTES).rows


def write_csv_atomic(path: Path, header: list[str], records: Iterable[list[str]], *, bom: bool = False) -> None:
    """Write a whole CSV file via a temporary file and os.replace, so readers never see half of it.

    `bom`: start it with a BOM (a rewrite keeps the file's own, see `pipeline.ledger.encoding.bom_for`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding=ENCODING_WRITE, newline="") as fh:
        if bom:
            fh.write("\ufeff")
        w = csv.writer(fh, lineterminator=LINE_END)
        w.writerow(header)
        w.writerows(records)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
