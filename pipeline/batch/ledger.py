"""The folder's batch ledger, `OUT/batches/ledger.json`: every shard, what was sent and what came back.

A batch costs money and takes up to 24 hours, so the folder must know at every moment what it has done
on the provider's side: a kill -9 followed by the same command must find each shard again and never
create a second batch for it. The record of a shard is written BEFORE the call that changes its state
(its input file is complete and hashed before it is uploaded) and updated after each call, so what the
ledger says is at worst one call behind the provider, and the batch's `metadata` (folder tag + shard id)
and the upload's file name close that gap (`flow` lists before it creates).

States of a shard:

    planned --upload--> uploaded --create--> submitted --ended--> ended --joined--> collected
    local     (--batch-files-only: written for another server; `collect` ingests its output)
    waiting   (refused for the enqueued-token limit: submitted again when this folder's batches end)

Every save is atomic: a temporary file in the same folder, flushed and fsynced, then `os.replace`, so a
crash leaves the old ledger or the new one, never half of one. A damaged ledger is one line naming the
file (exit 2), never a guess: guessing could send a batch twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from pipeline.batch.ids import parse_custom_id
from pipeline.errors import ConfigError
from pipeline.ledger.donekeys import DoneKeys
from pipeline.ledger.manifest import now_iso

__all__ = [
    "BATCHES_DIR",
    "LEDGER_NAME",
    "LEDGER_VERSION",
    "STATES",
    "DONE_STATES",
    "ShardRecord",
    "BatchLedger",
    "shard_name",
    "online_notes",
    "write_atomic",
]

BATCHES_DIR = "batches"
LEDGER_NAME = "ledger.json"
LEDGER_VERSION = 1
STATES = ("planned", "uploaded", "submitted", "ended", "collected", "local", "waiting")
DONE_STATES = frozenset({"collected"})  # every line's outcome is in the CSV files (or re-planned)
METADATA_FOLDER = "reid_prompt_folder"
METADATA_SHARD = "reid_prompt_shard"


def shard_name(number: int) -> str:
    """`s000001`: shard ids are numbered in the folder and never reused."""
    return f"s{number:06d}"


@dataclass
class ShardRecord:
    """One shard: one JSONL input file, at most one batch on the provider (the ledger's unit).

    `jsonl` and `ids` are paths relative to the output folder (absolute for a `--batch-files-only` folder
    elsewhere); the `.ids` file (one custom_id a line) is kept after the JSONL is deleted, so the work
    items of a shard are known for as long as the shard is not collected. `round`: 1 for the first
    submission of its items, +1 for each re-submission of failed lines (attempts per work item).
    `est_cost_usd` is at the batch price with every answer at max_tokens (what `--max-cost` commits).
    """

    shard_id: str
    round: int
    jsonl: str
    ids: str
    sha256: str
    lines: int
    bytes: int
    est_input_tokens: int
    est_cost_usd: float
    state: str = "planned"
    input_file_id: str | None = None
    batch_id: str | None = None
    batch_status: str | None = None  # the provider's word: validating, in_progress, completed, expired, ...
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # the batch's errors.data lines
    created_at: str = ""
    updated_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ShardRecord":
        """The record as saved; ValueError for anything that is not one (the ledger names its file)."""
        if not isinstance(data, dict):
            raise ValueError("a shard is not a JSON object")
        known = {f.name for f in fields(cls)}
        missing = [n for n in ("shard_id", "round", "jsonl", "ids", "sha256", "lines", "bytes",
                               "est_input_tokens", "est_cost_usd", "state") if n not in data]
        if missing:
            raise ValueError(f"a shard lacks {', '.join(missing)}")
        rec = cls(**{k: v for k, v in data.items() if k in known})
        rec.check()
        return rec

    def check(self) -> None:
        """Types and values a ledger can hold; ValueError naming the first one that is wrong."""
        def whole(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"shard {self.shard_id!r}: {name} must be a whole number, got {value!r}")

        if not isinstance(self.shard_id, str) or not self.shard_id:
            raise ValueError(f"a shard id must be a string, got {self.shard_id!r}")
        for name in ("round", "lines", "bytes", "est_input_tokens"):
            whole(name)
        cost = self.est_cost_usd
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or cost < 0:
            raise ValueError(f"shard {self.shard_id!r}: est_cost_usd must be a number, got {cost!r}")
        if self.state not in STATES:
            raise ValueError(f"shard {self.shard_id!r}: unknown state {self.state!r}")
        for name in ("jsonl", "ids", "sha256"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"shard {self.shard_id!r}: {name} must be a string")
        for name in ("input_file_id", "batch_id", "batch_status", "output_file_id", "error_file_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"shard {self.shard_id!r}: {name} must be a string or null")
        if not isinstance(self.request_counts, dict) or not isinstance(self.errors, list):
            raise ValueError(f"shard {self.shard_id!r}: request_counts must be an object, errors a list")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once: a temporary file in the same folder, flushed and
    fsynced, then `os.replace` (and the folder fsynced where the OS allows it). A failure at any point
    leaves the old file as it was and no temporary file behind."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); Windows cannot open a folder for fsync, and needs not."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BatchLedger:
    """`OUT/batches/ledger.json` in memory; every change is saved before the method returns."""

    def __init__(self, out: Path, folder_tag: str | None = None, shards: list[ShardRecord] | None = None) -> None:
        self.out = Path(out)
        self.folder_tag = folder_tag or uuid.uuid4().hex  # made once, kept by the first save
        self.shards: list[ShardRecord] = list(shards or [])

    # --- where things are ---------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.out / BATCHES_DIR

    @property
    def path(self) -> Path:
        return self.folder / LEDGER_NAME

    def resolve(self, relative: str) -> Path:
        """A record's path (`jsonl`, `ids`) on disk: relative to the output folder unless absolute."""
        p = Path(relative)
        return p if p.is_absolute() else self.out / p

    def relative(self, path: Path) -> str:
        """How a record names `path`: relative to the output folder (with `/`) when inside it."""
        try:
            return Path(path).resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(Path(path).resolve())

    # --- reading and writing ------------------------------------------------------------------------

    @classmethod
    def load(cls, out: Path) -> "BatchLedger":
        """The folder's ledger (an empty one if there is none yet); a damaged one is a ConfigError."""
        ledger = cls(out)
        try:
            raw = ledger.path.read_bytes()
        except FileNotFoundError:
            return ledger
        except OSError as exc:
            raise ConfigError(f"cannot read the batch ledger {ledger.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("version") != LEDGER_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {LEDGER_VERSION}")
            tag = data.get("folder_tag")
            if not isinstance(tag, str) or len(tag) != 32 or any(c not in "0123456789abcdef" for c in tag):
                raise ValueError("no folder_tag of 32 hex characters")
            shards = data.get("shards")
            if not isinstance(shards, list):
                raise ValueError("no list of shards")
            records = [ShardRecord.from_dict(s) for s in shards]
            ids = [r.shard_id for r in records]
            if len(set(ids)) != len(ids):
                raise ValueError("a shard id appears twice")
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"the batch ledger {ledger.path} is damaged ({' '.join(str(exc).split())[:200]}): it records the "
                "batches sent from this folder; restore it from a backup, or move it away only if no batch of "
                "this folder is still in flight"
            ) from None
        return cls(out, tag, records)

    def to_dict(self) -> dict[str, Any]:
        return {"version": LEDGER_VERSION, "folder_tag": self.folder_tag,
                "shards": [s.to_dict() for s in self.shards]}

    def save(self) -> None:
        """Write the whole ledger atomically (`write_atomic`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"
        write_atomic(self.path, text.encode("utf-8"))

    # --- shards -------------------------------------------------------------------------------------

    def get(self, shard_id: str) -> ShardRecord:
        for s in self.shards:
            if s.shard_id == shard_id:
                return s
        raise KeyError(shard_id)

    def next_shard_id(self) -> str:
        """The next unused id: one past the highest ever recorded (ids are never reused)."""
        highest = 0
        for s in self.shards:
            if s.shard_id.startswith("s") and s.shard_id[1:].isdigit():
                highest = max(highest, int(s.shard_id[1:]))
        return shard_name(highest + 1)

    def new_shard(self, *, shard_id: str | None = None, round: int = 1, jsonl: str | Path, ids: str | Path,
                  sha256: str, lines: int, bytes: int, est_input_tokens: int, est_cost_usd: float,
                  state: str = "planned") -> ShardRecord:
        """Record a shard whose files are complete on disk (saved before this returns)."""
        shard_id = shard_id or self.next_shard_id()
        if any(s.shard_id == shard_id for s in self.shards):
            raise ValueError(f"shard {shard_id} is already in the ledger")
        now = now_iso()
        rec = ShardRecord(
            shard_id=shard_id, round=round,
            jsonl=jsonl if isinstance(jsonl, str) else self.relative(jsonl),
            ids=ids if isinstance(ids, str) else self.relative(ids),
            sha256=sha256, lines=lines, bytes=bytes, est_input_tokens=est_input_tokens,
            est_cost_usd=round_usd(est_cost_usd), state=state, created_at=now, updated_at=now,
        )
        rec.check()
        self.shards.append(rec)
        self.save()
        return rec

    def update(self, shard_id: str, **changes: Any) -> ShardRecord:
        """Change fields of one shard and save. Unknown fields, a bad state or bad types are ValueErrors
        (and change nothing)."""
        rec = self.get(shard_id)
        known = {f.name for f in fields(ShardRecord)} - {"shard_id", "created_at"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"a shard has no field {', '.join(unknown)}")
        before = rec.to_dict()
        for k, v in changes.items():
            setattr(rec, k, v)
        try:
            rec.check()
        except ValueError:
            for k, v in before.items():
                setattr(rec, k, v)
            raise
        rec.updated_at = now_iso()
        self.save()
        return rec

    def outstanding(self) -> list[ShardRecord]:
        """Shards whose lines are not all written to the CSV files yet, oldest first."""
        return [s for s in self.shards if s.state not in DONE_STATES]

    def read_ids(self, rec: ShardRecord) -> Iterator[str]:
        """The custom_ids of a shard, from its `.ids` file (one a line), streamed."""
        path = self.resolve(rec.ids)
        try:
            with path.open("r", encoding="utf-8", newline="") as fh:
                for line in fh:
                    cid = line.rstrip("\r\n")
                    if cid:
                        yield cid
        except FileNotFoundError:
            raise ConfigError(f"shard {rec.shard_id} of the batch ledger {self.path} lists its work in {path}, "
                              "which is missing") from None

    def covered_ids(self) -> set[str]:
        """custom_ids of the shards not collected yet: the planner leaves them out (they are in flight,
        waiting, or written for another server), so no work item is sent twice."""
        covered: set[str] = set()
        for rec in self.outstanding():
            covered.update(self.read_ids(rec))
        return covered

    def covered_slots(self, *, skip_local: bool = False) -> DoneKeys:
        """The work items of the shards not collected yet as (image_id, prompt, caption slot) keys, 8
        bytes each (`pipeline.ledger.donekeys`): the planner skips them slot by slot, so an item is never
        in two shards even when the slots of its job changed since (an online run did one of them).
        `skip_local`: leave out batch files written for another server (what an online run skips)."""
        keys = DoneKeys()
        for rec in self.outstanding():
            if skip_local and rec.state == "local":
                continue
            for cid in self.read_ids(rec):
                try:
                    image_id, prompt_name, indices = parse_custom_id(cid)
                except ValueError:
                    raise ConfigError(f"shard {rec.shard_id} of the batch ledger {self.path} lists an id that is "
                                      f"not reid-prompt's: {cid[:80]!r}") from None
                for i in indices:
                    keys.add_key(image_id, prompt_name, i)
        return keys

    def metadata(self, rec: ShardRecord) -> dict[str, str]:
        """The batch's `metadata`: the folder and the shard, to find a batch whose creation answer was lost."""
        return {METADATA_FOLDER: self.folder_tag, METADATA_SHARD: rec.shard_id}

    def upload_name(self, rec: ShardRecord) -> str:
        """The input file's name on the provider, to find an upload whose answer was lost."""
        return f"reid-prompt-{self.folder_tag}-{rec.shard_id}.jsonl"

    def committed_usd(self) -> float:
        """Estimated cost of shards sent and not collected (submitted or ended): `--max-cost` counts them."""
        return sum(s.est_cost_usd for s in self.shards if s.state in ("submitted", "ended"))


