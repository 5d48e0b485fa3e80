"""One job -> one JSONL request line of a batch input file, exactly the request online mode sends.

A batch must ask what an online run asks (same prompt text and template, same image bytes, `n`, detail,
max_tokens, temperature, the structured prompt's `response_format`), or batch and online rows in one
folder would not be alike. So the body is built by the same functions: `render_prompt` for the text,
`request_format` for a structured prompt (json_schema mode unless the folder learned another), the
image as `pipeline.data.images` loads and checks it, and `pipeline.providers.openai.build_request`.

    {"custom_id": "rp1/base/0/0002_c1s1_000451_03.jpg", "method": "POST",
     "url": "/v1/chat/completions", "body": {"model": ..., "messages": [...], "max_tokens": 300}}

This is OpenAI's batch input format, which `vllm run-batch` reads too. Token estimates (for the
enqueued-token limit and the budget) are `pipeline.providers.tokens.estimate_request`'s, as online.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Container, Iterable, Iterator, Sequence

from pipeline.batch.ids import make_custom_id
from pipeline.data.images import prepare_payload
from pipeline.data.prompts import billed_text, render_prompt
from pipeline.errors import ImageError
from pipeline.providers.base import ImagePayload, ModelRequest
from pipeline.providers.openai import build_request
from pipeline.providers.pricing import ModelPrice, cost_usd
from pipeline.providers.tokens import ImageRule, estimate_request, text_tokens
from pipeline.records import IndexEntry, Prompt, Usage
from pipeline.run.dispatch import Job, plan_jobs
from pipeline.run.fallbacks import FallbackState, FormatMode, request_format

__all__ = [
    "BATCH_URL",
    "BatchLine",
    "EitherSet",
    "LineSettings",
    "build_line",
    "job_custom_id",
    "job_lines",
    "line_cost",
    "pending_jobs",
]

BATCH_URL = "/v1/chat/completions"  # the endpoint every line (and the batch) names


@dataclass(frozen=True)
class BatchLine:
    """One request line: its id, the JSON line itself (UTF-8, ending in "\\n"), and its estimates.

    `est_output_tokens` is max_tokens x n: what a batch may at most produce (the budget counts it);
    `n` the captions it asks; `job` the work it was made from (for an errors.csv row if it is refused)."""

    custom_id: str
    data: bytes
    est_input_tokens: int
    est_output_tokens: int
    n: int = 1
    job: Job | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class LineSettings:
    """What every line of a run shares: the model options and the image-token rule of its price."""

    model: str
    detail: str
    max_tokens: int | None
    temperature: float | None
    image_rule: ImageRule
    format_mode: FormatMode = FormatMode.JSON_SCHEMA  # a structured prompt's mode (the folder may know better)

    @classmethod
    def from_config(cls, cfg, price: ModelPrice, format_mode: FormatMode = FormatMode.JSON_SCHEMA) -> "LineSettings":
        """From a `RunConfig` and the run's price (its image rule counts the image tokens)."""
        m = cfg.model
        return cls(m.model, m.detail, m.max_tokens, m.temperature, price.image_rule, format_mode)

    @classmethod
    def for_run(cls, prep) -> "LineSettings":
        """For a prepared run (`pipeline.run.runner.Prepared`): a structured prompt is asked in the mode
        an earlier run of the folder learned this server needs (same model and server), else json_schema."""
        cfg, previous = prep.cfg, prep.previous_manifest or {}
        same = previous.get("model") == cfg.model.model and previous.get("base_url") == cfg.model.base_url
        mode = FallbackState.from_learned(previous.get("learned")).mode if same else FormatMode.JSON_SCHEMA
        return cls.from_config(cfg, prep.price, mode)


def job_custom_id(job: Job) -> str:
    return make_custom_id(job.entry.image_id, job.prompt.name, tuple(job.indices))


def build_line(job: Job, settings: LineSettings, payload: ImagePayload | None = None) -> BatchLine:
    """The request line of `job`. The image is read and checked as online (`prepare_payload`) unless
    `payload` is given; an unreadable image raises `ImageError` (the caller writes its errors.csv row)."""
    if payload is None:
        payload = prepare_payload(job.entry.path)
    text = render_prompt(job.prompt, job.entry.image_id, job.indices[0])
    response_format = None
    if job.prompt.schema is not None:
        text, response_format = request_format(job.prompt, text, settings.format_mode)
    n = len(job.indices)
    request = ModelRequest(
        image_id=job.entry.image_id,
        prompt_text=text,
        image=payload,
        model=settings.model,
        detail=settings.detail,
        max_tokens=settings.max_tokens,
        n=n,
        temperature=settings.temperature,
        response_format=response_format,
    )
    cid = job_custom_id(job)
    line = {"custom_id": cid, "method": "POST", "url": BATCH_URL, "body": build_request(request)}
    data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    # estimate_request's sum (framing + text + image), the text counted once per distinct prompt text
    est = estimate_request(settings.image_rule, "", payload.width, payload.height, settings.detail,
                           settings.max_tokens, n=n)
    input_tokens = est.input_tokens + _text_tokens(billed_text(job.prompt, text))
    return BatchLine(cid, data, input_tokens, est.max_output_tokens, n, job)


@lru_cache(maxsize=512)
def _text_tokens(text: str) -> int:
    """`text_tokens`, remembered: a run sends a handful of prompt texts to every image (10 % of the time
    a line takes, counted anew for each)."""
    return text_tokens(text)


def job_lines(jobs: Iterable[Job], settings: LineSettings,
              on_image_error: Callable[[Job, ImageError], None]) -> Iterator[BatchLine]:
    """The lines of `jobs`, lazily (one image in memory at a time); a job whose image cannot be read
    goes to `on_image_error` (an errors.csv row, as online) and has no line."""
    for job in jobs:
        try:
            yield build_line(job, settings)
        except ImageError as exc:
            on_image_error(job, exc)


class EitherSet:
    """`key in done or key in covered`, without building a union of the two."""

    def __init__(self, done: Container, covered: Container) -> None:
        self.done, self.covered = done, covered

    def __contains__(self, key: object) -> bool:
        return key in self.done or key in self.covered

    def __bool__(self) -> bool:
        return True


def pending_jobs(entries: Sequence[IndexEntry], prompts: list[Prompt], captions_per_image: int,
                 done: Container, covered: Container, todo: Sequence[int] | None = None) -> Iterator[Job]:
    """The jobs a batch plans: the runner's own plan (`plan_jobs`, so online and batch never disagree on
    the work), less every caption slot that is done or already in a shard not collected yet (`covered`:
    `BatchLedger.covered_slots`). Lazy, in index order."""
    return plan_jobs(entries, prompts, captions_per_image, EitherSet(done, covered), todo)


def line_cost(price: ModelPrice, est_input_tokens: int, est_output_tokens: int) -> float:
    """USD of a line at `price` (the batch price) with every answer at max_tokens: the full estimate."""
    return cost_usd(price, Usage(prompt_tokens=est_input_tokens, completion_tokens=est_output_tokens))
