"""Retries and faults, against the loopback server's fault injection (real SDK, real HTTP)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_big_market, prepare_index, rows
from pipeline.ledger.costs import is_failure
from pipeline.testing.loopback import expected_caption


@pytest.fixture
def big(cli, tmp_path):
    root = make_big_market(tmp_path / "data", n_ids=50, per_id=3)  # 350 images
    index = prepare_index(cli, root, tmp_path / "index.json")
    return root, index


def run(cli, server, index: Path, out: Path, prompt: Path, *extra: object):
    return cli("run", "--index", index, "--out", out, "--prompt-file", prompt, "--base-url", server.base_url,
               "--no-dashboard", *extra)


def outcome(index: Path, out: Path) -> tuple[dict[str, dict], dict[str, dict], int]:
    """(captions by id, errors by id, images in the index); asserts nobody is in two places or twice.

    errors.csv is append-only and also holds the bills of answers that were retried (`*_retried`): the
    errors that count are the failure rows of images not captioned since.
    """
    images = json.loads(index.read_text(encoding="utf-8"))["images"]
    root = Path(json.loads(index.read_text(encoding="utf-8"))["root"])
    caps = rows(out / "captions_all.csv")
    captioned = {r["image_id"] for r in caps}
    errs = [r for r in rows(out / "errors.csv") if is_failure(r["reason"]) and r["image_id"] not in captioned]
    cap_ids = Counter(r["image_id"] for r in caps)
    err_ids = Counter(r["image_id"] for r in errs)
    assert max(cap_ids.values(), default=1) == 1 and max(err_ids.values(), default=1) == 1
    assert not set(cap_ids) & set(err_ids)
    assert set(cap_ids) | set(err_ids) == {im["image_id"] for im in images}
    for r in caps:
        assert r["caption"] == expected_caption((root / r["image_id"]).read_bytes())
    return {r["image_id"]: r for r in caps}, {r["image_id"]: r for r in errs}, len(images)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_fault_mix_every_image_accounted_for_and_retries_counted(cli, server, api_env, big, prompt_file, tmp_path):
    root, index = big
    server.configure(latency=0.01, seed=7, p_5xx=0.05, p_drop=0.02, p_hang=0.01, hang_s=30, p_refusal=0.03,
                     p_429=0.01, fault_retry_after_s=0.1, storms=[(60, 0.3), (200, 0.2)])
    out = tmp_path / "out"
    res = run(cli, server, index, out, prompt_file, "--concurrency", 16, "--timeout", 1, "--batch-size", 50)
    caps, errs, n = outcome(index, out)
    assert res.code == (1 if errs else 0), res.err  # 1: the run finished, some items failed
    assert len(caps) + len(errs) == n
    assert len(caps) >= n - 3  # with 6 attempts, almost everything gets through
    for r in errs.values():
        assert r["reason"] in ("refused", "server_error", "connection_error", "timeout", "rate_limited")
        assert int(r["attempts"]) >= 1
    m = manifest(out)
    # every extra request the server saw is a retry the pipeline counted, and nothing else
    # every extra request is a retry or a hedge (a second request for a straggler near the end, run.tail)
    assert m["counts"]["retries"] + m["counts"]["hedges"] == server.stats.extra_requests
    assert m["counts"]["requests"] == server.stats.requests
    assert server.stats.outcomes["hang"] >= 1 and server.stats.outcomes["drop"] >= 1
    assert server.stats.outcomes["refusal"] >= 1 and server.stats.outcomes["5xx"] >= 1
    # refusals never become captions
    assert not any("sorry" in r["caption"].lower() for r in caps.values())


def test_429_storm_pauses_the_whole_pool(cli, server, api_env, big, prompt_file, tmp_path):
    root, index = big
    concurrency = 16
    server.configure(latency=0.02, storms=[(40, 0.6)])
    out = tmp_path / "out"
    res = run(cli, server, index, out, prompt_file, "--concurrency", concurrency)
    assert res.code == 0, res.err
    caps, errs, n = outcome(index, out)
    assert len(caps) == n
    storm_429s = server.stats.rate_limited["storm"]
    # Only requests already on their way when the first 429 arrived meet the storm; the pool waits out
    # retry-after instead of each worker knocking again after its own backoff.
    assert 1 <= storm_429s <= concurrency + 2, storm_429s
    t429 = server.stats.timestamps_429
    assert max(t429) - min(t429) < 0.3  # all the 429s come in the first moment of the storm
    assert manifest(out)["counts"]["rate_limited"] == storm_429s


def test_refusals_get_one_more_try_then_errors_csv(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(p_refusal=1.0)
    out = tmp_path / "out"
    res = run(cli, server, index, out, prompt_file)
    assert res.code == 1, res.err  # finished, every item failed
    caps, errs, n = outcome(index, out)
    assert caps == {} and len(errs) == n
    assert {r["reason"] for r in errs.values()} == {"refused"}
    assert {r["attempts"] for r in errs.values()} == {"2"}
    assert server.stats.requests == 2 * n
    # cost of refused answers is still counted (they were paid for)
    assert manifest(out)["cost_usd_this_run"] > 0
    # a rerun tries them again; now the server answers
    server.configure(p_refusal=0.0)
    res = run(cli, server, index, out, prompt_file)
    caps, errs, n = outcome(index, out)
    assert len(caps) == n and errs == {}


@pytest.mark.parametrize("fault,reason", [("p_apology", "refused"), ("p_content_filter", "refused"),
                                          ("p_empty", "empty")])
def test_apology_filter_and_empty_answers_are_not_captions(cli, server, api_env, market, prompt_file, tmp_path,
                                                           fault, reason):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(**{fault: 1.0})
    out = tmp_path / "out"
    assert run(cli, server, index, out, prompt_file).code == 1
    caps, errs, n = outcome(index, out)
    assert caps == {} and {r["reason"] for r in errs.values()} == {reason}


def test_hung_call_is_abandoned_and_retried(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(p_hang=0.3, hang_s=60, seed=3)
    out = tmp_path / "out"
    res = run(cli, server, index, out, prompt_file, "--timeout", 0.5, "--concurrency", 4)
    assert res.code == 0, res.err
    caps, errs, n = outcome(index, out)
    assert len(caps) == n
    assert server.stats.outcomes["hang"] >= 1
    counts = manifest(out)["counts"]
    assert counts["retries"] + counts["hedges"] == server.stats.extra_requests


def test_server_errors_exhaust_attempts_into_errors_csv(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(fail_first_attempts=10)
    out = tmp_path / "out"
    res = run(cli, server, index, out, prompt_file, "--max-attempts", 2)
    assert res.code == 1, res.err
    caps, errs, n = outcome(index, out)
    assert caps == {} and {r["reason"] for r in errs.values()} == {"server_error"}
    assert {r["attempts"] for r in errs.values()} == {"2"}
    assert "HTTP 500" in next(iter(errs.values()))["detail"]


def test_quota_exhausted_stops_the_run(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(quota_exhausted=True)
    res = run(cli, server, index, tmp_path / "out", prompt_file)
    assert res.code == 3
    assert "quota" in res.err and len([ln for ln in res.err.splitlines() if ln.strip()]) == 1
    assert server.stats.requests <= 16  # stopped at the first answers, not retried


@pytest.mark.parametrize("honour_n", [True, False])
def test_several_captions_per_image_with_and_without_n(cli, server, api_env, market, prompt_file, tmp_path,
                                                       honour_n):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(honour_n=honour_n)
    out = tmp_path / "out"
    res = run(cli, server, index, out, prompt_file, "--captions-per-image", 3)
    assert res.code == 0, res.err
    images = json.loads(index.read_text(encoding="utf-8"))["images"]
    n = len(images)
    table = rows(out / "captions_all.csv")
    assert len(table) == 3 * n
    keys = Counter((r["image_id"], r["caption_index"]) for r in table)
    assert set(keys.values()) == {1} and {k[1] for k in keys} == {"0", "1", "2"}
    if honour_n:
        assert server.stats.requests == n  # the image's input tokens paid once
        root = Path(json.loads(index.read_text(encoding="utf-8"))["root"])
        for r in table:
            assert r["caption"] == expected_caption((root / r["image_id"]).read_bytes(), int(r["caption_index"]))
    else:
        assert server.stats.requests <= 3 * n + 16
    # rerun sends nothing
    sent = server.stats.requests
    assert run(cli, server, index, out, prompt_file, "--captions-per-image", 3).code == 0
    assert server.stats.requests == sent


def test_a_refusal_after_a_server_error_still_gets_its_one_more_try(cli, server, api_env, market, prompt_file,
                                                                     tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(fail_first_attempts=1, p_refusal=1.0)  # 500, then refusals
    out = tmp_path / "out"
    assert run(cli, server, index, out, prompt_file).code == 1
    caps, errs, n = outcome(index, out)
    assert caps == {} and {r["reason"] for r in errs.values()} == {"refused"}
    assert {r["attempts"] for r in errs.values()} == {"3"}  # 500, refusal, one more try
    assert server.stats.requests == 3 * n
