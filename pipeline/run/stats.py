"""The run's counters. The pipeline updates them; the dashboard, the plain progress lines, the manifest
and the final summary only read them (through `snapshot()`), so none of the views can slow or break a run.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from typing import Any, Mapping

from pipeline.ledger.costs import Spent, run_spent
from pipeline.providers.capabilities import has_rate_limit_headers
from pipeline.records import Usage


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the counters at one moment; what every view renders."""

    total: int  # work items (image x prompt x caption) in the index for this run
    skipped: int  # already done before this run started
    done: int  # captioned in this run
    failed: int  # recorded in errors.csv in this run
    failed_by_reason: dict[str, int]
    in_flight: int
    concurrency: int
    requests: int  # HTTP requests sent (attempts), including retries
    retries: int
    rate_limited: int  # 429 answers
    tokens_in: int
    tokens_out: int
    cost_usd: float
    projected_cost_usd: float | None
    elapsed_s: float
    images_per_s: float  # over the last minute (or the run so far if shorter)
    requests_per_min: float  # over the last minute
    tokens_per_min: float  # over the last minute
    rpm_limit: float | None  # configured or learned
    tpm_limit: float | None
    latency_p50: float | None
    latency_p95: float | None
    last_captions: list[tuple[str, str]]  # (image_id, caption), newest last
    paused_s: float  # seconds the pool is still paused by a 429 (0 if not)
    stop_reason: str | None  # "interrupted" | "budget" | "fatal: ..." | None
    max_cost: float | None
    cost_unknown: int = 0  # answers of this run whose cost is unknown (model without a price)
    cost_before_usd: float = 0.0  # spent in the folder before this run (captions, attributes, errors)
    cost_before_unknown: int = 0  # rows of unknown cost among them
    price_known: bool = True  # False: the model has no price; this run's cost is unknown
    outage_s: float | None = None  # seconds the server has been unreachable (pool held, probing); None if not
    outage_why: str = ""  # "connection refused", "host name not found", ...
    write_warning: str | None = None  # "captions_all.csv cannot be written: ...; holding N answers, retrying"
    concurrency_limit: int | None = None  # the adaptive limit under `concurrency` now; None: not adaptive

    @property
    def spent_run(self) -> Spent:
        """This run's spending: every billed answer, caption or not (`cost_usd` is its known part)."""
        return run_spent(self.cost_usd, self.cost_unknown, self.price_known)

    @property
    def spent_folder(self) -> Spent:
        """The output folder's spending: earlier runs plus this one (what `--max-cost` counts)."""
        return Spent(self.cost_before_usd, self.cost_before_unknown) + self.spent_run

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.skipped - self.done - self.failed)

    @property
    def eta_s(self) -> float | None:
        if self.images_per_s <= 0:
            return None
        return self.remaining / self.images_per_s


