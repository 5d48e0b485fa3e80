"""Command line: `python -m pipeline {prepare,run,status,export,report,compare,gallery,probe} ...`.

This is the only place errors become text and exit codes: a `ReidPromptError` prints one line
`error: ...` on stderr and exits non-zero; nothing below prints tracebacks at a user.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline import __version__
from pipeline.config import (
    BATCH_MAX_BYTES,
    BATCH_MAX_REQUESTS,
    MAX_CONCURRENCY,
    BatchConfig,
    LimitConfig,
    ModelConfig,
    PriceConfig,
    RunConfig,
    SubsetConfig,
)
from pipeline.errors import EXIT_INTERRUPTED, EXIT_MEANINGS, InputError, ReidPromptError, exit_code_for
from pipeline.providers.presets import (
    AZURE_API_VERSION,
    DEFAULT_PROVIDER,
    default_model,
    model_or_default,
    provider_names,
    resolve_api_version,
    resolve_endpoint,
)
from pipeline.run.sample import subset_flags
from pipeline.settings import (
    ConfigFile,
    DotenvLoad,
    SOURCE_ENVIRONMENT,
    Setting,
    apply_overrides,
    command_name,
    config_path_in,
    describe_settings,
    given_on_command_line,
    key_lines,
    load_config,
    load_dotenv_file,
    render_settings,
    variable_source,
)

EXIT_CODES_HELP = "exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_MEANINGS.items())
DEFAULT_BATCH_SIZE = 20  # images per part file, as the seed's scripts ask (their default answer)
DEFAULT_PROMPT = "base"  # the bundled prompt a run uses when none is given


def _number(text: str, cast: type, what: str) -> float:
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(_number(text, int, "a whole number"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = _number(text, float, "a number of seconds")
    if not (value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus the usage hint, exit 2 (its default code), and no
    abbreviations: `--mod` is not `--model`, and a typo of a prefix never becomes another flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # self.prog is the command as typed: `reid-prompt run`, `python -m pipeline run`
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse, but an unknown option's hint names the subcommand's help, where the options are."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(ns, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            self.exit(2, f"error: unrecognized arguments: {' '.join(extras)} (see `{prog} --help`)\n")
        return ns


def _whole_number(text: str) -> int:
    return int(_number(text, int, "a whole number"))


def build_parser(prog: str = "python -m pipeline") -> argparse.ArgumentParser:
    """The command line; `prog` is the command the user typed (`settings.command_name`)."""
    parser = _Parser(prog=prog, description="Caption person re-ID image sets with a vision model.")
    parser.add_argument("--version", action="version", version=f"reid-prompt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="index a dataset folder into a JSON index")
    p.add_argument("--root", required=True, type=Path, help="dataset folder (Market-1501, DukeMTMC-reID, MSMT17, CUHK03 or any folder)")
    p.add_argument("--out", required=True, type=Path, help="where to write the JSON index")
    p.add_argument("--dataset", default="auto", help="auto (default), market1501, dukemtmc, msmt17, cuhk03, folder")
    p.add_argument("--splits", default=None, help="comma-separated splits to index, e.g. train,query,gallery (default: all)")
    p.add_argument("--skip-junk", action="store_true", help="leave out Market-1501 junk (-1) and distractor (0000) images")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="index images that are symlinks to files outside the root (refused by default)")

    r = sub.add_parser("run", help="caption every image of an index (resumes what is done)",
                       description="Caption every image of an index (resumes what is done). A .env file in "
                                   "the current folder is read for OPENAI_API_KEY, OPENAI_BASE_URL and the "
                                   "providers' keys; variables already set in the environment win.",
                       epilog=EXIT_CODES_HELP)
    r.add_argument("--index", required=True, type=Path, help="index from `prepare`, a JSON list of paths, or a text file of paths")
    r.add_argument("--out", required=True, type=Path, help="output folder (captions_all.csv, parts, errors.csv, manifest.json)")
    r.add_argument("--root", type=Path, default=None, help="image root for a plain list of paths (default: the list's folder)")
    r.add_argument("--prompt-file", "--prompt_file", dest="prompt_files", action="append", type=Path, default=[],
                   help="prompt file, or the name of a bundled prompt (repeatable; the file stem names the prompt; "
                        f"default: the bundled {DEFAULT_PROMPT!r} when neither this nor --prompts is given)")
    r.add_argument("--prompts", dest="prompts_dir", type=Path, default=None, help="use every prompt in this folder")
    r.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per captions_part_NNNN.csv (default {DEFAULT_BATCH_SIZE})")
    subset = r.add_mutually_exclusive_group()
    subset.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help="only the first N images of the index (every prompt and caption of each); "
                             "a later run without --limit continues with the rest")
    subset.add_argument("--sample", type=_positive_int, default=None, metavar="N",
                        help="only N images spread across persons and cameras (the same N for the same --seed); "
                             "a later run without --sample continues with the rest")
    r.add_argument("--seed", type=_whole_number, default=0, help="which images --sample picks (default 0)")
    r.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML file of run options (keys: the long option names, e.g. model = \"qwen-vl-plus\"); "
                        "options on the command line override it")
    r.add_argument("--print-config", action="store_true",
                   help="print every option that would be used and where it came from, then exit 0 without running")
    r.add_argument("--concurrency", type=_positive_int, default=16, help="requests in flight at most (default 16)")
    r.add_argument("--model", default=None,
                   help="model name, for azure the deployment name (default: the provider's, gpt-4o-mini for "
                        "openai, qwen-vl-plus for dashscope, gemini-2.5-flash for gemini)")
    r.add_argument("--provider", choices=provider_names(), default=DEFAULT_PROVIDER,
                   help="whose API: sets the endpoint (unless --base-url), the key variable (DASHSCOPE_API_KEY, "
                        "GEMINI_API_KEY, OPENROUTER_API_KEY, AZURE_OPENAI_API_KEY; else OPENAI_API_KEY) and prices; "
                        "dashscope is China (Beijing), dashscope-intl Singapore; vllm, ollama, lmstudio are local, "
                        "need no key and cost 0 (default openai)")
    r.add_argument("--api-version", default=None,
                   help=f"Azure OpenAI api-version (default: $OPENAI_API_VERSION, else {AZURE_API_VERSION})")
    r.add_argument("--backend", choices=["openai", "offline"], default="openai",
                   help="openai: any OpenAI-compatible server; offline: colour baseline from pixels, no network")
    r.add_argument("--base-url", default=None, help="OpenAI-compatible server URL (default: $OPENAI_BASE_URL, also read from .env, or OpenAI)")
    r.add_argument("--detail", choices=["low", "high", "auto"], default="low", help="image detail (default low)")
    r.add_argument("--max-tokens", type=_positive_int, default=300, help="answer length cap in tokens (default 300)")
    r.add_argument("--temperature", type=_non_negative_float, default=None)
    r.add_argument("--captions-per-image", type=_positive_int, default=1, help="captions per image and prompt (default 1)")
    r.add_argument("--timeout", type=_positive_seconds, default=60.0,
                   help="longest a request may take before it is abandoned and retried (default 60); once the run "
                        "has 20 answers, a request is abandoned sooner, after 4x their 99th-percentile latency "
                        "(at least 1 s)")
    r.add_argument("--rpm", type=_non_negative_float, default=None, help="requests per minute (default: learn from headers)")
    r.add_argument("--tpm", type=_non_negative_float, default=None, help="tokens per minute (default: learn from headers)")
    r.add_argument("--max-attempts", type=_positive_int, default=6, help="attempts per image before it goes to errors.csv")
    r.add_argument("--max-cost", type=_non_negative_float, default=None, help="USD budget for this output folder")
    r.add_argument("--pricing", dest="pricing_file", type=Path, default=None, metavar="FILE",
                   help="your own pricing TOML (default: $REID_PROMPT_PRICING, else config/pricing.toml in the "
                        "current folder if there is one, else the bundled prices)")
    r.add_argument("--price-in", type=_non_negative_float, default=None, help="USD per 1M input tokens (overrides the pricing file)")
    r.add_argument("--price-out", type=_non_negative_float, default=None, help="USD per 1M output tokens")
    r.add_argument("--price-cached-in", type=_non_negative_float, default=None, help="USD per 1M cached input tokens")
    r.add_argument("--dry-run", action="store_true", help="estimate tokens and cost of what is left; send nothing")
    r.add_argument("--redo", type=Path, default=None, metavar="REVIEW_CSV",
                   help="ask again the captions a review (the gallery's review.csv: image_id, prompt_name, "
                        "caption_index, verdict) rejects; their old rows move to captions_replaced.csv")
    r.add_argument("--allow-changes", action="store_true",
                   help="rerun on a folder made with another prompt text, model, detail or image root: keep its "
                        "rows as done and record the change in the manifest (default: refuse, exit 2)")
    r.add_argument("--follow-symlinks", action="store_true",
                   help="use images that are symlinks to files outside the image root (refused by default)")
    r.add_argument("--excel", action="store_true",
                   help="start a new output folder's CSV files with a BOM, so Excel shows Chinese correctly "
                        "(default: plain UTF-8; a folder keeps the encoding it was started with)")
    r.add_argument("--no-dashboard", action="store_true", help="plain progress lines instead of the live dashboard")
    r.add_argument("--progress-every", type=_non_negative_float, default=5.0, help="seconds between plain progress lines")
    r.add_argument("--grace", type=_non_negative_float, default=15.0, help="seconds answers in flight get after Ctrl-C")
    # an output file cannot be written: seconds between retries, and how long to retry once the run ended
    r.add_argument("--hold-retry", type=_non_negative_float, default=3.0, help=argparse.SUPPRESS)
    r.add_argument("--hold-final", type=_non_negative_float, default=30.0, help=argparse.SUPPRESS)
    r.add_argument("--outage-timeout", type=_positive_seconds, default=300.0, metavar="S",
                   help="seconds the server may stay unreachable mid-run (the pool waits and probes) "
                        "before the run stops with exit 3 (default 300)")
    r.add_argument("--http-client", choices=["aiohttp", "httpx"], default="aiohttp", help=argparse.SUPPRESS)
    # --concurrency as a fixed pool even for a server without rate-limit headers (benchmarks sweep with it)
    r.add_argument("--fixed-concurrency", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--no-hedge", action="store_true",
                   help="never send a second request for one that is out far longer than the rest near the end "
                        "of a run (hedging is on by default, off under --rpm/--tpm, learned limits or --max-cost)")
    b = r.add_argument_group("Batch API (--mode batch: the same work at the batch price, answered within 24 h)")
    b.add_argument("--mode", choices=["online", "batch"], default="online",
                   help="online: one request per call (default); batch: shards of requests through the Batch "
                        "API (/v1/files + /v1/batches), resumable, written to the same files")
    b.add_argument("--batch-max-requests", type=_positive_int, default=BATCH_MAX_REQUESTS, metavar="N",
                   help=f"lines per batch file at most (default {BATCH_MAX_REQUESTS:,}, OpenAI's limit)")
    b.add_argument("--batch-max-bytes", type=_positive_int, default=BATCH_MAX_BYTES, metavar="N",
                   help=f"bytes per batch file at most, base64 images counted (default {BATCH_MAX_BYTES:,}, "
                        "just under OpenAI's 200 MB)")
    b.add_argument("--batch-max-tokens", type=_positive_int, default=None, metavar="N",
                   help="estimated input tokens per batch at most: your tier's enqueued-token limit for the model "
                        "(default: no cap; a batch refused for the limit waits for this folder's batches to end)")
    b.add_argument("--batch-files-only", type=Path, default=None, metavar="DIR",
                   help="write the batch files (JSONL, as `vllm run-batch` reads) to DIR and send nothing; "
                        "`collect` ingests the output files; needs no API key")
    b.add_argument("--no-wait", action="store_true",
                   help="submit the batches, print their ids and exit 0; the same command later collects them")
    b.add_argument("--keep-batch-files", action="store_true",
                   help="leave the input and output files on the provider once collected (default: deleted)")
    # the longest pause between two looks at a batch in flight (tests use small values)
    b.add_argument("--poll-max", type=_positive_seconds, default=60.0, help=argparse.SUPPRESS)

    s = sub.add_parser("status", help="how far a run's output folder is, from its files alone")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ca = sub.add_parser("cancel", help="cancel an output folder's batches in flight and collect what they answered",
                        description="Cancel every batch of the folder still in flight (--mode batch), wait until "
                                    "each has ended and write what it answered; unanswered work is left for the "
                                    "next run. The endpoint, key variable, index and prompts are the folder's "
                                    "(manifest.json).", epilog=EXIT_CODES_HELP)
    ca.add_argument("--out", required=True, type=Path, help="the run's output folder")
    ca.add_argument("--base-url", default=None, help="the server, if not the one manifest.json records")
    ca.add_argument("--poll-max", type=_positive_seconds, default=60.0, help=argparse.SUPPRESS)

    co = sub.add_parser("collect", help="write batch output files produced elsewhere (vllm run-batch) into a folder",
                        description="Join output JSONL files (OpenAI's batch output format, as `vllm run-batch` "
                                    "writes) on custom_id against the shards `run --mode batch --batch-files-only` "
                                    "wrote for this folder, and write the answers into its CSV files by the same "
                                    "rules as a run. Unknown ids, work already done and malformed lines are "
                                    "reported and never written. Nothing is sent; no key is needed.",
                        epilog=EXIT_CODES_HELP)
    co.add_argument("--out", required=True, type=Path, help="the run's output folder")
    co.add_argument("files", nargs="+", type=Path, metavar="FILE", help="output JSONL file(s)")

    e = sub.add_parser("export", help="write training data for text-to-image ReID code")
    e.add_argument("--out", required=True, type=Path, help="the run's output folder")
    e.add_argument("--format", required=True, dest="fmt", help="cuhk-pedes, icfg-pedes, rstpreid or jsonl")
    e.add_argument("--to", type=Path, default=None, help="file to write (default: <out>/export_<format>.json[l])")
    e.add_argument("--val-from-train", type=_fraction, default=0.0, help="fraction of train persons to move to val")
    e.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("report", help="caption quality report")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--save", type=Path, default=None, help="JSON file (default: <out>/report.json)")

    c = sub.add_parser("compare", help="a scoreboard of prompts and models across output folders",
                       description="One row per (model, prompt) over the images they share: cost per image and "
                                   "per 1,000 images, tokens, caption length, vocabulary and diversity, "
                                   "refusals, cross-camera consistency within an identity, per-caption flags; "
                                   "with --attributes agreement with the dataset's attribute labels; with "
                                   "--retrieval clip text-to-image Rank-1/5/10 and mAP (Market-1501 protocol).")
    c.add_argument("--out", required=True, type=Path, action="append", metavar="DIR",
                   help="an output folder of `run` (repeatable: compare folders of other models or prompts)")
    c.add_argument("--attributes", type=Path, default=None, metavar="FILE",
                   help="the dataset's attribute labels (market_attribute.mat, duke_attribute.mat): score "
                        "each prompt's agreement with them, attribute by attribute")
    c.add_argument("--retrieval", choices=["clip"], default=None,
                   help='clip: retrieve gallery images from query captions with CLIP (needs pip install ".[eval]")')
    c.add_argument("--clip-model", default=None, metavar="NAME",
                   help="CLIP model for --retrieval clip: a Hugging Face name or a local folder "
                        "(default openai/clip-vit-base-patch32)")
    c.add_argument("--save", type=Path, default=None, metavar="FILE.json", help="also write the scoreboard as JSON")
    c.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="draw quality against cost per prompt")

    g = sub.add_parser("gallery", help="a static HTML gallery of the captions, by person and camera, with review marks",
                       description="Write a self-contained HTML gallery of an output folder (opens from file://, "
                                   "no server, no network): images grouped by person id then camera, their "
                                   "captions per prompt, structured attributes, errors and flags; mark captions "
                                   "accept/reject with the keyboard and download review.csv for `run --redo`.")
    g.add_argument("--out", required=True, type=Path, help="the run's output folder")
    g.add_argument("--to", type=Path, default=None, metavar="PATH",
                   help="the page to write (an .html file, or a folder for its index.html; default: "
                        "<out>/gallery/index.html); assets, data and thumbnails go beside it")
    g.add_argument("--prompt", nargs="+", action="extend", default=None, metavar="NAME",
                   help="only these prompts (default: all); repeatable")
    g.add_argument("--attributes", type=Path, default=None, metavar="FILE",
                   help="the dataset's attribute labels (market_attribute.mat, duke_attribute.mat): flags the "
                        "captions that disagree with them")

    pr = sub.add_parser("probe", help="find out what an OpenAI-compatible server does (a few tiny requests)",
                        description="Send a few tiny requests (a 32x64 image, a few output tokens; at most 40 "
                                    "requests) and say what the server does: image types, n, response_format, "
                                    "detail, usage, rate-limit headers, the length parameter, and latency at "
                                    "concurrency 1, 2, 4, 8 with the concurrency worth running at. The endpoint "
                                    "and key are resolved as `run` resolves them.",
                        epilog=EXIT_CODES_HELP)
    pr.add_argument("--base-url", default=None, help="OpenAI-compatible server URL (default: the provider's, "
                                                     "else $OPENAI_BASE_URL, else OpenAI)")
    pr.add_argument("--model", default=None, help="model name as the server names it (default: the provider's)")
    pr.add_argument("--provider", choices=provider_names(), default=DEFAULT_PROVIDER,
                    help="whose API: endpoint and key variable, as for `run` (default openai)")
    pr.add_argument("--api-version", default=None, help="Azure OpenAI api-version")
    pr.add_argument("--timeout", type=_positive_seconds, default=30.0, help="seconds per request (default 30)")
    pr.add_argument("--budget", type=_positive_seconds, default=120.0, metavar="S",
                    help="seconds the probe may take; latency levels not started by then are skipped (default 120)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr.add_argument("--save", type=Path, default=None, metavar="FILE",
                    help="also write the JSON to FILE (e.g. <out>/probe.json: `run --dry-run` on that folder "
                         "then counts requests as this server needs them)")
    pr.add_argument("--http-client", choices=["aiohttp", "httpx"], default="aiohttp", help=argparse.SUPPRESS)
    return parser


def no_prompt_given(a: argparse.Namespace) -> bool:
    return not a.prompt_files and a.prompts_dir is None


def config_from_args(a: argparse.Namespace) -> RunConfig:
    """The run's options from the parsed command line (config file and command line merged already)."""
    prompt_files = [Path(DEFAULT_PROMPT)] if no_prompt_given(a) else list(a.prompt_files)
    # --base-url, else the provider's endpoint, else (openai) $OPENAI_BASE_URL: pipeline.providers.presets
    base_url = resolve_endpoint(a.provider, a.base_url, os.environ).base_url if a.backend == "openai" else None
    model = model_or_default(a.provider, a.model) if a.backend == "openai" else "offline"
    concurrency = a.concurrency
    if concurrency > MAX_CONCURRENCY:
        print(f"note: --concurrency {concurrency:,} capped at {MAX_CONCURRENCY:,} (more requests in flight help "
              "no server or rate limit)", file=sys.stderr)
        concurrency = MAX_CONCURRENCY
    return RunConfig(
        index=a.index,
        root=a.root,
        out=a.out,
        prompt_files=prompt_files,
        prompts_dir=a.prompts_dir,
        batch_size=a.batch_size,
        model=ModelConfig(
            backend=a.backend,
            model=model,
            base_url=base_url,
            provider=a.provider,
            api_version=resolve_api_version(a.provider, a.api_version, os.environ),
            detail=a.detail,
            max_tokens=a.max_tokens,
            temperature=a.temperature,
            captions_per_image=a.captions_per_image,
            timeout=a.timeout,
            http_client=a.http_client,
        ),
        limits=LimitConfig(
            concurrency=concurrency,
            rpm=a.rpm or None,
            tpm=a.tpm or None,
            max_attempts=a.max_attempts,
            max_cost=a.max_cost,
            grace_seconds=a.grace,
            hold_retry_s=a.hold_retry,
            hold_final_s=a.hold_final,
            outage_timeout=a.outage_timeout,
            adaptive=not a.fixed_concurrency,
            hedge=not a.no_hedge,
        ),
        prices=PriceConfig(price_in=a.price_in, price_cached_in=a.price_cached_in, price_out=a.price_out,
                           pricing_file=a.pricing_file),
        dashboard=not a.no_dashboard,
        dry_run=a.dry_run,
        allow_changes=a.allow_changes,
        redo=a.redo,
        follow_symlinks=a.follow_symlinks,
        excel=a.excel,
        progress_every=a.progress_every,
        subset=SubsetConfig(limit=a.limit, sample=a.sample, seed=a.seed),
        batch=batch_config(a),
    )


