"""Rank-k and mAP under the Market-1501 protocol, against cases worked out by hand and against a plain
re-statement of torchreid's `eval_market1501` loop (distances, per-query removal of same person + same
camera, junk dropped from the gallery as torchreid's dataset loader drops it)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.review.retrieval import (
    FALLBACK_RULE,
    SPLIT_RULE,
    ProtocolImage,
    evaluate,
    protocol_sets,
    rank_query,
)

# gallery:        g0     g1     g2     g3      g4     g5
G_PIDS = np.array([1,     2,     1,     -1,     1,     0])
G_CAMS = np.array([1,     2,     2,     3,      3,     2])
#                 same-cam other  match  junk   match  distractor


def test_one_query_worked_by_hand():
    # ranking by similarity: g0 (ignored: same person, same camera), g3 (ignored: junk), g1 (miss),
    # g2 (match at kept position 2), g5 (distractor: a miss), g4 (match at kept position 4)
    sim = [0.9, 0.7, 0.6, 0.8, 0.4, 0.5]
    r = rank_query(sim, 1, 1, G_PIDS, G_CAMS)
    assert r is not None
    assert r.first_match == 1          # 0-based: the second kept image
    assert r.matches == 2
    assert r.average_precision == pytest.approx((1 / 2 + 2 / 4) / 2)
    s = evaluate([sim], [1], [1], G_PIDS, G_CAMS)
    assert s.ranks == {1: 0.0, 5: 1.0, 10: 1.0}
    assert s.mAP == pytest.approx(0.5)
    assert (s.queries, s.skipped, s.gallery) == (1, 0, 6)
    assert s.cmc[:3] == (0.0, 1.0, 1.0)


def test_same_camera_images_never_count_even_when_first():
    # the only other-camera image of person 1 is last: Rank-1 is 0 although person 1 tops the list
    g_pids, g_cams = np.array([1, 1, 2, 1]), np.array([4, 4, 1, 2])
    s = evaluate([[0.9, 0.8, 0.7, 0.1]], [1], [4], g_pids, g_cams)
    assert s.ranks[1] == 0.0 and s.ranks[5] == 1.0
    assert s.mAP == pytest.approx(1 / 2)


def test_several_queries_average_and_skips():
    g_pids, g_cams = np.array([1, 2, 3, 1, 2]), np.array([2, 2, 2, 3, 1])
    sims = [
        [0.9, 0.1, 0.4, 0.3, 0.0],    # person 1 cam 1: g0 (match), g2 (miss), g3 (match): AP (1 + 2/3)/2
        [0.9, 0.8, 0.1, 0.2, 0.3],    # person 2 cam 2: g1 is the same camera (ignored)
        [0.5, 0.5, 0.5, 0.5, 0.5],    # person 9: nowhere in the gallery -> skipped
        [0.1, 0.2, 0.3, 0.4, 0.5],    # person -1 (junk query) -> skipped
    ]
    s = evaluate(sims, [1, 2, 9, -1], [1, 2, 1, 1], g_pids, g_cams)
    assert (s.queries, s.skipped) == (2, 2)
    # query 2 kept ranking: g0 (0.9, miss), g4 (0.3, match), g3 (0.2), g2 (0.1): first match at 2nd
    assert s.ranks == {1: 0.5, 5: 1.0, 10: 1.0}
    ap1 = (1 / 1 + 2 / 3) / 2
    ap2 = 1 / 2
    assert s.mAP == pytest.approx((ap1 + ap2) / 2)


def test_distractor_is_a_miss_and_never_a_query():
    g_pids, g_cams = np.array([0, 5]), np.array([1, 2])
    s = evaluate([[0.9, 0.1], [0.1, 0.9]], [5, 0], [1, 1], g_pids, g_cams)
    assert (s.queries, s.skipped) == (1, 1)
    assert s.ranks[1] == 0.0 and s.mAP == pytest.approx(0.5)


def test_ties_break_by_gallery_order():
    g_pids, g_cams = np.array([2, 1, 1]), np.array([2, 2, 3])
    s = evaluate([[0.5, 0.5, 0.5]], [1], [1], g_pids, g_cams)
    assert s.ranks[1] == 0.0                     # g0 (a miss) comes first among equals
    assert s.mAP == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_nothing_counted_gives_none_not_a_crash():
    s = evaluate([[0.3, 0.2]], [7], [1], np.array([1, 2]), np.array([1, 2]))
    assert s.queries == 0 and s.mAP is None and s.ranks[1] is None
    assert s.to_dict()["rank1"] is None


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError):
        evaluate([[0.1]], [1], [1], np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError):
        evaluate([[0.1, 0.2]], [1, 2], [1, 1], np.array([1, 2]), np.array([1, 2]))


def _torchreid_style(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The loop of torchreid's eval_market1501, restated: the reference the module must agree with."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap = [], []
    for q in range(num_q):
        order = indices[q]
        remove = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        raw = matches[q][~remove]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        cmc[cmc > 1] = 1
        cmc = np.pad(cmc, (0, max(0, max_rank - len(cmc))), mode="edge")  # a short kept list saturates
        all_cmc.append(cmc[:max_rank])
        tmp = np.array([x / (i + 1.0) for i, x in enumerate(raw.cumsum())]) * raw
        all_ap.append(tmp.sum() / raw.sum())
    return np.asarray(all_cmc, dtype=np.float64).sum(0) / len(all_cmc), float(np.mean(all_ap))


def test_agrees_with_torchreid_on_random_rankings():
    rng = np.random.default_rng(7)
    for trial in range(20):
        n_q, n_g = 15, 60
        g_pids = rng.integers(1, 12, n_g)
        g_cams = rng.integers(1, 7, n_g)
        q_pids = rng.integers(1, 12, n_q)
        q_cams = rng.integers(1, 7, n_q)
        sim = rng.random((n_q, n_g))                      # continuous: no ties
        ours = evaluate(sim, q_pids, q_cams, g_pids, g_cams)
        cmc, m_ap = _torchreid_style(-sim, q_pids, g_pids, q_cams, g_cams, max_rank=10)
        assert ours.mAP == pytest.approx(m_ap), trial
        for k in (1, 5, 10):
            assert ours.ranks[k] == pytest.approx(cmc[k - 1]), (trial, k)


def test_junk_gallery_images_are_dropped_as_torchreid_drops_them():
    rng = np.random.default_rng(3)
    g_pids = np.array([1, -1, 2, 1, -1, 3, 2, 1])
    g_cams = np.array([2, 1, 1, 3, 2, 2, 3, 1])
    q_pids, q_cams = np.array([1, 2, 3]), np.array([1, 2, 1])
    sim = rng.random((3, 8))
    ours = evaluate(sim, q_pids, q_cams, g_pids, g_cams)
    kept = g_pids != -1
    cmc, m_ap = _torchreid_style(-sim[:, kept], q_pids, g_pids[kept], q_cams, g_cams[kept], max_rank=10)
    assert ours.mAP == pytest.approx(m_ap)
    assert ours.ranks[1] == pytest.approx(cmc[0])


def test_protocol_sets_use_the_split_when_there_is_one():
    ims = [ProtocolImage("q/0001_c1.jpg", 1, 1, "query"), ProtocolImage("g/0001_c2.jpg", 1, 2, "gallery"),
           ProtocolImage("t/0002_c1.jpg", 2, 1, "train"), ProtocolImage("g/x.jpg", None, None, "gallery")]
    q, g, rule = protocol_sets(ims)
    assert [i.image_id for i in q] == ["q/0001_c1.jpg"]
    assert [i.image_id for i in g] == ["g/0001_c2.jpg"]
    assert rule == SPLIT_RULE


def test_protocol_sets_fallback_one_query_per_person_camera():
    ims = [ProtocolImage("b.jpg", 1, 1), ProtocolImage("a.jpg", 1, 1), ProtocolImage("c.jpg", 1, 2),
           ProtocolImage("d.jpg", -1, 1), ProtocolImage("e.jpg", 0, 2), ProtocolImage("f.jpg", 2, 1)]
    q, g, rule = protocol_sets(ims)
    assert [i.image_id for i in q] == ["a.jpg", "c.jpg", "f.jpg"]
    assert [i.image_id for i in g] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    assert rule == FALLBACK_RULE
    # a query scores against the gallery without finding itself: same person, same camera is ignored
    idx = {i.image_id: n for n, i in enumerate(g)}
    sim = np.zeros(len(g))
    sim[idx["a.jpg"]] = 1.0
    sim[idx["c.jpg"]] = 0.5
    r = rank_query(sim, 1, 1, np.array([i.pid for i in g]), np.array([i.camid for i in g]))
    assert r is not None and r.first_match == 0