def online_notes(ledger: BatchLedger) -> tuple[DoneKeys | None, list[str]]:
    """(work items an online run must leave out, its notes) in a folder with shards not collected. Pure
    but for reading the shards' `.ids` files.

    Work in a shard sent (or about to be sent) to the Batch API is the batch's: an online run asking for
    it too would pay for it twice, so it is left out (and said); the batch run collects it. Work in batch
    files written for another server (`local`) is asked for: the user may have chosen not to run them,
    and `collect` later skips what is done."""
    sent = [s for s in ledger.outstanding() if s.state != "local"]
    local = [s for s in ledger.outstanding() if s.state == "local"]
    notes: list[str] = []
    covered = None
    if sent:
        covered = ledger.covered_slots(skip_local=True)
        lines = sum(s.lines for s in sent)
        notes.append(f"{len(sent)} batch shard(s) of this folder are not collected yet ({lines:,} requests): this "
                     "online run leaves their work to them; `run --mode batch` collects them, `cancel --out` "
                     "cancels them")
    if local:
        lines = sum(s.lines for s in local)
        notes.append(f"{len(local)} batch file(s) written for another server ({lines:,} requests) are not "
                     "collected: this online run asks for their work too; `collect` later skips what is done")
    return covered, notes


def round_usd(x: float) -> float:
    return round(float(x), 8)