def batch_config(a: argparse.Namespace) -> BatchConfig:
    """--mode and the Batch API options, with the combinations that make no sense refused (exit 2)."""
    batch = BatchConfig(
        mode=getattr(a, "mode", "online"),
        max_requests=getattr(a, "batch_max_requests", BATCH_MAX_REQUESTS),
        max_bytes=getattr(a, "batch_max_bytes", BATCH_MAX_BYTES),
        max_tokens=getattr(a, "batch_max_tokens", None),
        files_only=getattr(a, "batch_files_only", None),
        no_wait=getattr(a, "no_wait", False),
        keep_files=getattr(a, "keep_batch_files", False),
        poll_max_s=getattr(a, "poll_max", 60.0),
    )
    problem = batch_problem(batch, backend=a.backend, dry_run=a.dry_run)
    if problem:
        raise InputError(problem)
    return batch


def batch_problem(batch: BatchConfig, *, backend: str, dry_run: bool) -> str | None:
    """Why these batch options cannot go together (one line), or None. Pure."""
    default = BatchConfig()
    if batch.mode != "batch":
        given = [flag for flag, value, usual in (
            ("--batch-files-only", batch.files_only, default.files_only),
            ("--no-wait", batch.no_wait, default.no_wait),
            ("--keep-batch-files", batch.keep_files, default.keep_files),
            ("--batch-max-requests", batch.max_requests, default.max_requests),
            ("--batch-max-bytes", batch.max_bytes, default.max_bytes),
            ("--batch-max-tokens", batch.max_tokens, default.max_tokens),
            ("--poll-max", batch.poll_max_s, default.poll_max_s),
        ) if value != usual]
        if given:
            return f"{given[0]} is an option of --mode batch (this run is online): add --mode batch, or leave it out"
        return None
    if backend == "offline":
        return "--mode batch needs a server's Batch API: the offline backend has none (use --backend openai)"
    if batch.files_only is not None:
        for flag, value in (("--no-wait", batch.no_wait), ("--keep-batch-files", batch.keep_files),
                            ("--dry-run", dry_run)):
            if value:
                return (f"--batch-files-only writes the batch files and sends nothing: {flag} does not go with it")
    return None


