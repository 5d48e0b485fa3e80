"""Which images of the index a run works on: all of them, the first N (`--limit`), or N spread across
persons and cameras (`--sample N --seed S`).

A subset is a choice of images, never a new index: every image keeps its index position (so part files
and resume are those of the whole index), and the images chosen are a pure function of the index, N and
the seed. A later run with a larger N, or with no subset at all, continues where this one ended: the
images already captioned are skipped as done.

The sample is for trying a prompt before paying for a whole set, so it should show the model as many
different people and viewpoints as N allows: round-robin over persons (in an order given by a stable
hash of the seed and the person), and for each person over its cameras (those it was seen on fewest
times first, then those seen fewest times in the sample so far, then by hash), one image at a time.
Every person is taken once before any person twice, and a person's cameras all once before any twice.
The choice for N is a prefix of the choice for N + 1, so growing N only adds images.

Images without a person id are each their own person; images without a camera are each their own
camera. Market-1501 junk and distractor crops (`junk`) come only after every other image.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from pipeline.config import SubsetConfig
from pipeline.records import IndexEntry


def stable_hash(seed: int, *parts: object) -> int:
    """A hash that is the same in every process and on every platform (unlike `hash()`)."""
    text = "\x1f".join([str(seed), *(repr(p) for p in parts)])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def person_key(entry: IndexEntry) -> Hashable:
    return ("pid", entry.pid) if entry.pid is not None else ("image", entry.image_id)


def camera_key(entry: IndexEntry) -> Hashable:
    return ("cam", entry.camid) if entry.camid is not None else ("image", entry.image_id)


@dataclass
class _Person:
    key: Hashable
    cameras: dict[Hashable, list[IndexEntry]] = field(default_factory=dict)  # each list: next image last
    taken: dict[Hashable, int] = field(default_factory=dict)  # images taken per camera of this person

    def left(self) -> bool:
        return any(self.cameras.values())


def sample_entries(entries: Sequence[IndexEntry], n: int, seed: int = 0) -> list[IndexEntry]:
    """`n` images spread across persons and cameras, deterministic for `seed`; returned in index order."""
    if n <= 0:
        return []
    chosen: list[IndexEntry] = []
    for group in (
        [e for e in entries if not e.junk],
        [e for e in entries if e.junk],
    ):
        if len(chosen) >= n:
            break
        chosen.extend(_round_robin(group, n - len(chosen), seed))
    return sorted(chosen, key=lambda e: e.position)


def _round_robin(entries: Sequence[IndexEntry], n: int, seed: int) -> list[IndexEntry]:
    """Take `n` images: one per person per round, each person cycling over its cameras."""
    people: dict[Hashable, _Person] = {}
    for e in entries:
        person = people.setdefault(person_key(e), _Person(person_key(e)))
        person.cameras.setdefault(camera_key(e), []).append(e)
    for person in people.values():
        for cam, images in person.cameras.items():
            # the next image of a camera is popped from the end: sort so the smallest hash is last
            images.sort(key=lambda e: (stable_hash(seed, "image", e.image_id), e.position), reverse=True)
            person.taken[cam] = 0
    order = sorted(people.values(), key=lambda p: (stable_hash(seed, "person", p.key), repr(p.key)))
    camera_use: dict[Hashable, int] = defaultdict(int)  # images taken per camera across the sample
    chosen: list[IndexEntry] = []
    while len(chosen) < n and order:
        for person in order:
            if len(chosen) >= n:
                break
            cam = min(
                (c for c, images in person.cameras.items() if images),
                key=lambda c: (person.taken[c], camera_use[c], stable_hash(seed, "camera", person.key, c), repr(c)),
            )
            chosen.append(person.cameras[cam].pop())
            person.taken[cam] += 1
            camera_use[cam] += 1
        order = [p for p in order if p.left()]
    return chosen


def select_entries(entries: Sequence[IndexEntry], subset: SubsetConfig) -> Sequence[IndexEntry]:
    """The images a run works on: the whole index (as it is: a compact index stays compact), its first
    `limit` images, or a `sample`."""
    if subset.sample is not None:
        return sample_entries(entries, subset.sample, subset.seed)
    if subset.limit is not None:
        return list(entries[: subset.limit])
    return entries


def subset_flags(subset: SubsetConfig) -> str | None:
    """The subset as the options that chose it (`--limit 10`, `--sample 10 --seed 0`); None = everything."""
    if subset.sample is not None:
        return f"--sample {subset.sample} --seed {subset.seed}"
    if subset.limit is not None:
        return f"--limit {subset.limit}"
    return None


def describe_subset(subset: SubsetConfig, chosen: Sequence[IndexEntry], total: int) -> str | None:
    """The start line's account of the subset (None when the whole index is used)."""
    flags = subset_flags(subset)
    if flags is None:
        return None
    if subset.sample is not None:
        persons = len({person_key(e) for e in chosen})
        cameras = len({e.camid for e in chosen if e.camid is not None})
        spread = f"{persons:,} person{'s' if persons != 1 else ''}"
        if cameras:
            spread += f", {cameras:,} camera{'s' if cameras != 1 else ''}"
        what = f"{len(chosen):,} of {total:,} images spread across {spread}"
        option = "--sample"
    else:
        what = f"the first {len(chosen):,} of {total:,} images in index order"
        option = "--limit"
    return f"subset {flags}: {what}; a run without {option} continues with the rest"
