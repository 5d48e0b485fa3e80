"""The run: a dispatcher streams work, a bounded pool of workers calls the model, one writer writes.

    dispatcher --jobs--> worker x concurrency --results--> writer
         ^                      |
         +---- retries ---------+   (after their backoff, ahead of new work; never a sleeping worker)

One anyio task group. Memory object streams with small buffers give backpressure; each worker holds its
own clone of both streams, so the job stream ends when the dispatcher closes it and the results stream
ends when the last worker closes its clone, and every task ends when its input ends. Only the writer
holds the receive end of results.

Stopping:
- Ctrl-C / SIGTERM (first): no new request; answers already in flight get `grace_seconds` to arrive and
  be written (they are paid for); then the workers are cancelled. A second Ctrl-C cancels them at once.
- `--max-cost`: no new request once spent + in flight + this one would pass the budget; in flight finish.
- A fatal API answer (401, 403, unknown model, no quota): the workers are cancelled at once.
The writer is outside the scope those cancel: it drains what the workers sent, flushes and ends.

Neighbours: `dispatch.py` (jobs, the plan, the dispatcher), `control.py` (stopping: signals, grace,
budget, fatal errors), `writer.py` (the output files), `manifest.py` (manifest.json).
"""

from __future__ import annotations

import os
import random
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from pipeline.data.attributes import AttributeValidationError, field_names, validate_answer
from pipeline.providers.base import APIFailure, Backend, ErrorKind, ModelReply, ModelRequest
from pipeline.config import MAX_CONCURRENCY, RunConfig
from pipeline.errors import ConfigError, FatalAPIError, ImageError, ServerUnreachableError
from pipeline.data.images import payload_from_bytes, read_bytes
from pipeline.data.index import LoadedIndex, index_positions, load_index
from pipeline.run.limits import RateLimiter
from pipeline.run.fallbacks import (
    FallbackState, FormatMode, apply_format, format_after_answer, format_after_invalid, n_after_answer,
    on_bad_request, repair_turns, request_format,
)
from pipeline.run.adaptive import AdaptiveLimit, AdaptivePolicy, Outcome, Slot, classify_failure
from pipeline.run.tail import TailPolicy, TailTracker, hedge_after, race, should_hedge, timeout_is_load
from pipeline.ledger.manifest import now_iso
from pipeline.ledger.costs import budget_refusal, new_run_id, price_warning, retried_reason
from pipeline.providers.pricing import (
    ModelPrice,
    cost_usd,
    load_run_pricing,
    pricing_label,
    resolve_price,
    row_cost,
)
from pipeline.data.prompts import billed_text, load_prompts, render_prompt
from pipeline.records import AttributeRow, CaptionRow, ErrorRow, IndexEntry, Prompt, Usage
from pipeline.run.retry import RetryPolicy, decide
from pipeline.run.stats import RunStats, Snapshot
from pipeline.providers.tokens import estimate_request
from pipeline.providers.presets import ResolvedKey, get_preset, preset_prices, resolve_key
from pipeline.run.control import Controller, signal_handlers, watch_until
from pipeline.run.outage import DEFAULT_BASE_URL, OutagePolicy, OutageTracker, cannot_reach_message, watch_outages
from pipeline.run.dispatch import Dispatcher, Job, captions_wanted, plan_jobs, scan_work
from pipeline.run.sample import describe_subset, select_entries
from pipeline.ledger.inputs import Change, Inputs, check_inputs, current_inputs, fingerprint_file, folder_has_rows
from pipeline.ledger.lock import FolderLock
from pipeline.ledger.redo import apply_redo
from pipeline.ledger.manifest import read_manifest
from pipeline.run.keeper import ManifestKeeper
from pipeline.ledger.outputs import output_csv_names
from pipeline.ledger.appendfile import describe_write_error
from pipeline.ledger.writer import HoldPolicy, OutputWriter, ResumeState, Result, say, writer_task

JOB_BUFFER = 0  # the dispatcher hands a job over only when a worker is free: retries stay fresh
INLINE_DECODE_BYTES = 512 * 1024  # smaller images are checked on the loop (cheaper than a thread hop)


# --- the workers -----------------------------------------------------------------------------------------

@dataclass
class Context:
    cfg: RunConfig
    backend: Backend
    limiter: RateLimiter
    policy: RetryPolicy
    stats: RunStats
    price: ModelPrice
    controller: Controller
    dispatcher: Dispatcher
    budget_left: float | None = None  # USD this run may still spend (--max-cost minus earlier runs)
    n_supported: bool = True
    inflight_cost: float = 0.0
    answers: int = 0
    answered_cost: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    outage: OutageTracker | None = None  # can the server be reached (pipeline.run.outage); None: stop at once
    adaptive: AdaptiveLimit | None = None  # the concurrency limit below --concurrency (pipeline.run.adaptive)
    fallbacks: FallbackState = field(default_factory=FallbackState)  # n / response_format (pipeline.run.fallbacks)
    notify: Callable[[str], None] = field(default=lambda line: say(f"note: {line}"))  # a fallback's one line
    tail: TailTracker = field(default_factory=TailTracker)  # adaptive deadline and hedges (pipeline.run.tail)


@dataclass(frozen=True)
class Billed:
    """An answer the server billed that is no caption (refused, empty, invalid): who answered, what usage."""

    model: str
    usage: Usage


def error_rows(
    job: Job,
    reason: str,
    detail: str,
    *,
    run_id: str = "",
    model: str = "",
    billed: Billed | None = None,
    price: ModelPrice | None = None,
) -> list[Result]:
    """errors.csv rows for every slot of `job`; a billed answer's usage and cost are shared among them.

    The usage is split like a caption answer's (`split_usage`), so the rows' costs add up to exactly
    the answer's cost; an unknown price leaves the cost cells empty. Unbilled failures cost 0.
    """
    ts = now_iso()
    parts = split_usage(billed.usage, len(job.indices)) if billed is not None else [Usage()] * len(job.indices)
    rows: list[Result] = []
    for i, u in zip(job.indices, parts):
        cost: float | None = 0.0
        if billed is not None and price is not None:
            cost = row_cost(price, u)
        rows.append(ErrorRow(
            job.entry.image_id, reason, detail, job.attempts, ts, job.prompt.name, i,
            model=billed.model if billed is not None else model,
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cost_usd=cost,
            run_id=run_id, position=job.entry.position,
        ))
    return rows


