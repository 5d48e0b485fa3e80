"""Number cells of our CSV files, read and written one way everywhere.

Plain functions with no imports of the package, so the readers of every file (outputs, costs, status)
share them without importing each other.
"""

from __future__ import annotations


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


def int_cell(value: str | None, default: int = 0) -> int:
    """A whole-number cell; empty or malformed gives `default` (the scanner has quarantined bad rows)."""
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def float_cell(value: str | None, default: float = 0.0) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except ValueError:
        return default


def answer_cell(value: object) -> str:
    """One field of a structured answer as attributes.csv shows it: yes/no for booleans, `;` between list items."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)