# --- commands ---------------------------------------------------------------------------------------------

def cmd_prepare(a: argparse.Namespace) -> int:
    import time

    from pipeline.data.index import image_json, scan_index, write_index

    splits = {s.strip() for s in a.splits.split(",") if s.strip()} if a.splits else None
    last = [time.monotonic()]

    def every_2s(line: str) -> None:  # a progress line on stderr: a million images take a while
        now = time.monotonic()
        if now - last[0] >= 2.0:
            last[0] = now
            print(line, file=sys.stderr, flush=True)

    root, dataset, images = scan_index(a.root, a.dataset, splits=splits, skip_junk=a.skip_junk,
                                       follow_symlinks=a.follow_symlinks,
                                       progress=lambda n: every_2s(f"listed {n:,} files ..."))
    total = len(images)

    def progress(done: int) -> None:
        every_2s(f"indexed {done:,} of {total:,} images ...")

    # streamed: one image's JSON at a time, never the whole index as dicts or text
    write_index({"root": str(root), "dataset": dataset, "images": (image_json(im) for im in images)},
                a.out, progress=progress)
    by_split: dict[str, int] = {}
    for im in images:
        by_split[str(im.split)] = by_split.get(str(im.split), 0) + 1
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(by_split.items()))
    print(f"indexed {total:,} images of {dataset} ({parts}) -> {a.out}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.run import runner

    cfg = config_from_args(a)
    notes = [f"no prompt given: using the bundled prompt {DEFAULT_PROMPT!r}"] if no_prompt_given(a) else []
    console = Console()
    if cfg.dry_run:
        return _dry_run(cfg, console, notes)
    if cfg.batch.enabled and cfg.batch.files_only is not None:
        return _batch_files_only(cfg, notes)
    if cfg.batch.enabled:
        from pipeline.batch.flow import run_batch

        outcome = run_batch(cfg, notes=notes)
        if isinstance(outcome, int):
            return outcome
        return _report_run(outcome, console, subset_flags(cfg.subset), extra=_batch_tail(cfg.out))
    from pipeline.batch.ledger import BATCHES_DIR, LEDGER_NAME
    from pipeline.review.dashboard import make_view

    run = runner.run
    if (Path(cfg.out) / BATCHES_DIR / LEDGER_NAME).is_file():  # a folder with batches: their work is theirs
        from pipeline.batch.online import run_online as run
    result = run(cfg, views=lambda stats: make_view(stats, console, dashboard=cfg.dashboard,
                                                    every_s=cfg.progress_every), notes=notes)
    return _report_run(result, console, subset_flags(cfg.subset))


def _dry_run(cfg: RunConfig, console, notes: Sequence[str] = ()) -> int:
    from pipeline.review.estimate import estimate_for_run, render_estimate
    from pipeline.run.runner import prepare, start_notes

    prep = prepare(cfg, readonly=True)
    for note in start_notes(prep, notes):
        print(f"note: {note}", file=sys.stderr)
    if cfg.batch.enabled:  # the shards a batch run would write now, at the batch price beside the online one
        from pipeline.batch.work import preview
        from pipeline.review.estimate import render_batch_preview

        render_batch_preview(preview(prep), prep, console)
        return 0
    est = estimate_for_run(prep)
    render_estimate(est, console)
    return 0


def _batch_files_only(cfg: RunConfig, notes: Sequence[str] = ()) -> int:
    """`run --mode batch --batch-files-only DIR`: the JSONL shards of the work left, for another server;
    nothing sent, no key needed. Exit 0, or 1 when some images got no line (errors.csv says why)."""
    from pipeline.batch.work import files_only_config, write_batch_files
    from pipeline.run.runner import announce, describe_run, prepare

    folder = Path(cfg.batch.files_only)
    prep = prepare(files_only_config(cfg))
    try:
        announce(prep, notes)

        def wrote(rec) -> None:
            print(f"wrote {prep.cfg.out / rec.jsonl if not Path(rec.jsonl).is_absolute() else rec.jsonl} "
                  f"(shard {rec.shard_id}: {rec.lines:,} lines, {rec.bytes:,} bytes, "
                  f"~{rec.est_input_tokens:,} input tokens)", flush=True)

        shards, errors = write_batch_files(prep, folder, describe_run, progress=wrote)
    finally:
        prep.release()
    failed = sum(errors.by_reason.values())
    if failed:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(errors.by_reason.items()))
        print(f"{failed:,} caption(s) got no line ({reasons}): see {cfg.out / 'errors.csv'}", file=sys.stderr)
    if not shards:
        print("nothing left to write: every caption is done or already in a batch file of this folder")
    else:
        lines = sum(r.lines for r in shards)
        print(f"{len(shards):,} batch file(s), {lines:,} requests, nothing sent. Run them with any server that "
              f"reads OpenAI batch files, e.g. `vllm run-batch -i {folder / shards[0].shard_id}.jsonl -o "
              f"{folder / shards[0].shard_id}.out.jsonl --model {cfg.model.model}`, then "
              f"`{command_name(sys.argv[0] if sys.argv else '')} collect --out {cfg.out} <output files>`")
    return 1 if failed else 0