def _error_rows(ctx: "Context", job: Job, reason: str, detail: str, billed: Billed | None = None) -> list[Result]:
    return error_rows(job, reason, detail, run_id=ctx.stats.run_id, model=ctx.cfg.model.model, billed=billed,
                      price=ctx.price)


def sum_usage(usages: list[Usage]) -> Usage:
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )


def split_usage(usage: Usage, parts: int) -> list[Usage]:
    """Share one request's usage among the rows it produced: input on the first, output evenly."""
    parts = max(1, parts)
    out_each, rest = divmod(usage.completion_tokens, parts)
    return [
        Usage(
            prompt_tokens=usage.prompt_tokens if i == 0 else 0,
            completion_tokens=out_each + (rest if i == 0 else 0),
            cached_tokens=usage.cached_tokens if i == 0 else 0,
        )
        for i in range(parts)
    ]


async def load_payload(entry: IndexEntry):
    data = read_bytes(entry.path)
    if len(data) <= INLINE_DECODE_BYTES:
        return payload_from_bytes(data)
    return await anyio.to_thread.run_sync(payload_from_bytes, data)


def request_cost_guess(ctx: Context, est_in: int, est_out: int) -> float:
    """What the next request will likely cost: the mean of real answers once there are a few."""
    if ctx.answers >= 5:
        return 1.1 * ctx.answered_cost / ctx.answers
    return cost_usd(ctx.price, Usage(prompt_tokens=est_in, completion_tokens=est_out))


async def process(ctx: Context, job: Job) -> list[Result]:
    """One attempt at one job. Returns the rows to write; tells the dispatcher what became of the job."""
    cfg, stats, disp = ctx.cfg, ctx.stats, ctx.dispatcher
    try:
        payload = await load_payload(job.entry)
    except ImageError as exc:
        disp.finished(job)
        stats.failed(exc.reason, len(job.indices))
        return error_rows(job, exc.reason, exc.detail, run_id=stats.run_id)

    if not ctx.n_supported and len(job.indices) > 1:
        for i in job.indices[1:]:
            disp.add(Job(job.entry, job.prompt, (i,), job.attempts, job.soft_failures))
        job.indices = job.indices[:1]

    prompt_text = render_prompt(job.prompt, job.entry.image_id, job.indices[0])
    n = len(job.indices)
    # a structured prompt asks in the run's mode (json_schema, else json_object or the schema in the
    # prompt: pipeline.run.fallbacks), or in the mode a probe tries; a malformed answer gets its repair turns
    mode: FormatMode | None = None
    sent_text, rformat = prompt_text, None
    if job.prompt.schema is not None:
        mode = job.format_mode or ctx.fallbacks.mode
        sent_text, rformat = request_format(job.prompt, prompt_text, mode)
    follow_up = repair_turns(*job.repair) if job.repair is not None else ()
    est = estimate_request(
        ctx.price.image_rule,
        billed_text(job.prompt, sent_text) + "".join(text for _, text in follow_up),
        payload.width, payload.height, cfg.model.detail, cfg.model.max_tokens, n=n,
    )
    reserve = est.reserve_tokens
    guess = 0.0
    if ctx.budget_left is not None:
        guess = request_cost_guess(ctx, est.input_tokens, est.output_tokens)
        if stats.cost_usd + ctx.inflight_cost + guess > ctx.budget_left:
            ctx.controller.request_stop("budget")
            disp.abandon(job)
            return []

    slot: Slot | None = None
    with ctx.controller.before_send() as scope:
        await ctx.controller.gate.wait_open()  # held while the server is unreachable or the disk is full
        if ctx.adaptive is not None:
            slot = await ctx.adaptive.acquire()  # a place within the adaptive limit (servers without limits)
        reservation = await ctx.limiter.acquire(reserve)
    if scope.cancelled_caught or ctx.controller.stopping:
        if slot is not None:
            slot.cancel()
        if not scope.cancelled_caught:
            ctx.limiter.correct(reservation, 0)
        disp.abandon(job)
        return []

    request = ModelRequest(
        image_id=job.entry.image_id,
        prompt_text=sent_text,
        image=payload,
        model=cfg.model.model,
        detail=cfg.model.detail,
        max_tokens=cfg.model.max_tokens,
        n=n,
        temperature=cfg.model.temperature,
        response_format=rformat,
        reserve_tokens=reserve,
        follow_up=follow_up,
        timeout_s=ctx.tail.deadline(cfg.model.timeout),
    )
    job.attempts += 1
    stats.request_sent()
    ctx.inflight_cost += guess
    try:
        reply, hedge_won = await send_request(ctx, request)
    except APIFailure as failure:
        if failure.status is not None and ctx.outage is not None:
            ctx.outage.heard_from_server()  # any HTTP answer: the server is there
        ctx.limiter.observe_headers(failure.headers)
        if failure.status is not None:
            stats.saw_answer(failure.headers, failure.usage)  # manifest's `learned`: headers, usage
        ctx.limiter.correct(reservation, tpm_charge(failure.kind, failure.usage, reserve, est.output_tokens))
        outcome, occupied = classify_failure(failure.kind, failure.status, failure.usage is not None)
        if occupied and not timeout_is_load(ctx.tail.deadline(cfg.model.timeout), cfg.model.timeout):
            outcome, occupied = Outcome.OTHER, False  # abandoned at the adaptive deadline: a hang, not a queue
        settle_slot(ctx, slot, outcome, cfg.model.timeout if occupied else 0.0)
        billed = None
        if failure.usage is not None:  # answered and billed, but no caption (refused, empty)
            _account(ctx, failure.usage)
            billed = Billed(failure.model or cfg.model.model, failure.usage)
        if failure.status == 200:  # answered, though no caption: what it says about n / response_format
            learn_from_answer(ctx, job, n, None, mode)
        elif failure.kind is ErrorKind.BAD_REQUEST and retry_bad_request(ctx, job, n, mode, failure.code):
            return []
        return handle_failure(ctx, job, failure.kind, failure.message, failure.headers, billed)
    except BaseException:
        if slot is not None:
            slot.cancel()  # cut off by a stop: no sample
        raise
    finally:
        ctx.inflight_cost -= guess
    if ctx.outage is not None:
        ctx.outage.heard_from_server()
    ctx.limiter.observe_headers(reply.headers)
    stats.saw_answer(reply.headers, reply.usage)
    ctx.limiter.correct(reservation, tpm_charge(None, reply.usage, reserve, est.output_tokens))
    # a hedge's answer says nothing of the queue (the slot's clock ran through the straggler): no sample
    settle_slot(ctx, slot, Outcome.OTHER if hedge_won else Outcome.OK)
    ctx.tail.observe(reply.latency_s)
    return handle_reply(ctx, job, prompt_text, reply, mode=mode)


