"""Dry-run estimate: token and cost arithmetic on hand-made items, and what build_estimate reads."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

import pipeline.review.estimate as estimate_mod
from pipeline.review.estimate import (
    DEFAULT_OUTPUT_TOKENS,
    CostEstimate,
    EstimateItem,
    build_estimate,
    describe_price_source,
    estimate_cost,
    measured_output_tokens,
    render_estimate,
    reservoir_sample,
)
from pipeline.ledger.outputs import CAPTION_COLUMNS, CAPTIONS_ALL, caption_record, write_csv_atomic
from pipeline.providers.pricing import ModelPrice, PricingTable
from pipeline.records import CaptionRow, IndexEntry, Prompt
from pipeline.providers.tokens import MESSAGE_OVERHEAD_TOKENS, ImageRule, estimate_request, text_tokens

MINI = ModelPrice("gpt-4o-mini", 0.15, 0.075, 0.60, ImageRule("tile", base=2833, per_tile=5667))
PATCH = ModelPrice("gpt-4.1-mini", 0.40, 0.10, 1.60, ImageRule("patch", multiplier=1.62))
PROMPT = "Describe the person."  # 20 characters: 5 tokens


def est(items: list[EstimateItem], price: ModelPrice = MINI, **kw: object) -> CostEstimate:
    args = dict(detail="low", max_tokens=300, captions_per_image=2, expected_output_tokens=60)
    args.update(kw)
    return estimate_cost(items, price, **args)  # type: ignore[arg-type]


# --- arithmetic ------------------------------------------------------------------------------------------

def test_image_input_is_paid_once_per_request_output_per_caption() -> None:
    items = [EstimateItem(f"a{i}.jpg", 64, 128, PROMPT) for i in range(3)]
    e = est(items)
    text_per_request = MESSAGE_OVERHEAD_TOKENS + text_tokens(PROMPT)
    assert e.requests == 3 and e.items_left == 6  # 2 captions per image, one request each
    assert e.image_tokens == 3 * 2833
    assert e.text_tokens == 3 * text_per_request
    assert e.input_tokens == 3 * (2833 + text_per_request)
    assert e.output_tokens == 3 * 2 * 60
    assert e.output_tokens_max == 3 * 2 * 300
    assert e.cost_input == pytest.approx(e.input_tokens * 0.15 / 1e6)
    assert e.cost_output == pytest.approx(360 * 0.60 / 1e6)
    assert e.cost_total == pytest.approx(e.cost_input + e.cost_output)
    assert e.cost_max == pytest.approx(e.cost_input + 1800 * 0.60 / 1e6)
    assert e.size_counts == {(64, 128): 3}
    assert e.unreadable == 0 and not e.sampled
    assert e.model == "gpt-4o-mini" and e.price_known


def test_agrees_with_the_runners_request_estimate() -> None:
    for price, detail, (w, h) in [(MINI, "low", (64, 128)), (MINI, "high", (1000, 3000)), (PATCH, "high", (333, 777))]:
        e = est([EstimateItem("x.jpg", w, h, PROMPT, n=3)], price, detail=detail)
        ref = estimate_request(price.image_rule, PROMPT, w, h, detail, 300, n=3, expected_output_tokens=60)
        assert (e.input_tokens, e.output_tokens) == (ref.input_tokens, ref.output_tokens)


def test_detail_and_rule() -> None:
    low = est([EstimateItem("x.jpg", 64, 128, PROMPT)], detail="low")
    high = est([EstimateItem("x.jpg", 64, 128, PROMPT)], detail="high")
    assert high.image_tokens - low.image_tokens == 5667  # one 512-px tile
    patch_low = est([EstimateItem("x.jpg", 64, 128, PROMPT)], PATCH, detail="low")
    patch_high = est([EstimateItem("x.jpg", 64, 128, PROMPT)], PATCH, detail="high")
    assert patch_low.image_tokens == patch_high.image_tokens == 13  # 2 x 4 patches x 1.62, rounded up


def test_unreadable_images_cost_no_image_tokens() -> None:
    e = est([EstimateItem("ok.jpg", 64, 128, PROMPT), EstimateItem("bad.jpg", None, None, PROMPT),
             EstimateItem("zero.jpg", 0, 10, PROMPT)])
    assert e.unreadable == 2
    assert e.image_tokens == 2833
    assert e.text_tokens == 3 * (MESSAGE_OVERHEAD_TOKENS + text_tokens(PROMPT))
    assert e.size_counts == {(64, 128): 1}


def test_per_item_n_and_output_capped_by_max_tokens() -> None:
    e = est([EstimateItem("a.jpg", 64, 128, PROMPT, n=1), EstimateItem("b.jpg", 64, 128, PROMPT, n=4)],
            max_tokens=50, expected_output_tokens=80)
    assert e.items_left == 5
    assert e.expected_output_tokens == 50
    assert e.output_tokens == 5 * 50 == e.output_tokens_max


def test_a_sample_is_scaled_to_the_requests_it_stands_for() -> None:
    items = [EstimateItem("a.jpg", 64, 128, PROMPT), EstimateItem("b.jpg", 128, 256, PROMPT)]
    full = est(items)
    scaled = est(items, scale_to=10)
    assert scaled.sampled and scaled.items_seen == 2 and scaled.requests == 10
    assert scaled.items_left == 5 * full.items_left
    assert scaled.image_tokens == 5 * full.image_tokens
    assert scaled.output_tokens == 5 * full.output_tokens
    assert scaled.cost_total == pytest.approx(5 * full.cost_total)
    assert scaled.size_counts == full.size_counts  # the sizes actually seen


def test_no_items() -> None:
    e = est([])
    assert (e.requests, e.items_left, e.input_tokens, e.output_tokens, e.cost_total) == (0, 0, 0, 0, 0.0)
    assert est([], scale_to=0).requests == 0


def test_reservoir_sample_is_seeded_and_uniform_in_size() -> None:
    a, n = reservoir_sample(range(10_000), 50, seed=3)
    b, _ = reservoir_sample(range(10_000), 50, seed=3)
    assert n == 10_000 and a == b and len(set(a)) == 50
    small, m = reservoir_sample(range(7), 50)
    assert small == list(range(7)) and m == 7


# --- reading a folder ---------------------------------------------------------------------------------------

def make_images(root: Path, sizes: list[tuple[int, int] | None]) -> list[IndexEntry]:
    """One image per size; None = a file that is not an image."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, size in enumerate(sizes):
        path = root / f"{i:04d}_c1s1_000001_01.png"
        if size is None:
            path.write_bytes(b"this is not an image")
        else:
            Image.new("RGB", size).save(path)
        entries.append(IndexEntry(f"train/{path.name}", path, position=i))
    return entries


