"""Pricing: the shipped table, prefix lookup, overrides, cost arithmetic and malformed files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.providers.pricing import (
    DEFAULT_PRICING_PATH,
    ModelPrice,
    PricingTable,
    cost_usd,
    load_pricing,
    lookup,
    resolve_price,
)
from pipeline.records import Usage
from pipeline.providers.tokens import TILE_4O, ImageRule, image_tokens


@pytest.fixture(scope="module")
def table() -> PricingTable:
    return load_pricing()


def test_default_table_is_the_bundled_package_data(table):
    assert DEFAULT_PRICING_PATH == Path(__file__).resolve().parent.parent / "pipeline" / "bundled" / "pricing.toml"
    assert table.source == DEFAULT_PRICING_PATH
    assert table.taken_on.startswith("20")


@pytest.mark.parametrize(
    ("model", "prices", "rule"),
    [
        ("gpt-4o-mini", (0.15, 0.075, 0.60), ImageRule("tile", base=2833, per_tile=5667)),
        ("gpt-4o", (2.50, 1.25, 10.00), TILE_4O),
        ("gpt-4.1", (2.00, 0.50, 8.00), TILE_4O),
        ("gpt-4.1-mini", (0.40, 0.10, 1.60), ImageRule("patch", multiplier=1.62)),
        ("gpt-4.1-nano", (0.10, 0.025, 0.40), ImageRule("patch", multiplier=2.46)),
        ("o4-mini", (1.10, 0.275, 4.40), ImageRule("patch", multiplier=1.72)),
        ("loopback", (0.15, 0.075, 0.60), TILE_4O),
    ],
)
def test_shipped_prices(table, model, prices, rule):
    price = table.models[model]
    assert (price.input, price.cached_input, price.output) == pytest.approx(prices)
    assert price.image_rule == rule
    assert price.known


@pytest.mark.parametrize(
    ("model", "low", "high"),
    [
        ("gpt-4o", 85, 255),
        ("gpt-4o-mini", 2833, 8500),
        ("gpt-4.1-mini", 13, 13),
        ("gpt-4.1-nano", 20, 20),
    ],
)
def test_image_tokens_of_the_shipped_rules(table, model, low, high):
    rule = lookup(table, model).image_rule
    assert (image_tokens(rule, 64, 128, "low"), image_tokens(rule, 64, 128, "high")) == (low, high)


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # longest prefix, not gpt-4o
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # its own price beats the gpt-4o prefix
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-nano", "gpt-4.1-nano"),
        ("GPT-4o-Mini", "gpt-4o-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("llava-hf/llava-1.5-7b", None),
        ("gpt-4", None),  # a prefix of listed names is not a match
        ("", None),
    ],
)
def test_lookup(table, model, entry):
    got = lookup(table, model)
    assert (got.model if got else None) == entry


def test_lookup_prefers_longest_regardless_of_order():
    rule = TILE_4O
    t = PricingTable("2026-01-01", {
        "a-b": ModelPrice("a-b", 2, 2, 2, rule),
        "a": ModelPrice("a", 1, 1, 1, rule),
        "a-b-c": ModelPrice("a-b-c", 3, 3, 3, rule),
    }, None)
    assert lookup(t, "a-b-c-d").model == "a-b-c"
    assert lookup(t, "a-bx").model == "a-b"
    assert lookup(t, "a-x").model == "a"


@pytest.mark.parametrize(
    ("model", "overrides", "expected"),
    [
        # (input, cached_input, output, known)
        ("gpt-4o-mini", {}, (0.15, 0.075, 0.60, True)),
        ("gpt-4o-mini-2024-07-18", {}, (0.15, 0.075, 0.60, True)),
        ("gpt-4o-mini", {"price_out": 1.0}, (0.15, 0.075, 1.0, True)),
        ("gpt-4o-mini", {"price_in": 0.2}, (0.2, 0.2, 0.60, True)),  # cached follows an input override
        ("gpt-4o-mini", {"price_in": 0.2, "price_cached_in": 0.05}, (0.2, 0.05, 0.60, True)),
        ("gpt-4o-mini", {"price_cached_in": 0.01}, (0.15, 0.01, 0.60, True)),
        # a local vLLM: free
        ("Qwen/Qwen2-VL-7B", {"price_in": 0, "price_out": 0}, (0.0, 0.0, 0.0, True)),
        # unknown model, no overrides: zero prices, flagged so the caller warns
        ("Qwen/Qwen2-VL-7B", {}, (0.0, 0.0, 0.0, False)),
        ("Qwen/Qwen2-VL-7B", {"price_in": 0.3}, (0.3, 0.3, 0.0, False)),
    ],
)
def test_resolve_price(table, model, overrides, expected):
    price = resolve_price(table, model, **overrides)
    assert (price.input, price.cached_input, price.output, price.known) == pytest.approx(expected)
    assert price.model == model


def test_unknown_model_gets_the_gpt4o_tile_rule(table):
    assert resolve_price(table, "some-local-model").image_rule == TILE_4O
    assert resolve_price(table, "gpt-4.1-nano-x").image_rule.kind == "patch"


@pytest.mark.parametrize("bad", [{"price_in": -1.0}, {"price_out": float("nan")}, {"price_cached_in": float("inf")}])
def test_resolve_price_rejects_bad_overrides(table, bad):
    with pytest.raises(ConfigError):
        resolve_price(table, "gpt-4o-mini", **bad)


MINI = ModelPrice("gpt-4o-mini", 0.15, 0.075, 0.60, TILE_4O)


@pytest.mark.parametrize(
    ("usage", "usd"),
    [
        (Usage(), 0.0),
        (Usage(prompt_tokens=1_000_000), 0.15),
        (Usage(completion_tokens=1_000_000), 0.60),
        (Usage(prompt_tokens=1_000_000, cached_tokens=1_000_000), 0.075),
        (Usage(prompt_tokens=1_000_000, cached_tokens=400_000), 0.6 * 0.15 + 0.4 * 0.075),
        # one 64x128 crop at detail=low on gpt-4o-mini: 2,833 image + ~40 text in, ~60 out
        (Usage(prompt_tokens=2873, completion_tokens=60), (2873 * 0.15 + 60 * 0.60) / 1e6),
        # a cached count above the prompt count (a server bug) is clamped, never negative
        (Usage(prompt_tokens=100, cached_tokens=500), 100 * 0.075 / 1e6),
    ],
)
def test_cost_usd(usage, usd):
    assert cost_usd(MINI, usage) == pytest.approx(usd)


VALID_MODEL = '[models."m"]\ninput = 1.0\noutput = 2.0\nimage_rule = "tile"\nimage_base = 85\nimage_per_tile = 170\n'
META = '[meta]\ntaken_on = "2026-01-01"\ncurrency = "USD"\n'


def test_small_valid_file(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(META + VALID_MODEL + '[models."n"]\ninput = 0.1\noutput = 0.2\nimage_rule = "patch"\nimage_multiplier = 2\n')
    t = load_pricing(p)
    assert t.taken_on == "2026-01-01" and t.source == p
    assert t.models["m"].cached_input == 1.0  # defaults to input
    assert t.models["n"].image_rule == ImageRule("patch", multiplier=2.0, patch_cap=1536)


@pytest.mark.parametrize(
    "text",
    [
        "this is [not toml",
        VALID_MODEL,  # no [meta]
        '[meta]\ncurrency = "USD"\n' + VALID_MODEL,  # no taken_on
        '[meta]\ntaken_on = "2026-01-01"\ncurrency = "EUR"\n' + VALID_MODEL,
        META,  # no models
        META + '[models."m"]\ninput = 1.0\n',  # no output price
        META + VALID_MODEL.replace("input = 1.0", 'input = "cheap"'),
        META + VALID_MODEL.replace("input = 1.0", "input = -1.0"),
        META + VALID_MODEL.replace("input = 1.0", "input = true"),
        META + VALID_MODEL.replace('"tile"', '"pixels"'),
        META + VALID_MODEL.replace("image_base = 85\n", ""),
        META + VALID_MODEL.replace("image_base = 85", "image_base = 8.5"),
        META + '[models."m"]\ninput = 1.0\noutput = 2.0\nimage_rule = "patch"\n',  # no multiplier
        META + "models = 3\n",
    ],
)
def test_malformed_file_is_a_one_line_config_error(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pricing(p)
    assert "\n" not in str(info.value)
    assert str(p) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pricing(tmp_path / "nope.toml")
