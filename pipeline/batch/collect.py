"""Batch answers joined on `custom_id` and judged by the online rules. Pure: no I/O, no server.

A batch's output and error files come back in any order, possibly with lines from elsewhere, twice, or
torn. `join_lines` reads them against the shard's own list of custom_ids (its `.ids` file): every
expected id gets exactly one `LineOutcome` (an answer, an error, or `missing`), and what does not belong
(an unknown id, a malformed line, a second line for one id) is counted and described, never written.

`judge_line` turns one outcome into rows with the same rules as online mode: a 200 body is read by
`pipeline.providers.openai.parse_completion` (refusals, empty answers), its choices by
`pipeline.run.runner.answer_rows` (captions, attributes validated against their schema, usage split over
the slots, cost at the price given: the batch price), failures by `pipeline.run.retry.decide` with the
round of the shard as the attempt: what online would retry goes into the next round (`retry`), what it
would give up goes to errors.csv. Lines the batch never answered (expired, cancelled, missing) are
re-planned while rounds are left, else recorded with their reason.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from pipeline.batch.ids import parse_custom_id
from pipeline.providers.base import APIFailure, ErrorKind
from pipeline.providers.classify import classify_status
from pipeline.providers.errorbody import error_code, error_message, error_type, one_line
from pipeline.providers.openai import parse_completion
from pipeline.providers.pricing import ModelPrice, row_cost
from pipeline.data.prompts import render_prompt
from pipeline.ledger.costs import retried_reason
from pipeline.ledger.writer import Result
from pipeline.records import IndexEntry, Prompt, Usage
from pipeline.run.dispatch import Job
from pipeline.run.retry import RetryPolicy, decide
from pipeline.run.runner import SOFT_KINDS, Billed, answer_rows, error_rows, sum_usage

UNANSWERED_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})  # never run: re-planned
MISSING = "batch_line_missing"  # errors.csv reason of a line the batch neither answered nor reported
EXAMPLES = 5  # problems described by example (the rest only counted)


# --- the join ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LineOutcome:
    """What the batch says of one custom_id: an HTTP answer (`status`, `body`), an error without one
    (`error_code`: batch_expired, batch_cancelled, ...), or nothing at all (`missing`)."""

    custom_id: str
    status: int | None = None
    body: Any = None
    error_code: str | None = None
    error_message: str = ""
    missing: bool = False

    @property
    def unanswered(self) -> bool:
        """Never attempted by the batch (it expired or was cancelled first), or absent from its files."""
        return self.missing or (self.status is None and (self.error_code in UNANSWERED_CODES or not self.error_code))


@dataclass
class Join:
    """Every expected custom_id's outcome, and what did not belong."""

    outcomes: dict[str, LineOutcome] = field(default_factory=dict)
    unknown: int = 0  # lines whose custom_id is not one of the expected ones
    duplicates: int = 0  # second lines for an id already answered
    malformed: int = 0  # lines that are not an output object
    examples: list[str] = field(default_factory=list)  # a few of the problems above, in words

    def note(self, text: str) -> None:
        if len(self.examples) < EXAMPLES:
            self.examples.append(text)

    @property
    def problems(self) -> int:
        return self.unknown + self.duplicates + self.malformed