def caption_row(image_id: str, k: int = 0, completion: int = 40, prompt: str = "base") -> CaptionRow:
    return CaptionRow(image_id, PROMPT, "a man", "2025-03-01T12:00:00+00:00", "gpt-4o-mini", 3000, completion,
                      0.001, prompt, k)


def test_build_estimate_counts_what_is_left_and_reads_sizes(tmp_path: Path) -> None:
    entries = make_images(tmp_path / "img", [(64, 128), (64, 128), (128, 256), None])
    entries.append(IndexEntry("train/missing.png", tmp_path / "img" / "missing.png", position=4))
    out = tmp_path / "out"
    out.mkdir()
    # image 0 fully done (2 captions), image 1 half done
    rows = [caption_row(entries[0].image_id, 0), caption_row(entries[0].image_id, 1), caption_row(entries[1].image_id, 0)]
    write_csv_atomic(out / CAPTIONS_ALL, CAPTION_COLUMNS, [caption_record(r) for r in rows])
    prompts = [Prompt("base", PROMPT)]

    e = build_estimate(entries, prompts, out, MINI, detail="low", max_tokens=300, captions_per_image=2,
                       price_source="pricing.toml, taken on 2026-11-25", max_cost=0.001)
    assert (e.items_total, e.items_done, e.items_left) == (10, 3, 7)
    assert e.requests == 4  # image 1 (1 caption), 2, 3 and the missing one (2 captions each)
    assert e.unreadable == 2
    assert e.size_counts == {(64, 128): 1, (128, 256): 1}
    assert e.image_tokens == 2 * 2833
    assert e.output_tokens == 7 * DEFAULT_OUTPUT_TOKENS
    assert "default" in e.output_tokens_source
    assert not e.sampled

    console = Console(record=True, width=200, force_terminal=True, file=io.StringIO())
    render_estimate(e, console)
    text = console.export_text()
    for expected in ["gpt-4o-mini", "detail low", "taken on 2026-11-25", "10 total, 3 done, 7 left", "requests",
                     "64x128: 1", "unreadable: 2", "image 5,666", "60 per caption", "default", "over budget",
                     "nothing was sent", fmt_cost(e.cost_total)]:
        assert expected in text, expected


def fmt_cost(x: float) -> str:
    from pipeline.review.dashboard import fmt_usd

    return fmt_usd(x)


def test_build_estimate_samples_large_plans_and_never_writes(tmp_path: Path) -> None:
    entries = [IndexEntry(f"train/{i:04d}.jpg", tmp_path / f"{i:04d}.jpg", position=i) for i in range(30)]
    out = tmp_path / "out"
    out.mkdir()
    torn = to_bytes([caption_row(entries[0].image_id)]) + b'train/0001.jpg,"half a row'
    (out / CAPTIONS_ALL).write_bytes(torn)
    reads: list[Path] = []

    def size_of(path: Path) -> tuple[int, int]:
        reads.append(path)
        return (64, 128)

    kw = dict(detail="low", max_tokens=300, captions_per_image=1, sample_size=10, seed=7, size_of=size_of)
    e = build_estimate(entries, [Prompt("base", PROMPT)], out, MINI, **kw)  # type: ignore[arg-type]
    again = build_estimate(entries, [Prompt("base", PROMPT)], out, MINI, **kw)  # type: ignore[arg-type]
    assert e == again  # seeded
    assert e.sampled and e.items_seen == 10 and e.requests == 29 and e.items_left == 29
    assert e.image_tokens == 29 * 2833
    assert len(reads) == 20  # 10 per call, header reads only for the sample
    assert any("sample of 10" in n for n in e.notes)
    assert (out / CAPTIONS_ALL).read_bytes() == torn
    assert sorted(p.name for p in out.iterdir()) == [CAPTIONS_ALL]

    console = Console(record=True, width=200, force_terminal=True, file=io.StringIO())
    render_estimate(e, console)
    assert "(sample of 10)" in console.export_text()


