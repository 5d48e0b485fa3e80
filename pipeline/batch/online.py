"""An online run in a folder that also has batches: their work is left to them, never asked twice.

Online and batch rows live in one folder. While a shard of the folder is on its way to the Batch API
(planned, uploaded, submitted, waiting, ended and not collected), its work items belong to that batch:
an online run that asked for them too would pay for them twice, and the batch's answers would then be
thrown away as already done. So an online run takes the folder's lock, reads the batch ledger, and plans
its work without those items (one note says how many); the batch run collects them later. Batch files
written for another server (`--batch-files-only`) are not left out: nothing may ever answer them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import anyio

from pipeline.batch.ledger import BATCHES_DIR, LEDGER_NAME, BatchLedger, online_notes
from pipeline.batch.lines import EitherSet
from pipeline.config import RunConfig
from pipeline.run.runner import RunResult, announce, prepare, run_prepared

__all__ = ["run_online"]


def run_online(cfg: RunConfig, *, views: Any = None, notes: Sequence[str] = ()) -> RunResult:
    """`pipeline.run.runner.run`, less the work of the folder's batches not collected yet. The ledger
    is read under the folder's lock (taken by `prepare`), so no batch run can add a shard meanwhile."""
    prep = prepare(cfg)
    try:
        extra: list[str] = []
        if (Path(cfg.out) / BATCHES_DIR / LEDGER_NAME).is_file():
            covered, extra = online_notes(BatchLedger.load(cfg.out))
            if covered is not None and len(covered):
                prep.resume.done = EitherSet(prep.resume.done, covered)  # the plan asks it, nothing else does
        announce(prep, [*notes, *extra])
        return anyio.run(lambda: run_prepared(prep, views=views))
    finally:
        prep.release()
