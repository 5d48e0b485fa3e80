"""Plain records that flow between the pipeline's stages.

Kept free of I/O so that every stage (index, worker, writer, exports, views) agrees on one shape.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One image of the index.

    `image_id` is the path relative to the dataset root with `/` separators and its extension, so it is
    unique and identical on Windows and Linux. An index of objects may give its own `image_id` instead
    (kept exactly as written: the user's scripts key on it). `position` is its place in the index
    (0-based); the part file of an image is `position // batch_size`. `extra` holds an index object's
    other fields (carried into the JSONL export); None when there are none, so a plain index costs no
    more memory per image. A loaded index does not hold these: `pipeline.data.index.IndexEntries` keeps
    compact arrays and makes an `IndexEntry` (with its `path`) only when one is asked for.
    """

    image_id: str
    path: Path
    pid: int | None = None
    camid: int | None = None
    split: str | None = None
    position: int = 0
    junk: bool = False
    extra: dict[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Prompt:
    """A named prompt. `name` is the prompt file's stem; `text` may hold a `{template}` slot."""

    name: str
    text: str
    templates: tuple[str, ...] = ()
    schema: dict | None = None  # JSON schema for structured (attribute) prompts
    path: Path | None = None

    @cached_property
    def fingerprint(self) -> str:
        """A short, stable hash of everything the prompt sends: text, templates and schema.

        Rows carry it (`prompt_hash`) and the manifest records it per prompt name, so an edited prompt
        file is noticed before its answers are mixed with the old ones under the same name.
        """
        h = hashlib.sha256(self.text.encode("utf-8"))
        for t in self.templates:
            h.update(b"\x00t" + t.encode("utf-8"))
        if self.schema is not None:
            h.update(b"\x00s" + json.dumps(self.schema, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()[:16]


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
    cost_usd: float | None = 0.0  # None: the model's price is unknown (written as an empty cell)
    prompt_name: str = "base"
    caption_index: int = 0
    attempts: int = 1
    latency_s: float = 0.0
    prompt_hash: str = ""  # prompts.prompt_hash of the prompt it was asked with (the manifest names it)
    position: int = 0  # index position, for the part file; not a CSV column

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.image_id, self.prompt_name, self.caption_index)


@dataclass
class ErrorRow:
    """An image (or one caption slot of it) that a run could not caption: a row of errors.csv.

    errors.csv is append-only across runs (`run_id` tells them apart): an answer that was billed but is no
    caption (refused, empty, invalid) carries its model, tokens and cost here, so the folder's total counts
    every paid answer.
    """

    image_id: str
    reason: str
    detail: str
    attempts: int
    timestamp: str
    prompt_name: str = "base"
    caption_index: int = 0
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    run_id: str = ""
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
    cost_usd: float | None = 0.0
    caption_index: int = 0
    prompt_hash: str = ""
    position: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.image_id, self.prompt_name, self.caption_index)
