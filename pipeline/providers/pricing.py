"""Model prices and image-token rules from a pricing TOML, and the cost of one answer.

Prices change more often than code, so they live in a TOML file with the date they were taken. The
package ships one (`pipeline/bundled/pricing.toml`, package data read through importlib.resources, so
an installed wheel finds it from any folder); a user's own file overrides it as a whole: `--pricing
FILE`, else `$REID_PROMPT_PRICING`, else `config/pricing.toml` in the current folder
(`choose_pricing_file`). The CLI's --price-in/--price-out/--price-cached-in override single prices (0 for a
local server).

Batch API prices (`run --mode batch`): a model may list `batch_input`, `batch_output` and
`batch_cached_input`; else its `batch_discount` (the fraction taken off every online price, 0.5 = half),
else the file's `[meta] batch_discount`; else none is known and a batch is priced as online (never a
guessed saving). `ModelPrice.batch()` gives the batch-priced `ModelPrice` rows and budgets use.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from pipeline import bundled
from pipeline.errors import ConfigError
from pipeline.records import Usage
from pipeline.providers.tokens import GEMINI, QWEN_VL_28, QWEN_VL_32, TILE_4O, ImageRule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_PRICING_PATH",
    "PRICING_ENV",
    "LOCAL_PRICING",
    "ModelPrice",
    "PricingTable",
    "PricingChoice",
    "choose_pricing_file",
    "pricing_choice",
    "load_pricing",
    "load_run_pricing",
    "pricing_label",
    "lookup",
    "lookup_names",
    "guess_image_rule",
    "resolve_price",
    "cost_usd",
    "row_cost",
]

# The prices shipped with the package (package data: found the same way by a wheel, `pip install .` and
# `pip install -e .`).
DEFAULT_PRICING_PATH = bundled.bundled_path(bundled.PRICING)
PRICING_ENV = "REID_PROMPT_PRICING"  # a user's pricing file for every run, without --pricing
LOCAL_PRICING = Path("config") / "pricing.toml"  # ... or one in the folder the command runs in


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
    source: str = ""  # where the pricing file says this model's figures came from
    taken_on: str = ""  # ... and when (the file's [meta] taken_on when the model gives none)
    # Batch API: explicit prices per 1M tokens, else the fraction taken off the online ones; None = not known
    batch_input: float | None = None
    batch_cached_input: float | None = None
    batch_output: float | None = None
    batch_discount: float | None = None
    tier: str = "online"  # "online" | "batch": which prices input/cached_input/output are

    @property
    def batch_known(self) -> bool:
        """Does the pricing say what a batch costs (explicit prices or a discount)?"""
        return self.tier == "batch" or self.batch_discount is not None or any(
            v is not None for v in (self.batch_input, self.batch_output, self.batch_cached_input))

    def batch(self) -> "ModelPrice":
        """This model at Batch API prices: each explicit batch price, else the online price less the
        discount, else the online price itself (no saving is assumed that the pricing does not state).
        `known` as before. A batch price's `batch()` is itself."""
        if self.tier == "batch":
            return self
        keep = 1.0 - (self.batch_discount or 0.0)

        def pick(explicit: float | None, online: float) -> float:
            return float(explicit) if explicit is not None else online * keep

        batch_in = pick(self.batch_input, self.input)
        # cached input: its own batch price, else the online one less the discount, never above batch input
        cached = (float(self.batch_cached_input) if self.batch_cached_input is not None
                  else min(batch_in, self.cached_input * keep))
        if any(v is not None for v in (self.batch_input, self.batch_output, self.batch_cached_input)):
            note = "batch prices from the pricing file"
        elif self.batch_discount:
            note = f"batch: {self.batch_discount:.0%} off online prices"
        elif self.batch_discount is not None:
            note = "batch: priced as online (no batch discount for this model)"
        else:
            note = "batch: no batch price in the pricing file, priced as online"
        return replace(
            self,
            input=batch_in,
            cached_input=cached,
            output=pick(self.batch_output, self.output),
            batch_input=None, batch_cached_input=None, batch_output=None, batch_discount=None,
            tier="batch",
            source=f"{self.source}; {note}" if self.source else note,
        )


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


def _discount(path: Path, where: str, value: Any) -> float:
    number = _number(path, where, value)
    if number > 1:
        raise ConfigError(f"{path}: {where} is the fraction taken off online prices (0.5 = half), "
                          f"from 0 to 1, got {value!r}")
    return number


