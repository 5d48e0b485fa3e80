"""Load one image and turn it into what the API is sent.

The file's own bytes are sent whenever the API takes its format as it is (JPEG, PNG, WEBP, non-animated
GIF) and it is under the size cap: no quality lost, no CPU spent re-encoding. Anything else (BMP, TIFF,
animated GIF, an oversize file) is re-encoded once, losslessly to PNG where the size allows.

Every image is fully decoded once before it is sent (`Image.load()`), because a truncated JPEG opens and
reports its size happily and only fails when decoded; sending it would waste a paid request on an answer
about a grey half-image.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.providers.base import ImagePayload
from pipeline.errors import ImageError

# The formats the API accepts as they are, with the MIME type it expects.
API_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
API_MAX_BYTES = 20 * 1024 * 1024  # OpenAI's per-image cap for vision input
MAX_SIDE_REENCODE = 2048  # an over-cap image is scaled to this before re-encoding (the API would anyway)

# Pillow warns (DecompressionBombWarning) for images between 89 and 179 megapixels and refuses larger ones
# (DecompressionBombError -> `too_large` in errors.csv). The warning would print a raw Python warning line
# into the dashboard from a worker thread; such an image is decoded once and scaled down before sending,
# so the warning tells the user nothing they need. Installed once, for this category only.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class DecodedImage:
    """What the checks found: the bytes to send, their format and the pixel size."""

    data: bytes
    fmt: str
    width: int
    height: int
    animated: bool


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError("missing", f"no such file: {path}") from None
    except IsADirectoryError:
        raise ImageError("unreadable", f"is a folder: {path}") from None
    except PermissionError:
        raise ImageError("unreadable", f"permission denied: {path}") from None
    except OSError as exc:
        raise ImageError("unreadable", f"{exc.strerror or exc}: {path}") from None


def decode(data: bytes) -> DecodedImage:
    """Check that `data` is a whole image Pillow can decode; raise ImageError(reason) otherwise."""
    if not data:
        raise ImageError("empty_file", "the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            animated = bool(getattr(im, "is_animated", False))
            width, height = im.size
            im.load()
    except UnidentifiedImageError:
        raise ImageError("not_image", "not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc).splitlines()[0]) from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise ImageError(reason, msg) from None
    if width < 1 or height < 1:
        raise ImageError("corrupt", f"image has no pixels ({width}x{height})")
    return DecodedImage(data=data, fmt=fmt, width=width, height=height, animated=animated)


def needs_reencode(img: DecodedImage) -> bool:
    if img.fmt not in API_FORMATS:
        return True
    if img.fmt == "GIF" and img.animated:
        return True
    return len(img.data) > API_MAX_BYTES


def reencode(img: DecodedImage) -> tuple[bytes, str, int, int]:
    """Re-encode to PNG (lossless); an oversize image is first scaled to fit MAX_SIDE_REENCODE."""
    with Image.open(io.BytesIO(img.data)) as im:
        im.seek(0)
        frame = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
    if len(img.data) > API_MAX_BYTES and max(frame.size) > MAX_SIDE_REENCODE:
        frame.thumbnail((MAX_SIDE_REENCODE, MAX_SIDE_REENCODE))
    buf = io.BytesIO()
    frame.save(buf, format="PNG", optimize=False)
    data = buf.getvalue()
    if len(data) > API_MAX_BYTES:  # a huge photo: PNG is still too big, fall back to high-quality JPEG
        buf = io.BytesIO()
        frame.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "image/jpeg", frame.width, frame.height
    return data, "image/png", frame.width, frame.height


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def prepare_payload(path: Path) -> ImagePayload:
    """Read, check and encode one image for the API. Raises ImageError with a reason for errors.csv."""
    return payload_from_bytes(read_bytes(path))


def payload_from_bytes(data: bytes) -> ImagePayload:
    img = decode(data)
    if needs_reencode(img):
        data, mime, w, h = reencode(img)
        return ImagePayload(data_url(data, mime), mime, w, h, len(data), reencoded=True)
    mime = API_FORMATS[img.fmt]
    return ImagePayload(data_url(img.data, mime), mime, img.width, img.height, len(img.data))


def open_rgb(path: Path) -> Image.Image:
    """Decode to RGB for pixel-based work (the offline backend)."""
    img = decode(read_bytes(path))
    with Image.open(io.BytesIO(img.data)) as im:
        im.seek(0)
        return im.convert("RGB")