def read_output_line(raw: bytes | str) -> LineOutcome:
    """One output/error JSONL line -> LineOutcome; ValueError (in words) if it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    cid = data.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise ValueError("no custom_id")
    response = data.get("response")
    error = data.get("error")
    status = body = None
    if isinstance(response, dict):
        code = response.get("status_code")
        if isinstance(code, int) and not isinstance(code, bool):
            status, body = code, response.get("body")
    code = message = None
    if isinstance(error, dict):
        code = error.get("code") if isinstance(error.get("code"), str) else None
        message = error.get("message") if isinstance(error.get("message"), str) else None
    if status is None and error is None:
        raise ValueError(f"neither a response nor an error for {cid[:80]!r}")
    return LineOutcome(cid, status, body, code, one_line(message or ""))


def join_lines(expected: Iterable[str], lines: Iterable[bytes | str], *, where: str = "") -> Join:
    """Join output/error lines on custom_id against the ids a shard sent (`expected`).

    An id answered twice keeps its first answer, except that an answer with a status (a 200 above
    all) beats an error line without one. Ids never seen are `missing`."""
    join = Join()
    wanted = set(expected)
    prefix = f"{where}: " if where else ""
    for number, raw in enumerate(lines, 1):
        if isinstance(raw, bytes) and not raw.strip() or isinstance(raw, str) and not raw.strip():
            continue
        try:
            line = read_output_line(raw)
        except ValueError as exc:
            join.malformed += 1
            join.note(f"{prefix}line {number}: {exc}")
            continue
        if line.custom_id not in wanted:
            join.unknown += 1
            join.note(f"{prefix}line {number}: custom_id {line.custom_id[:80]!r} was not sent from this folder")
            continue
        seen = join.outcomes.get(line.custom_id)
        if seen is not None:
            join.duplicates += 1
            join.note(f"{prefix}line {number}: custom_id {line.custom_id[:80]!r} answered twice (first kept)")
            if not _better(line, seen):
                continue
        join.outcomes[line.custom_id] = line
    for cid in wanted:
        if cid not in join.outcomes:
            join.outcomes[cid] = LineOutcome(cid, missing=True)
    return join


def _better(new: LineOutcome, old: LineOutcome) -> bool:
    def rank(o: LineOutcome) -> int:
        return 2 if o.status == 200 else 1 if o.status is not None else 0

    return rank(new) > rank(old)


# --- one line -> rows ------------------------------------------------------------------------------------

@dataclass
class Verdict:
    """What one line gives: rows to write, jobs for the next round, the bill, and how it is counted."""

    rows: list[Result] = field(default_factory=list)
    retry: list[Job] = field(default_factory=list)  # slots for the next round
    left: int = 0  # slots neither written nor re-planned (cancelled by the user, no rounds asked for)
    usage: Usage | None = None  # the answer's billed usage (None: not billed)
    cost: float | None = 0.0  # its cost at the price given (None: price unknown)
    captioned: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # errors.csv reason -> slots given up
    already_done: int = 0  # slots that were done when the line came (not written again)


@dataclass(frozen=True)
class Judge:
    """The fixed facts every line is judged with: the price (batch), the run id, the model asked for,
    the round limit, whether unanswered lines may be re-planned (not after `cancel`, nor for `collect`)."""

    price: ModelPrice
    run_id: str
    model: str
    max_attempts: int
    replan: bool = True
    rand: Callable[[], float] = random.random


def job_for(custom_id: str, find_entry: Callable[[str], IndexEntry | None], prompts: Mapping[str, Prompt],
            done: Any, round_: int) -> tuple[Job | None, int, str]:
    """The job a custom_id names, reduced to its slots not done yet: (job or None, slots already done,
    why there is no job). `round_`: the shard's round, the attempts the slots have had."""
    try:
        image_id, prompt_name, indices = parse_custom_id(custom_id)
    except ValueError as exc:
        return None, 0, str(exc)
    prompt = prompts.get(prompt_name)
    if prompt is None:
        return None, 0, f"prompt {prompt_name!r} is not one of this run's prompts"
    entry = find_entry(image_id)
    if entry is None:
        return None, 0, f"image {image_id!r} is not in the index"
    todo = tuple(i for i in indices if (image_id, prompt_name, i) not in done)
    if not todo:
        return None, len(indices), ""
    return Job(entry, prompt, todo, attempts=round_), len(indices) - len(todo), ""


def judge_line(line: LineOutcome, job: Job, judge: Judge) -> Verdict:
    """Rows and retries for one joined line, by the online rules (see the module docstring).

    `job`: the line's work item with only the slots not done yet (`job_for`); `job.attempts` is the
    shard's round. A line whose slots are partly done writes only the others."""
    sent = tuple(parse_custom_id(line.custom_id)[2])
    if line.status == 200:
        if not isinstance(line.body, dict):
            return _failed(job, judge, ErrorKind.SERVER, "the batch answered 200 with a body that is not a JSON object")
        return _answered(line.body, job, judge, sent)
    if line.status is not None:
        body = line.body
        code = error_code(body)
        kind = classify_status(line.status, code, error_type=error_type(body))
        message = error_message(body) or "no message"
        return _failed(job, judge, kind, f"HTTP {line.status}{f' {code}' if code else ''}: {message}")
    reason = line.error_code or MISSING
    detail = line.error_message or ("the batch's files hold no line for this request" if line.missing
                                    else f"the batch reported {reason}")
    if line.unanswered:
        if not judge.replan:
            return Verdict(left=len(job.indices))
        if job.attempts < judge.max_attempts:
            return Verdict(retry=[_again(job)])
        return _give_up(job, judge, reason, detail)
    return _failed(job, judge, ErrorKind.OTHER, f"{reason}: {detail}" if line.error_message else reason)