def _batch_tail(out: Path) -> str:
    """The end of a batch run's summary line: costs at the batch price, and what is still on its way
    (--no-wait, Ctrl-C, the budget or the token limit leave batches in flight or shards unsent)."""
    from pipeline.batch.ledger import BatchLedger
    from pipeline.errors import ReidPromptError

    try:
        open_ = [s for s in BatchLedger.load(out).outstanding() if s.state != "local"]
    except ReidPromptError:
        return "; costs at the batch price"
    sent = [s for s in open_ if s.state != "planned"]
    unsent = [s for s in open_ if s.state == "planned"]
    tail = "; costs at the batch price"
    if sent:
        tail += (f"; {len(sent):,} batch(es) in flight ({sum(s.lines for s in sent):,} requests): "
                 "the same command waits for and collects them")
    if unsent:
        tail += f"; {len(unsent):,} shard(s) not sent yet ({sum(s.lines for s in unsent):,} requests)"
    return tail


def _report_run(result, console, subset: str | None = None, extra: str = "") -> int:
    """The end of a run: the summary table on a terminal, the repair notes, ONE summary line that says
    how the run ended, on which subset of the index (`--limit`/`--sample`) and with which exit code,
    and the fatal error's own line."""
    from pipeline.review.dashboard import render_summary, summary_line

    if console.is_terminal:
        console.print(render_summary(result.snapshot, result.out))
    for note in result.repaired:
        print(f"repaired: {note}", file=sys.stderr)
    code = exit_code_for(result.state, result.snapshot.failed, result.fatal is not None, result.held)
    scope = f", subset {subset}" if subset else ""
    print(f"{summary_line(result.snapshot)}{scope}{extra} (exit {code}: {EXIT_MEANINGS[code]})")
    if result.fatal is not None:
        print(f"error: {result.fatal}", file=sys.stderr)
    return code


