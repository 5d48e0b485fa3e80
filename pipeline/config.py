"""The options of a run, grouped, so no function takes forty arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    """What is asked of the model and how."""

    backend: str = "openai"  # "openai" | "offline"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    # --provider (pipeline.providers.presets): its key variable, prices and, unless --base-url, endpoint
    provider: str = "openai"
    api_version: str | None = None  # Azure only: the api-version query parameter
    detail: str = "low"  # low | high | auto
    max_tokens: int = 300
    temperature: float | None = None
    captions_per_image: int = 1
    timeout: float = 60.0  # seconds per request; a hung call is abandoned and retried
    http_client: str = "aiohttp"  # SDK transport: aiohttp (default, cheaper per request) | httpx


@dataclass
class LimitConfig:
    """How hard to drive the API."""

    concurrency: int = 16
    rpm: float | None = None  # requests per minute; None = learn from headers, else --concurrency alone
    tpm: float | None = None  # tokens per minute
    max_attempts: int = 6
    max_cost: float | None = None  # USD budget for this output folder
    grace_seconds: float = 15.0  # after Ctrl-C: how long answers in flight may still arrive
    hold_retry_s: float = 3.0  # an output file cannot be written: seconds between retries
    hold_final_s: float = 30.0  # ... and once the run has ended: how long to retry before the pending file
    outage_timeout: float = 300.0  # seconds the server may stay unreachable mid-run before the run stops
    adaptive: bool = True  # without --rpm/--tpm or rate-limit headers, --concurrency is a ceiling (run.adaptive)
    hedge: bool = True  # --no-hedge: no second request for a straggler near the end of the work (run.tail)


@dataclass
class PriceConfig:
    """USD per million tokens; None = take from the pricing file for the model.

    `pricing_file`: --pricing; None = $REID_PROMPT_PRICING, ./config/pricing.toml or the bundled file
    (`pipeline.providers.pricing.choose_pricing_file`)."""

    price_in: float | None = None
    price_cached_in: float | None = None
    price_out: float | None = None
    pricing_file: Path | None = None


@dataclass(frozen=True)
class SubsetConfig:
    """Which images of the index a run works on (pipeline.run.sample): all, the first `limit`, or a
    `sample` spread across persons and cameras chosen by `seed`. Positions and resume stay the index's."""

    limit: int | None = None
    sample: int | None = None
    seed: int = 0


MAX_CONCURRENCY = 1024  # more requests in flight help no server or rate limit: the CLI caps --concurrency with a note

BATCH_MAX_REQUESTS = 50_000  # OpenAI's limit of lines per batch input file
BATCH_MAX_BYTES = 199_000_000  # just under OpenAI's 200 MB per input file (base64 images counted)


@dataclass
class BatchConfig:
    """`run --mode batch`: the work goes through the Batch API (`pipeline.batch`) instead of one request
    per call. The default is online mode, so a run that says nothing of batches is unchanged.

    Shards (one input file, one batch each) hold at most `max_requests` lines, `max_bytes` bytes of JSONL
    and, when set, `max_tokens` estimated input tokens (the enqueued-token limit of an account's tier).
    `files_only`: write the JSONL shards to this folder for another server (`vllm run-batch`) and send
    nothing. `no_wait`: submit and exit; `keep_files`: leave the provider's input/output files in place;
    `poll_max_s`: the longest pause between two looks at a batch in flight."""

    mode: str = "online"  # "online" | "batch"
    max_requests: int = BATCH_MAX_REQUESTS
    max_bytes: int = BATCH_MAX_BYTES
    max_tokens: int | None = None
    files_only: Path | None = None
    no_wait: bool = False
    keep_files: bool = False
    poll_max_s: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.mode == "batch"


@dataclass
class RunConfig:
    index: Path
    out: Path
    root: Path | None = None  # image root for a plain list of paths
    prompt_files: list[Path] = field(default_factory=list)
    prompts_dir: Path | None = None
    batch_size: int = 20  # images per part file, as the seed's scripts had it
    model: ModelConfig = field(default_factory=ModelConfig)
    limits: LimitConfig = field(default_factory=LimitConfig)
    prices: PriceConfig = field(default_factory=PriceConfig)
    dashboard: bool = True
    dry_run: bool = False
    follow_symlinks: bool = False  # images that are symlinks out of the root are refused unless set
    allow_changes: bool = False  # rerun with other inputs: keep the old rows as done, record the change
    redo: Path | None = None  # --redo review.csv: its rejected captions are asked again (pipeline.ledger.redo)
    excel: bool = False  # new output folders' CSV files start with a BOM (Excel); a folder keeps its own
    progress_every: float = 5.0  # seconds between plain progress lines
    subset: SubsetConfig = field(default_factory=SubsetConfig)  # --limit / --sample
    batch: BatchConfig = field(default_factory=BatchConfig)  # --mode batch and its options
    api_key: str | None = field(default=None, repr=False)  # never printed, never written

    def __repr__(self) -> str:  # belt and braces: the key never reaches a log through repr()
        return (
            f"RunConfig(index={self.index!s}, out={self.out!s}, model={self.model.model!r}, "
            f"backend={self.model.backend!r}, batch_size={self.batch_size})"
        )
