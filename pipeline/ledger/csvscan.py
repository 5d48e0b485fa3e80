"""Scan the bytes of a CSV file we wrote, telling whole rows from a torn tail and from damage.

Our CSVs are written whole row by row, each record terminated by `\\r\\n`; quoted fields may hold `\\n`,
`\\r\\n`, quotes, commas and Chinese. Two things can go wrong with such a file:

- a **torn tail**: a writer killed mid-row leaves the last record without its terminator, or with a quoted
  field still open at the end of the file. Nothing after it exists, so cutting it loses no finished row;
- **damage**: a hand edit (a quote deleted, a field added or removed, a number typed over) or a foreign
  write breaks a record somewhere in the middle. Only that region is bad: the rows after it are whole and
  were paid for, so the scanner must not give them up. It marks the region and *resynchronises*: it finds
  the next line from which records parse and validate again. A line inside a multi-line quoted caption can
  look like a record start, so a candidate counts only when the record after it is valid too (or the file
  ends, whole or torn, right after it).

`scan` is pure: bytes in, a `Scan` out (header, good records with their byte spans, damaged regions with
1-based physical line numbers, the torn tail). The common case, a clean file, is one pass of the `csv`
module over the file's lines; only a record that fails sends the scan down the careful resync path, which
looks at a few lines around the damage, so a large file with one damaged row is still read in one pass.
"""

from __future__ import annotations

import csv
import io
import operator
import re
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterator

BOM = b"\xef\xbb\xbf"
NL = 10  # b"\n"[0]
PROBE_LINES = 256  # a candidate record during resync may span at most this many physical lines

# One record as our writer (csv, QUOTE_MINIMAL) writes it: a field is quoted with quotes doubled, or holds
# no quote, comma or line break at all. The csv module also accepts a stray quote inside an unquoted field;
# during resync that is exactly how a line from the middle of a quoted caption passes for a record.
_WELL_FORMED = re.compile(
    rb'(?:\r?\n)*(?:"(?:[^"]|"")*"|[^,"\r\n]*)(?:,(?:"(?:[^"]|"")*"|[^,"\r\n]*))*\r?\n'
)
INT_OR_EMPTY = r"(?:-?[0-9]+)?"  # empty: not recorded (a file written before the column existed)
FLOAT_OR_EMPTY = r"(?:-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)?"  # empty: unknown (a cost)
IMAGE_ID = r"[^\r\n\x1f]+"  # a relative path: never empty, never spanning lines

# What the typed columns of our files (captions_all.csv, parts, errors.csv, attributes.csv) must hold, as
# regular expressions for one cell. Keyed by column name, so one table serves every header, old or new;
# other columns are free text. (Patterns never match \x1f: the validator joins cells with it.)
COLUMN_PATTERNS: dict[str, str] = {
    "image_id": IMAGE_ID,
    "caption_index": INT_OR_EMPTY,
    "attempts": INT_OR_EMPTY,
    "prompt_tokens": INT_OR_EMPTY,
    "completion_tokens": INT_OR_EMPTY,
    "cost_usd": FLOAT_OR_EMPTY,
    "latency_s": FLOAT_OR_EMPTY,
}


@dataclass(frozen=True)
class Region:
    """Bytes [start, end) of the file, on physical lines first_line..last_line (1-based), holding ~`rows`."""

    start: int
    end: int
    first_line: int
    last_line: int
    rows: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def lines_text(self) -> str:
        return str(self.first_line) if self.first_line == self.last_line else f"{self.first_line}-{self.last_line}"


@dataclass
class Scan:
    """What a file holds. Offsets are into the whole file (BOM included); `records` are the good rows."""

    size: int
    bom: bool
    header: list[str] | None  # None: not even a whole header line
    body_start: int  # just after the header record
    records: list[list[str]] = field(default_factory=list)
    starts: array = field(default_factory=lambda: array("q"))
    ends: array = field(default_factory=lambda: array("q"))
    damaged: list[Region] = field(default_factory=list)
    torn: Region | None = None

    @property
    def clean(self) -> bool:
        return not self.damaged and self.torn is None

    def span(self, i: int) -> tuple[int, int]:
        """The original bytes of good record i."""
        return self.starts[i], self.ends[i]

    @property
    def bad(self) -> list[Region]:
        """Every region that is not kept: damage, then the torn tail, in file order."""
        return self.damaged + ([self.torn] if self.torn else [])

    def kept(self) -> list[tuple[int, int]]:
        """The byte ranges to keep (BOM, header, good records, blank lines): the complement of `bad`."""
        out: list[tuple[int, int]] = []
        pos = 0
        for r in self.bad:
            if r.start > pos:
                out.append((pos, r.start))
            pos = r.end
        if pos < self.size:
            out.append((pos, self.size))
        return out

    @property
    def damaged_rows(self) -> int:
        return sum(r.rows for r in self.damaged)


