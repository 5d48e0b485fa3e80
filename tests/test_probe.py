"""`python -m pipeline probe`, and what `run` learns of its server on its first answers.

The decisions (an answer -> honoured / ignored / rejected; the latency table -> a concurrency) are pure
and tested as tables. The probe itself runs through the real SDK against the loopback server in the
modes real servers show: OpenAI-like (n honoured, rate-limit headers), Ollama / transformers serve
(n ignored, response_format ignored, no headers), llama-server (n rejected), a one-at-a-time backend.
"""

from __future__ import annotations

import json

import pytest

from pipeline.providers.capabilities import (
    ACCEPTED,
    ENFORCED,
    HONOURED,
    IGNORED,
    REJECTED,
    UNKNOWN,
    LEARNED_KEYS,
    LevelStats,
    classify_accepted,
    classify_json_object,
    classify_json_schema,
    classify_n,
    has_rate_limit_headers,
    level_stats,
    max_tokens_param,
    merge_learned,
    n_unsupported,
    recommend_concurrency,
    usage_present,
)
from pipeline.run.probe import MAX_REQUESTS, PROBE_SCHEMA
from pipeline.testing.realserver import free_port

from conftest import KEY, prepare_index

MODEL = "gpt-4o-mini"
PROBE_KEYS = {"images", "n", "json_schema", "json_object", "detail", "usage", "rate_limit_headers",
              "max_tokens_param", "latency", "recommended_concurrency"}


# --- pure decisions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("asked, choices, status, verdict", [
    (2, 2, 200, HONOURED),
    (3, 5, 200, HONOURED),
    (2, 1, 200, IGNORED),  # Ollama, transformers serve
    (2, 0, 200, IGNORED),
    (2, None, 400, REJECTED),  # llama-server: "Only one completion choice is allowed"
    (2, None, 422, REJECTED),
    (2, None, 500, UNKNOWN),  # a bad moment of the server proves nothing
    (2, None, 503, UNKNOWN),
    (2, None, None, UNKNOWN),  # no HTTP answer at all
])
def test_classify_n(asked, choices, status, verdict):
    assert classify_n(asked, choices, status) == verdict


def test_classify_n_needs_a_request_that_asked_for_several():
    with pytest.raises(ValueError):
        classify_n(1, 1, 200)


@pytest.mark.parametrize("status, content, verdict", [
    (200, '{"colour": "red"}', ENFORCED),
    (200, '```json\n{"colour": "blue"}\n```', ENFORCED),
    (200, '{"colour": "purple"}', IGNORED),  # JSON, but outside the enum: not enforced
    (200, '{"colour": "red", "extra": 1}', IGNORED),
    (200, '{"colour": "re', IGNORED),  # truncated
    (200, "Red.", IGNORED),  # free text: transformers serve
    (200, None, IGNORED),
    (400, None, REJECTED),
    (502, None, UNKNOWN),
    (None, None, UNKNOWN),
])
def test_classify_json_schema(status, content, verdict):
    assert classify_json_schema(status, content, PROBE_SCHEMA) == verdict


@pytest.mark.parametrize("status, content, verdict", [
    (200, '{"colour": "red"}', ENFORCED),
    (200, '{}', ENFORCED),
    (200, "[1, 2]", IGNORED),  # JSON, not an object
    (200, "A red shirt.", IGNORED),
    (400, None, REJECTED),
    (500, None, UNKNOWN),
])
def test_classify_json_object(status, content, verdict):
    assert classify_json_object(status, content) == verdict


@pytest.mark.parametrize("mt, mct, param", [
    (ACCEPTED, ACCEPTED, "both"),
    (ACCEPTED, REJECTED, "max_tokens"),
    (REJECTED, ACCEPTED, "max_completion_tokens"),  # OpenAI's reasoning models
    (ACCEPTED, UNKNOWN, "max_tokens"),
    (REJECTED, REJECTED, "neither"),
    (UNKNOWN, REJECTED, UNKNOWN),
])
def test_max_tokens_param(mt, mct, param):
    assert max_tokens_param(mt, mct) == param