def _answered(body: dict, job: Job, judge: Judge, sent: tuple[int, ...]) -> Verdict:
    """A 200: captions for the filled slots (of those not done), the rest retried or given up."""
    try:
        reply = parse_completion(body, {}, 0.0, judge.model)
    except APIFailure as failure:  # answered and billed, no caption at all (refused, empty)
        billed = Billed(failure.model or judge.model, failure.usage or Usage())
        v = _failed(job, judge, failure.kind, failure.message, billed)
        _bill(v, billed.usage, judge)
        return v
    except (AttributeError, TypeError, ValueError):  # a file from elsewhere: not a chat.completion at all
        return _failed(job, judge, ErrorKind.SERVER, "the answer is not a chat.completion object")
    # the answer fills the slots it was asked for, in order; slots done meanwhile are not written again
    full = Job(job.entry, job.prompt, sent, job.attempts, job.soft_failures)
    prompt_text = render_prompt(job.prompt, job.entry.image_id, sent[0])
    answer = answer_rows(full, prompt_text, reply, judge.price)
    keep = set(job.indices)
    v = Verdict()
    _bill(v, reply.usage, judge)
    v.rows = [r for r in answer.rows if r.caption_index in keep]
    v.captioned = len(v.rows)
    v.already_done = len(answer.rows) - len(v.rows)
    bad = [(i, k, why) for i, k, why in answer.bad if i in keep]
    unfilled = tuple(i for i in answer.unfilled if i in keep)
    if unfilled and not reply.rejected:  # the server gave fewer choices than n: ask again, one by one
        v.retry += [Job(job.entry, job.prompt, (i,), job.attempts, job.soft_failures) for i in unfilled]
        unfilled = ()
    failed = tuple(i for i, _, _ in bad) + unfilled
    if failed:
        kind, why = (bad[0][1], bad[0][2]) if bad else reply.rejected[0]
        billed = Billed(reply.model, sum_usage(answer.bad_usage)) if answer.bad_usage else None
        rest = _failed(Job(job.entry, job.prompt, failed, job.attempts, job.soft_failures), judge, kind, why, billed)
        v.rows += rest.rows
        v.retry += rest.retry
        for reason, n in rest.failed.items():
            v.failed[reason] = v.failed.get(reason, 0) + n
    return v


def _failed(job: Job, judge: Judge, kind: ErrorKind, message: str, billed: Billed | None = None) -> Verdict:
    """A failure of `job`'s slots: the next round if online would try again, else errors.csv. A billed
    answer's cost is on exactly one row per slot (`<kind>_retried` when retried), as online.

    As online (`pipeline.run.runner.handle_failure`), an answer that is no caption (refused, empty,
    invalid) gets one more try per work item, counted apart from the 5xx or expiry before it:
    `job.soft_failures` is how many such answers the item had in earlier rounds."""
    soft_rand = judge.rand()
    soft = kind in SOFT_KINDS
    attempt = job.soft_failures + 1 if soft and job.attempts < judge.max_attempts else job.attempts
    decision = decide(kind, max(1, attempt), {}, RetryPolicy(max_attempts=judge.max_attempts), soft_rand)
    if decision.action == "retry" and job.attempts < judge.max_attempts:
        paid = [] if billed is None else _rows(job, judge, retried_reason(kind.value), message, billed)
        return Verdict(rows=paid, retry=[_again(job)])
    return _give_up(job, judge, kind.value, message, billed)


def _give_up(job: Job, judge: Judge, reason: str, detail: str, billed: Billed | None = None) -> Verdict:
    return Verdict(rows=_rows(job, judge, reason, detail, billed), failed={reason: len(job.indices)})


def _rows(job: Job, judge: Judge, reason: str, detail: str, billed: Billed | None) -> list[Result]:
    return error_rows(job, reason, detail, run_id=judge.run_id, model=judge.model, billed=billed, price=judge.price)


def _again(job: Job) -> Job:
    """The same slots for the next round (its shard's round is one more: the attempts they will have had)."""
    return Job(job.entry, job.prompt, job.indices, job.attempts, job.soft_failures)


def _bill(v: Verdict, usage: Usage, judge: Judge) -> None:
    v.usage = usage
    v.cost = row_cost(judge.price, usage)