async def send_request(ctx: Context, request: ModelRequest) -> tuple[ModelReply, bool]:
    """One request under the adaptive deadline, hedged near the end of the work (pipeline.run.tail);
    (the answer, whether the hedge's answer won)."""
    tail, ceiling, stats = ctx.tail, ctx.cfg.model.timeout, ctx.stats
    left = stats.total - stats.skipped - stats.done - stats.failed_total  # work items not finished
    near_end = left <= 2 * ctx.cfg.limits.concurrency * max(1, ctx.cfg.model.captions_per_image)
    if tail.samples >= tail.policy.min_samples and not near_end:
        # mid-run: the deadline set at sending (request.timeout_s) is the window's; a plain call costs
        # no task group (~0.1 ms of CPU a request at 1,000 requests/s)
        return await ctx.backend.caption(request), False

    def may_hedge(age_s: float) -> bool:
        adaptive = ctx.adaptive
        room = adaptive is None or not adaptive.enabled or adaptive.in_use + adaptive.held < adaptive.capacity
        return should_hedge(
            age_s=age_s, p99=tail.p99, samples=tail.samples, plan_exhausted=ctx.dispatcher.exhausted,
            idle=room and ctx.stats.in_flight < ctx.cfg.limits.concurrency, hedges=tail.hedges,
            requests=ctx.stats.requests, policy=tail.policy,
            rate_limit_binds=(ctx.limiter.rpm_limit is not None or ctx.limiter.tpm_limit is not None
                              or ctx.budget_left is not None),  # nor under --max-cost
        )

    def on_hedge() -> None:
        tail.hedges += 1
        ctx.stats.hedges += 1
        ctx.stats.request_sent()

    # nothing can happen to a request before the deadline's floor or the hedge age: wake no sooner
    first_check = tail.policy.floor_s if tail.p99 is None else min(tail.policy.floor_s, hedge_after(tail.p99, tail.policy))
    reply, hedge_won = await race(lambda: ctx.backend.caption(request), lambda: tail.deadline(ceiling),
                                  may_hedge, on_hedge, first_check_s=first_check)
    tail.hedge_wins += hedge_won
    return reply, hedge_won


def learn_from_answer(ctx: Context, job: Job, n_sent: int, choices: int | None, mode: FormatMode | None) -> None:
    """What an HTTP answer (caption or not) says about the server's `n` and `response_format`: the
    decisions are `pipeline.run.fallbacks`'; a change is said once, in one line, and kept on RunStats."""
    fb, stats = ctx.fallbacks, ctx.stats
    verdict, line = n_after_answer(fb, n_sent, n_sent if choices is None else choices, probe=job.probe == "n")
    if verdict is not None:
        fb.n_support = stats.n_support = verdict
        if not fb.n_usable:
            ctx.n_supported = False
    if line is not None:
        _say_once(ctx, "n", line)
    if mode is not None:
        new_mode, line = format_after_answer(fb, mode)
        if new_mode is not None and line is not None:
            apply_format(fb, new_mode, "rejected")
            _say_once(ctx, f"format:{new_mode.value}", line)
        _sync_format_stats(ctx)
    job.probe = ""
    job.repair = None


def retry_bad_request(ctx: Context, job: Job, n_sent: int, mode: FormatMode | None, code: str | None) -> bool:
    """A 400 that may be about `n` or `response_format` rather than the image: send the same slots again
    without it (a probe, `pipeline.run.fallbacks.on_bad_request`). True if the job went back in line."""
    action = on_bad_request(ctx.fallbacks, n_sent, mode, code)
    if action.action != "retry":
        return False
    if ctx.controller.stopping:  # not known to be the image's fault: left for the next run
        ctx.dispatcher.abandon(job)
        return True
    if n_sent > 1:
        if len(job.indices) > 1:
            ctx.dispatcher.add(Job(job.entry, job.prompt, job.indices[1:], job.attempts, job.soft_failures,
                                   format_mode=job.format_mode))
            job.indices = job.indices[:1]
    else:
        job.format_mode = action.mode
    job.probe = action.probe
    ctx.stats.retry()
    ctx.dispatcher.reschedule(job, 0.0)
    return True


def seed_fallbacks(ctx: Context, learned: Any, structured: bool) -> None:
    """Start from what an earlier run of the folder learned of this server (`n`, the structured mode)."""
    fb = ctx.fallbacks = FallbackState.from_learned(learned)
    ctx.n_supported = fb.n_usable
    ctx.stats.n_support = fb.n_support
    if structured:
        _sync_format_stats(ctx)
    for key, line in fb.resumed_lines(ctx.cfg.model.captions_per_image, structured):
        _say_once(ctx, key, line)


def _say_once(ctx: Context, key: str, line: str) -> None:
    if ctx.fallbacks.say_once(key, line, ctx.notify):
        ctx.stats.fallback_lines.append(line)


def _sync_format_stats(ctx: Context) -> None:
    fb, stats = ctx.fallbacks, ctx.stats
    stats.structured_mode = fb.mode.value
    stats.json_schema_support = fb.json_schema
    stats.json_object_support = fb.json_object


