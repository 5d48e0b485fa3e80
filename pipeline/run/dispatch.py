"""What there is to do and in which order: jobs, the lazy plan, and the dispatcher that hands them out.

The dispatcher is the pipeline's producer. It streams new jobs from the plan and re-sends retries when
their backoff is over, ahead of new work, so retries go back into the pool instead of trickling after
the first pass, and no worker sleeps holding a slot.
"""

from __future__ import annotations

import heapq
from array import array
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import anyio
from anyio.abc import ObjectSendStream

from pipeline.data.index import image_ids
from pipeline.data.prompts import has_templates
from pipeline.records import IndexEntry, Prompt

if TYPE_CHECKING:
    from pipeline.run.control import Controller


@dataclass
class Job:
    """One request's worth of work: one image, one prompt, the caption slots still wanted."""

    entry: IndexEntry
    prompt: Prompt
    indices: tuple[int, ...]
    attempts: int = 0  # requests sent for this job
    soft_failures: int = 0  # answers that were no caption (refused, empty, invalid): one more try each job
    # fallbacks (pipeline.run.fallbacks): what this attempt probes ("n", "format"), the structured mode it
    # is sent in when not the run's, and a malformed answer with its validation error (a repair request)
    probe: str = ""
    format_mode: Any = None
    repair: tuple[str, str] | None = None

    @property
    def prompt_hash(self) -> str:
        return self.prompt.fingerprint


def captions_wanted(prompt: Prompt, captions_per_image: int) -> int:
    """Structured (schema) prompts give one answer per image; text prompts give N captions."""
    return 1 if prompt.schema is not None else captions_per_image


def plan_jobs(entries: Sequence[IndexEntry], prompts: list[Prompt], n: int, done: set,
              todo: Sequence[int] | None = None) -> Iterator[Job]:
    """Lazily yield the work still to do, in index order, skipping every (id, prompt, slot) already done.

    Slots of one image share one request (`n`), except under a templated prompt: there every caption
    gets its own sentence template, so its own request, and the captions do not share one shape.
    Done images are skipped by id: an `IndexEntry` (and its path) is made only for an image with work.
    `todo`: the positions `scan_work` found with work left, so a resume does not ask `done` about a
    million finished images a second time.
    """
    ids = image_ids(entries)
    places = enumerate(ids) if todo is None else ((k, ids[k]) for k in todo)
    for position, image_id in places:
        entry = None
        for prompt in prompts:
            wanted = captions_wanted(prompt, n)
            missing = tuple(i for i in range(wanted) if (image_id, prompt.name, i) not in done)
            if not missing:
                continue
            if entry is None:
                entry = entries[position]
            if has_templates(prompt):
                for i in missing:
                    yield Job(entry, prompt, (i,))
            else:
                yield Job(entry, prompt, missing)


@dataclass
class WorkScan:
    """What `scan_work` found: work items in all, how many are done, the positions with work left."""

    total: int
    skipped: int
    todo: array  # index positions with at least one item not done (4 bytes each), for `plan_jobs`


def scan_work(entries: Sequence[IndexEntry], prompts: list[Prompt], n: int, done: set) -> WorkScan:
    """Count the work and note which images have some left, asking `done` once per item.

    Asks `done` about each item (`in` only): the done set is digests that cannot be listed
    (`pipeline.ledger.donekeys`), and no set of the index's ids is built."""
    wanted = [(p.name, captions_wanted(p, n)) for p in prompts]
    per_image = sum(k for _, k in wanted)
    total = len(entries) * per_image
    todo = array("i" if len(entries) < 2**31 else "q")
    if not done:
        todo.extend(range(len(entries)))
        return WorkScan(total, 0, todo)
    skipped = 0
    for position, iid in enumerate(image_ids(entries)):
        found = 0
        for name, k in wanted:
            for i in range(k):
                if (iid, name, i) in done:
                    found += 1
        if found < per_image:
            todo.append(position)
        skipped += found
    return WorkScan(total, skipped, todo)


def count_work(entries: Sequence[IndexEntry], prompts: list[Prompt], n: int, done: set) -> tuple[int, int]:
    """(total work items in the index, how many of them are already done); see `scan_work`."""
    scan = scan_work(entries, prompts, n, done)
    return scan.total, scan.skipped


class Dispatcher:
    """The producer. Streams new jobs from the plan and re-sends retries when their backoff is over.

    Due retries go ahead of new work, so retries do not trickle after the first pass. The job stream
    closes once the plan is exhausted and no job is outstanding (sent and neither finished nor waiting
    for a retry), or when the run is stopping.
    """

    def __init__(self, plan: Iterator[Job], controller: Controller) -> None:
        self._plan = plan
        self._controller = controller
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self.outstanding = 0
        self.abandoned = 0
        self.exhausted = False  # the plan has no new job left: only retries and jobs out remain (tail hedging)
        self._wake = anyio.Event()
        controller.on_stop.append(self.wake)

    def wake(self) -> None:
        self._wake.set()

    def adopt(self, job: Job) -> Job:
        """Count a job born from another (some of its caption slots) as outstanding."""
        self.outstanding += 1
        return job

    def add(self, job: Job) -> None:
        """A new job born from another (slots the server did not fill); due at once."""
        self.reschedule(self.adopt(job), 0.0)

    def reschedule(self, job: Job, wait_s: float) -> None:
        heapq.heappush(self._heap, (anyio.current_time() + wait_s, next(self._seq), job))
        self.wake()

    def finished(self, job: Job) -> None:
        self.outstanding -= 1
        self.wake()

    def abandon(self, job: Job) -> None:
        """Left for a later run (stop or budget): not done, not an error."""
        self.abandoned += 1
        self.finished(job)

    async def run(self, jobs: ObjectSendStream[Job]) -> None:
        exhausted = False
        async with jobs:
            while not self._controller.stopping:
                now = anyio.current_time()
                if self._heap and self._heap[0][0] <= now:
                    await jobs.send(heapq.heappop(self._heap)[2])
                    continue
                if not exhausted:
                    job = next(self._plan, None)
                    if job is None:
                        exhausted = self.exhausted = True
                        continue
                    self.outstanding += 1
                    await jobs.send(job)
                    continue
                if self.outstanding <= 0 and not self._heap:
                    return
                wake = self._wake = anyio.Event()
                delay = self._heap[0][0] - now if self._heap else None
                if delay is None:
                    await wake.wait()
                else:
                    with anyio.move_on_after(delay):
                        await wake.wait()
            self.abandoned += len(self._heap)
            self._heap.clear()
