"""Batch API prices: the pricing file's batch fields, the default discount, overrides and `ModelPrice.batch()`."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.providers.pricing import cost_usd, load_pricing, resolve_price, row_cost
from pipeline.records import Usage


@pytest.fixture(scope="module")
def table():
    return load_pricing()


def write(tmp_path: Path, body: str, meta: str = "") -> Path:
    p = tmp_path / "pricing.toml"
    p.write_text(f'[meta]\ntaken_on = "2026-01-01"\n{meta}\n{body}', encoding="utf-8")
    return p


MODEL = '[models."m"]\ninput = 1.0\ncached_input = 0.5\noutput = 4.0\nimage_rule = "tile"\nimage_base = 85\nimage_per_tile = 170\n'


@pytest.mark.parametrize(("model", "online", "batch"), [
    ("gpt-4o-mini", (0.15, 0.075, 0.60), (0.075, 0.0375, 0.30)),
    ("gpt-4o", (2.50, 1.25, 10.00), (1.25, 0.625, 5.00)),
    ("gpt-4.1-nano", (0.10, 0.025, 0.40), (0.05, 0.0125, 0.20)),
    ("loopback", (0.15, 0.075, 0.60), (0.075, 0.0375, 0.30)),  # tests see half-price rows
    ("qwen-vl-plus", (0.21, 0.21, 0.63), (0.105, 0.105, 0.315)),
    ("gemini-2.5-flash", (0.30, 0.075, 2.50), (0.15, 0.0375, 1.25)),
])
def test_bundled_batch_prices_are_half_where_the_provider_documents_it(table, model, online, batch):
    price = resolve_price(table, model)
    assert (price.input, price.cached_input, price.output) == pytest.approx(online)
    b = price.batch()
    assert (b.input, b.cached_input, b.output) == pytest.approx(batch)
    assert b.known and b.tier == "batch" and price.tier == "online"
    assert "50% off" in b.source
    assert b.image_rule == price.image_rule  # tokens are counted alike


@pytest.mark.parametrize("model", ["qwen3-vl-8b", "qwen2.5-vl-7b-instruct"])
def test_a_model_without_a_documented_batch_price_is_priced_as_online(table, model):
    price = resolve_price(table, model)
    b = price.batch()
    assert (b.input, b.output) == (price.input, price.output)
    assert "priced as online" in b.source


def test_batch_rows_cost_half(table):
    price = resolve_price(table, "gpt-4o-mini")
    usage = Usage(prompt_tokens=3_000, completion_tokens=60, cached_tokens=1_000)
    assert cost_usd(price.batch(), usage) == pytest.approx(cost_usd(price, usage) / 2)
    assert row_cost(price.batch(), usage) == pytest.approx(cost_usd(price, usage) / 2)


def test_batch_of_a_batch_price_is_itself(table):
    b = resolve_price(table, "gpt-4o").batch()
    assert b.batch() is b


def test_explicit_batch_prices_win_over_the_default_discount(tmp_path):
    path = write(tmp_path, MODEL + "batch_input = 0.7\nbatch_output = 3.0\n", meta="batch_discount = 0.5")
    b = resolve_price(load_pricing(path), "m").batch()
    assert (b.input, b.output) == pytest.approx((0.7, 3.0))
    # a model with batch prices of its own takes no default discount: cached = min(batch input, online cached)
    assert b.cached_input == pytest.approx(0.5)
    assert "from the pricing file" in b.source


def test_explicit_cached_batch_price(tmp_path):
    path = write(tmp_path, MODEL + "batch_input = 0.6\nbatch_cached_input = 0.1\nbatch_output = 2.0\n")
    b = resolve_price(load_pricing(path), "m").batch()
    assert (b.input, b.cached_input, b.output) == pytest.approx((0.6, 0.1, 2.0))


def test_model_discount_overrides_the_files_default(tmp_path):
    path = write(tmp_path, MODEL + "batch_discount = 0.25\n", meta="batch_discount = 0.5")
    b = resolve_price(load_pricing(path), "m").batch()
    assert (b.input, b.cached_input, b.output) == pytest.approx((0.75, 0.375, 3.0))


def test_a_file_without_batch_prices_prices_a_batch_as_online(tmp_path):
    price = resolve_price(load_pricing(write(tmp_path, MODEL)), "m")
    assert not price.batch_known
    b = price.batch()
    assert (b.input, b.cached_input, b.output) == (1.0, 0.5, 4.0)
    assert "no batch price in the pricing file" in b.source


def test_cached_batch_price_never_exceeds_the_batch_input(tmp_path):
    body = MODEL.replace("cached_input = 0.5", "cached_input = 1.0") + "batch_input = 0.4\nbatch_output = 2.0\n"
    b = resolve_price(load_pricing(write(tmp_path, body)), "m").batch()
    assert b.cached_input == pytest.approx(0.4)


@pytest.mark.parametrize(("where", "value"), [
    ("meta", "1.5"), ("meta", "-0.1"), ("meta", '"half"'), ("model", "2"), ("model", "true"),
])
def test_bad_discounts_are_one_line_errors(tmp_path, where, value):
    meta = f"batch_discount = {value}" if where == "meta" else ""
    body = MODEL + (f"batch_discount = {value}\n" if where == "model" else "")
    with pytest.raises(ConfigError) as exc:
        load_pricing(write(tmp_path, body, meta=meta))
    assert "batch_discount" in str(exc.value) and "\n" not in str(exc.value)


def test_bad_batch_price_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="batch_output"):
        load_pricing(write(tmp_path, MODEL + "batch_output = -1\n"))


def test_an_override_is_an_online_price_discounted_by_the_providers_rule(table):
    price = resolve_price(table, "gpt-4o-mini", price_in=1.0, price_out=2.0)
    b = price.batch()
    assert (b.input, b.cached_input, b.output) == pytest.approx((0.5, 0.5, 1.0))


def test_an_override_drops_explicit_batch_prices_and_keeps_their_saving(tmp_path):
    path = write(tmp_path, MODEL + "batch_input = 0.6\nbatch_output = 2.4\n")
    b = resolve_price(load_pricing(path), "m", price_in=2.0, price_out=8.0).batch()
    assert (b.input, b.output) == pytest.approx((1.2, 4.8))  # 40 % off, as the file's own batch prices


def test_local_and_unknown_models(table):
    free = resolve_price(table, "Qwen/Qwen2-VL-7B", 0.0, 0.0, 0.0).batch()
    assert (free.input, free.output, free.known) == (0.0, 0.0, True)
    unknown = resolve_price(table, "my-fine-tune").batch()
    assert not unknown.known  # a batch of an unpriced model stays unpriced (empty cost cells)
    openrouter_free = resolve_price(table, "qwen/qwen-vl-plus:free").batch()
    assert (openrouter_free.input, openrouter_free.output) == (0.0, 0.0)