# --- the csv module over byte lines -------------------------------------------------------------------

class _Cursor:
    """Where the line feeder is: byte offset after the last line handed out, and whether EOF was hit."""

    __slots__ = ("end", "exhausted", "limited")

    def __init__(self, start: int) -> None:
        self.end = start
        self.exhausted = False
        self.limited = False


def _lines(data: bytes, cur: _Cursor, limit: int | None = None) -> Iterator[str]:
    """Physical lines from `cur.end`, split on b"\\n" only (a lone \\r stays inside its line).

    A line that is not UTF-8 raises UnicodeDecodeError through the csv reader: that record is damaged
    (unless it is the unterminated last line: a write cut inside a character is a torn tail).
    """
    bio = io.BytesIO(data)  # shares `data`'s buffer; readline is done in C
    bio.seek(cur.end)
    count = 0
    for raw in bio:
        if limit is not None and count >= limit:
            cur.limited = True
            return
        count += 1
        cur.end += len(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            if raw.endswith(b"\n"):
                raise
            line = raw.decode("utf-8", "replace")  # the last line, torn inside a character
        yield line
    cur.exhausted = True


@dataclass
class _Probe:
    """One record parsed from a given offset, for the resync decisions."""

    fields: list[str] | None  # None: the csv module refused it (or only blank lines followed)
    end: int
    terminated: bool  # ended with a line terminator
    to_eof: bool  # ran to the end of the file: unterminated there, or a quoted field still open


def _probe(data: bytes, start: int, limit: int | None = PROBE_LINES) -> _Probe:
    cur = _Cursor(start)
    reader = csv.reader(_lines(data, cur, limit), strict=True)
    try:
        for rec in reader:
            if rec:
                terminated = data[cur.end - 1] == NL
                return _Probe(rec, cur.end, terminated, not terminated and cur.end >= len(data))
        # only blank lines to the end (or to the probe's limit)
        return _Probe(None, cur.end, True, cur.exhausted and not cur.limited)
    except (csv.Error, UnicodeDecodeError):
        # strict csv raises at EOF only for a quoted field left open: the feeder was exhausted
        return _Probe(None, cur.end, False, cur.exhausted and not cur.limited)


def _next_line(data: bytes, pos: int) -> int:
    nl = data.find(b"\n", pos)
    return len(data) if nl < 0 else nl + 1


class _Validator:
    """A record is valid when it has the header's width and every typed column holds its type.

    The typed cells are joined and matched by one compiled pattern: one C call per record, not one Python
    call per cell, which is most of the cost of reading a large clean file.
    """

    def __init__(self, header: list[str], patterns: dict[str, str]) -> None:
        self.width = len(header)
        typed = [i for i, name in enumerate(header) if name in patterns]
        self.pattern = re.compile("\x1f".join(patterns[header[i]] for i in typed) + r"\Z") if typed else None
        if len(typed) > 1:
            self.cells: Callable[[list[str]], tuple[str, ...]] = operator.itemgetter(*typed)
        else:
            self.cells = (lambda rec: (rec[typed[0]],)) if typed else (lambda rec: ())

    def __call__(self, rec: list[str]) -> bool:
        if len(rec) != self.width:
            return False
        return self.pattern is None or self.pattern.match("\x1f".join(self.cells(rec))) is not None


class _LineNumbers:
    """Physical line number of a byte offset, counted incrementally (offsets mostly come in order)."""

    def __init__(self, data: bytes, origin: int) -> None:
        self.data = data
        self.offset = origin
        self.line = 1

    def at(self, offset: int) -> int:
        if offset >= self.offset:
            self.line += self.data.count(b"\n", self.offset, offset)
        else:
            self.line -= self.data.count(b"\n", offset, self.offset)
        self.offset = offset
        return self.line


Validator = _Validator  # public: the fast path of `pipeline.ledger.outputs` validates rows the same way


# --- the scan ------------------------------------------------------------------------------------------

def scan(data: bytes, patterns: dict[str, str] | None = None) -> Scan:
    """Split a CSV file's bytes into header, good records, damaged regions and a torn tail.

    `patterns`: per column name, what a cell must hold (default `COLUMN_PATTERNS`).
    """
    patterns = COLUMN_PATTERNS if patterns is None else patterns
    n = len(data)
    bom = data.startswith(BOM)
    origin = len(BOM) if bom else 0
    lines = _LineNumbers(data, origin)
    crlf = True

    def region(start: int, end: int) -> Region:
        first = lines.at(start)
        last = lines.at(max(start, end - 1))
        seps = data.count(b"\r\n" if crlf else b"\n", start, end)
        rows = seps + (0 if data[end - 1] == NL else 1)
        return Region(start, end, first, last, max(rows, 1))

    head = _probe(data, origin, limit=None)
    if head.fields is None or not head.terminated:
        out = Scan(n, bom, None, origin)
        if n > origin:
            out.torn = region(origin, n)
        return out
    crlf = data[head.end - 2 : head.end] == b"\r\n"
    out = Scan(n, bom, head.fields, head.end)
    valid = _Validator(head.fields, patterns)

    pos = head.end
    while pos < n:
        pos = _read_clean(data, pos, valid, out)
        if pos >= n:
            break
        resync = _resync(data, pos, valid)
        if resync is None:
            _end_in_damage(data, pos, out, region)
            break
        out.damaged.append(region(pos, resync))
        pos = resync
    return out


def _read_clean(data: bytes, pos: int, valid: _Validator, out: Scan) -> int:
    """Parse whole, valid records from `pos` on; return where the first one that is not begins (or EOF)."""
    cur = _Cursor(pos)
    reader = csv.reader(_lines(data, cur), strict=True)
    records, starts, ends = out.records, out.starts, out.ends
    start = pos
    try:
        for rec in reader:
            end = cur.end
            if data[end - 1] != NL:
                return start  # no terminator: only the last record can be like this
            if rec:
                if not valid(rec):
                    return start
                records.append(rec)
                starts.append(start)
                ends.append(end)
            start = end
    except (csv.Error, UnicodeDecodeError):
        return start
    return start


def _resync(data: bytes, bad: int, valid: _Validator) -> int | None:
    """The first line start after `bad` from which records are whole and valid again, if any.

    A candidate needs its record valid and terminated, and the record after it valid and terminated too,
    or the file ending right after it (cleanly, or in a torn tail), so that a line inside a multi-line
    quoted caption is not taken for a record start.
    """
    n = len(data)
    pos = _next_line(data, bad)
    while pos < n:
        first = _probe(data, pos)
        if _whole(data, pos, first, valid):
            if first.end >= n:
                return pos
            second = _probe(data, first.end)
            if second.to_eof or _whole(data, first.end, second, valid):
                return pos
        pos = _next_line(data, pos)
    return None


def _whole(data: bytes, start: int, probe: _Probe, valid: _Validator) -> bool:
    """A probed record that is terminated, valid, and well-formed as our writer writes records."""
    return (
        probe.fields is not None
        and probe.terminated
        and valid(probe.fields)
        and _WELL_FORMED.fullmatch(data, start, probe.end) is not None
    )


def _end_in_damage(data: bytes, pos: int, out: Scan, region: Callable[[int, int], Region]) -> None:
    """No resync after `pos`: the rest is a torn tail if the record at `pos` runs to EOF unfinished;
    otherwise it is damage, except a last line without a terminator, which is the torn tail."""
    n = len(data)
    if _probe(data, pos, limit=None).to_eof:
        out.torn = region(pos, n)
        return
    tail = n if data[n - 1] == NL else data.rfind(b"\n", pos, n) + 1
    if tail <= pos:
        tail = pos
    if tail > pos:
        out.damaged.append(region(pos, tail))
    if tail < n:
        out.torn = region(tail, n)