def test_classify_accepted_and_headers_and_usage():
    assert [classify_accepted(s) for s in (200, 400, 415, 500, None)] == [ACCEPTED, REJECTED, REJECTED, UNKNOWN,
                                                                         UNKNOWN]
    assert has_rate_limit_headers({"X-RateLimit-Limit-Requests": "500"})
    assert not has_rate_limit_headers({"content-type": "application/json", "x-request-id": "r"})
    assert usage_present({"usage": {"prompt_tokens": 12, "completion_tokens": 3}})
    assert not usage_present({"usage": None}) and not usage_present({})


def levels(*rows: tuple[int, float, float, int]) -> list[LevelStats]:
    return [LevelStats(c, 4, e, p50, rps) for c, p50, rps, e in rows]


@pytest.mark.parametrize("table, best", [
    # parallel server (vLLM, OpenAI): latency holds, throughput doubles: the highest level
    (levels((1, 1.0, 1.0, 0), (2, 1.0, 2.0, 0), (4, 1.05, 3.8, 0), (8, 1.1, 7.2, 0)), 8),
    # one request at a time (transformers serve, Ollama with one slot): latency doubles, throughput flat
    (levels((1, 1.0, 1.0, 0), (2, 2.0, 1.0, 0), (4, 4.0, 1.0, 0), (8, 8.0, 1.0, 0)), 1),
    # four slots: the knee at 4
    (levels((1, 1.0, 1.0, 0), (2, 1.0, 2.0, 0), (4, 1.0, 4.0, 0), (8, 1.5, 4.5, 0)), 4),
    # growing equally is not "faster": keep climbing
    (levels((1, 1.0, 1.0, 0), (2, 1.4, 1.4, 0)), 2),
    # a level with failures (timeouts, 503 busy) ends the climb before it
    (levels((1, 1.0, 1.0, 0), (2, 1.0, 2.0, 0), (4, 1.0, 4.0, 1)), 2),
    (levels((1, 1.0, 1.0, 1)), 1),
    ([], 1),
    # only one level measured (time budget): that level
    (levels((1, 0.5, 2.0, 0)), 1),
])
def test_recommend_concurrency(table, best):
    assert recommend_concurrency(table) == best


def test_level_stats_summarises_a_level():
    lv = level_stats(4, [0.1, 0.3, 0.2, 0.4], errors=0, wall_s=0.5)
    assert (lv.concurrency, lv.requests, lv.errors) == (4, 4, 0)
    assert lv.p50_s == pytest.approx(0.25) and lv.throughput_rps == pytest.approx(8.0)
    empty = level_stats(2, [], errors=2, wall_s=1.0)
    assert empty.p50_s is None and empty.throughput_rps == 0 and empty.requests == 2


def test_merge_learned_keeps_earlier_findings_where_this_run_learned_nothing():
    before = {"n": "ignored", "rate_limit_headers": False, "usage": True, "stranger": 1}
    now = {"n": None, "rate_limit_headers": None, "usage": True, "json_schema": "ignored"}
    merged = merge_learned(before, now)
    assert set(merged) == set(LEARNED_KEYS)
    assert merged["n"] == "ignored" and merged["rate_limit_headers"] is False
    assert merged["json_schema"] == "ignored" and merged["structured_mode"] is None
    assert merge_learned(None, {"n": "honoured"})["n"] == "honoured"
    assert merge_learned({"n": "ignored"}, {"n": "rejected"})["n"] == "rejected"


def test_n_unsupported():
    assert n_unsupported({"n": "ignored"}) == "ignored" and n_unsupported({"n": "rejected"}) == "rejected"
    assert n_unsupported({"n": "honoured"}) is None and n_unsupported({}) is None and n_unsupported(None) is None


# --- probe against the loopback server ------------------------------------------------------------------

def probe_json(cli, server, *extra):
    res = cli("probe", "--base-url", server.base_url, "--model", MODEL, "--json", *extra)
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert PROBE_KEYS <= set(report)
    assert server.stats.requests == report["requests_sent"] <= MAX_REQUESTS
    return report