def _parse_model(path: Path, name: str, spec: Any, default_discount: float | None = None) -> ModelPrice:
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
    elif kind == "qwen":
        # Qwen-VL's smart_resize: image_patch_px 28 (Qwen2/2.5-VL) or 32 (Qwen3-VL), 4..max patches, +2
        patch_px = _positive_int(path, f"{where}.image_patch_px", spec.get("image_patch_px", 28))
        rule = ImageRule(
            "qwen",
            base=_positive_int(path, f"{where}.image_extra_tokens", spec.get("image_extra_tokens", 2)),
            patch_px=patch_px or 28,
            min_tokens=_positive_int(path, f"{where}.image_min_tokens", spec.get("image_min_tokens", 4)) or 4,
            max_tokens=_positive_int(path, f"{where}.image_max_tokens", spec.get("image_max_tokens", 1280)) or 1280,
        )
    elif kind == "gemini":
        # Gemini 2.x: image_base (258) for both sides <= 384 px, else image_per_tile (258) per crop tile
        rule = ImageRule(
            "gemini",
            base=_positive_int(path, f"{where}.image_base", spec.get("image_base", 258)),
            per_tile=_positive_int(path, f"{where}.image_per_tile", spec.get("image_per_tile", 258)),
        )
    else:
        raise ConfigError(
            f'{path}: {where}.image_rule must be "tile", "patch", "qwen" or "gemini", got {kind!r}'
        )
    source = spec.get("source", "")
    taken_on = spec.get("taken_on", "")
    if not isinstance(source, str) or not isinstance(taken_on, str):
        raise ConfigError(f"{path}: {where}.source and .taken_on must be strings")
    batch = {key: _number(path, f"{where}.{key}", spec[key]) if key in spec else None
             for key in ("batch_input", "batch_cached_input", "batch_output")}
    if "batch_discount" in spec:
        discount: float | None = _discount(path, f"{where}.batch_discount", spec["batch_discount"])
    elif batch["batch_input"] is not None and batch["batch_output"] is not None:
        discount = None  # the model's own batch prices; the file's default discount is not for it
    else:
        discount = default_discount
    return ModelPrice(name, input_price, cached, output_price, rule, source=source.strip(),
                      taken_on=taken_on.strip(), batch_discount=discount, **batch)


@dataclass(frozen=True)
class PricingChoice:
    """Which pricing file a run reads, and why (`origin` is said in an error about the file)."""

    path: Path
    origin: str  # "--pricing" | "REID_PROMPT_PRICING" | "config/pricing.toml in the current folder" | "bundled"

    @property
    def bundled(self) -> bool:
        return self.origin == "bundled"


def choose_pricing_file(
    flag: Path | None, env: Mapping[str, str], local_exists: bool, bundled_file: Path = DEFAULT_PRICING_PATH
) -> PricingChoice:
    """The pricing file to read: `--pricing`, else `$REID_PROMPT_PRICING`, else `config/pricing.toml` in
    the current folder when `local_exists`, else the bundled one. Pure: the caller looks at the disk.

    A user's file replaces the bundled table as a whole (no merging), so what a run is priced by is one
    file a user can read. An empty variable counts as unset.
    """
    if flag is not None:
        return PricingChoice(Path(flag), "--pricing")
    from_env = env.get(PRICING_ENV, "").strip()
    if from_env:
        return PricingChoice(Path(from_env), PRICING_ENV)
    if local_exists:
        return PricingChoice(LOCAL_PRICING, f"{LOCAL_PRICING.as_posix()} in the current folder")
    return PricingChoice(bundled_file, "bundled")


def pricing_choice(flag: Path | None = None) -> PricingChoice:
    """`choose_pricing_file` for this process: its environment and current folder."""
    return choose_pricing_file(flag, os.environ, LOCAL_PRICING.is_file())


def load_run_pricing(flag: Path | None = None) -> PricingTable:
    """The table a run (or a dry-run) prices with: the chosen file, loaded. Errors name where the choice
    came from when that is not the command line (a stale variable or a forgotten config/ folder)."""
    choice = pricing_choice(flag)
    try:
        return load_pricing(choice.path)
    except ConfigError as exc:
        if choice.origin in ("--pricing", "bundled"):
            raise
        raise ConfigError(f"{exc} (chosen by {choice.origin})") from None


def pricing_label(table: PricingTable) -> str:
    """The pricing file as a message names it: "the bundled pricing.toml", or the user's path."""
    source = table.source
    if source is None or source == DEFAULT_PRICING_PATH:
        return "the bundled pricing.toml"
    return str(source)