def cmd_cancel(a: argparse.Namespace) -> int:
    from pipeline.batch.flow import cancel_folder

    done = cancel_folder(a.out, base_url=a.base_url, poll_max_s=a.poll_max)
    t = done.tally
    ids = ", ".join(done.cancelled) if done.cancelled else "none in flight"
    print(f"cancelled: {ids}; collected {t.captioned:,} caption(s), failed {t.failed:,}, "
          f"left for the next run {t.left + t.retried:,}")
    return _folder_exit(done.result)


def cmd_collect(a: argparse.Namespace) -> int:
    from pipeline.batch.flow import collect_folder

    done = collect_folder(a.out, a.files)
    t = done.tally
    problems = [f"{n:,} {what}" for n, what in ((t.unknown, "unknown id(s)"), (t.duplicates, "duplicate(s)"),
                                                  (t.malformed, "malformed line(s)"),
                                                  (t.already_done, "already done")) if n]
    print(f"collected {t.captioned:,} caption(s), failed {t.failed:,}, left for the next run {t.left + t.retried:,}"
          + (f"; not written: {', '.join(problems)}" if problems else ""))
    if done.left_shards:
        print(f"shards still waiting for output: {', '.join(done.left_shards)}")
    return _folder_exit(done.result)


def _folder_exit(result) -> int:
    """`cancel` / `collect`: the exit code of what they did, the fatal error's own line."""
    code = exit_code_for(result.state, result.snapshot.failed, result.fatal is not None, result.held)
    if result.fatal is not None:
        print(f"error: {_one_line(str(result.fatal))}", file=sys.stderr)
    return code


