"""Every paid answer on the books: what a folder has spent, and which failures still stand.

The ledger of money is the output folder's rows, never a counter: each answer the server billed is
written in exactly one row, and the folder's spent total is the sum of the `cost_usd` column over
captions_all.csv, attributes.csv and errors.csv. errors.csv is append-only across runs and each of its
rows carries the `run_id` of the run that wrote it.

Billed answers that are no caption (refused, empty, invalid) are written to errors.csv *when they are
answered*, not when the item finally fails:
- the attempt that ends the item (attempts used up) is the item's failure row, with its tokens and cost;
- an attempt that is retried (or left for the next run because the run is stopping) is written at once
  with reason `<kind>_retried` (`refused_retried`, `empty_retried`, `invalid_retried`). Such a row is a
  bill, not a failure: it never counts as failed, and a later caption of the same item does not undo it.
So a crash between a paid refusal and its retry loses no money from the books, and nothing is counted
twice: a caption row carries only its own request's cost, and a retried row only its own attempt's.

A price may be unknown (a model missing from the pricing file without --price-in/--price-out): such a
row's cost cell is empty. A row's cost is *unknown* only when its cell is empty and it has tokens; an
empty cell without tokens (nothing was billed, or a file written before the column existed) costs 0.
Totals over rows of both kinds are a lower bound, and every view says so (`Spent`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Mapping

from pipeline.ledger.cells import cost_value as _cost
from pipeline.ledger.cells import int_cell as _int
from pipeline.records import ErrorRow

Key = tuple[str, str, int]

RETRIED_SUFFIX = "_retried"


def new_run_id() -> str:
    """An id for one run, made once at its start: UTC start time (ISO-8601, microseconds) and the pid.

    Two runs on one folder cannot share it (the folder lock lets one run at a time, so a second run of
    the same process starts later); it sorts by start time.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{stamp}-{os.getpid()}"


def retried_reason(kind: str) -> str:
    """The errors.csv reason of a billed answer that was no caption and is tried again: `refused_retried`."""
    return kind + RETRIED_SUFFIX


def is_failure(reason: str) -> bool:
    """Does an errors.csv row say the item failed? Rows of retried billed answers are bills only."""
    return not reason.endswith(RETRIED_SUFFIX)


@dataclass(frozen=True)
class Spent:
    """Money spent: `usd` over rows of known cost, and how many billed rows have an unknown cost.

    `unknown == 0`: `usd` is the whole amount. Otherwise it is a lower bound ("at least $X (some
    unknown)"), or, when `usd` is 0, simply unknown. Never shown as a false `$0.0000`.
    """

    usd: float = 0.0
    unknown: int = 0

    @property
    def complete(self) -> bool:
        return self.unknown == 0

    def __add__(self, other: "Spent") -> "Spent":
        return Spent(self.usd + other.usd, self.unknown + other.unknown)

    def add(self, cost: float | None, tokens: int) -> "Spent":
        """This plus one row: `cost` None with tokens billed is unknown; None without tokens costs 0."""
        if cost is None:
            return Spent(self.usd, self.unknown + (1 if tokens > 0 else 0))
        return Spent(self.usd + cost, self.unknown)

    def json_value(self) -> float | None:
        """For JSON (manifest, status --json): the amount when complete, else null."""
        return round(self.usd, 8) if self.complete else None


def run_spent(usd: float, unknown_answers: int, price_known: bool) -> Spent:
    """A run's spending. At an unknown price it is unknown even before its first answer, so that no view
    shows a false $0 for a model nobody priced."""
    return Spent(usd, unknown_answers if price_known else max(1, unknown_answers))


def row_spent(d: Mapping[str, str]) -> Spent:
    """What one CSV row (as a dict) adds to the folder's spent total."""
    tokens = _int(d.get("prompt_tokens")) + _int(d.get("completion_tokens"))
    return Spent().add(_cost(d.get("cost_usd")), tokens)


def rows_spent(rows: Iterable[Mapping[str, str]]) -> Spent:
    usd = 0.0
    unknown = 0
    for d in rows:
        s = row_spent(d)
        usd += s.usd
        unknown += s.unknown
    return Spent(usd, unknown)


def open_failures(errors: Iterable[ErrorRow], done: set[Key]) -> dict[Key, str]:
    """Items that failed (in any run) and are not captioned since: key -> the latest failure's reason.

    Rows of retried billed answers are bills, not failures, and are left out; a key in `done` (a row in
    captions_all.csv or attributes.csv) is no failure whatever errors.csv says about it.
    """
    out: dict[Key, str] = {}
    for err in errors:
        if err.key in done or not is_failure(err.reason):
            continue
        out.pop(err.key, None)  # keep file order of the latest failure
        out[err.key] = err.reason or "unknown"
    return out


def price_warning(model: str, known: bool) -> str | None:
    """The one line a run without a budget starts with when the model's price is unknown."""
    if known:
        return None
    return (f"price of model {model!r} unknown: costs are shown as unknown; "
            f"give --price-in/--price-out")


def budget_refusal(model: str, pricing_file: str = "the pricing file") -> str:
    """Why `--max-cost` cannot be used with a model of unknown price (one line, exit 2)."""
    return (f"model {model!r} has no price in {pricing_file}: give --price-in and --price-out to use "
            f"--max-cost")