@dataclass
class RunStats:
    """Mutable counters, updated from the event loop only (no locks needed)."""

    total: int = 0
    skipped: int = 0
    concurrency: int = 0
    max_cost: float | None = None
    run_id: str = ""  # pipeline.ledger.costs.new_run_id(): on every errors.csv row and in the manifest
    cost_before_usd: float = 0.0
    cost_before_unknown: int = 0
    price_known: bool = True
    window_s: float = 60.0
    keep_latencies: int = 2000
    keep_captions: int = 5
    done: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    in_flight: int = 0
    requests: int = 0
    retries: int = 0
    hedges: int = 0  # second requests for work out too long near the end (pipeline.run.tail); in `requests`
    rate_limited: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0  # known part of what this run's answers cost (failures included)
    cost_unknown: int = 0  # answers whose cost is unknown
    rpm_limit: float | None = None
    tpm_limit: float | None = None
    paused_until: float = 0.0  # time.monotonic() deadline of a pool-wide 429 pause
    outage_since: float | None = None  # time.monotonic() the server became unreachable, while it holds the pool
    outage_why: str = ""
    stop_reason: str | None = None
    write_warning: str | None = None  # set by the writer while an output file cannot be written
    concurrency_limit: int | None = None  # adaptive limit (pipeline.run.adaptive); None: --concurrency alone
    concurrency_limit_max: int | None = None  # the highest it reached in this run
    # what the run learned of the server's `n` and `response_format` (pipeline.run.fallbacks), None: not yet
    n_support: str | None = None  # "honoured" | "ignored" | "rejected"
    json_schema_support: str | None = None  # "enforced" | "ignored" | "rejected"
    json_object_support: str | None = None  # "ignored" | "rejected" (json_object was dropped too)
    structured_mode: str | None = None  # "json_schema" | "json_object" | "prompt": how attribute prompts ask now
    fallback_lines: list[str] = field(default_factory=list)  # the one-line notes said, in order
    # what the run's answers showed (manifest's `learned`; None: no answer yet)
    rate_limit_headers: bool | None = None  # any x-ratelimit-* header on any answer
    usage_reported: bool | None = None  # any 200 answer with token counts in `usage`
    started: float = field(default_factory=time.monotonic)
    _latencies: deque = field(default_factory=deque)
    _done_times: deque = field(default_factory=deque)
    _request_times: deque = field(default_factory=deque)
    _token_events: deque = field(default_factory=deque)  # (t, tokens)
    _captions: deque = field(default_factory=deque)

    # --- updates (called by the pipeline) -------------------------------------------------------
    def request_sent(self) -> None:
        self.requests += 1
        self._request_times.append(time.monotonic())

    def retry(self) -> None:
        self.retries += 1

    def got_429(self) -> None:
        self.rate_limited += 1

    def usage(self, tokens_in: int, tokens_out: int, cost: float | None) -> None:
        """One billed answer (a caption or not). `cost` None: the price is unknown."""
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        if cost is None:
            self.cost_unknown += 1
        else:
            self.cost_usd += cost
        self._token_events.append((time.monotonic(), tokens_in + tokens_out))

    def captioned(self, image_id: str, caption: str, latency_s: float, n: int = 1) -> None:
        now = time.monotonic()
        self.done += n
        for _ in range(n):
            self._done_times.append(now)
        self._latencies.append(latency_s)
        if len(self._latencies) > self.keep_latencies:
            self._latencies.popleft()
        self._captions.append((image_id, caption))
        if len(self._captions) > self.keep_captions:
            self._captions.popleft()

    def failed(self, reason: str, n: int = 1) -> None:
        self.failed_by_reason[reason] += n

    def saw_answer(self, headers: Mapping[str, str], usage: Usage | None = None) -> None:
        """An HTTP answer's headers (any status) and, for a 200, its usage: what the manifest's `learned`
        says of rate-limit headers and usage. Sticky once true; cheap after that."""
        if not self.rate_limit_headers:
            self.rate_limit_headers = has_rate_limit_headers(headers)
        if usage is not None and not self.usage_reported:
            self.usage_reported = usage.prompt_tokens > 0 or usage.completion_tokens > 0

    def learned(self) -> dict[str, Any]:
        """What this run found out about the server (`capabilities.LEARNED_KEYS`; None: not known)."""
        return {"n": self.n_support, "json_schema": self.json_schema_support,
                "json_object": self.json_object_support, "structured_mode": self.structured_mode,
                "rate_limit_headers": self.rate_limit_headers, "usage": self.usage_reported}

    # --- reads ----------------------------------------------------------------------------------
    @property
    def spent_run(self) -> Spent:
        """As `Snapshot.spent_run` (the manifest reads it from here)."""
        return run_spent(self.cost_usd, self.cost_unknown, self.price_known)

    @property
    def failed_total(self) -> int:
        return sum(self.failed_by_reason.values())

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        for dq in (self._done_times, self._request_times):
            while dq and dq[0] < horizon:
                dq.popleft()
        while self._token_events and self._token_events[0][0] < horizon:
            self._token_events.popleft()

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        self._trim(now)
        elapsed = max(1e-9, now - self.started)
        span = min(self.window_s, elapsed)
        lat = sorted(self._latencies)
        finished = self.done + self.failed_total
        projected = None
        if finished > 0 and self.cost_unknown == 0 and self.price_known:
            # cost per finished item so far, times everything this run will have finished
            per_item = self.cost_usd / max(1, self.done)
            projected = self.cost_usd + per_item * max(0, self.total - self.skipped - finished)
        return Snapshot(
            total=self.total,
            skipped=self.skipped,
            done=self.done,
            failed=self.failed_total,
            failed_by_reason=dict(self.failed_by_reason),
            in_flight=self.in_flight,
            concurrency=self.concurrency,
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            cost_usd=self.cost_usd,
            projected_cost_usd=projected,
            elapsed_s=elapsed,
            images_per_s=len(self._done_times) / span,
            requests_per_min=len(self._request_times) * 60.0 / span,
            tokens_per_min=sum(t for _, t in self._token_events) * 60.0 / span,
            rpm_limit=self.rpm_limit,
            tpm_limit=self.tpm_limit,
            latency_p50=_percentile(lat, 0.50),
            latency_p95=_percentile(lat, 0.95),
            last_captions=list(self._captions),
            paused_s=max(0.0, self.paused_until - now),
            stop_reason=self.stop_reason,
            max_cost=self.max_cost,
            cost_unknown=self.cost_unknown,
            cost_before_usd=self.cost_before_usd,
            cost_before_unknown=self.cost_before_unknown,
            price_known=self.price_known,
            outage_s=None if self.outage_since is None else max(0.0, now - self.outage_since),
            outage_why=self.outage_why,
            write_warning=self.write_warning,
            concurrency_limit=self.concurrency_limit,
        )