def settle_slot(ctx: Context, slot: Slot | None, outcome: Outcome, hold_s: float = 0.0) -> None:
    """Give the adaptive slot back with what the attempt said; once the server has shown rate-limit
    headers (or limits were given), the adaptive limit steps aside for --concurrency."""
    if slot is None or ctx.adaptive is None:
        return
    if ctx.limiter.rpm_limit is not None or ctx.limiter.tpm_limit is not None:
        ctx.adaptive.disable()
    slot.finish(outcome, hold_s)
    stats = ctx.stats
    if ctx.adaptive.enabled:
        stats.concurrency_limit = ctx.adaptive.capacity
        stats.concurrency_limit_max = max(stats.concurrency_limit_max or 0, stats.concurrency_limit)
    else:
        stats.concurrency_limit = stats.concurrency_limit_max = None


def tpm_charge(kind: ErrorKind | None, usage: Usage | None, reserved: int, max_output: int) -> int:
    """What the server counted against tokens-per-minute for one attempt.

    OpenAI reserves input + max_tokens x n up front and does not give back the unused answer budget, so
    the limiter keeps the output reservation and corrects only the input estimate from `usage`. A 429
    was not admitted (nothing counted); other failures without usage keep the reservation, since the
    server may have counted them before failing.
    """
    if usage is not None:
        return usage.prompt_tokens + max(max_output, usage.completion_tokens)
    if kind is ErrorKind.RATE_LIMIT:
        return 0
    return reserved


def _account(ctx: Context, usage: Usage) -> float | None:
    """Count one billed answer (caption or not) in the run's spending; its row cost (None: price unknown)."""
    cost = row_cost(ctx.price, usage)
    ctx.stats.usage(usage.prompt_tokens, usage.completion_tokens, cost)
    ctx.answers += 1
    ctx.answered_cost += cost_usd(ctx.price, usage)
    return cost


SOFT_KINDS = frozenset({ErrorKind.REFUSED, ErrorKind.EMPTY, ErrorKind.INVALID})


def handle_failure(
    ctx: Context, job: Job, kind: ErrorKind, message: str, headers, billed: Billed | None = None
) -> list[Result]:
    """Apply the retry policy to `job` after a failed attempt: retry later, record it, or stop the run.

    `billed`: the attempt was answered and paid for (a refused, empty or invalid answer). Its cost goes on
    the books now, in exactly one errors.csv row per slot: the failure row if the item fails here, else a
    `<kind>_retried` row (see `pipeline.ledger.costs`), so a retry that later succeeds, a stop, or a
    crash before the retry loses none of it.
    """
    stats, disp = ctx.stats, ctx.dispatcher
    if kind is ErrorKind.RATE_LIMIT:
        stats.got_429()
    # "One more try" for an answer that is no caption counts such answers, not the 5xx or drops before.
    soft = kind in SOFT_KINDS
    if soft:
        job.soft_failures += 1
    attempt = job.soft_failures if soft and job.attempts < ctx.policy.max_attempts else job.attempts
    decision = decide(kind, attempt, headers, ctx.policy, ctx.rng.random())
    if decision.action == "wait_outage":
        return wait_outage(ctx, job, message)
    if decision.pause_pool and decision.wait_s > 0:
        ctx.limiter.pause(decision.wait_s)
        stats.paused_until = ctx.limiter.paused_until
    paid = [] if billed is None else _error_rows(ctx, job, retried_reason(kind.value), message, billed)
    if decision.action == "retry" and not ctx.controller.stopping:
        stats.retry()
        disp.reschedule(job, decision.wait_s)
        return paid
    if decision.action == "stop_run":
        ctx.controller.fail(FatalAPIError(_fatal_message(kind, message, ctx.cfg)))
        disp.abandon(job)
        return paid
    if decision.action == "retry":  # stopping: leave it for the next run
        disp.abandon(job)
        return paid
    disp.finished(job)
    stats.failed(kind.value, len(job.indices))
    return _error_rows(ctx, job, kind.value, message, billed)


def wait_outage(ctx: Context, job: Job, why: str) -> list[Result]:
    """No connection could be made: the attempt is not spent and nothing goes to errors.csv.

    Before the server's first answer in this run the address is wrong or the server is down: stop now
    (exit 3). After it, the pool waits at the gate while `watch_outages` probes; the job goes back in line.
    """
    job.attempts -= 1
    outage, disp = ctx.outage, ctx.dispatcher
    if outage is None or not outage.heard:
        url = outage.url if outage is not None else (ctx.cfg.model.base_url or DEFAULT_BASE_URL)
        ctx.controller.fail(ServerUnreachableError(cannot_reach_message(url, why)))
        disp.abandon(job)
        return []
    outage.unreachable(why)
    if ctx.controller.stopping:
        disp.abandon(job)
    else:
        disp.reschedule(job, 0.0)  # it waits at the gate, with every other request
    return []


def _fatal_message(kind: ErrorKind, message: str, cfg: RunConfig) -> str:
    where = cfg.model.base_url or "the OpenAI API"
    if kind is ErrorKind.AUTH:
        return f"the API key was rejected by {where} ({message}): check {key_hint(cfg)}"
    if kind is ErrorKind.PERMISSION:
        return f"{where} refused access ({message})"
    if kind is ErrorKind.NOT_FOUND:
        # the server's own words: a 404, or a 400 naming the model (transformers serve's {"detail": ...})
        return f"model {cfg.model.model!r} is not available at {where} ({message}): check --model"
    if kind is ErrorKind.QUOTA:
        return f"{where} says the account is out of quota or credit ({message}): add credit or change key"
    return message


def key_hint(cfg: RunConfig) -> str:
    """Which variable to check after a rejected key: the provider's, and OPENAI_API_KEY if that stood in."""
    preset_var = get_preset(cfg.model.provider).key_env or "OPENAI_API_KEY"
    if preset_var == "OPENAI_API_KEY" or os.environ.get(preset_var, "").strip():
        return preset_var
    return f"{preset_var} (OPENAI_API_KEY was sent in its place)"


@dataclass
class AnswerRows:
    """What one answer gives its job's slots (`answer_rows`), before any retry decision.

    `rows`: caption or attribute rows of the slots filled; `bad`: (slot, INVALID, why) of structured
    answers that fail their schema, with `invalid_reasons` (the validation reason codes, in order) and
    `bad_usage` (their share of the bill); `repair`: the first malformed answer and what is wrong with it;
    `unfilled`: slots no choice filled (refused, empty, or `n` not honoured).
    """

    rows: list[Result]
    bad: list[tuple[int, ErrorKind, str]]
    invalid_reasons: list[str]
    bad_usage: list[Usage]
    repair: tuple[str, str] | None
    unfilled: tuple[int, ...]