def test_probe_openai_like_server(cli, server, api_env):
    server.configure(latency=0.05, rpm=60_000)  # rate limits, so x-ratelimit-* headers
    report = probe_json(cli, server)
    assert report["images"] == {"jpeg": True, "png": True, "webp": True}
    assert report["n"] == "honoured"
    assert report["json_schema"] == "enforced" and report["json_object"] == "enforced"
    assert report["detail"] == "accepted" and report["detail_changes_tokens"] is True  # gpt-4o-mini: low/high
    assert report["usage"] is True and report["rate_limit_headers"] is True
    assert report["max_tokens_param"] == "both"
    assert set(report["latency"]) == {"1", "2", "4", "8"}
    for level in report["latency"].values():
        assert level["p50_s"] > 0 and level["throughput_rps"] > 0 and level["errors"] == 0
    assert report["recommended_concurrency"] == 8  # every request computes at once
    assert KEY not in json.dumps(report)


def test_probe_ollama_like_server(cli, server, api_env):
    """n ignored, response_format ignored, no rate-limit headers (no limits configured: none sent)."""
    server.configure(latency=0.01, honour_n=False, response_format_mode="ignore")
    report = probe_json(cli, server)
    assert report["n"] == "ignored"
    assert report["json_schema"] == "ignored" and report["json_object"] == "ignored"
    assert report["rate_limit_headers"] is False and report["usage"] is True


def test_probe_headers_switched_off(cli, server, api_env):
    server.configure(latency=0.01, rpm=60_000, send_headers=False)
    assert probe_json(cli, server)["rate_limit_headers"] is False


def test_probe_llama_server_like(cli, server, api_env):
    """n rejected with 400 in the server's words; json_schema rejected while json_object is honoured."""
    server.configure(latency=0.01, reject_n=True, response_format_mode="reject_schema")
    report = probe_json(cli, server)
    assert report["n"] == "rejected" and "Only one completion choice" in report["server_said"]["n"]
    assert report["json_schema"] == "rejected" and report["json_object"] == "enforced"


def test_probe_one_at_a_time_server_recommends_one(cli, server, api_env):
    server.configure(latency=0.04, serve_slots=1)
    report = probe_json(cli, server)
    assert report["recommended_concurrency"] == 1
    assert "8" not in report["latency"]  # the climb stops once latency grows faster than throughput
    assert any("grew faster" in note for note in report["notes"])


def test_probe_table(cli, server, api_env):
    server.configure(latency=0.01, honour_n=False)
    res = cli("probe", "--base-url", server.base_url, "--model", MODEL)
    assert res.code == 0, res.err
    out = " ".join(res.out.split())
    for words in ("base64 images", "jpeg yes", "n (several choices) ignored", "one caption per request",
                  "rate-limit headers no", "latency x1", "recommended concurrency", "requests sent"):
        assert words in out, words


def test_probe_unreachable_is_one_line_exit_3(cli, api_env):
    url = f"http://127.0.0.1:{free_port()}/v1"
    res = cli("probe", "--base-url", url, "--model", MODEL)
    assert res.code == 3
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach") and "refused" in lines[0]
    assert res.out == ""


