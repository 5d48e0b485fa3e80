"""Text-to-image retrieval metrics under the Market-1501 protocol: CMC Rank-k and mAP (pure, no model).

A query is one caption of a query image; the gallery is images. For each query the gallery is ranked
by similarity (higher = closer) and scored as torchreid's `eval_market1501` scores it:

* a gallery image of the same person on ANOTHER camera is a match;
* a gallery image of the same person on the SAME camera is ignored (removed from the ranking), since
  finding the same person in the same camera view is too easy to count;
* junk gallery images (Market-1501 person id -1: bad detections) are ignored for every query;
* distractors (person id 0, Market-1501's `0000` images) stay in the gallery as non-matches, as in the
  official protocol and torchreid; they are never queries;
* a query whose person has no match left in the gallery is skipped (not counted), as torchreid does.

Rank-k is the share of counted queries with a match among the first k kept gallery images; AP is the
mean of the precision at each match's position in the kept ranking; mAP is their mean over counted
queries. Ties in similarity are broken by gallery order (a stable sort), so results are deterministic;
torchreid's `np.argsort` leaves tie order to its quicksort.

`evaluate` takes the similarities row by row (`Iterable` of rows), so a caller with 3,368 queries and
19,732 gallery images can stream them in chunks instead of holding the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

JUNK_PIDS: frozenset[int] = frozenset({-1})      # removed from every ranking
DISTRACTOR_PIDS: frozenset[int] = frozenset({0})  # kept in the gallery as non-matches, never a query
RANKS: tuple[int, ...] = (1, 5, 10)


@dataclass(frozen=True)
class QueryResult:
    """One counted query: where its first match is in the kept ranking (0-based) and its AP."""

    first_match: int
    average_precision: float
    matches: int


@dataclass(frozen=True)
class RetrievalScores:
    """CMC at `ranks` and mAP over the counted queries; values in [0, 1], None when nothing counted."""

    ranks: dict[int, float | None]
    mAP: float | None
    queries: int               # counted queries
    skipped: int               # queries not counted: junk/distractor person, or no match in the gallery
    gallery: int               # gallery images given
    cmc: tuple[float, ...] = field(default=())  # CMC curve up to max(ranks)

    def rank(self, k: int) -> float | None:
        return self.ranks.get(k)

    def to_dict(self) -> dict[str, object]:
        return {**{f"rank{k}": v for k, v in self.ranks.items()}, "mAP": self.mAP, "queries": self.queries,
                "skipped": self.skipped, "gallery": self.gallery}


def rank_query(similarity: Sequence[float] | np.ndarray, q_pid: int, q_camid: int,
               g_pids: np.ndarray, g_camids: np.ndarray) -> QueryResult | None:
    """Score one query against the gallery; None when it is not counted (see the module's rules)."""
    if q_pid in JUNK_PIDS or q_pid in DISTRACTOR_PIDS:
        return None
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.shape != g_pids.shape:
        raise ValueError(f"similarity row has {sim.shape[0] if sim.ndim else 0} values for {len(g_pids)} gallery images")
    order = np.argsort(-sim, kind="stable")
    pids, cams = g_pids[order], g_camids[order]
    keep = ~(((pids == q_pid) & (cams == q_camid)) | np.isin(pids, list(JUNK_PIDS)))
    hits = (pids[keep] == q_pid)
    n_rel = int(hits.sum())
    if n_rel == 0:
        return None
    positions = np.flatnonzero(hits)
    precision_at_hits = np.arange(1, n_rel + 1) / (positions + 1)
    return QueryResult(first_match=int(positions[0]), average_precision=float(precision_at_hits.mean()),
                       matches=n_rel)


def evaluate(similarities: Iterable[Sequence[float] | np.ndarray], q_pids: Sequence[int],
             q_camids: Sequence[int], g_pids: Sequence[int], g_camids: Sequence[int],
             ranks: Sequence[int] = RANKS) -> RetrievalScores:
    """CMC Rank-k and mAP of queries (rows of `similarities`, in the order of `q_pids`) over the gallery."""
    gp, gc = np.asarray(g_pids, dtype=np.int64), np.asarray(g_camids, dtype=np.int64)
    if gp.shape != gc.shape:
        raise ValueError("g_pids and g_camids differ in length")
    if len(q_pids) != len(q_camids):
        raise ValueError("q_pids and q_camids differ in length")
    results: list[QueryResult] = []
    rows = 0
    for row, pid, cam in zip(similarities, q_pids, q_camids):
        rows += 1
        result = rank_query(row, int(pid), int(cam), gp, gc)
        if result is not None:
            results.append(result)
    if rows != len(q_pids):
        raise ValueError(f"{rows} similarity rows for {len(q_pids)} queries")
    return summarise(results, rows - len(results), len(gp), ranks)


def summarise(results: Sequence[QueryResult], skipped: int, gallery: int,
              ranks: Sequence[int] = RANKS) -> RetrievalScores:
    """Rank-k, CMC and mAP from per-query results (shared by `evaluate` and callers that stream)."""
    max_rank = max(ranks) if ranks else 0
    if not results:
        return RetrievalScores(ranks={k: None for k in ranks}, mAP=None, queries=0, skipped=skipped,
                               gallery=gallery)
    first = np.array([r.first_match for r in results])
    cmc = tuple(float((first < k).mean()) for k in range(1, max_rank + 1))
    return RetrievalScores(
        ranks={k: float((first < k).mean()) for k in ranks},
        mAP=float(np.mean([r.average_precision for r in results])),
        queries=len(results), skipped=skipped, gallery=gallery, cmc=cmc,
    )


# --------------------------------------------------------------------------------------------- query / gallery

@dataclass(frozen=True)
class ProtocolImage:
    """What the protocol needs of an image: its id, person, camera and split (from the index)."""

    image_id: str
    pid: int | None
    camid: int | None
    split: str | None = None


SPLIT_RULE = "the dataset's split: query images' captions against gallery images"
FALLBACK_RULE = ("no query/gallery split in the index: the first image (by image_id) of each person on each "
                 "camera is a query, every image of a known person is in the gallery")


def protocol_sets(images: Iterable[ProtocolImage]) -> tuple[list[ProtocolImage], list[ProtocolImage], str]:
    """(queries, gallery, the rule used). Images with no person id or camera take no part.

    With the dataset's split (Market-1501, DukeMTMC-reID, MSMT17 from `prepare`): the query split against
    the gallery split (either may come back empty). With neither split (a plain folder): the first image of each (person, camera) is a query
    and every image is in the gallery; the query's own image is then the same person on the same camera,
    which the protocol ignores, so it never scores itself.
    """
    known = [im for im in images if im.pid is not None and im.camid is not None]
    queries = [im for im in known if im.split == "query"]
    gallery = [im for im in known if im.split == "gallery"]
    if queries or gallery:  # the dataset has the protocol's splits (the caller says when one is empty)
        return queries, gallery, SPLIT_RULE
    firsts: dict[tuple[int, int], ProtocolImage] = {}
    for im in sorted(known, key=lambda im: im.image_id):
        assert im.pid is not None and im.camid is not None
        if im.pid in JUNK_PIDS or im.pid in DISTRACTOR_PIDS:
            continue
        firsts.setdefault((im.pid, im.camid), im)
    return list(firsts.values()), sorted(known, key=lambda im: im.image_id), FALLBACK_RULE
