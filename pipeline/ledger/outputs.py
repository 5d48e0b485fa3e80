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
from typing import Iterable

from pipeline.errors import OutputError
from pipeline.ledger import csvscan, quarantine
from pipeline.ledger.cells import cost_cell, cost_value
from pipeline.ledger.cells import float_cell as _float
from pipeline.ledger.cells import int_cell as _int
from pipeline.ledger.costs import Spent, rows_spent
from pipeline.records import AttributeRow, CaptionRow, ErrorRow

CAPTIONS_ALL = "captions_all.csv"
ERRORS = "errors.csv"
ATTRIBUTES = "attributes.csv"
MANIFEST = "manifest.json"
PART_PATTERN = "captions_part_{:0{digits}d}.csv"
PART_GLOB = "captions_part_*.csv"
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


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)


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


@dataclass
class DoneRead:
    """What an output folder already holds: the work items done, and what they cost.

    Done means a row in captions_all.csv or, for structured prompts, in attributes.csv; errors.csv rows
    are never done (they are retried) but their billed answers are spent money, so `cost_usd` (and
    `spent`) is the sum over captions, attributes *and* errors (see `pipeline.ledger.costs`). The writer
    reads this on start (resume, the budget), and status and the dry-run read it too, so all count alike.
    """

    keys: set[Key]
    images: set[str]
    cost_usd: float  # known part of the folder's spent total (captions + attributes + errors)
    caption_rows: list[dict[str, str]]  # captions_all.csv, whole rows only
    attribute_rows: int
    cut_bytes: dict[str, int]  # file name -> torn tail cut (repair) or skipped
    bad_rows: int
    cost_unknown: int = 0  # billed rows whose cost cell is empty (price unknown when they were written)
    errors_cost_usd: float = 0.0  # the part of cost_usd paid for answers that are in errors.csv
    error_rows: list[dict[str, str]] = field(default_factory=list)  # errors.csv, whole rows only

    @property
    def spent(self) -> "Spent":
        """The folder's spent total as a `Spent` (known amount, rows of unknown cost)."""
        return Spent(self.cost_usd, self.cost_unknown)

    @property
    def rows(self) -> int:
        return len(self.caption_rows) + self.attribute_rows


def read_done(out_dir: Path, *, repair: bool = False, attributes: bool = True) -> DoneRead:
    """Read captions_all.csv (and attributes.csv unless `attributes` is False) into a DoneRead."""
    out_dir = Path(out_dir)
    captions = read_table(out_dir / CAPTIONS_ALL, repair=repair, expect_columns=CAPTION_COLUMNS)
    done = DoneRead(set(), set(), 0.0, captions.rows, 0, {CAPTIONS_ALL: captions.cut_bytes}, captions.bad_rows)
    spent = rows_spent(captions.rows)
    for d in captions.rows:
        row = caption_from_dict(d)
        done.keys.add(row.key)
        done.images.add(row.image_id)
    if attributes:
        attrs = read_table(out_dir / ATTRIBUTES, repair=repair)
        for d in attrs.rows:
            image_id = d.get("image_id", "")
            done.keys.add((image_id, d.get("prompt_name") or "", _int(d.get("caption_index"))))
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