def to_bytes(rows: list[CaptionRow]) -> bytes:
    from pipeline.ledger.outputs import to_csv_text

    return ("\ufeff" + to_csv_text([CAPTION_COLUMNS] + [caption_record(r) for r in rows])).encode("utf-8")


def test_structured_prompts_ask_one_answer_and_count_their_schema(tmp_path: Path) -> None:
    entries = [IndexEntry("a.jpg", tmp_path / "a.jpg")]
    schema = {"type": "object", "properties": {"gender": {"type": "string"}}, "required": ["gender"],
              "additionalProperties": False}
    kw = dict(detail="low", max_tokens=300, captions_per_image=4, size_of=lambda p: (64, 128))
    plain = build_estimate(entries, [Prompt("attrs", PROMPT)], tmp_path / "none", MINI, **kw)  # type: ignore[arg-type]
    structured = build_estimate(entries, [Prompt("attrs", PROMPT, schema=schema)], tmp_path / "none", MINI, **kw)  # type: ignore[arg-type]
    assert plain.items_left == 4 and structured.items_left == 1
    assert structured.text_tokens > plain.text_tokens


def test_expected_output_tokens_measured_from_20_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rows = [caption_row(f"{i}.jpg", completion=40 + (i % 2) * 10) for i in range(19)]
    write_csv_atomic(out / CAPTIONS_ALL, CAPTION_COLUMNS, [caption_record(r) for r in rows])
    assert measured_output_tokens(out)[0] == DEFAULT_OUTPUT_TOKENS
    rows.append(caption_row("19.jpg", completion=50))
    rows.append(caption_row("zero.jpg", completion=0))  # an offline row says nothing about length
    write_csv_atomic(out / CAPTIONS_ALL, CAPTION_COLUMNS, [caption_record(r) for r in rows])
    tokens, source = measured_output_tokens(out)
    assert tokens == 45 and "mean of 20 captions" in source


def test_price_source_text() -> None:
    table = PricingTable(taken_on="2026-11-25", models={}, source=Path("config/pricing.toml"))
    assert describe_price_source(table) == f"{Path('config/pricing.toml')}, taken on 2026-11-25"
    bundled = PricingTable(taken_on="2026-11-25", models={}, source=None)
    assert describe_price_source(bundled) == "the bundled pricing.toml, taken on 2026-11-25"
    assert "command line" in describe_price_source(table, overridden=True)


def test_unknown_price_is_flagged(tmp_path: Path) -> None:
    guess = ModelPrice("my-local-model", 0.0, 0.0, 0.0, MINI.image_rule, known=False)
    e = build_estimate([IndexEntry("a.jpg", tmp_path / "a.jpg")], [Prompt("base", PROMPT)], tmp_path, guess,
                       detail="low", max_tokens=300, captions_per_image=1, size_of=lambda p: (64, 128))
    assert e.cost_total == 0.0 and any("price unknown" in n for n in e.notes)


def test_estimate_never_reads_the_config() -> None:
    source = inspect.getsource(estimate_mod)
    assert "api_key" not in source and "pipeline.config" not in source


def test_estimate_for_run_reads_only_what_it_needs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.review.estimate import estimate_for_run

    entries = make_images(tmp_path / "img", [(64, 128)])
    cfg = SimpleNamespace(  # a stand-in for RunConfig: no api_key attribute to read
        out=tmp_path / "out",
        model=SimpleNamespace(backend="openai", provider="openai", detail="low", max_tokens=300,
                              captions_per_image=2, model="gpt-4o-mini", base_url=None),
        limits=SimpleNamespace(max_cost=None),
        prices=SimpleNamespace(price_in=None, price_out=None, price_cached_in=None, pricing_file=None),
    )
    prep = SimpleNamespace(cfg=cfg, index=SimpleNamespace(entries=entries), prompts=[Prompt("base", PROMPT)], price=MINI,
                           previous_manifest=None)
    e = estimate_for_run(prep)
    assert (e.requests, e.items_left, e.image_tokens) == (1, 2, 2833)
    assert e.price_source and "taken on" in e.price_source
    cfg.prices.price_in = 1.0
    assert "command line" in (estimate_for_run(prep).price_source or "")