def answer_rows(job: Job, prompt_text: str, reply: ModelReply, price: ModelPrice) -> AnswerRows:
    """The rows an answer makes for `job`'s slots, judged by the same rules online and in batch mode
    (pure: no counters, no retries). The usage is split over the texts (`split_usage`), each row costed
    at `price` (the batch price for a Batch API answer); a structured answer is validated against its
    prompt's schema."""
    ts = now_iso()
    filled = list(zip(job.indices, reply.texts))
    usages = split_usage(reply.usage, len(filled))
    rows: list[Result] = []
    bad: list[tuple[int, ErrorKind, str]] = []
    reasons: list[str] = []
    bad_usage: list[Usage] = []  # the invalid answers' share of the bill: it goes on their error rows
    repair: tuple[str, str] | None = None  # a malformed answer and what is wrong with it
    for (idx, text), u in zip(filled, usages):
        cost = row_cost(price, u)
        if job.prompt.schema is not None:
            try:
                fields = validate_answer(text, job.prompt.schema)
            except AttributeValidationError as exc:
                bad.append((idx, ErrorKind.INVALID, f"{exc.reason}: {exc.detail}"))
                reasons.append(exc.reason)
                bad_usage.append(u)
                repair = repair or (text, f"{exc.reason}: {exc.detail}")
                continue
            rows.append(AttributeRow(
                job.entry.image_id, job.prompt.name, fields, ts, reply.model, u.prompt_tokens,
                u.completion_tokens, cost, caption_index=idx, prompt_hash=job.prompt_hash,
                position=job.entry.position,
            ))
        else:
            rows.append(CaptionRow(
                image_id=job.entry.image_id, prompt=prompt_text, caption=text, timestamp=ts,
                model=reply.model, prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                cost_usd=cost, prompt_name=job.prompt.name, caption_index=idx, attempts=job.attempts,
                latency_s=reply.latency_s, prompt_hash=job.prompt_hash, position=job.entry.position,
            ))
    return AnswerRows(rows, bad, reasons, bad_usage, repair, tuple(job.indices[len(filled):]))


def handle_reply(
    ctx: Context, job: Job, prompt_text: str, reply: ModelReply, *, mode: FormatMode | None = None
) -> list[Result]:
    """Rows for the slots the answer filled; the rest go on as a job of their own.

    Slots can stay unfilled because a choice was refused or invalid (retried once, then errors.csv) or
    because the server ignores `n` (asked for one by one from then on, like any server without `n`).
    A malformed structured answer's retry is a repair request (its answer and the validation error
    shown to the model); the first non-JSON answer in a `response_format` mode moves the run to the
    next mode (`pipeline.run.fallbacks`). `mode`: the structured mode the request was sent in.
    """
    disp = ctx.dispatcher
    learn_from_answer(ctx, job, len(job.indices), len(reply.texts) + len(reply.rejected), mode)
    _account(ctx, reply.usage)
    answer = answer_rows(job, prompt_text, reply, ctx.price)
    if mode is not None:
        for reason in answer.invalid_reasons:
            new_mode, line = format_after_invalid(ctx.fallbacks, mode, reason)
            if new_mode is not None and line is not None:
                apply_format(ctx.fallbacks, new_mode, "ignored")
                _say_once(ctx, f"format:{new_mode.value}", line)
                _sync_format_stats(ctx)
    rows, bad, bad_usage = answer.rows, answer.bad, answer.bad_usage
    if rows:
        ctx.stats.captioned(job.entry.image_id, _preview(rows[0]), reply.latency_s, n=len(rows))
    unfilled = answer.unfilled
    if unfilled and not reply.rejected:
        ctx.n_supported = False
        for i in unfilled:
            disp.add(Job(job.entry, job.prompt, (i,), 0))
        unfilled = ()
    failed = tuple(i for i, _, _ in bad) + tuple(unfilled)
    out: list[Result] = list(rows)
    if failed:
        kind, why = (bad[0][1], bad[0][2]) if bad else reply.rejected[0]
        rest = disp.adopt(Job(job.entry, job.prompt, failed, job.attempts, job.soft_failures, repair=answer.repair))
        # refused choices' tokens are already on the caption rows (the usage is split over the texts)
        billed = Billed(reply.model, sum_usage(bad_usage)) if bad_usage else None
        out += handle_failure(ctx, rest, kind, why, reply.headers, billed)
    disp.finished(job)
    return out


def _preview(row: Result) -> str:
    if isinstance(row, CaptionRow):
        return row.caption
    return ", ".join(f"{k}={v}" for k, v in list(getattr(row, "fields", {}).items())[:4])


async def worker(ctx: Context, jobs: ObjectReceiveStream[Job], results: ObjectSendStream[list[Result]]) -> None:
    async with jobs, results:
        async for job in jobs:
            if ctx.controller.stopping:
                ctx.dispatcher.abandon(job)
                continue
            ctx.stats.in_flight += 1
            try:
                rows = await process(ctx, job)
            finally:
                ctx.stats.in_flight -= 1
            if rows:
                with anyio.CancelScope(shield=True):  # the writer is alive; an answer is never dropped
                    await results.send(rows)


# --- set-up and the whole run ---------------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything checked and loaded before the first request."""

    cfg: RunConfig
    index: LoadedIndex
    prompts: list[Prompt]
    writer: OutputWriter
    resume: ResumeState
    price: ModelPrice
    total: int
    skipped: int
    api_key: str | None = field(default=None, repr=False)
    lock: FolderLock | None = None  # held from prepare() to the end of run_prepared()
    inputs: Inputs | None = None
    accepted_changes: list[Change] = field(default_factory=list)  # --allow-changes
    previous_manifest: dict | None = None
    subset_note: str | None = None  # --limit / --sample: which images, said at the start
    index_size: int = 0  # images in the whole index (index.entries holds the subset)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


