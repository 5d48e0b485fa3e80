"""Command line: `python -m pipeline {prepare,run,status,export,report} ...`.

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
from pipeline.config import LimitConfig, ModelConfig, PriceConfig, RunConfig
from pipeline.errors import EXIT_INTERRUPTED, EXIT_MEANINGS, InputError, ReidPromptError, exit_code_for

EXIT_CODES_HELP = "exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_MEANINGS.items())
MAX_CONCURRENCY = 1024  # more requests in flight help no server or rate limit; capped with a note


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


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus the usage hint, exit 2 (its default code)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `python -m pipeline {self.prog.split()[-1]} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description="Caption person re-ID image sets with a vision model.")
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
                       epilog=EXIT_CODES_HELP)
    r.add_argument("--index", required=True, type=Path, help="index from `prepare`, a JSON list of paths, or a text file of paths")
    r.add_argument("--out", required=True, type=Path, help="output folder (captions_all.csv, parts, errors.csv, manifest.json)")
    r.add_argument("--root", type=Path, default=None, help="image root for a plain list of paths (default: the list's folder)")
    r.add_argument("--prompt-file", "--prompt_file", dest="prompt_files", action="append", type=Path, default=[],
                   help="prompt file (repeatable; the file stem names the prompt)")
    r.add_argument("--prompts", dest="prompts_dir", type=Path, default=None, help="use every prompt in this folder")
    r.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=1000,
                   help="images per captions_part_NNNN.csv (default 1000)")
    r.add_argument("--concurrency", type=_positive_int, default=16, help="requests in flight at most (default 16)")
    r.add_argument("--model", default="gpt-4o-mini", help="model name (default gpt-4o-mini)")
    r.add_argument("--backend", choices=["openai", "offline"], default="openai",
                   help="openai: any OpenAI-compatible server; offline: colour baseline from pixels, no network")
    r.add_argument("--base-url", default=None, help="OpenAI-compatible server URL (default: $OPENAI_BASE_URL or OpenAI)")
    r.add_argument("--detail", choices=["low", "high", "auto"], default="low", help="image detail (default low)")
    r.add_argument("--max-tokens", type=_positive_int, default=300, help="answer length cap in tokens (default 300)")
    r.add_argument("--temperature", type=_non_negative_float, default=None)
    r.add_argument("--captions-per-image", type=_positive_int, default=1, help="captions per image and prompt (default 1)")
    r.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds per request before it is abandoned and retried")
    r.add_argument("--rpm", type=_non_negative_float, default=None, help="requests per minute (default: learn from headers)")
    r.add_argument("--tpm", type=_non_negative_float, default=None, help="tokens per minute (default: learn from headers)")
    r.add_argument("--max-attempts", type=_positive_int, default=6, help="attempts per image before it goes to errors.csv")
    r.add_argument("--max-cost", type=_non_negative_float, default=None, help="USD budget for this output folder")
    r.add_argument("--price-in", type=_non_negative_float, default=None, help="USD per 1M input tokens (overrides config/pricing.toml)")
    r.add_argument("--price-out", type=_non_negative_float, default=None, help="USD per 1M output tokens")
    r.add_argument("--price-cached-in", type=_non_negative_float, default=None, help="USD per 1M cached input tokens")
    r.add_argument("--dry-run", action="store_true", help="estimate tokens and cost of what is left; send nothing")
    r.add_argument("--allow-changes", action="store_true",
                   help="rerun on a folder made with another prompt text, model, detail or image root: keep its "
                        "rows as done and record the change in the manifest (default: refuse, exit 2)")
    r.add_argument("--follow-symlinks", action="store_true",
                   help="use images that are symlinks to files outside the image root (refused by default)")
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

    s = sub.add_parser("status", help="how far a run's output folder is, from its files alone")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    e = sub.add_parser("export", help="write training data for text-to-image ReID code")
    e.add_argument("--out", required=True, type=Path, help="the run's output folder")
    e.add_argument("--format", required=True, dest="fmt", help="cuhk-pedes, icfg-pedes, rstpreid or jsonl")
    e.add_argument("--to", type=Path, default=None, help="file to write (default: <out>/export_<format>.json[l])")
    e.add_argument("--val-from-train", type=_fraction, default=0.0, help="fraction of train persons to move to val")
    e.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("report", help="caption quality report")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--save", type=Path, default=None, help="JSON file (default: <out>/report.json)")
    return parser


def config_from_args(a: argparse.Namespace) -> RunConfig:
    if not a.prompt_files and a.prompts_dir is None:
        raise InputError("no prompt given: pass --prompt-file FILE (repeatable) or --prompts DIR")
    base_url = a.base_url or os.environ.get("OPENAI_BASE_URL") or None
    concurrency = a.concurrency
    if concurrency > MAX_CONCURRENCY:
        print(f"note: --concurrency {concurrency:,} capped at {MAX_CONCURRENCY:,} (more requests in flight help "
              "no server or rate limit)", file=sys.stderr)
        concurrency = MAX_CONCURRENCY
    return RunConfig(
        index=a.index,
        root=a.root,
        out=a.out,
        prompt_files=list(a.prompt_files),
        prompts_dir=a.prompts_dir,
        batch_size=a.batch_size,
        model=ModelConfig(
            backend=a.backend,
            model=a.model if a.backend == "openai" else "offline",
            base_url=base_url if a.backend == "openai" else None,
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
        ),
        prices=PriceConfig(price_in=a.price_in, price_cached_in=a.price_cached_in, price_out=a.price_out),
        dashboard=not a.no_dashboard,
        dry_run=a.dry_run,
        allow_changes=a.allow_changes,
        follow_symlinks=a.follow_symlinks,
        progress_every=a.progress_every,
    )


# --- commands ---------------------------------------------------------------------------------------------

def cmd_prepare(a: argparse.Namespace) -> int:
    from pipeline.data.index import build_index, write_index

    splits = {s.strip() for s in a.splits.split(",") if s.strip()} if a.splits else None
    index = build_index(a.root, a.dataset, splits=splits, skip_junk=a.skip_junk,
                        follow_symlinks=a.follow_symlinks)
    write_index(index, a.out)
    by_split: dict[str, int] = {}
    for img in index["images"]:
        by_split[str(img.get("split"))] = by_split.get(str(img.get("split")), 0) + 1
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(by_split.items()))
    print(f"indexed {len(index['images']):,} images of {index['dataset']} ({parts}) -> {a.out}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.run import runner

    cfg = config_from_args(a)
    console = Console()
    if cfg.dry_run:
        return _dry_run(cfg, console)
    from pipeline.review.dashboard import make_view

    result = runner.run(cfg, views=lambda stats: make_view(stats, console, dashboard=cfg.dashboard,
                                                            every_s=cfg.progress_every))
    return _report_run(result, console)


def _dry_run(cfg: RunConfig, console) -> int:
    from pipeline.review.estimate import estimate_for_run, render_estimate
    from pipeline.run.runner import prepare

    prep = prepare(cfg, readonly=True)
    est = estimate_for_run(prep)
    render_estimate(est, console)
    return 0


def _report_run(result, console) -> int:
    """The end of a run: the summary table on a terminal, the repair notes, ONE summary line that says
    how the run ended and with which exit code, and the fatal error's own line."""
    from pipeline.review.dashboard import render_summary, summary_line

    if console.is_terminal:
        console.print(render_summary(result.snapshot, result.out))
    for note in result.repaired:
        print(f"repaired: {note}", file=sys.stderr)
    code = exit_code_for(result.state, result.snapshot.failed, result.fatal is not None, result.held)
    print(f"{summary_line(result.snapshot)} (exit {code}: {EXIT_MEANINGS[code]})")
    if result.fatal is not None:
        print(f"error: {result.fatal}", file=sys.stderr)
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare,
    "run": cmd_run,
    "status": cmd_status,
    "export": cmd_export,
    "report": cmd_report,
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


def main(argv: Sequence[str] | None = None) -> int:
    _tolerant_streams()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
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
