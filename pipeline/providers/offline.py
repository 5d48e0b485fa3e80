"""Caption from the pixels alone, with no network and no key: the classic colour-attribute baseline.

It names the dominant colour of the upper body and of the lower body, the two attributes every ReID
attribute set has (Market-1501, DukeMTMC-reID), so a newcomer can rehearse prepare -> run -> resume ->
export before spending anything. It says nothing it cannot see.
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter

from PIL import Image

from pipeline.providers.base import APIFailure, ErrorKind, ModelReply, ModelRequest
from pipeline.providers.refusals import clean_text, is_empty
from pipeline.records import Usage

# Market-1501 / DukeMTMC-reID colour names with a representative RGB value each.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "red": (200, 30, 30),
    "pink": (240, 150, 180),
    "purple": (120, 40, 150),
    "yellow": (230, 210, 40),
    "green": (40, 150, 50),
    "blue": (40, 70, 190),
    "brown": (120, 75, 35),
}

# Regions of a pedestrian crop, as fractions of the height (head above, feet below) and width.
UPPER_ROWS = (0.22, 0.50)
LOWER_ROWS = (0.55, 0.85)
BODY_COLS = (0.25, 0.75)


def nearest_colour(rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    return min(COLOURS, key=lambda n: (COLOURS[n][0] - r) ** 2 + (COLOURS[n][1] - g) ** 2 + (COLOURS[n][2] - b) ** 2)


def dominant_colour(img: Image.Image, rows: tuple[float, float], cols: tuple[float, float] = BODY_COLS) -> str:
    """The most frequent colour name in a region, leaving out pixels close to the background.

    The background is measured (the crop's side borders) rather than named, so a pale wall is not
    mistaken for a white shirt, while a white shirt on a dark street still counts.
    """
    w, h = img.size
    box = (int(cols[0] * w), int(rows[0] * h), max(int(cols[0] * w) + 1, int(cols[1] * w)),
           max(int(rows[0] * h) + 1, int(rows[1] * h)))
    raw = img.crop(box).resize((16, 16)).tobytes()  # RGB bytes: portable across Pillow versions
    pixels = list(zip(raw[0::3], raw[1::3], raw[2::3]))
    bg = _background_rgb(img)
    person = [p for p in pixels if _dist2(p, bg) > BACKGROUND_DIST2] or pixels
    return Counter(nearest_colour(p) for p in person).most_common(1)[0][0]


BACKGROUND_DIST2 = 35**2


def _dist2(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 + (a[2] - b[2]) ** 2


def _background_rgb(img: Image.Image) -> tuple[int, int, int]:
    """Median colour of the crop's left and right borders, where the person rarely is."""
    w, h = img.size
    strip = [img.getpixel((x, y)) for y in range(0, h, max(1, h // 32)) for x in (0, 1, w - 2, w - 1)]
    return tuple(sorted(c[i] for c in strip)[len(strip) // 2] for i in range(3))  # type: ignore[return-value]


def describe(img: Image.Image) -> str:
    upper = dominant_colour(img, UPPER_ROWS)
    lower = dominant_colour(img, LOWER_ROWS)
    return f"A person wearing {_article(upper)} {upper} upper garment and {upper_or_same(upper, lower)} lower garment."


def upper_or_same(upper: str, lower: str) -> str:
    return f"a matching {lower}" if lower == upper else f"{_article(lower)} {lower}"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def decode_data_url(url: str) -> Image.Image:
    b64 = url.split(",", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        im.seek(0)
        return im.convert("RGB")


class OfflineBackend:
    """Backend protocol implementation that never touches the network."""

    name = "offline"
    model = "offline-colour-baseline"

    async def caption(self, request: ModelRequest) -> ModelReply:
        t0 = time.perf_counter()
        text = clean_text(describe(decode_data_url(request.image.data_url))).strip()
        if is_empty(text):  # the same rule as a server's answer: no letters or digits is no caption
            raise APIFailure(ErrorKind.EMPTY, "no letters or digits in the answer", usage=Usage(), model=self.model)
        return ModelReply(
            texts=[text] * max(1, request.n),
            usage=Usage(),
            model=self.model,
            latency_s=time.perf_counter() - t0,
        )

    async def reachable(self) -> bool:
        """There is no server to lose."""
        return True

    async def aclose(self) -> None:
        return None
