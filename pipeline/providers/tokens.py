"""Token estimates for rate-limit reservations and cost forecasts, without tiktoken.

The limiter must reserve tokens *before* a request is sent (OpenAI counts input + max_tokens up front),
and the dry run forecasts cost before anything is sent. Exact text tokenisation is not worth a
dependency here: the prompt is a few hundred characters, the image dominates, and every answer's real
usage comes back and settles the reservation (`RateLimiter.correct`). So text is estimated by character
class, images by each model family's published rule: OpenAI's tiles and patches, Qwen-VL's 28/32-px
patches after `smart_resize`, Gemini's 258-token tiles. Where each rule comes from is said in the pricing
file (pipeline/bundled/pricing.toml) next to the models that use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ImageRule",
    "TILE_4O",
    "QWEN_VL_28",
    "QWEN_VL_32",
    "GEMINI",
    "Estimate",
    "MESSAGE_OVERHEAD_TOKENS",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "text_tokens",
    "image_tokens",
    "qwen_resize",
    "gemini_tiles",
    "estimate_request",
]

# Chat framing: role markers and separators of the system/user message plus the reply's priming tokens.
MESSAGE_OVERHEAD_TOKENS = 7
# What we assume a request with max_tokens=None may produce; only used for reservations and forecasts.
DEFAULT_MAX_OUTPUT_TOKENS = 4096

_CHARS_PER_TOKEN = 4  # Latin-script English averages about four characters per token in OpenAI tokenizers


@dataclass(frozen=True)
class ImageRule:
    """How a model counts an image's input tokens.

    - "tile" (gpt-4o, gpt-4.1, gpt-4o-mini): `base` for detail=low; `base + per_tile x tiles` for high,
      with 512-px tiles counted after fitting in 2048x2048 and scaling the short side down to 768.
    - "patch" (gpt-4.1-mini, gpt-4.1-nano, o4-mini): 32-px patches, at most `patch_cap` (the image is
      scaled down to fit), times `multiplier`; `detail` has no effect.
    - "qwen" (Qwen-VL on DashScope, vLLM, ...): Qwen2-VL's `smart_resize` to multiples of `patch_px`
      (28 for Qwen2/2.5-VL, 32 for Qwen3-VL) with between `min_tokens` and `max_tokens` patches, one token
      per patch plus `base` (2: the vision start/end markers); `detail` has no effect.
    - "gemini" (Gemini 2.x): `base` (258) when both sides are at most 384 px, else `per_tile` (258) per
      tile, the tile side being the short side / 1.5 kept within 256..768 px; `detail` has no effect.
    """

    kind: Literal["tile", "patch", "qwen", "gemini"]
    base: int = 0
    per_tile: int = 0
    multiplier: float = 1.0
    patch_cap: int = 1536
    patch_px: int = 28  # qwen: pixels per token along each side
    min_tokens: int = 4  # qwen: min_pixels = min_tokens x patch_px^2
    max_tokens: int = 1280  # qwen: max_pixels = max_tokens x patch_px^2 (DashScope's default cap)


TILE_4O = ImageRule("tile", base=85, per_tile=170)  # gpt-4o's rule; the fallback for unknown models
# Qwen2/2.5-VL (and the older qwen-vl-plus/max snapshots): 28-px patches, 4..1280 of them, +2.
QWEN_VL_28 = ImageRule("qwen", base=2, patch_px=28, min_tokens=4, max_tokens=1280)
# Qwen3-VL (and qwen-vl-plus-2025-07-10/-08-15, qwen-vl-max-2025-08-13): 32-px patches, +2. The 2,560
# cap is DashScope's default as we read it (see pricing.toml); vLLM's own default is higher.
QWEN_VL_32 = ImageRule("qwen", base=2, patch_px=32, min_tokens=4, max_tokens=2560)
GEMINI = ImageRule("gemini", base=258, per_tile=258)

GEMINI_SMALL_PX = 384  # both sides at most this: one flat `base`
GEMINI_TILE_MIN_PX, GEMINI_TILE_MAX_PX = 256, 768  # the crop unit is kept within these


def _is_wide(cp: int) -> bool:
    """CJK ideographs, kana, Hangul and full-width forms: about one token per character."""
    return (
        0x3040 <= cp <= 0x30FF  # hiragana, katakana
        or 0x3400 <= cp <= 0x4DBF  # CJK extension A
        or 0x4E00 <= cp <= 0x9FFF  # CJK unified ideographs
        or 0xAC00 <= cp <= 0xD7AF  # Hangul syllables
        or 0xF900 <= cp <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF00 <= cp <= 0xFFEF  # half/full-width forms
        or 0x20000 <= cp <= 0x2FA1F  # CJK extensions B..
    )


def text_tokens(text: str) -> int:
    """Estimated tokens of `text`: one per CJK character, one per ~4 other characters, at least 1 if non-empty."""
    if not text:
        return 0
    wide = 0
    for ch in text:
        if ord(ch) >= 0x3040 and _is_wide(ord(ch)):
            wide += 1
    narrow = len(text) - wide
    return max(1, wide + math.ceil(narrow / _CHARS_PER_TOKEN))


def _tile_count(width: int, height: int) -> int:
    w, h = float(width), float(height)
    if max(w, h) > 2048:  # fit within a 2048 x 2048 square
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:  # then scale down so the shortest side is 768 (never up)
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    w, h = math.floor(w + 1e-9), math.floor(h + 1e-9)
    return math.ceil(w / 512) * math.ceil(h / 512)


def _patch_count(width: int, height: int, cap: int) -> int:
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches <= cap:
        return patches
    # OpenAI's rule: shrink so the image fits in `cap` patches, then shrink a little more so the
    # limiting side is a whole number of patches.
    r = math.sqrt(32 * 32 * cap / (width * height))
    r *= min(math.floor(width * r / 32) / (width * r / 32), math.floor(height * r / 32) / (height * r / 32))
    scaled = math.ceil(math.floor(width * r) / 32) * math.ceil(math.floor(height * r) / 32)
    return min(scaled, cap)


def qwen_resize(
    width: int, height: int, patch_px: int = 28, min_tokens: int = 4, max_tokens: int = 1280
) -> tuple[int, int]:
    """The (width, height) Qwen-VL's `smart_resize` gives an image: each side rounded to a multiple of
    `patch_px`; above max_pixels both are scaled down by sqrt(area / max_pixels) and floored, below
    min_pixels scaled up and ceiled (qwen_vl_utils.vision_process.smart_resize, which DashScope documents
    as its own rule). Python's round() on purpose: it is what the reference code uses (ties to even).
    """
    f = patch_px
    min_pixels, max_pixels = min_tokens * f * f, max_tokens * f * f
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return w_bar, h_bar


def gemini_tiles(width: int, height: int) -> int:
    """How many 258-token tiles Gemini 2.x counts for an image (1 for one with both sides <= 384 px).

    Google's rule: larger images are cropped into tiles whose side is the shorter side / 1.5, kept within
    256..768 px, each tile then scaled to 768x768.
    """
    if width <= GEMINI_SMALL_PX and height <= GEMINI_SMALL_PX:
        return 1
    unit = min(max(min(width, height) / 1.5, GEMINI_TILE_MIN_PX), GEMINI_TILE_MAX_PX)
    return math.ceil(width / unit - 1e-9) * math.ceil(height / unit - 1e-9)


def image_tokens(rule: ImageRule, width: int, height: int, detail: str) -> int:
    """Input tokens one image costs under `rule` (see ImageRule).

    detail="auto" is counted as "high": OpenAI does not publish how auto chooses, and for a reservation an
    overestimate only delays a request slightly (the surplus is given back by `correct`), while an
    underestimate earns a 429. Unknown detail values are treated like "auto".
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if rule.kind == "qwen":
        w, h = qwen_resize(width, height, rule.patch_px, rule.min_tokens, rule.max_tokens)
        return (w // rule.patch_px) * (h // rule.patch_px) + rule.base
    if rule.kind == "gemini":
        if width <= GEMINI_SMALL_PX and height <= GEMINI_SMALL_PX:
            return rule.base
        return rule.per_tile * gemini_tiles(width, height)
    if rule.kind == "patch":
        patches = _patch_count(width, height, rule.patch_cap)
        # round() first: 100 x 1.62 is 162.00000000000003 in floating point and must not become 163.
        return max(1, math.ceil(round(patches * rule.multiplier, 6)))
    if (detail or "").strip().lower() == "low":
        return rule.base
    return rule.base + rule.per_tile * _tile_count(width, height)


@dataclass(frozen=True)
class Estimate:
    """Tokens of one request.

    `output_tokens` is the figure asked for (max_tokens x n for reservations, expected x n for cost
    forecasts); `max_output_tokens` is always max_tokens x n, because that is what the server reserves.
    """

    input_tokens: int
    output_tokens: int
    max_output_tokens: int = 0

    @property
    def reserve_tokens(self) -> int:
        """What OpenAI's tpm counts up front: input + max_tokens x n. Pass this to RateLimiter.acquire."""
        return self.input_tokens + max(self.max_output_tokens, self.output_tokens)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def estimate_request(
    rule: ImageRule,
    prompt_text: str,
    width: int,
    height: int,
    detail: str,
    max_tokens: int | None,
    n: int = 1,
    expected_output_tokens: int | None = None,
) -> Estimate:
    """Estimate one captioning request: prompt + one image + framing in, `n` choices out.

    The input is billed once however many choices are asked for; output is per choice.
    """
    choices = max(1, n)
    ceiling = DEFAULT_MAX_OUTPUT_TOKENS if max_tokens is None else max(0, max_tokens)
    input_tokens = MESSAGE_OVERHEAD_TOKENS + text_tokens(prompt_text) + image_tokens(rule, width, height, detail)
    per_choice = ceiling if expected_output_tokens is None else min(max(0, expected_output_tokens), ceiling)
    return Estimate(input_tokens, per_choice * choices, ceiling * choices)
