"""The done set held compactly: 8 bytes per key, whatever the number of rows.

A run resuming a folder of a million finished rows asks "is (image_id, prompt_name, caption_index)
done?" for every item of the index. A Python `set` of such tuples costs ~250 bytes per key (the tuple,
its strings, the set slot): 250 MB for a million rows. Here each key is a 64-bit BLAKE2b digest of the
key's text, kept in 256 arrays of signed 64-bit integers (split by the digest's top byte), each sorted
once when first queried and searched with `bisect`: 8 bytes per key, plus a transient list of one
bucket's ints while it is sorted.

Why a hash and not the exact keys: the exact keys are the strings themselves (~60-100 bytes each, more
than the whole budget at 5 million rows). The price is a false "done": a key not in the set whose digest
equals a member's. A done key's digest is the first 8 bytes of its BLAKE2b hash, a stable function (the
same in every process), because the set is also kept on disk between runs (`pipeline.ledger.donesnap`:
a resume loads 8 MB of digests instead of reading a million rows). It behaves as a random function: with
n keys held and m keys asked, the chance that *any* asked key is wrongly taken as done is about
m * n / 2**64: 5e-8 for a million of each, 1.4e-6 for 5 million of each. Such an item would be skipped,
never paid twice; `status` would count one caption too many. (BLAKE2b costs ~0.45 microseconds a key,
about 0.35 more than Python's own string hash: 0.35 s to ask a million keys.)

`DistinctStrings` (distinct images, for `status`) is never kept on disk, so it uses Python's own string
hash (SipHash-1-3 with a per-process key, 64 bits on 64-bit builds; BLAKE2b on 32-bit builds), which is
cheaper and also behaves as a random function.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from bisect import bisect_left
from typing import Iterable

SEP = "\x1f"  # never inside an image id (the scanner refuses it), a prompt name or a number
_BUCKET_SHIFT = 56  # the top byte of the digest picks the bucket (as unsigned: 0..255)
_SUB_SHIFT = 48  # the next byte: the sub-range of a bucket a look-up bisects


def _blake2b(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


# the string's own hash where it has 64 bits (module docstring), else BLAKE2b: in-process sets only
text_digest = hash if sys.hash_info.width >= 64 else _blake2b
stable_digest = _blake2b  # the same in every process: done keys, which are also kept on disk


def key_digest(image_id: str, prompt_name: str, caption_index: int) -> int:
    """The signed 64-bit digest of one done key (see the module docstring for collision odds)."""
    return stable_digest(f"{image_id}{SEP}{prompt_name}{SEP}{caption_index}")


_NO_STARTS = array("q", bytes(8 * 257))


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


class DigestSet:
    """A set of signed 64-bit digests: `add`, `in`, `len` (distinct members). No iteration: the keys
    themselves are not kept.

    256 buckets by the digest's top byte, each an `array('q')` sorted when first asked after an add,
    with the start of each of its 256 sub-ranges (the next byte) noted, so a look-up bisects ~1/65,536
    of the set: a few steps, not twenty (0.4 against 1.5 microseconds a look-up at a million keys)."""

    __slots__ = ("_buckets", "_dirty", "_starts")

    def __init__(self) -> None:
        self._buckets: list[array] = [array("q") for _ in range(256)]
        self._starts: list[array] = [_NO_STARTS] * 256  # an empty bucket: every sub-range is [0, 0)
        self._dirty: set[int] = set()

    def add_digest(self, digest: int) -> None:
        b = (digest >> _BUCKET_SHIFT) & 0xFF
        self._buckets[b].append(digest)
        self._dirty.add(b)

    def has_digest(self, digest: int) -> bool:
        b = (digest >> _BUCKET_SHIFT) & 0xFF
        if b in self._dirty:
            self._sort(b)
        sub = (digest >> _SUB_SHIFT) & 0xFF
        starts = self._starts[b]
        bucket = self._buckets[b]
        hi = starts[sub + 1]
        i = bisect_left(bucket, digest, starts[sub], hi)
        return i < hi and bucket[i] == digest

    def _sort(self, b: int) -> None:
        """Sort one bucket, drop repeats (a key written twice), note where each sub-range starts."""
        self._buckets[b] = array("q", sorted(set(self._buckets[b])))
        self._note_starts(b)
        self._dirty.discard(b)

    def _note_starts(self, b: int) -> None:
        bucket = self._buckets[b]
        top = b << _BUCKET_SHIFT
        starts = array("q", (bisect_left(bucket, _signed(top | (s << _SUB_SHIFT))) for s in range(256)))
        starts.append(len(bucket))
        self._starts[b] = starts

    def sorted_digests(self) -> array:
        """Every member once, sorted bucket by bucket (the order `from_sorted` takes back)."""
        self.freeze()
        out = array("q")
        for bucket in self._buckets:
            out.extend(bucket)
        return out

    def add_sorted(self, digests: array) -> None:
        """Fill an empty set with what `sorted_digests` gave: no sort, only the sub-range starts noted.

        The buckets come in bucket order, 0-127 (digests >= 0) then 128-255 (< 0): two sorted runs."""
        if any(len(bucket) for bucket in self._buckets):
            raise ValueError("add_sorted needs an empty set")
        n = len(digests)
        split = bisect_left(digests, True, key=lambda d: d < 0)  # where the negative run starts
        lo = 0
        for b in range(256):
            hi = split if b < 128 else n
            if b not in (127, 255):
                hi = bisect_left(digests, _signed((b + 1) << _BUCKET_SHIFT), lo, hi)
            if hi > lo:
                self._buckets[b] = digests[lo:hi]
                self._note_starts(b)
            lo = hi
        if lo != n:
            raise ValueError("digests not in sorted_digests order")

    def freeze(self) -> "DigestSet":
        """Sort every bucket now (a reader that then only queries pays no sort on the first look-up)."""
        for b in list(self._dirty):
            self._sort(b)
        return self

    def __len__(self) -> int:
        self.freeze()
        return sum(len(b) for b in self._buckets)

    @property
    def nbytes(self) -> int:
        return sum(b.itemsize * len(b) for b in self._buckets)


class DoneKeys(DigestSet):
    """The done set: (image_id, prompt_name, caption_index) keys, 8 bytes each (module docstring).

    Quacks like the `set[Key]` it replaces for `in`, `add`, `len`; it cannot be iterated."""

    __slots__ = ()

    def __init__(self, keys: Iterable[tuple[str, str, int]] = ()) -> None:
        super().__init__()
        for key in keys:
            self.add(key)

    def add(self, key: tuple[str, str, int]) -> None:
        image_id, prompt_name, index = key
        self.add_key(image_id, prompt_name, index)

    def add_key(self, image_id: str, prompt_name: str, index: int) -> None:
        """`add((image_id, prompt_name, index))` without making the tuple (a reader's million rows)."""
        self.add_digest(stable_digest(f"{image_id}{SEP}{prompt_name}{SEP}{index}"))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 3:
            return False
        image_id, prompt_name, index = key
        return self.has_digest(stable_digest(f"{image_id}{SEP}{prompt_name}{SEP}{index}"))

    def __iter__(self):  # pragma: no cover - a guard, never a feature
        raise TypeError("DoneKeys holds digests, not keys: it cannot be iterated")


class DistinctStrings(DigestSet):
    """Distinct strings counted by digest (distinct images captioned), 8 bytes each."""

    __slots__ = ()

    def add(self, text: str) -> None:
        self.add_digest(text_digest(text))

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self.has_digest(text_digest(text))

    def __iter__(self):  # pragma: no cover
        raise TypeError("DistinctStrings holds digests: it cannot be iterated")
