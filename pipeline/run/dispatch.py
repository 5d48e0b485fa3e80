"""What there is to do and in which order: jobs, the lazy plan, and the dispatcher that hands them out.

The dispatcher is the pipeline's producer. It streams new jobs from the plan and re-sends retries when
their backoff is over, ahead of new work, so retries go back into the pool instead of trickling after
the first pass, and no worker sleeps holding a slot.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import anyio
from anyio.abc import ObjectSendStream

from pipeline.data.prompts import has_templates, prompt_hash
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
        return prompt_hash(self.prompt)


def captions_wanted(prompt: Prompt, captions_per_image: int) -> int:
    """Structured (schema) prompts give one answer per image; text prompts give N captions."""
    return 1 if prompt.schema is not None else captions_per_image


def plan_jobs(entries: list[IndexEntry], prompts: list[Prompt], n: int, done: set) -> Iterator[Job]:
    """Lazily yield the work still to do, in index order, skipping every (id, prompt, slot) already done.

    Slots of one image share one request (`n`), except under a templated prompt: there every caption
    gets its own sentence template, so its own request, and the captions do not share one shape.
    """
    for entry in entries:
        for prompt in prompts:
            wanted = captions_wanted(prompt, n)
            missing = tuple(i for i in range(wanted) if (entry.image_id, prompt.name, i) not in done)
            if not missing:
                continue
            if has_templates(prompt):
                for i in missing:
                    yield Job(entry, prompt, (i,))
            else:
                yield Job(entry, prompt, missing)


def count_work(entries: list[IndexEntry], prompts: list[Prompt], n: int, done: set) -> tuple[int, int]:
    """(total work items in the index, how many of them are already done)."""
    per_image = sum(captions_wanted(p, n) for p in prompts)
    total = len(entries) * per_image
    ids = {e.image_id for e in entries}
    names = {p.name: captions_wanted(p, n) for p in prompts}
    skipped = sum(1 for (iid, pname, idx) in done if iid in ids and pname in names and idx < names[pname])
    return total, skipped


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
                        exhausted = True
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