def load_pricing(path: Path | None = None) -> PricingTable:
    """Read a pricing TOML (default: the bundled one). Problems are one-line ConfigErrors."""
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
    default_discount = (_discount(source, "meta.batch_discount", meta["batch_discount"])
                        if "batch_discount" in meta else None)
    parsed = {name: _parse_model(source, name, spec, default_discount) for name, spec in models.items()}
    return PricingTable(taken_on=meta["taken_on"].strip(), models=parsed, source=source)


def lookup(table: PricingTable, model: str) -> ModelPrice | None:
    """The price of `model`: the exact name, else the longest listed name that `model` starts with.

    Dated snapshots resolve to their family (gpt-4o-mini-2024-07-18 -> gpt-4o-mini), and the longest
    match keeps gpt-4o-mini from being priced as gpt-4o. Case-insensitive.
    """
    lowered = {name.lower(): price for name, price in table.models.items()}
    for wanted in lookup_names(model):
        if wanted in lowered:
            return lowered[wanted]
        best: str | None = None
        for name in lowered:
            if wanted.startswith(name) and (best is None or len(name) > len(best)):
                best = name
        if best is not None:
            return lowered[best]
    return None


def lookup_names(model: str) -> list[str]:
    """The names `model` is looked up by, in order: as given, then without a provider's prefix, then
    without a variant tag. Lower-cased. Pure.

    OpenRouter and Hugging Face name models `vendor/model` (qwen/qwen2.5-vl-72b-instruct,
    google/gemini-2.0-flash-001, Qwen/Qwen2.5-VL-7B-Instruct as vLLM serves it), Gemini's endpoint
    accepts `models/gemini-2.0-flash`, and OpenRouter and Ollama add `:tag` (`:free`, `:7b`); the
    pricing file lists each model once, by its plain name.
    """
    names: list[str] = []
    full = model.strip().lower()
    for name in (full, full.rsplit("/", 1)[-1]):
        for candidate in (name, name.split(":", 1)[0]):
            if candidate and candidate not in names:
                names.append(candidate)
    return names


def guess_image_rule(model: str) -> ImageRule:
    """The image-token rule of a model the pricing file does not list, from its family name (the name
    is all there is): Qwen3-VL and Qwen2/2.5-VL served locally count Qwen-VL patches, Gemini its tiles;
    anything else gpt-4o's tiles. Only token estimates depend on it, never a price."""
    name = lookup_names(model)[-1].replace("_", "-")
    if "qwen" in name and "vl" in name:
        return QWEN_VL_32 if name.startswith(("qwen3", "qwen-3")) else QWEN_VL_28
    if name.startswith("gemini"):
        return GEMINI
    return TILE_4O


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
        base = ModelPrice(model, 0.0, 0.0, 0.0, guess_image_rule(model),
                          known=price_in is not None and price_out is not None)
    elif model.strip().lower().endswith(":free"):  # OpenRouter's free variant of a listed model
        base = ModelPrice(model, 0.0, 0.0, 0.0, base.image_rule, known=True, source="OpenRouter :free variant",
                          batch_discount=0.0)
    else:
        base = replace(base, model=model, known=True, taken_on=base.taken_on or table.taken_on)
    input_price = base.input if price_in is None else float(price_in)
    if price_cached_in is not None:
        cached = float(price_cached_in)
    elif price_in is not None:
        cached = float(price_in)
    else:
        cached = base.cached_input
    output_price = base.output if price_out is None else float(price_out)
    overridden = any(v is not None for v in (price_in, price_out, price_cached_in))
    # an override is an online price: the file's explicit batch prices belong to other figures and are
    # dropped; the model's batch discount (the provider's rule) applies to the overridden prices
    explicit = {} if overridden else {"batch_input": base.batch_input, "batch_output": base.batch_output,
                                      "batch_cached_input": base.batch_cached_input}
    discount = base.batch_discount
    if overridden and discount is None and base.batch_input is not None and base.input > 0:
        discount = max(0.0, min(1.0, 1.0 - base.batch_input / base.input))  # the saving the file implies
    return ModelPrice(model, input_price, cached, output_price, base.image_rule, known=base.known,
                      source="overridden (--price-* or a local provider)" if overridden else base.source,
                      taken_on="" if overridden else base.taken_on, batch_discount=discount, **explicit)


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
