"""Token estimates: text by character class, images by OpenAI's published tile and patch rules."""

from __future__ import annotations

import pytest

from pipeline.providers.tokens import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    TILE_4O,
    Estimate,
    ImageRule,
    estimate_request,
    image_tokens,
    text_tokens,
)

TILE_4O_MINI = ImageRule("tile", base=2833, per_tile=5667)
PATCH_41_MINI = ImageRule("patch", multiplier=1.62)
PATCH_41_NANO = ImageRule("patch", multiplier=2.46)
PATCH_O4_MINI = ImageRule("patch", multiplier=1.72)
PATCH_1 = ImageRule("patch", multiplier=1.0)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("Describe the person in the image.", 9),  # 33 chars
        ("x" * 400, 100),
        ("穿红色上衣的女人", 8),  # one per CJK character
        ("赤いシャツ", 5),  # kanji + kana
        ("빨간 셔츠", 5),  # 4 Hangul + 1 space -> 4 + ceil(1/4)
        ("red 红色", 3),  # 2 CJK + ceil(4/4)
    ],
)
def test_text_tokens(text, tokens):
    assert text_tokens(text) == tokens


@pytest.mark.parametrize(
    ("rule", "w", "h", "detail", "tokens"),
    [
        # the reference's 64x128 crop
        (TILE_4O, 64, 128, "low", 85),
        (TILE_4O, 64, 128, "high", 255),
        (TILE_4O_MINI, 64, 128, "low", 2833),
        (TILE_4O_MINI, 64, 128, "high", 8500),
        (PATCH_41_MINI, 64, 128, "low", 13),  # 2x4 patches x 1.62 = 12.96
        (PATCH_41_MINI, 64, 128, "high", 13),  # detail has no effect on patch models
        (PATCH_41_NANO, 64, 128, "low", 20),  # 8 x 2.46 = 19.68
        (PATCH_O4_MINI, 64, 128, "auto", 14),  # 8 x 1.72 = 13.76
        # auto is counted as high (documented choice: reservations err high)
        (TILE_4O, 64, 128, "auto", 255),
        (TILE_4O, 64, 128, "AUTO", 255),
        (TILE_4O, 64, 128, "Low", 85),
        # OpenAI's worked examples for tile models
        (TILE_4O, 1024, 1024, "high", 765),  # -> 768x768, 4 tiles
        (TILE_4O, 2048, 4096, "high", 1105),  # -> 1024x2048 -> 768x1536, 6 tiles
        (TILE_4O, 4096, 8192, "low", 85),
        (TILE_4O, 512, 512, "high", 255),
        (TILE_4O, 513, 512, "high", 425),  # one pixel over: two tiles
        (TILE_4O, 300, 5000, "high", 85 + 170 * 4),  # -> 122x2048 (short side < 768: no upscale), 1x4 tiles
        (TILE_4O_MINI, 1024, 1024, "high", 2833 + 5667 * 4),
        # OpenAI's worked examples for patch models (multiplier 1)
        (PATCH_1, 1024, 1024, "low", 1024),
        (PATCH_1, 1800, 2400, "low", 1452),  # scaled below the 1536-patch cap
        (PATCH_1, 10_000, 10_000, "low", 1521),  # -> 1248x1248, 39x39 patches
        (PATCH_1, 1, 1, "low", 1),
        (PATCH_41_MINI, 1800, 2400, "low", 2353),  # ceil(1452 x 1.62 = 2352.24)
        (ImageRule("patch", multiplier=1.62, patch_cap=100), 1000, 1000, "low", 162),
    ],
)
def test_image_tokens(rule, w, h, detail, tokens):
    assert image_tokens(rule, w, h, detail) == tokens


@pytest.mark.parametrize("w,h", [(0, 10), (10, 0), (-1, 5)])
def test_image_tokens_rejects_empty_images(w, h):
    with pytest.raises(ValueError):
        image_tokens(TILE_4O, w, h, "low")


def test_patch_count_never_exceeds_the_cap():
    for w, h in [(1500, 1500), (4000, 3000), (33, 20000), (20000, 33), (1260, 1260)]:
        assert image_tokens(PATCH_1, w, h, "low") <= 1536


PROMPT = "Describe the person: clothing colours, bag, hair."  # 49 chars -> 13 tokens


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # reservation: output is max_tokens x n
        (dict(max_tokens=300), Estimate(MESSAGE_OVERHEAD_TOKENS + 13 + 85, 300, 300)),
        (dict(max_tokens=300, n=4), Estimate(MESSAGE_OVERHEAD_TOKENS + 13 + 85, 1200, 1200)),
        # forecast: output is the expected length x n; the reservation still counts max_tokens
        (dict(max_tokens=300, n=2, expected_output_tokens=60), Estimate(MESSAGE_OVERHEAD_TOKENS + 13 + 85, 120, 600)),
        # expected above max_tokens cannot happen: capped
        (dict(max_tokens=50, expected_output_tokens=60), Estimate(MESSAGE_OVERHEAD_TOKENS + 13 + 85, 50, 50)),
        (dict(max_tokens=None), Estimate(MESSAGE_OVERHEAD_TOKENS + 13 + 85, DEFAULT_MAX_OUTPUT_TOKENS,
                                         DEFAULT_MAX_OUTPUT_TOKENS)),
        (dict(max_tokens=300, n=0), Estimate(MESSAGE_OVERHEAD_TOKENS + 13 + 85, 300, 300)),
    ],
)
def test_estimate_request(kwargs, expected):
    got = estimate_request(TILE_4O, PROMPT, 64, 128, "low", **kwargs)
    assert got == expected


def test_reserve_tokens_is_input_plus_max_tokens_times_n():
    est = estimate_request(TILE_4O_MINI, PROMPT, 64, 128, "low", 300, n=2, expected_output_tokens=40)
    assert est.reserve_tokens == est.input_tokens + 600
    assert est.total_tokens == est.input_tokens + 80
    assert est.input_tokens == MESSAGE_OVERHEAD_TOKENS + 13 + 2833