@dataclass
class RunResult:
    state: str  # finished | interrupted | budget | failed
    snapshot: Snapshot
    out: Path
    fatal: FatalAPIError | None = None
    repaired: list[str] = field(default_factory=list)
    abandoned: int = 0
    held: int = 0  # answers that went to a pending file instead of the CSV files (merged on next start)


def resolve_api_key(cfg: RunConfig) -> str | None:
    """The key of the run's provider (`presets.resolve_key`: its variable, else OPENAI_API_KEY; a local
    server needs none). A missing or unusable key is one line naming the variable, never the key."""
    if cfg.model.backend != "openai":
        return None
    return usable_key(cfg.model.provider, os.environ, cfg.api_key).key


def usable_key(provider: str | None, env: Mapping[str, str], explicit: str | None = None) -> ResolvedKey:
    """`presets.resolve_key`, refused in one line naming the variable (never the key) if the key cannot go
    into an HTTP header (`key_problem`). `run` and `probe` check a key alike."""
    resolved = resolve_key(provider, env, explicit)
    problem = key_problem(resolved.key)
    if problem:
        raise ConfigError(f"{resolved.variable} {problem}: copy the key again (the key itself is not shown)")
    return resolved


def key_problem(key: str) -> str | None:
    """Why a key cannot go into an HTTP header (None if it can), without ever quoting the key.

    A key pasted with a stray newline, a non-breaking space or smart quotes would otherwise fail deep in
    the HTTP library with a traceback that may print the header, key included.
    """
    for i, ch in enumerate(key):
        if ord(ch) > 126:
            return f"holds a non-ASCII character at position {i + 1}"
        if ord(ch) < 32 or ord(ch) == 127:
            return f"holds a control character at position {i + 1}"
        if ch == " ":
            return f"holds a space at position {i + 1}"
    return None


def prepare(cfg: RunConfig, *, readonly: bool = False) -> Prepared:
    """All the checks that must pass before any request is paid for, in the order a user fixes them.

    `readonly` (dry-run): needs no key, takes no lock and changes nothing on disk (no repair).
    Otherwise the output folder's lock is taken before anything in it is read or repaired, and held
    until `run_prepared` ends (or released here if a check fails).
    """
    api_key = None if readonly else resolve_api_key(cfg)
    prompts = load_prompts(cfg.prompt_files, cfg.prompts_dir)
    if cfg.model.backend == "offline" and any(p.schema is not None for p in prompts):
        raise ConfigError("the offline backend cannot answer structured (JSON schema) prompts")
    whole = load_index(cfg.index, cfg.root, follow_symlinks=cfg.follow_symlinks)
    # --limit / --sample: a choice of images that keep their index positions (parts, resume: the index's)
    index = replace(whole, entries=select_entries(whole.entries, cfg.subset))
    subset_note = describe_subset(cfg.subset, index.entries, len(whole.entries))
    table = load_run_pricing(cfg.prices.pricing_file)
    if cfg.model.backend == "offline":
        price = resolve_price(table, cfg.model.model, 0.0, 0.0, 0.0)
    else:
        # a local server's preset (vllm, ollama, lmstudio) costs 0 unless --price-* says otherwise
        price_in, price_out, price_cached_in = preset_prices(
            cfg.model.provider, cfg.prices.price_in, cfg.prices.price_out, cfg.prices.price_cached_in
        )
        price = resolve_price(table, cfg.model.model, price_in, price_out, price_cached_in)
    if cfg.limits.max_cost is not None and not price.known:
        # a budget cannot be kept at an unknown price: refused before anything is sent (exit 2)
        raise ConfigError(budget_refusal(cfg.model.model, pricing_label(table)))
    lock = None if readonly else FolderLock(cfg.out)
    if lock is not None:
        lock.acquire()
    try:
        previous = read_manifest(cfg.out)
        inputs = run_inputs(cfg, index, prompts)
        check = check_inputs(
            previous, inputs, has_rows=folder_has_rows(cfg.out, output_csv_names(cfg.out)),
            allow_changes=cfg.allow_changes, out_dir=cfg.out,
        )
        redo = apply_redo(cfg.out, cfg.redo, {p.name: captions_wanted(p, cfg.model.captions_per_image) for p in prompts},
                          readonly=readonly)  # --redo; also finishes a move a kill cut short (ledger.redo)
        positions = index_positions(whole.entries)  # answered by the compact index: no 1M-entry dict
        attr_fields: list[str] = []
        for p in prompts:
            if p.schema is not None:
                attr_fields += [f for f in field_names(p.schema) if f not in attr_fields]
        writer = OutputWriter(cfg.out, cfg.batch_size, positions, attr_fields,
                              excel=cfg.excel, recorded_bom=(previous or {}).get("csv_bom"),
                              index_key=inputs.index.sha256 if inputs.index else None,
                              last_position=max(0, len(whole.entries) - 1))
        resume = writer.read_done() if readonly else writer.open(previous_batch_size=previous_batch_size(previous))
        redo.exclude_from(resume)  # a dry run moved nothing: its estimate counts the rejected as not done
        resume.repaired[:0] = check.notes
        work = scan_work(index.entries, prompts, cfg.model.captions_per_image, resume.done)
        total, skipped = work.total, work.skipped
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    resume.todo = work.todo  # the images with work left: the plan asks the done set no second time
    return Prepared(cfg, index, prompts, writer, resume, price, total, skipped, api_key,
                    lock=lock, inputs=inputs, accepted_changes=check.accepted, previous_manifest=previous,
                    subset_note=subset_note, index_size=len(whole.entries))


