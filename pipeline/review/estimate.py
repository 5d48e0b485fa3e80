"""`run --dry-run`: what is left to caption in an output folder, and what it will cost. Sends nothing.

The arithmetic (`estimate_cost`) is a pure function of hand-made items and a price, so it is tested
without images or files. `build_estimate` does the reading: what is done (the same keys the writer
counts when a run resumes), what the runner would still ask for (`pipeline.run.runner.plan_jobs`, so the
forecast and the run never disagree on the work), and each image's pixel size from its header only.

Reading 100,000 headers over a network drive takes minutes, so above `SAMPLE_SIZE` requests a seeded
random sample is read and the figures are scaled; the table says so. Nothing is written: the output
folder is read with `repair=False`, exactly like `status`.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from PIL import Image
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.review.dashboard import fmt_int, fmt_spent, fmt_usd
from pipeline.ledger.costs import Spent
from pipeline.errors import ReidPromptError
from pipeline.ledger.outputs import CAPTIONS_ALL, DoneRead, read_done
from pipeline.data.prompts import billed_text, render_prompt
from pipeline.providers.capabilities import n_unsupported, one_request_per_caption_note
from pipeline.providers.presets import get_preset
from pipeline.providers.pricing import ModelPrice, PricingTable, cost_usd, load_run_pricing, pricing_label
from pipeline.records import IndexEntry, Prompt, Usage
from pipeline.providers.tokens import DEFAULT_MAX_OUTPUT_TOKENS, MESSAGE_OVERHEAD_TOKENS, image_tokens, text_tokens

MANIFEST_NAME = "manifest.json"
PROBE_FILE = "probe.json"  # `probe --save <out>/probe.json`: read when the manifest has not learned n
SAMPLE_SIZE = 2_000  # image headers read at most; above this many requests the figures are scaled
DEFAULT_OUTPUT_TOKENS = 60  # per caption, when the folder has too few captions to measure
MIN_ROWS_TO_MEASURE = 20

T = TypeVar("T")


@dataclass(frozen=True)
class EstimateItem:
    """One request still to send: one image, one prompt text, `n` captions asked in one go.

    `width`/`height` are None when the image could not be read (it costs 0 tokens and is counted as
    unreadable). `n` None means `captions_per_image`.
    """

    image_id: str
    width: int | None
    height: int | None
    prompt_text: str
    n: int | None = None


@dataclass(frozen=True)
class CostEstimate:
    """The forecast of a dry run. Token and cost figures are for everything left (scaled when sampled)."""

    model: str
    detail: str
    max_tokens: int | None
    captions_per_image: int
    expected_output_tokens: int  # per caption
    requests: int
    items_left: int  # captions still to make (work items)
    image_tokens: int
    text_tokens: int  # prompt text + message framing
    output_tokens: int
    output_tokens_max: int  # if every answer ran to max_tokens
    cost_input: float
    cost_output: float
    cost_max: float  # input + output_tokens_max
    size_counts: dict[tuple[int, int], int]  # pixel sizes seen -> requests (in the sample when sampled)
    unreadable: int  # requests seen whose image could not be read
    items_seen: int  # requests whose image size was looked at
    price_input: float
    price_cached_input: float
    price_output: float
    price_known: bool
    # context, filled by build_estimate
    items_total: int | None = None
    items_done: int = 0
    output_tokens_source: str = "given"
    price_source: str | None = None
    max_cost: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    spent_usd: float = 0.0  # already spent in the folder: captions, attributes and billed failures
    spent_unknown: int = 0  # billed rows there whose cost is unknown
    n_verdict: str | None = None  # "ignored" | "rejected": the server does not honour n, one request per caption

    @property
    def spent(self) -> Spent:
        return Spent(self.spent_usd, self.spent_unknown)

    @property
    def input_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def cost_total(self) -> float:
        return self.cost_input + self.cost_output

    @property
    def sampled(self) -> bool:
        return self.items_seen < self.requests


def _readable(width: int | None, height: int | None) -> bool:
    return bool(width and height and width > 0 and height > 0)


def estimate_cost(
    items: Iterable[EstimateItem],
    price: ModelPrice,
    *,
    detail: str,
    max_tokens: int | None,
    captions_per_image: int,
    expected_output_tokens: int,
    scale_to: int | None = None,
) -> CostEstimate:
    """Tokens and USD for `items`: per request the image and prompt are paid once, output per caption.

    Input per request = framing + prompt text + image (the same sum as `pipeline.providers.tokens.estimate_request`);
    output = n x min(expected, max_tokens). When `items` is a sample, `scale_to` is the number of
    requests it stands for and every count and cost is scaled by scale_to / len(items).
    """
    ceiling = DEFAULT_MAX_OUTPUT_TOKENS if max_tokens is None else max(0, max_tokens)
    per_caption = min(max(0, expected_output_tokens), ceiling)
    image_cache: dict[tuple[int, int], int] = {}
    text_cache: dict[str, int] = {}
    sizes: Counter[tuple[int, int]] = Counter()
    seen = captions = unreadable = img_tok = txt_tok = out_tok = out_max = 0
    for it in items:
        seen += 1
        n = max(1, it.n if it.n is not None else captions_per_image)
        captions += n
        if _readable(it.width, it.height):
            size = (int(it.width), int(it.height))  # type: ignore[arg-type]
            sizes[size] += 1
            if size not in image_cache:
                image_cache[size] = image_tokens(price.image_rule, size[0], size[1], detail)
            img_tok += image_cache[size]
        else:
            unreadable += 1
        if it.prompt_text not in text_cache:
            text_cache[it.prompt_text] = MESSAGE_OVERHEAD_TOKENS + text_tokens(it.prompt_text)
        txt_tok += text_cache[it.prompt_text]
        out_tok += n * per_caption
        out_max += n * ceiling

    requests = seen if scale_to is None else scale_to
    factor = requests / seen if seen else 0.0

    def scaled(x: int) -> int:
        return int(round(x * factor))

    image_total, text_total = scaled(img_tok), scaled(txt_tok)
    output_total, output_max_total = scaled(out_tok), scaled(out_max)
    cost_in = cost_usd(price, Usage(prompt_tokens=image_total + text_total))
    cost_out = cost_usd(price, Usage(completion_tokens=output_total))
    cost_out_max = cost_usd(price, Usage(completion_tokens=output_max_total))
    return CostEstimate(
        model=price.model,
        detail=detail,
        max_tokens=max_tokens,
        captions_per_image=captions_per_image,
        expected_output_tokens=per_caption,
        requests=requests,
        items_left=scaled(captions),
        image_tokens=image_total,
        text_tokens=text_total,
        output_tokens=output_total,
        output_tokens_max=output_max_total,
        cost_input=cost_in,
        cost_output=cost_out,
        cost_max=cost_in + cost_out_max,
        size_counts=dict(sizes),
        unreadable=unreadable,
        items_seen=seen,
        price_input=price.input,
        price_cached_input=price.cached_input,
        price_output=price.output,
        price_known=price.known,
    )


# --- reading what the estimate needs -----------------------------------------------------------------

def read_image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding pixels; None if it cannot be read.

    Any failure counts as unreadable: a dry run must report a bad file, never crash on one.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - PIL raises many types for bad headers (OSError, SyntaxError, ...)
        return None
    return (width, height) if width > 0 and height > 0 else None


def measured_output_tokens(out_dir: Path, done: DoneRead | None = None) -> tuple[int, str]:
    """Expected output tokens per caption: the mean of the captions already in the folder, else a default.

    `done`: the folder as already read (the dry-run's `prepare` read it), so it is not read again.
    """
    done = done if done is not None else read_done(Path(out_dir))
    n = done.measured_rows  # rows with completion_tokens > 0, summed in the reading pass
    if n >= MIN_ROWS_TO_MEASURE:
        return math.ceil(done.completion_tokens / n), f"mean of {fmt_int(n)} captions in {CAPTIONS_ALL}"
    return DEFAULT_OUTPUT_TOKENS, f"default (fewer than {MIN_ROWS_TO_MEASURE} captions to measure)"


def expected_output(out_dir: Path, done: DoneRead | None) -> tuple[int, str]:
    """`measured_output_tokens` of a folder already read (`done`), else the default (nothing to measure)."""
    if done is None:
        return DEFAULT_OUTPUT_TOKENS, f"default (no {CAPTIONS_ALL} yet)"
    return measured_output_tokens(out_dir, done)


def reservoir_sample(items: Iterable[T], k: int, seed: int = 0) -> tuple[list[T], int]:
    """A uniform random sample of at most k items in one pass (Algorithm R), and how many items there were.

    One pass and O(k) memory: the plan of a 100,000-image run is never held in full.
    """
    rng = random.Random(seed)
    sample: list[T] = []
    count = 0
    for item in items:
        count += 1
        if len(sample) < k:
            sample.append(item)
        else:
            j = rng.randrange(count)
            if j < k:
                sample[j] = item
    return sample, count


def describe_price_source(table: PricingTable | None, *, overridden: bool = False) -> str:
    """Where the prices came from, for the table: the pricing file and its date, or the command line."""
    if overridden:
        return "command line (--price-in/--price-out)"
    if table is None:
        return "unknown"
    return f"{pricing_label(table)}, taken on {table.taken_on}"


def build_estimate(
    entries: Sequence[IndexEntry],
    prompts: Sequence[Prompt],
    out_dir: Path,
    price: ModelPrice,
    *,
    detail: str,
    max_tokens: int | None,
    captions_per_image: int,
    max_cost: float | None = None,
    price_source: str | None = None,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
    size_of: Callable[[Path], tuple[int, int] | None] = read_image_size,
    done: DoneRead | None = None,
    n_verdict: str | None = None,
    n_source: str = "",
) -> CostEstimate:
    """Count what is left in `out_dir` for this index and these prompts, read image sizes, and estimate.

    Read-only. The work left is the runner's own plan (`plan_jobs`), so the estimate asks for exactly
    the requests a run would send: one per (image, prompt) with the missing caption slots as `n`.
    `done` is the folder as already read, if the caller has it; else it is read here.
    `n_verdict` ("ignored" | "rejected", learned from the server: `n_source` says where): the run will
    ask one caption per request, so each missing caption is a request of its own, paying for the image.
    """
    from pipeline.run.dispatch import count_work, plan_jobs

    out_dir = Path(out_dir)
    if done is None and out_dir.is_dir():
        done = read_done(out_dir)
    done_keys = done.keys if done is not None else set()
    total, items_done = count_work(list(entries), list(prompts), captions_per_image, done_keys)
    expected, source = expected_output(out_dir, done)
    jobs: Iterator = plan_jobs(list(entries), list(prompts), captions_per_image, done_keys)
    if n_verdict is not None:
        jobs = one_per_caption(jobs)
    sample, requests = reservoir_sample(jobs, sample_size, seed)
    sizes: dict[Path, tuple[int, int] | None] = {}
    items: list[EstimateItem] = []
    for job in sample:
        path = Path(job.entry.path)
        if path not in sizes:
            sizes[path] = size_of(path)
        size = sizes[path]
        items.append(
            EstimateItem(
                image_id=job.entry.image_id,
                width=size[0] if size else None,
                height=size[1] if size else None,
                prompt_text=billed_text(job.prompt, render_prompt(job.prompt, job.entry.image_id, job.indices[0])),
                n=len(job.indices),
            )
        )
    est = estimate_cost(
        items,
        price,
        detail=detail,
        max_tokens=max_tokens,
        captions_per_image=captions_per_image,
        expected_output_tokens=expected,
        scale_to=requests,
    )
    notes = [f"{source}: {expected} output tokens per caption"]
    if est.sampled:
        notes.append(f"image sizes from a random sample of {fmt_int(est.items_seen)} of {fmt_int(requests)} "
                     f"requests (seed {seed}); token and cost figures scaled")
    notes.append("earlier failures are counted as left: the next run retries them")
    if n_verdict is not None:
        notes.append(one_request_per_caption_note(n_verdict, n_source or "learned"))
    else:
        notes.append("one request per image and prompt, its missing captions asked together (n); "
                     "one per caption under a {template} prompt")
    if any(p.schema is not None for p in prompts):
        notes.append("structured prompts: one answer per image, schema counted as input text")
    if not price.known:
        notes.append("price unknown for this model: costs are shown as unknown (give --price-in/--price-out)")
    notes.append("nothing was sent")
    return replace(
        est,
        items_left=total - items_done,
        items_total=total,
        items_done=items_done,
        output_tokens_source=source,
        price_source=price_source,
        max_cost=max_cost,
        notes=tuple(notes),
        spent_usd=done.cost_usd if done is not None else 0.0,
        spent_unknown=done.cost_unknown if done is not None else 0,
        n_verdict=n_verdict,
    )


def one_per_caption(jobs: Iterable[Any]) -> Iterator[Any]:
    """The plan as a server that does not honour `n` is asked: one job per missing caption slot."""
    for job in jobs:
        if len(job.indices) <= 1:
            yield job
        else:
            for i in job.indices:
                yield replace(job, indices=(i,))


def _same_server(recorded: Any, base_url: str | None) -> bool:
    """Is a recorded base URL (manifest, probe.json) the run's? None stands for OpenAI's default."""
    from pipeline.run.outage import DEFAULT_BASE_URL

    def norm(url: Any) -> str:
        return str(url or DEFAULT_BASE_URL).rstrip("/")

    return norm(recorded) == norm(base_url)


def learned_n(out_dir: Path, manifest: dict | None, model: str, base_url: str | None) -> tuple[str | None, str]:
    """What the server does with `n`, as the folder knows it for this model and server: the manifest's
    `learned` (earlier runs), else a saved `probe --save <out>/probe.json`. (verdict or None, where from)."""
    if isinstance(manifest, dict) and manifest.get("model") == model and _same_server(manifest.get("base_url"), base_url):
        verdict = n_unsupported(manifest.get("learned"))
        if verdict is not None:
            return verdict, f"learned by an earlier run, {MANIFEST_NAME}"
    probe_file = Path(out_dir) / PROBE_FILE
    try:
        saved = json.loads(probe_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    if isinstance(saved, dict) and saved.get("model") == model and _same_server(saved.get("base_url"), base_url):
        verdict = n_unsupported(saved)
        if verdict is not None:
            return verdict, f"found by `probe`, {PROBE_FILE}"
    return None, ""


def estimate_for_run(prep: Any) -> CostEstimate:
    """The CLI's `run --dry-run`: `build_estimate` for a prepared run (`pipeline.run.runner.Prepared`).

    Reads only prep.index.entries, prep.prompts, prep.price, prep.previous_manifest (what earlier runs
    learned of the server's `n`), and from prep.cfg the output folder, the model options, the budget and
    the price options (overrides, --pricing); nothing else of the run's configuration.
    """
    cfg = prep.cfg
    prices = cfg.prices
    overridden = any(v is not None for v in (prices.price_in, prices.price_out, prices.price_cached_in))
    if cfg.model.backend == "offline":
        source = "offline backend: free"
    elif get_preset(cfg.model.provider).free and not overridden:
        source = f"--provider {cfg.model.provider}: a server of your own, free"
    else:
        try:
            table: PricingTable | None = load_run_pricing(prices.pricing_file)
        except ReidPromptError:
            table = None
        source = describe_price_source(table, overridden=overridden)
        if not overridden and prep.price.known and prep.price.source:
            source += f"; {prep.price.source}"  # the model's own source: says UNVERIFIED where it is
    verdict, where = learned_n(Path(cfg.out), prep.previous_manifest, cfg.model.model, cfg.model.base_url) \
        if cfg.model.backend == "openai" else (None, "")
    return build_estimate(
        prep.index.entries,
        prep.prompts,
        Path(cfg.out),
        prep.price,
        n_verdict=verdict,
        n_source=where,
        detail=cfg.model.detail,
        max_tokens=cfg.model.max_tokens,
        captions_per_image=cfg.model.captions_per_image,
        max_cost=cfg.limits.max_cost,
        price_source=source,
        done=prep.resume.read if Path(cfg.out).is_dir() else None,  # prepare() read the folder already
    )


# --- rendering ---------------------------------------------------------------------------------------

def _per_million(x: float) -> str:
    """$0.60, $0.075, $2.50: at least cents, and the extra digits a price per 1M tokens really has."""
    text = f"{x:.4f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def _sizes_text(est: CostEstimate, top: int = 5) -> str:
    if not est.size_counts:
        return "none read"
    ranked = sorted(est.size_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{w}x{h}: {fmt_int(n)}" for (w, h), n in ranked[:top])
    more = len(ranked) - top
    return shown + (f", {fmt_int(more)} more sizes" if more > 0 else "")


def render_estimate(est: CostEstimate, console: Console) -> None:
    """Print the dry-run table: model and prices, work left, tokens, cost, and the assumptions behind them."""
    t = Table(title="reid-prompt dry run (nothing sent)", box=box.SIMPLE_HEAVY, show_header=False,
              title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    t.add_row("model", Text(f"{est.model}, detail {est.detail}, max_tokens {est.max_tokens}"))
    price = (f"{_per_million(est.price_input)} in / {_per_million(est.price_cached_input)} cached / "
             f"{_per_million(est.price_output)} out per 1M tokens")
    if est.price_source:
        price += f" ({est.price_source})"
    if not est.price_known:
        price = "unknown: the model is not in the pricing file (give --price-in/--price-out)"
    t.add_row("price", Text(price, style="" if est.price_known else "yellow"))
    if est.items_total is not None:
        t.add_row("work items", f"{fmt_int(est.items_total)} total, {fmt_int(est.items_done)} done, "
                                f"{fmt_int(est.items_left)} left")
    else:
        t.add_row("work items left", fmt_int(est.items_left))
    requests = f"{fmt_int(est.requests)} ({est.captions_per_image} caption(s) per image)"
    if est.n_verdict is not None and est.captions_per_image > 1:
        requests = (f"{fmt_int(est.requests)} ({est.captions_per_image} caption(s) per image, one request "
                    f"each: the server {est.n_verdict} n)")
    t.add_row("requests", requests)
    sizes = _sizes_text(est)
    if est.sampled:
        sizes += f" (sample of {fmt_int(est.items_seen)})"
    t.add_row("image sizes", sizes)
    if est.unreadable:
        t.add_row("problems", Text(f"unreadable: {fmt_int(est.unreadable)}"
                                     + (f" of {fmt_int(est.items_seen)} sampled" if est.sampled else "")
                                     + " (counted as 0 image tokens)", style="yellow"))
    t.add_row("input tokens", f"{fmt_int(est.input_tokens)} (image {fmt_int(est.image_tokens)}, "
                              f"text {fmt_int(est.text_tokens)})")
    t.add_row("output tokens", f"{fmt_int(est.output_tokens)} ({est.expected_output_tokens} per caption; "
                               f"at most {fmt_int(est.output_tokens_max)})")
    if est.price_known:
        t.add_row("cost input", fmt_usd(est.cost_input))
        t.add_row("cost output", fmt_usd(est.cost_output))
        total = Text(fmt_usd(est.cost_total), style="bold")
        total.append(f"  (at most {fmt_usd(est.cost_max)} if every answer ran to max_tokens)", style="")
    else:
        total = Text("cost unknown", style="bold yellow")
        total.append(f"  (no price for {est.model}: give --price-in/--price-out)", style="")
    t.add_row("cost total", total)
    if est.spent_usd > 0 or est.spent_unknown:
        t.add_row("spent so far", Text(f"{fmt_spent(est.spent)} in this folder (failed answers that were "
                                       f"billed included)"))
    if est.max_cost is not None:
        over = est.spent_usd + est.cost_total > est.max_cost
        t.add_row("budget", Text(f"{fmt_usd(est.max_cost)}" + (" - the estimate is over budget; the run will stop"
                                                              " at the budget" if over else ""),
                                 style="bold red" if over else ""))
    for note in est.notes:
        t.add_row("assumption", Text(note))
    console.print(t)


# --- --dry-run --mode batch ------------------------------------------------------------------------

def _megabytes(n: int) -> str:
    return f"{n / 1_000_000:,.1f} MB" if n >= 100_000 else f"{n:,} bytes"


@dataclass(frozen=True)
class BatchCosts:
    """The batch plan's money: at the batch price (expected answers and every answer at max_tokens), and
    the same requests at the online price."""

    batch: float
    batch_max: float
    online: float
    expected_output_tokens: int  # per caption
    output_source: str


def batch_costs(input_tokens: int, captions: int, batch_max: float, online: ModelPrice, batch: ModelPrice,
                expected_output_tokens: int, output_source: str = "") -> BatchCosts:
    """Cost of `input_tokens` in and `captions` answers of `expected_output_tokens` each. Pure."""
    usage = Usage(prompt_tokens=input_tokens, completion_tokens=captions * expected_output_tokens)
    return BatchCosts(cost_usd(batch, usage), batch_max, cost_usd(online, usage), expected_output_tokens,
                      output_source)


def render_batch_preview(plan: Any, prep: Any, console: Console) -> None:
    """Print `--dry-run --mode batch`: each shard a run would write now (lines, bytes, estimated queued
    tokens) and the cost at the batch price beside the online price (`pipeline.batch.work.preview`)."""
    online = prep.price
    batch = online.batch()
    out = Path(prep.cfg.out)
    expected, source = expected_output(out, prep.resume.read if out.is_dir() else None)
    shards = plan.shards
    input_tokens = sum(s.est_input_tokens for _, s in shards)
    costs = batch_costs(input_tokens, plan.captions, sum(s.est_cost_usd for _, s in shards), online, batch,
                        min(expected, prep.cfg.model.max_tokens or expected), source)

    t = Table(title="reid-prompt batch plan (dry run: nothing sent, nothing written)", box=box.SIMPLE_HEAVY,
              title_justify="left")
    t.add_column("shard", no_wrap=True)
    t.add_column("lines", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("est. queued tokens", justify="right")
    for shard_id, s in shards:
        t.add_row(shard_id, fmt_int(s.lines), _megabytes(s.bytes), fmt_int(s.est_input_tokens))
    if len(shards) > 1:
        t.add_row("total", fmt_int(plan.lines), _megabytes(sum(s.bytes for _, s in shards)), fmt_int(input_tokens),
                  style="bold")
    if shards:
        console.print(t)
    else:
        console.print(Text("reid-prompt batch plan (dry run: nothing sent, nothing written)", style="italic"))
    lim = plan.limits
    cap = f", {fmt_int(lim.max_tokens)} estimated queued tokens" if lim.max_tokens else ""
    lines = [f"limits per shard: {fmt_int(lim.max_requests)} lines, {_megabytes(lim.max_bytes)}{cap}"]
    if not shards:
        lines.append("nothing to send: every caption is done or already in a batch of this folder")
    for reason, count in sorted(plan.errors.items()):
        lines.append(f"{fmt_int(count)} caption(s) would get no line: {reason} (errors.csv when run)")
    if plan.outstanding:
        in_flight = sum(r.lines for r in plan.outstanding)
        lines.append(f"{len(plan.outstanding)} earlier shard(s) not collected yet ({fmt_int(in_flight)} lines): "
                     "their work is not planned again; the run collects them first")
    if batch.known and online.known:
        lines.append(f"cost at the batch price: {fmt_usd(costs.batch)} (at most {fmt_usd(costs.batch_max)} if every "
                     f"answer ran to max_tokens); online: {fmt_usd(costs.online)}")
        lines.append(f"batch price: {_per_million(batch.input)} in / {_per_million(batch.output)} out per 1M tokens "
                     f"({batch.source or 'pricing file'}); online {_per_million(online.input)} in / "
                     f"{_per_million(online.output)} out")
    else:
        lines.append(f"cost unknown: no price for {online.model} (give --price-in/--price-out)")
    lines.append(f"output tokens: {costs.expected_output_tokens} per caption ({source})")
    limit = prep.cfg.limits.max_cost
    if limit is not None and batch.known:
        spent = prep.resume.read.cost_usd if prep.resume.read is not None else 0.0
        over = spent + costs.batch_max > limit
        lines.append(f"budget {fmt_usd(limit)}: a submitted batch counts at its full estimate"
                     + (" - the plan is over budget: the run submits only what fits" if over else ""))
    lines.append("batches finish within 24 h (the completion window); nothing was sent")
    for line in lines:
        console.print(Text(line))
