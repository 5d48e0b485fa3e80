"""captions_all.csv's done set kept on disk, so a resume loads 8 bytes a row instead of reading every row.

Reading a million finished rows with the `csv` module takes as long as everything else a resume does
together (about 5 s on 2 cores, for 700 MB). What a resume needs of those rows is small: the done keys
(8-byte digests, `pipeline.ledger.donekeys`) and a few sums (rows, spent money, answer lengths). So the
writer saves them in `.done_keys.bin` beside the CSV files (`save`): after the start has read
captions_all.csv (then a run killed later still finds it), and again as a run ends with every answer
it wrote counted. The file records which bytes of captions_all.csv it covers: the size, the
modification time, the file's identity (inode) and a hash of the first and of the last 64 KiB.

`load` trusts it only while captions_all.csv is that file:
- same size: the modification time and both hashes must match (a hand edit of the same size changes the
  time; a rewrite by an editor changes the inode too);
- larger: the same inode and both hashes of the covered bytes must match; the bytes after them were
  appended since (a run killed before its end, held answers merged) and are read with the same clean
  pass as a whole file, so only they cost time;
- anything else (smaller, rewritten, another header, appended bytes that are torn or damaged, a snapshot
  that is itself damaged or of another version): None, and the caller reads the whole file as before,
  which finds and quarantines damage exactly as it always did.
What it cannot see is a same-size edit in the middle of the covered bytes made while the file also
grew (an editor saving in place during a run); the parts' in-step record (`pipeline.ledger.partstate`)
has the same blind spot. The snapshot is a cache: deleting it costs one slower start, never a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from array import array
from pathlib import Path

from pipeline.ledger.outputs import CAPTIONS_ALL, CaptionTally, tally_clean_captions

SNAP_FILE = ".done_keys.bin"
MAGIC = b"reid-prompt done keys\n"
VERSION = 1
EDGE = 64 * 1024  # bytes hashed at each end of the covered range


def edge_hashes(path: Path, size: int) -> tuple[str, str]:
    """Hashes of the first and of the last EDGE bytes of `path`'s first `size` bytes."""
    with open(path, "rb") as fh:
        head = fh.read(min(EDGE, size))
        start = max(0, size - EDGE)
        fh.seek(start)
        tail = fh.read(size - start)
    if len(head) != min(EDGE, size) or len(tail) != size - start:
        raise OSError("captions_all.csv changed while it was read")
    return hashlib.blake2b(head, digest_size=16).hexdigest(), hashlib.blake2b(tail, digest_size=16).hexdigest()


def _covers(path: Path, st: os.stat_result) -> dict:
    head, tail = edge_hashes(path, st.st_size)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "head": head, "tail": tail}


def save(out_dir: Path, tally: CaptionTally, expect_size: int | None = None) -> int | None:
    """Save `tally` as the done set of captions_all.csv as it is now; returns the size it covers.

    `expect_size`: the size the caller knows the file has (its own appends counted); another size means
    something it did not count reached the file, and the snapshot is dropped instead. Never raises (it
    is a cache): on any failure the snapshot is dropped and None returned."""
    out_dir = Path(out_dir)
    try:
        path = out_dir / CAPTIONS_ALL
        st = path.stat()
        if expect_size is not None and st.st_size != expect_size:
            forget(out_dir)
            return None
        digests = tally.keys.sorted_digests()
        if sys.byteorder != "little":
            digests.byteswap()
        meta = {
            "version": VERSION, "covers": _covers(path, st), "keys": len(digests),
            "check": hashlib.blake2b(memoryview(digests).cast("B"), digest_size=16).hexdigest(),
            "rows": tally.rows, "usd": tally.usd, "unknown": tally.unknown,
            "completion_tokens": tally.completion_tokens, "measured_rows": tally.measured_rows,
        }
        snap = out_dir / SNAP_FILE
        tmp = snap.with_name(snap.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + json.dumps(meta, separators=(",", ":")).encode("utf-8") + b"\n")
            digests.tofile(fh)
        os.replace(tmp, snap)
        tally.saved = True
        return st.st_size
    except (OSError, ValueError):
        forget(out_dir)
        return None


def forget(out_dir: Path) -> None:
    """Drop the snapshot; never raises."""
    try:
        (Path(out_dir) / SNAP_FILE).unlink(missing_ok=True)
    except OSError:
        pass


def _read_snapshot(out_dir: Path) -> tuple[dict, array] | None:
    digests = array("q")
    try:
        with open(Path(out_dir) / SNAP_FILE, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                return None
            meta = json.loads(fh.readline())
            if not isinstance(meta, dict) or meta.get("version") != VERSION or not isinstance(meta.get("covers"), dict):
                return None
            digests.fromfile(fh, int(meta["keys"]))  # straight into the array: no second copy of the bytes
            if fh.read(1):
                return None
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    if hashlib.blake2b(memoryview(digests).cast("B"), digest_size=16).hexdigest() != meta.get("check"):
        return None
    if sys.byteorder != "little":
        digests.byteswap()
    return meta, digests


def load(out_dir: Path) -> CaptionTally | None:
    """The done set of captions_all.csv from the snapshot (plus a clean pass over bytes appended since),
    or None when the snapshot does not describe the file as it is (module docstring). Never raises."""
    out_dir = Path(out_dir)
    found = _read_snapshot(out_dir)
    if found is None:
        return None
    meta, digests = found
    cov = meta["covers"]
    path = out_dir / CAPTIONS_ALL
    try:
        st = path.stat()
        size = int(cov["size"])
        if st.st_size < size or (st.st_size == size and st.st_mtime_ns != cov["mtime_ns"]):
            return None
        if st.st_ino != cov["ino"] or edge_hashes(path, size) != (cov["head"], cov["tail"]):
            return None
        tally = CaptionTally()
        tally.keys.add_sorted(digests)
        del digests
        tally.rows, tally.usd, tally.unknown = int(meta["rows"]), float(meta["usd"]), int(meta["unknown"])
        tally.completion_tokens, tally.measured_rows = int(meta["completion_tokens"]), int(meta["measured_rows"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    if st.st_size == size:
        tally.saved = True
        return tally
    return tally_clean_captions(path, start=size, into=tally)  # the rows appended since (or None)