def previous_batch_size(manifest: dict | None) -> int | None:
    """The --batch-size the folder's parts were split by (None if unknown): a change re-splits them."""
    value = (manifest or {}).get("batch_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def run_inputs(cfg: RunConfig, index: LoadedIndex, prompts: list[Prompt]) -> Inputs:
    """What this run's rows will be made from (compared with the folder's, recorded in the manifest)."""
    try:
        fingerprint = fingerprint_file(Path(cfg.index))
    except OSError:
        fingerprint = None
    return current_inputs(
        root=index.root, dataset=index.dataset, index=fingerprint, prompts=prompts, model=cfg.model.model,
        detail=cfg.model.detail, max_tokens=cfg.model.max_tokens,
        captions_per_image=cfg.model.captions_per_image, backend=cfg.model.backend,
    )


def make_backend(cfg: RunConfig, api_key: str | None) -> Backend:
    if cfg.model.backend == "offline":
        from pipeline.providers.offline import OfflineBackend

        return OfflineBackend()
    from pipeline.providers.openai import OpenAIBackend

    assert api_key is not None
    return OpenAIBackend(
        api_key=api_key,
        base_url=cfg.model.base_url,
        timeout=cfg.model.timeout,
        max_connections=cfg.limits.concurrency + 8,
        transport=cfg.model.http_client,
        azure_api_version=cfg.model.api_version if get_preset(cfg.model.provider).azure else None,
    )


class View(Protocol):
    """What the run asks of a view (the dashboard, plain progress lines): it reads RunStats, never writes."""

    def start(self) -> None: ...

    def refresh(self) -> None: ...

    def stop(self) -> None: ...


ViewFactory = Callable[[RunStats], View]


class NoView:
    """No view at all (library use, tests)."""

    def start(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def stop(self) -> None:
        pass


async def _view_loop(view: View, finished: anyio.Event, period: float) -> None:
    view.start()
    try:
        while not finished.is_set():
            view.refresh()
            with anyio.move_on_after(period):
                await finished.wait()
    finally:
        view.stop()


async def run_prepared(
    prep: Prepared,
    *,
    views: ViewFactory | None = None,
    backend: Backend | None = None,
    install_signals: bool = True,
) -> RunResult:
    cfg = prep.cfg
    backend = backend or make_backend(cfg, prep.api_key)
    spent_before = prep.resume.read.spent if prep.resume.read is not None else None
    stats = RunStats(total=prep.total, skipped=prep.skipped, concurrency=cfg.limits.concurrency,
                     max_cost=cfg.limits.max_cost, run_id=new_run_id(), price_known=prep.price.known,
                     cost_before_usd=prep.resume.cost_usd,
                     cost_before_unknown=spent_before.unknown if spent_before is not None else 0)
    limiter = RateLimiter(cfg.limits.rpm, cfg.limits.tpm, learn=cfg.model.backend == "openai", probe=True)
    stats.rpm_limit, stats.tpm_limit = limiter.rpm_limit, limiter.tpm_limit
    controller = Controller()
    controller.on_stop.append(lambda: setattr(stats, "stop_reason", controller.stop_reason))  # for the views
    plan = plan_jobs(prep.index.entries, prep.prompts, cfg.model.captions_per_image, prep.resume.done,
                     prep.resume.todo)
    dispatcher = Dispatcher(plan, controller)
    ctx = Context(cfg, backend, limiter, RetryPolicy(max_attempts=cfg.limits.max_attempts), stats, prep.price,
                  controller, dispatcher)
    ctx.outage = OutageTracker(controller.gate, cfg.model.base_url or DEFAULT_BASE_URL,
                               OutagePolicy(timeout_s=cfg.limits.outage_timeout), stats=stats)
    ctx.adaptive = make_adaptive(cfg)
    ctx.tail = TailTracker(TailPolicy(hedge=cfg.limits.hedge))
    stats.concurrency_limit = stats.concurrency_limit_max = ctx.adaptive.capacity if ctx.adaptive.enabled else None
    if cfg.limits.max_cost is not None:
        # the budget is for the output folder: what earlier runs spent there counts against it, billed
        # failures (errors.csv) included; rows of unknown cost cannot be counted (the price was unknown)
        ctx.budget_left = max(0.0, cfg.limits.max_cost - prep.resume.cost_usd)
        if ctx.budget_left <= 0:
            controller.request_stop("budget")
    keeper = ManifestKeeper(cfg.out, describe_run(prep), stats, prep.resume.cost_usd, prep.previous_manifest)
    seed_fallbacks(ctx, keeper.learned_before, any(p.schema is not None for p in prep.prompts))
    keeper.record_changes([asdict(c) for c in prep.accepted_changes])
    workers = worker_count(cfg.limits.concurrency, prep.total - prep.skipped)
    view = views(stats) if views is not None else NoView()  # the views read stats; the run never needs them
    finished = anyio.Event()
    work_done = anyio.Event()

    def heartbeat() -> None:
        stats.rpm_limit, stats.tpm_limit = limiter.rpm_limit, limiter.tpm_limit
        keeper.save()

    async def work(results_send: ObjectSendStream[list[Result]], task_status=anyio.TASK_STATUS_IGNORED) -> None:
        jobs_send, jobs_recv = anyio.create_memory_object_stream[Job](JOB_BUFFER)
        try:
            with controller.work_scope:
                async with anyio.create_task_group() as wg:
                    task_status.started()
                    async with jobs_recv, results_send:
                        for _ in range(workers):
                            wg.start_soon(worker, ctx, jobs_recv.clone(), results_send.clone())
                        wg.start_soon(dispatcher.run, jobs_send)
        finally:
            work_done.set()

    async def writer_then_finish(results_recv) -> None:
        try:
            hold = HoldPolicy(
                limit=max(64, 2 * workers), retry_s=cfg.limits.hold_retry_s, final_s=cfg.limits.hold_final_s,
                gate=controller.gate, interrupted=controller.interrupted,
                on_warning=lambda line: setattr(stats, "write_warning", line),
            )
            await writer_task(prep.writer, results_recv, heartbeat=heartbeat, hold=hold)
        finally:
            finished.set()

    sig_ctx = signal_handlers(controller) if install_signals else nullcontext()
    state = "interrupted"  # what the manifest says if the run ends by an exception of any kind
    started = False
    try:
        with sig_ctx:
            # "running" only once a signal can no longer kill the run between here and the end
            keeper.save("running")
            started = True
            async with anyio.create_task_group() as tg:
                results_send, results_recv = anyio.create_memory_object_stream[list[Result]](
                    max(8, workers)
                )
                tg.start_soon(writer_then_finish, results_recv)
                await tg.start(work, results_send)
                tg.start_soon(_view_loop, view, finished, 0.25)
                tg.start_soon(watch_until, finished, controller, cfg.limits.grace_seconds, work_done)
                tg.start_soon(watch_outages, ctx.outage, backend.reachable,
                              lambda message: controller.fail(ServerUnreachableError(message)), finished)
        state = final_state(controller)
    finally:
        with anyio.CancelScope(shield=True):
            await backend.aclose()
        stats.stop_reason = controller.stop_reason
        if started:
            try:
                keeper.finish(state)
            except OSError as exc:  # informational; a full disk must not turn a finished run into an error
                print(f"warning: manifest.json not updated: {describe_write_error(exc)}", file=sys.stderr)
        prep.release()
    return RunResult(state, stats.snapshot(), cfg.out, controller.fatal, prep.resume.repaired, dispatcher.abandoned,
                     held=prep.writer.pending_answers + prep.writer.lost_answers)


def final_state(controller: Controller) -> str:
    """How the run ended, as the manifest and status name it."""
    if controller.fatal is not None:
        return "failed"
    if controller.stop_reason == "budget":
        return "budget"
    if controller.stopping:
        return "interrupted"
    return "finished"


def make_adaptive(cfg: RunConfig) -> AdaptiveLimit:
    """The adaptive limit: on for a server whose limits are not given (it steps aside if the server's
    rate-limit headers teach them); off with --rpm/--tpm, the offline backend or the hidden
    --fixed-concurrency (benchmarks sweep fixed pools with it)."""
    on = (cfg.model.backend == "openai" and cfg.limits.rpm is None and cfg.limits.tpm is None
          and cfg.limits.adaptive)
    return AdaptiveLimit(AdaptivePolicy(ceiling=cfg.limits.concurrency, timeout_s=cfg.model.timeout), enabled=on)


def worker_count(concurrency: int, items_left: int) -> int:
    """Workers to start: --concurrency, never more than the work items left (at least one)."""
    return max(1, min(concurrency, MAX_CONCURRENCY, items_left))


def start_notes(prep: Prepared, notes: Sequence[str] = ()) -> list[str]:
    """The notes a run (or a dry run) starts with: the caller's, then the subset chosen."""
    return [*notes, *([prep.subset_note] if prep.subset_note else [])]


def start_warnings(prep: Prepared) -> list[str]:
    """One-line warnings a run starts with (printed before the first request)."""
    warning = price_warning(prep.price.model, prep.price.known)
    return [w for w in (warning, region_price_warning(prep.cfg, prep.price), prep.writer.encoding.note) if w]


def region_price_warning(cfg: RunConfig, price: ModelPrice) -> str | None:
    """DashScope's China region bills in CNY at its own rates; the pricing file holds the international
    USD list. Said once at the start unless the user gave prices."""
    prices = cfg.prices
    if cfg.model.provider != "dashscope" or not price.known or any(
        v is not None for v in (prices.price_in, prices.price_out, prices.price_cached_in)
    ):
        return None
    return (f"costs of {price.model} are DashScope's international (USD) prices; the China region bills "
            "in CNY at its own rates: pass --price-in/--price-out in USD to count what you pay")


def describe_run(prep: Prepared) -> dict[str, Any]:
    """The manifest's fixed facts: what this run is made from and how it is driven (never the key)."""
    cfg = prep.cfg
    return {
        "index": str(Path(cfg.index).resolve()),
        "root": str(prep.index.root),
        "dataset": prep.index.dataset,
        "index_images": len(prep.index.entries),  # with --limit/--sample: the subset (see "subset")
        "work_items_total": prep.total,
        "out": str(Path(cfg.out).resolve()),
        "inputs": prep.inputs.to_dict() if prep.inputs is not None else None,
        "prompts": [
            {"name": p.name, "path": str(p.path) if p.path else None, "sha256": p.fingerprint} for p in prep.prompts
        ],
        "mode": "online",  # batch runs (pipeline.batch.flow) record "batch"; an older manifest without it: online
        "backend": cfg.model.backend,
        "provider": cfg.model.provider,  # its key variable may be named, the key never
        "model": cfg.model.model,
        "base_url": cfg.model.base_url,
        "api_version": cfg.model.api_version,
        "detail": cfg.model.detail,
        "max_tokens": cfg.model.max_tokens,
        "temperature": cfg.model.temperature,
        "captions_per_image": cfg.model.captions_per_image,
        "batch_size": cfg.batch_size,
        "concurrency": cfg.limits.concurrency,
        "rpm": cfg.limits.rpm,
        "tpm": cfg.limits.tpm,
        "max_cost": cfg.limits.max_cost,
        "max_attempts": cfg.limits.max_attempts,
        "price": {"model": prep.price.model, "input": prep.price.input, "output": prep.price.output,
                  "cached_input": prep.price.cached_input, "known": prep.price.known,
                  "source": prep.price.source, "taken_on": prep.price.taken_on},
        "repaired": prep.resume.repaired,
        "subset": _subset_record(prep),
        "csv_bom": prep.writer.bom,  # the folder's CSV encoding: kept by every later run (--excel or not)
    }


def _subset_record(prep: Prepared) -> dict[str, Any] | None:
    """--limit / --sample in the manifest: what was asked and how many of the index's images it chose."""
    sub = prep.cfg.subset
    if sub.limit is None and sub.sample is None:
        return None
    return {"limit": sub.limit, "sample": sub.sample, "seed": sub.seed if sub.sample is not None else None,
            "images": len(prep.index.entries), "index_images": prep.index_size}


def run(cfg: RunConfig, *, views: ViewFactory | None = None, notes: Sequence[str] = ()) -> RunResult:
    """Check everything, then run the pipeline on a fresh event loop.

    `notes`: the caller's start lines (e.g. the default prompt used), printed once the checks passed, so
    a run refused for bad input says only why.
    """
    prep = prepare(cfg)
    try:
        announce(prep, notes)
        return anyio.run(lambda: run_prepared(prep, views=views))
    finally:
        prep.release()


def announce(prep: Prepared, notes: Sequence[str] = ()) -> None:
    """The lines a run starts with, once every check has passed: the caller's notes, the subset chosen,
    then the warnings (unknown price, region, encoding). Online and batch runs say them alike."""
    for note in start_notes(prep, notes):
        print(f"note: {note}", file=sys.stderr)
    for warning in start_warnings(prep):
        print(f"warning: {warning}", file=sys.stderr)
