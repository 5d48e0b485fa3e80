"""Plain records that flow between the pipeline's stages.

Kept free of I/O so that every stage (index, worker, writer, exports, views) agrees on one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One image of the index.

    `image_id` is the path relative to the dataset root with `/` separators and its extension, so it is
    unique and identical on Windows and Linux. `position` is its place in the index (0-based); the part
    file of an image is `position // batch_size`.
    """

    image_id: str
    path: Path
    pid: int | None = None
    camid: int | None = None
    split: str | None = None
    position: int = 0
    junk: bool = False


@dataclass(frozen=True)
class Prompt:
    """A named prompt. `name` is the prompt file's stem; `text` may hold a `{template}` slot."""

    name: str
    text: str
    templates: tuple[str, ...] = ()
    schema: dict | None = None  # JSON schema for structured (attribute) prompts
    path: Path | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class CaptionRow:
    """One caption of one image under one prompt: a row of captions_all.csv and of its part file."""

    image_id: str
    prompt: str
    caption: str
    timestamp: str
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    prompt_name: str = "base"
    caption_index: int = 0
    attempts: int = 1
    latency_s: float = 0.0
    position: int = 0  # index position, for the part file; not a CSV column

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.image_id, self.prompt_name, self.caption_index)


@dataclass
class ErrorRow:
    """An image (or one caption slot of it) that could not be captioned in this run: a row of errors.csv."""

    image_id: str
    reason: str
    detail: str
    attempts: int
    timestamp: str
    prompt_name: str = "base"
    caption_index: int = 0
    position: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.image_id, self.prompt_name, self.caption_index)


@dataclass
class AttributeRow:
    """A validated structured answer: a row of attributes.csv (one column per schema field)."""

    image_id: str
    prompt_name: str
    fields: dict[str, object] = field(default_factory=dict)
    timestamp: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    caption_index: int = 0
    position: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.image_id, self.prompt_name, self.caption_index)
