"""Model prices and image-token rules from config/pricing.toml, and the cost of one answer.

Prices change more often than code, so they live in a TOML file the user can edit, with the date they
were taken; the CLI's --price-in/--price-out/--price-cached-in override them (0 for a local server).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.records import Usage
from pipeline.providers.tokens import TILE_4O, ImageRule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_PRICING_PATH",
    "ModelPrice",
    "PricingTable",
    "load_pricing",
    "lookup",
    "resolve_price",
    "cost_usd",
    "row_cost",
]

# The repository's config/ next to the package (the project is installed editable).
DEFAULT_PRICING_PATH = Path(__file__).resolve().parents[2] / "config" / "pricing.toml"


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens for one model, and how it counts image tokens.

    `known` is False when the prices are a guess (an unknown model without full --price-in/--price-out
    overrides): its rows get an empty cost cell (`row_cost` is None), every view says "cost unknown", and
    `--max-cost` is refused, so an unpriced fine-tune is never taken for free.
    """

    model: str
    input: float
    cached_input: float
    output: float
    image_rule: ImageRule
    known: bool = True


@dataclass
class PricingTable:
    taken_on: str
    models: dict[str, ModelPrice] = field(default_factory=dict)
    source: Path | None = None


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{path}: {where} must be a non-negative number, got {value!r}")
    return float(value)


def _positive_int(path: Path, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: {where} must be a non-negative integer, got {value!r}")
    return value


def _parse_model(path: Path, name: str, spec: Any) -> ModelPrice:
    where = f'models."{name}"'
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    for key in ("input", "output"):
        if key not in spec:
            raise ConfigError(f"{path}: {where} has no {key} price")
    input_price = _number(path, f"{where}.input", spec["input"])
    output_price = _number(path, f"{where}.output", spec["output"])
    cached = _number(path, f"{where}.cached_input", spec.get("cached_input", input_price))
    kind = spec.get("image_rule", "tile")
    if kind == "tile":
        if "image_base" not in spec or "image_per_tile" not in spec:
            raise ConfigError(f"{path}: {where} uses image_rule \"tile\" but lacks image_base or image_per_tile")
        rule = ImageRule(
            "tile",
            base=_positive_int(path, f"{where}.image_base", spec["image_base"]),
            per_tile=_positive_int(path, f"{where}.image_per_tile", spec["image_per_tile"]),
        )
    elif kind == "patch":
        if "image_multiplier" not in spec:
            raise ConfigError(f"{path}: {where} uses image_rule \"patch\" but lacks image_multiplier")
        cap = _positive_int(path, f"{where}.image_patch_cap", spec.get("image_patch_cap", 1536))
        rule = ImageRule(
            "patch",
            multiplier=_number(path, f"{where}.image_multiplier", spec["image_multiplier"]),
            patch_cap=cap or 1536,
        )
    else:
        raise ConfigError(f'{path}: {where}.image_rule must be "tile" or "patch", got {kind!r}')
    return ModelPrice(name, input_price, cached, output_price, rule)


def load_pricing(path: Path | None = None) -> PricingTable:
    """Read a pricing TOML (default: config/pricing.toml of this checkout). Problems are one-line ConfigErrors."""
    source = Path(path) if path is not None else DEFAULT_PRICING_PATH
    try:
        with source.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"pricing file not found: {source}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read pricing file {source}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None

    meta = data.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("taken_on"), str) or not meta["taken_on"].strip():
        raise ConfigError(f'{source}: needs a [meta] table with taken_on = "YYYY-MM-DD"')
    currency = meta.get("currency", "USD")
    if currency != "USD":
        raise ConfigError(f"{source}: prices must be in USD, meta.currency is {currency!r}")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f'{source}: needs at least one [models."<name>"] table')
    parsed = {name: _parse_model(source, name, spec) for name, spec in models.items()}
    return PricingTable(taken_on=meta["taken_on"].strip(), models=parsed, source=source)


def lookup(table: PricingTable, model: str) -> ModelPrice | None:
    """The price of `model`: the exact name, else the longest listed name that `model` starts with.

    Dated snapshots resolve to their family (gpt-4o-mini-2024-07-18 -> gpt-4o-mini), and the longest
    match keeps gpt-4o-mini from being priced as gpt-4o. Case-insensitive.
    """
    wanted = model.strip().lower()
    lowered = {name.lower(): price for name, price in table.models.items()}
    if wanted in lowered:
        return lowered[wanted]
    best: str | None = None
    for name in lowered:
        if wanted.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return lowered[best] if best is not None else None


def resolve_price(
    table: PricingTable,
    model: str,
    price_in: float | None = None,
    price_out: float | None = None,
    price_cached_in: float | None = None,
) -> ModelPrice:
    """The price a run uses: the table's entry for `model` with any CLI overrides applied.

    An --price-in override also sets the cached-input price unless --price-cached-in is given (a
    user-corrected input price should not be paired with a stale discount). An unknown model gets
    gpt-4o's tile rule and the overrides or zero; it is `known` only if both input and output prices
    were given.
    """
    for flag, value in (("--price-in", price_in), ("--price-out", price_out), ("--price-cached-in", price_cached_in)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ConfigError(f"{flag} must be a non-negative number, got {value!r}")
    base = lookup(table, model)
    if base is None:
        base = ModelPrice(model, 0.0, 0.0, 0.0, TILE_4O, known=price_in is not None and price_out is not None)
    else:
        base = ModelPrice(model, base.input, base.cached_input, base.output, base.image_rule, known=True)
    input_price = base.input if price_in is None else float(price_in)
    if price_cached_in is not None:
        cached = float(price_cached_in)
    elif price_in is not None:
        cached = float(price_in)
    else:
        cached = base.cached_input
    output_price = base.output if price_out is None else float(price_out)
    return ModelPrice(model, input_price, cached, output_price, base.image_rule, known=base.known)


def cost_usd(price: ModelPrice, usage: Usage) -> float:
    """USD for one answer: uncached input, cached input and output, each at its own price per 1M tokens."""
    cached = min(max(0, usage.cached_tokens), max(0, usage.prompt_tokens))
    uncached = max(0, usage.prompt_tokens) - cached
    return (
        uncached * price.input + cached * price.cached_input + max(0, usage.completion_tokens) * price.output
    ) / 1_000_000


def row_cost(price: ModelPrice, usage: Usage) -> float | None:
    """The cost a row records: `cost_usd`, or None when the price is unknown (an empty cell, never $0)."""
    return cost_usd(price, usage) if price.known else None
