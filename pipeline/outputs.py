"""The output folder's files and their CSV format: names, columns, and the one reader everybody uses.

Every CSV here is real CSV (the `csv` module, `newline=""`), UTF-8 with a BOM so that Excel shows Chinese
captions correctly; readers open with `utf-8-sig` so the BOM never reaches a column name. Rows are
written whole and terminated by `\\r\\n`; captions keep their own `\\n` inside quoted fields.

`read_table` is also the crash repair: a writer killed mid-row leaves a torn tail (a record without its
terminator, or a quoted field never closed). `read_table(..., repair=True)` keeps every whole row that
parses, truncates the file right after the last one, and reports how many bytes it cut.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import OutputError
from pipeline.records import AttributeRow, CaptionRow, ErrorRow

CAPTIONS_ALL = "captions_all.csv"
ERRORS = "errors.csv"
ATTRIBUTES = "attributes.csv"
MANIFEST = "manifest.json"
PART_PATTERN = "captions_part_{:04d}.csv"
PART_GLOB = "captions_part_*.csv"

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

ENCODING_WRITE_NEW = "utf-8-sig"  # BOM at the start of a new file only
ENCODING_READ = "utf-8-sig"
LINE_END = "\r\n"


def part_name(position: int, batch_size: int) -> str:
    """The part file of the image at index position `position`: part k holds [k*B, (k+1)*B)."""
    return PART_PATTERN.format(position // batch_size)


# --- rows <-> CSV records ----------------------------------------------------------------------------

def cost_cell(cost: float | None) -> str:
    """A cost as written: 8 decimals, or an empty cell when the price is unknown (never a false $0)."""
    return "" if cost is None else f"{cost:.8f}"


def cost_value(text: str | None) -> float | None:
    """A cost cell read back: None for an empty (unknown) cell."""
    if text in (None, ""):
        return None
    try:
        return float(text)
    except ValueError:
        return None


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


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def _float(value: str | None, default: float = 0.0) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except ValueError:
        return default


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


# --- reading, with torn-tail repair ---------------------------------------------------------------

@dataclass
class Table:
    header: list[str]
    rows: list[dict[str, str]]
    cut_bytes: int = 0  # bytes of torn tail removed (repair=True) or ignored (repair=False)
    bad_rows: int = 0  # whole records with the wrong number of fields, skipped


def _lines_with_offsets(data: bytes) -> Iterator[tuple[str, int]]:
    """Yield (line text, byte offset just after it), splitting on b"\\n" only (never on a lone \\r)."""
    start = 0
    n = len(data)
    while start < n:
        nl = data.find(b"\n", start)
        end = n if nl < 0 else nl + 1
        yield data[start:end].decode("utf-8", errors="replace"), end
        start = end


def read_table(path: Path, *, repair: bool = False, expect_columns: list[str] | None = None) -> Table:
    """Read a CSV written by this package. Missing file -> empty table.

    A record counts only if the csv module parsed it completely and it ended with a line terminator.
    With `repair=True` a torn tail is cut off the file on disk, so the next append starts on a clean line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Table(header=list(expect_columns or []), rows=[])
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from None
    bom = b"\xef\xbb\xbf"
    offset0 = len(bom) if data.startswith(bom) else 0
    body = data[offset0:]

    consumed = [0]

    def feed() -> Iterator[str]:
        for line, end in _lines_with_offsets(body):
            consumed[0] = end
            yield line

    reader = csv.reader(feed(), strict=True)
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    good_end = 0
    bad = 0
    try:
        for rec in reader:
            end = consumed[0]
            if body[end - 1 : end] != b"\n":
                break  # last record has no terminator: torn
            if header is None:
                header = rec
                good_end = end
                continue
            if not rec:
                good_end = end
                continue
            if len(rec) != len(header):
                bad += 1
                good_end = end
                continue
            rows.append(dict(zip(header, rec)))
            good_end = end
    except csv.Error:
        pass  # unterminated quoted field at EOF: torn tail
    if header is None:
        # nothing whole, not even a header: treat the file as empty
        good_end = 0
        header = list(expect_columns or [])
    if expect_columns is not None and header and header[: len(expect_columns)] != expect_columns[: len(header)]:
        if not set(["image_id"]).issubset(header):
            raise OutputError(f"{path} is not a reid-prompt CSV (columns: {', '.join(header[:6])})")
    cut = len(body) - good_end
    if cut and repair:
        with open(path, "r+b") as fh:
            fh.truncate(offset0 + good_end if good_end else 0)
    return Table(header=header, rows=rows, cut_bytes=cut, bad_rows=bad)


Key = tuple[str, str, int]  # (image_id, prompt_name, caption_index)


@dataclass
class DoneRead:
    """What an output folder already holds: the work items done, and what they cost.

    Done means a row in captions_all.csv or, for structured prompts, in attributes.csv. The writer reads
    this on start (resume), and status and the dry-run read it too, so all three count alike.
    """

    keys: set[Key]
    images: set[str]
    cost_usd: float
    caption_rows: list[dict[str, str]]  # captions_all.csv, whole rows only
    attribute_rows: int
    cut_bytes: dict[str, int]  # file name -> torn tail cut (repair) or skipped
    bad_rows: int

    @property
    def rows(self) -> int:
        return len(self.caption_rows) + self.attribute_rows


def read_done(out_dir: Path, *, repair: bool = False, attributes: bool = True) -> DoneRead:
    """Read captions_all.csv (and attributes.csv unless `attributes` is False) into a DoneRead."""
    out_dir = Path(out_dir)
    captions = read_table(out_dir / CAPTIONS_ALL, repair=repair, expect_columns=CAPTION_COLUMNS)
    done = DoneRead(set(), set(), 0.0, captions.rows, 0, {CAPTIONS_ALL: captions.cut_bytes}, captions.bad_rows)
    for d in captions.rows:
        row = caption_from_dict(d)
        done.keys.add(row.key)
        done.images.add(row.image_id)
        done.cost_usd += row.cost_usd or 0.0
    if attributes:
        attrs = read_table(out_dir / ATTRIBUTES, repair=repair)
        for d in attrs.rows:
            image_id = d.get("image_id", "")
            done.keys.add((image_id, d.get("prompt_name") or "", _int(d.get("caption_index"))))
            done.images.add(image_id)
            done.cost_usd += _float(d.get("cost_usd"))
        done.attribute_rows = len(attrs.rows)
        done.cut_bytes[ATTRIBUTES] = attrs.cut_bytes
        done.bad_rows += attrs.bad_rows
    return done


def read_captions(out_dir: Path, *, repair: bool = False) -> list[CaptionRow]:
    t = read_table(Path(out_dir) / CAPTIONS_ALL, repair=repair, expect_columns=CAPTION_COLUMNS)
    return [caption_from_dict(d) for d in t.rows]


def read_errors(out_dir: Path) -> list[ErrorRow]:
    t = read_table(Path(out_dir) / ERRORS, expect_columns=ERROR_COLUMNS)
    return [error_from_dict(d) for d in t.rows]


def read_attributes(out_dir: Path) -> list[dict[str, str]]:
    return read_table(Path(out_dir) / ATTRIBUTES).rows


def write_csv_atomic(path: Path, header: list[str], records: Iterable[list[str]]) -> None:
    """Write a whole CSV file via a temporary file and os.replace, so readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding=ENCODING_WRITE_NEW, newline="") as fh:
        w = csv.writer(fh, lineterminator=LINE_END)
        w.writerow(header)
        w.writerows(records)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