def test_probe_bad_key_and_unknown_model_exit_3(cli, server, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-1234567890")
    res = cli("probe", "--base-url", server.base_url, "--model", MODEL)
    assert res.code == 3 and len(res.err.strip().splitlines()) == 1
    assert "rejected" in res.err and "OPENAI_API_KEY" in res.err and "sk-wrong-key-1234567890" not in res.err
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    res = cli("probe", "--base-url", server.base_url, "--model", "no-such-model")
    assert res.code == 3 and len(res.err.strip().splitlines()) == 1 and "no-such-model" in res.err
    assert server.stats.requests == 2  # stopped at the first answer each time
    server.configure(unknown_model="400_detail")  # transformers serve: 400 {"detail": "..."} naming the model
    res = cli("probe", "--base-url", server.base_url, "--model", "no-such-model")
    assert res.code == 3 and len(res.err.strip().splitlines()) == 1
    assert "no-such-model" in res.err and "is not available" in res.err
    assert server.stats.requests == 3


def test_probe_resolves_provider_like_run(cli, server, monkeypatch):
    """--provider vllm needs no key (a placeholder is sent) and wants --model; --base-url overrides its URL."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.configure(api_key=None, latency=0.0)
    res = cli("probe", "--provider", "vllm")
    assert res.code == 2 and "--model" in res.err
    res = cli("probe", "--provider", "vllm", "--base-url", server.base_url, "--model", MODEL, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["provider"] == "vllm"


# --- what run learns, and the dry-run -------------------------------------------------------------------

def run_args(server, index, out, prompt, *extra):
    return ("run", "--index", index, "--out", out, "--prompt-file", prompt, "--base-url", server.base_url,
            "--no-dashboard", "--model", MODEL, *extra)


def dry_run(cli, server, index, out, prompt, *extra):
    res = cli(*run_args(server, index, out, prompt, "--dry-run", *extra))
    assert res.code == 0, res.err
    return " ".join(res.out.split())


def requests_of(text: str) -> int:
    return int(text.split(" requests ", 1)[1].split()[0].replace(",", ""))


def test_run_learns_n_ignored_and_dry_run_counts_one_request_per_caption(cli, server, api_env, market,
                                                                          prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    images = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    out = tmp_path / "out"
    before = dry_run(cli, server, index, out, prompt_file, "--captions-per-image", 2)
    assert requests_of(before) == images  # nothing learned yet: n asks both captions in one request

    server.configure(honour_n=False)
    res = cli(*run_args(server, index, out, prompt_file, "--captions-per-image", 2, "--limit", 2))
    assert res.code == 0, res.err
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    learned = manifest["learned"]
    assert learned["n"] == "ignored" and learned["rate_limit_headers"] is False and learned["usage"] is True

    after = dry_run(cli, server, index, out, prompt_file, "--captions-per-image", 2)
    assert requests_of(after) == 2 * (images - 2)  # one request per caption still to make
    assert "one request each: the server ignored n" in after and "learned by an earlier run" in after

    # a rerun that sends nothing keeps what was learned
    res = cli(*run_args(server, index, out, prompt_file, "--captions-per-image", 2, "--limit", 2))
    assert res.code == 0, res.err
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["learned"]["n"] == "ignored"


def test_run_learns_openai_like_server(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    server.configure(rpm=60_000)
    out = tmp_path / "out"
    res = cli(*run_args(server, index, out, prompt_file, "--captions-per-image", 2, "--limit", 3))
    assert res.code == 0, res.err
    learned = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["learned"]
    assert learned["n"] == "honoured" and learned["rate_limit_headers"] is True and learned["usage"] is True


def test_saved_probe_is_read_by_the_dry_run(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    images = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    out = tmp_path / "out"
    server.configure(reject_n=True)
    res = cli("probe", "--base-url", server.base_url, "--model", MODEL, "--save", out / "probe.json")
    assert res.code == 0, res.err
    text = dry_run(cli, server, index, out, prompt_file, "--captions-per-image", 3)
    assert requests_of(text) == 3 * images and "the server rejected n" in text and "probe.json" in text
    # another model: the saved probe does not speak for it
    other = cli(*run_args(server, index, out, prompt_file, "--dry-run", "--captions-per-image", 3,
                          "--model", "gpt-4o"))
    assert requests_of(" ".join(other.out.split())) == images


def test_probe_time_budget_stops_after_the_first_answer(cli, server, api_env):
    server.configure(latency=0.05)
    res = cli("probe", "--base-url", server.base_url, "--model", MODEL, "--json", "--budget", "0.01")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["requests_sent"] == server.stats.requests == 1
    assert report["usage"] is True and report["n"] == "unknown" and report["latency"] == {}
    assert report["recommended_concurrency"] == 1
    assert any("time budget" in note for note in report["notes"])


def test_probe_asks_again_after_a_server_error(cli, server, api_env):
    """A 5xx is a bad moment, not an answer: each question is asked once more (within the 40 requests)."""
    server.configure(latency=0.01, fail_first_attempts=1)  # every (image, prompt) gets a 500 first
    report = probe_json(cli, server)
    assert report["images"] == {"jpeg": True, "png": True, "webp": True}
    assert report["n"] == "honoured" and report["json_schema"] == "enforced" and report["detail"] == "accepted"
    assert server.stats.outcomes["5xx"] >= 5