def cmd_status(a: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from pipeline.review.status import collect_status, render_status

    report = collect_status(a.out)
    if a.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        render_status(report, Console())
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from pipeline.export import export_folder

    path, count = export_folder(a.out, a.fmt, a.to, val_from_train=a.val_from_train, seed=a.seed)
    print(f"wrote {count:,} records ({a.fmt}) -> {path}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.ledger.outputs import read_attributes, read_captions
    from pipeline.review.report import build_report, render_report, save_report

    if not Path(a.out).is_dir():
        raise InputError(f"output folder {a.out} does not exist")
    report = build_report(read_captions(a.out), read_attributes(a.out) or None)
    render_report(report, Console())
    target = a.save or Path(a.out) / "report.json"
    save_report(report, target)
    print(f"saved {target}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.review.compare import (
        build_scoreboard,
        check_writable,
        clip_retrieval_for,
        load_groups,
        render_scoreboard,
        save_scoreboard,
    )

    if a.clip_model is not None and a.retrieval != "clip":
        raise InputError("--clip-model needs --retrieval clip")
    if a.plot is not None and a.plot.suffix.lower() != ".png":
        raise InputError(f"--plot writes a PNG: give a file name ending in .png, not {a.plot.name!r}")
    if a.retrieval == "clip":
        from pipeline.review.clip import check_extra, check_model_name

        check_extra()  # before reading anything: a missing extra is one line, exit 2
        if a.clip_model is not None:
            check_model_name(a.clip_model)
    for path, option in ((a.save, "--save"), (a.plot, "--plot")):
        if path is not None:
            check_writable(path, option)
    labels = None
    if a.attributes is not None:
        from pipeline.data.labels import load_attribute_labels

        labels = load_attribute_labels(a.attributes)
    groups, folders = load_groups(a.out, labels)
    retrieval = None
    if a.retrieval == "clip":
        from pipeline.review.clip import DEFAULT_CLIP_MODEL

        retrieval = clip_retrieval_for(folders, a.clip_model or DEFAULT_CLIP_MODEL,
                                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    board = build_scoreboard(groups, labels, retrieval, attributes_file=str(a.attributes) if a.attributes else None)
    render_scoreboard(board, Console())
    if a.save is not None:
        save_scoreboard(board, a.save)
        print(f"saved {a.save}")
    if a.plot is not None:
        from pipeline.review.compare_plot import plot_scoreboard

        plot_scoreboard(board, a.plot)
        print(f"saved {a.plot}")
    return 0


def cmd_gallery(a: argparse.Namespace) -> int:
    from pipeline.review.gallery import build_gallery

    res = build_gallery(a.out, a.to, a.prompt, labels_path=a.attributes,
                        say=lambda line: print(line, file=sys.stderr, flush=True))
    for warning in res.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    flagged = ", ".join(f"{name} {count:,}" for name, count in res.flagged.items() if count) or "none"
    print(f"gallery: {res.images:,} images of {res.persons:,} persons, {res.captions:,} captions, "
          f"{res.attributes:,} structured answers, {res.errors:,} errors; flagged: {flagged}")
    print(f"thumbnails: {res.thumbs_made:,} made, {res.thumbs_reused:,} reused, {res.unreadable:,} placeholders")
    print(f"open {res.path}")
    return 0


def cmd_probe(a: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from rich.console import Console

    from pipeline.review.probe_table import render_probe
    from pipeline.run.probe import probe_options, run_probe

    opts = probe_options(a.provider, a.base_url, a.model, a.api_version, os.environ, timeout=a.timeout,
                         budget_s=a.budget)
    report = run_probe(replace(opts, http_client=a.http_client)).to_dict()
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if a.save is not None:
        a.save.parent.mkdir(parents=True, exist_ok=True)
        a.save.write_text(text + "\n", encoding="utf-8")
    if a.json:
        print(text)
    else:
        render_probe(report, Console())
        if a.save is not None:
            print(f"saved {a.save}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare,
    "run": cmd_run,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "collect": cmd_collect,
    "export": cmd_export,
    "report": cmd_report,
    "compare": cmd_compare,
    "gallery": cmd_gallery,
    "probe": cmd_probe,
}


def _find_user_error(exc: BaseException) -> ReidPromptError | None:
    """anyio task groups wrap errors in ExceptionGroups; find the user-facing one inside."""
    if isinstance(exc, ReidPromptError):
        return exc
    for inner in getattr(exc, "exceptions", ()) or ():
        found = _find_user_error(inner)
        if found is not None:
            return found
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _tolerant_streams() -> None:
    """A redirected stdout on Windows uses the locale's code page: never fail on a Chinese file name."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):
                pass


READ_ONLY_COMMANDS = frozenset({"status", "report", "compare", "probe"})  # a closed pipe cuts nothing short


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _parse(prog: str, argv: list[str], dotenv: DotenvLoad) -> argparse.Namespace | int:
    """Parse the command line over the `--config` file's values; `run --print-config` is answered here
    (it needs to know where each value came from). Returns the namespace, or an exit code."""
    parser = build_parser(prog)
    config: ConfigFile | None = None
    if argv[:1] == ["run"]:  # the command is the first word: the main parser has no option taking a value
        path = config_path_in(argv[1:])
        if path is not None:
            config = load_config(Path(path), _subparser(parser, "run"))
    args = parser.parse_args(argv)
    if args.command != "run":
        return args
    fresh = _subparser(build_parser(prog), "run")
    typed = given_on_command_line(fresh, argv[1:])
    apply_overrides(args, typed, config)
    if args.print_config:
        print_config(prog, _subparser(parser, "run"), args, typed.keys(), config, dotenv)
        return 0
    return args


def print_config(prog: str, run_parser: argparse.ArgumentParser, a: argparse.Namespace, typed,
                 config: ConfigFile | None, dotenv: DotenvLoad) -> None:
    """`run --print-config`: every option's value and where it came from; key variables as set or not."""
    from pipeline.providers.presets import get_preset

    provider = getattr(a, "provider", None)
    env: dict[str, tuple[str, str]] = {}  # options left unset that the provider or a variable fills in
    if a.backend == "openai":
        try:
            endpoint = resolve_endpoint(provider, a.base_url, os.environ)
        except ReidPromptError as exc:  # e.g. azure without its endpoint: said, not raised
            endpoint = None
            env["base_url"] = (f"(none: {_one_line(str(exc))})", "default")
        if endpoint is not None and endpoint.base_url is not None and endpoint.source != "--base-url":
            variable = endpoint.source if endpoint.source.isupper() else None
            source = (f"{variable_source(variable, dotenv) or SOURCE_ENVIRONMENT} {variable}" if variable
                      else f"--provider {provider}")
            env["base_url"] = (endpoint.base_url, source)
    if getattr(a, "model", None) is None and default_model(provider):
        env["model"] = (default_model(provider), f"default for --provider {provider}")
    rows = describe_settings(run_parser, a, typed, config, env)
    if no_prompt_given(a):
        rows = [r if r.option != "--prompt-file" else
                Setting(r.option, DEFAULT_PROMPT, "default: no prompt given, the bundled prompt") for r in rows]
    read = ([f"config file {config.path}"] if config is not None else []) + (
        [f".env from {dotenv.path}"] if dotenv.path is not None else [])
    where = f" ({'; '.join(read)})" if read else ""
    print(f"{prog} run would use{where}:")
    key_env = get_preset(provider).key_env if a.backend == "openai" else None
    for line in render_settings(rows, key_lines(dotenv, always=[v for v in (key_env, "OPENAI_API_KEY") if v])):
        print(line)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line. `prog`: the command as typed, for usage lines (default: from sys.argv[0])."""
    _tolerant_streams()
    prog = prog or command_name(sys.argv[0] if sys.argv else "")
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        try:
            here = Path.cwd()
        except OSError:  # the current folder was removed under us: there is no .env to read
            here = None
        dotenv = load_dotenv_file(here) if here is not None else DotenvLoad()
        parsed = _parse(prog, argv, dotenv)
    except ReidPromptError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    if isinstance(parsed, int):
        return parsed
    args = parsed
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `status | head`: the reader has what it wanted. Say nothing (stdout is gone), and keep Python from
        # complaining again when it flushes stdout at exit.
        _silence_stdout()
        return 0 if args.command in READ_ONLY_COMMANDS else 1
    except BaseException as exc:  # noqa: BLE001 - the edge: one line, never a traceback
        if isinstance(exc, SystemExit):
            raise
        user = _find_user_error(exc)
        if user is not None:
            print(f"error: {_one_line(str(user))}", file=sys.stderr)
            return user.exit_code
        if isinstance(exc, OSError):
            print(f"error: {_one_line(exc.strerror or str(exc))}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            return 1
        if os.environ.get("REID_PROMPT_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {_one_line(str(exc))[:300]} "
              f"(set REID_PROMPT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
