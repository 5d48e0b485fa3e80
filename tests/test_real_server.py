"""End to end against a real OpenAI-compatible server nobody on this project wrote.

By default the fixture starts `transformers serve` on 127.0.0.1 with a tiny vision-language model built
offline from a config (random weights, fixed seed: `pipeline.testing.realserver`); its answers are
gibberish words, so these tests check the mechanics (rows, files, exit codes, requests), never the words.
It needs the `realserver` extra (`pip install -e ".[test,realserver]"`); without it the module is
skipped, except in CI (`CI` set), where a missing extra is an error so a broken install is noticed.

Against your own server instead (vLLM, Ollama, LM Studio, llama-server): set
`REID_PROMPT_REAL_SERVER_URL` (e.g. `http://127.0.0.1:11434/v1`) and `REID_PROMPT_REAL_SERVER_MODEL`
(e.g. `qwen2.5vl:7b`), optionally `REID_PROMPT_REAL_SERVER_PROVIDER` (`vllm` by default: priced 0, no
key; `ollama`, `lmstudio`) and `REID_PROMPT_REAL_SERVER_KEY`, and run
`python -m pytest tests/test_real_server.py`. The checks that need the server's own log (requests
counted at the server) are then left out; everything else is the same.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from conftest import KEY, prepare_index, rows, spawn, wait_for_rows
from pipeline.testing import synth

URL_ENV, MODEL_ENV = "REID_PROMPT_REAL_SERVER_URL", "REID_PROMPT_REAL_SERVER_MODEL"
KEY_ENV, PROVIDER_ENV = "REID_PROMPT_REAL_SERVER_KEY", "REID_PROMPT_REAL_SERVER_PROVIDER"
EXTERNAL = bool(os.environ.get(URL_ENV))
NEEDED = ("torch", "transformers", "fastapi", "uvicorn", "PIL")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


MISSING = [m for m in NEEDED if not _installed(m)]

if EXTERNAL and not os.environ.get(MODEL_ENV):
    pytest.fail(f"{URL_ENV} is set but {MODEL_ENV} is not: name the model as your server names it",
                pytrace=False)
if not EXTERNAL and MISSING:
    if os.environ.get("CI"):
        pytest.fail(f"the realserver extra is not installed in CI (missing: {', '.join(MISSING)}): "
                    f'pip install -e ".[test,realserver]"', pytrace=False)
    pytest.skip(f'needs the realserver extra (pip install -e ".[test,realserver]"; missing: {", ".join(MISSING)})',
                allow_module_level=True)

# Small answers, one at a time (transformers serve handles one request at a time anyway), generous timeout.
COMMON = ("--no-dashboard", "--concurrency", 1, "--max-tokens", 8, "--timeout", 120)


class Target:
    """The server under test: where it is, its model name, and (ours only) requests counted at the server."""

    def __init__(self, base_url: str, model: str, key: str, provider: str = "vllm", server=None):
        self.base_url, self.model, self.key, self.server = base_url, model, key, server
        self.provider = provider

    def requests_seen(self) -> int | None:
        return self.server.requests_seen() if self.server is not None else None

    def args(self, model: str | None = None) -> tuple[object, ...]:
        """As a local server's user runs it: `--provider vllm` (priced 0, no key) and its URL."""
        return ("--provider", self.provider, "--base-url", self.base_url, "--model", model or self.model)


@pytest.fixture(scope="session")
def real_server(tmp_path_factory):
    """One server for the whole session: ours (`transformers serve`, built once) or yours (env vars)."""
    if EXTERNAL:
        yield Target(os.environ[URL_ENV], os.environ[MODEL_ENV], os.environ.get(KEY_ENV) or KEY,
                     os.environ.get(PROVIDER_ENV) or "vllm")
        return
    from pipeline.testing.realserver import RealServer

    server = RealServer.start(tmp_path_factory.mktemp("realserver") / "tiny-vlm")
    try:
        yield Target(server.base_url, server.model, KEY, server=server)
    finally:
        server.stop()
        assert server.proc.poll() is not None  # no stray server


@pytest.fixture
def real_env(monkeypatch, real_server):
    monkeypatch.setenv("OPENAI_API_KEY", real_server.key)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("REID_PROMPT_PRICING", raising=False)
    return real_server


@pytest.fixture
def small_index(cli, tmp_path):
    """8 crops: 2 train, 2 query, 2 gallery ids, one junk, one distractor."""
    root = tmp_path / "Market-1501"
    synth.make_market_tree(root, n_ids=2, per_split=1)
    return prepare_index(cli, root, tmp_path / "index.json")


def index_ids(index: Path) -> list[str]:
    return [im["image_id"] for im in json.loads(index.read_text(encoding="utf-8"))["images"]]


def error_rows(out: Path) -> list[dict[str, str]]:
    path = out / "errors.csv"
    return rows(path) if path.exists() else []


def assert_plain_csv(path: Path) -> None:
    """Real CSV that the users' `csv.DictReader(open(p, encoding="utf-8"))` reads, image_id first."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames and reader.fieldnames[0] == "image_id"
        list(reader)


def test_captions_then_resume_sends_nothing(cli, real_env, small_index, tmp_path):
    out = tmp_path / "out"
    res = cli("run", "--index", small_index, "--out", out, "--prompt-file", "base", *real_env.args(), *COMMON)
    assert res.code in (0, 1), res.err
    assert "Traceback" not in res.err and "internal error" not in res.err
    ids = index_ids(small_index)
    captions = rows(out / "captions_all.csv")
    empty = {r["image_id"] for r in error_rows(out) if r["reason"] == "empty"}
    assert {r["image_id"] for r in captions} | empty == set(ids)  # every image answered, one way or the other
    for r in captions:
        assert any(ch.isalnum() for ch in r["caption"]), r  # never stored without letters or digits
        assert r["model"] == real_env.model and int(r["prompt_tokens"]) > 0  # usage was read
    assert_plain_csv(out / "captions_all.csv")
    assert (out / "manifest.json").exists()

    before = real_env.requests_seen()
    again = cli("run", "--index", small_index, "--out", out, "--prompt-file", "base", *real_env.args(), *COMMON)
    assert again.code == 0, again.err
    assert "captioned 0" in again.out  # summary line: nothing new
    if before is not None:
        assert real_env.requests_seen() == before  # a finished run rerun sends zero requests
    assert len(rows(out / "captions_all.csv")) == len(captions)


def test_two_captions_per_image_on_a_server_that_ignores_n(cli, real_env, small_index, tmp_path):
    out = tmp_path / "out"
    before = real_env.requests_seen()
    res = cli("run", "--index", small_index, "--out", out, "--prompt-file", "base", "--captions-per-image", 2,
              "--temperature", 0.7, *real_env.args(), *COMMON)
    assert res.code in (0, 1), res.err
    ids = index_ids(small_index)
    got: dict[tuple[str, str], str] = {}
    for r in rows(out / "captions_all.csv"):
        assert (r["image_id"], r["caption_index"]) not in got  # no caption twice
        got[(r["image_id"], r["caption_index"])] = r["caption"]
    for r in error_rows(out):
        if r["reason"] == "empty":
            got.setdefault((r["image_id"], r["caption_index"]), "")
    assert set(got) == {(i, str(k)) for i in ids for k in (0, 1)}  # two per image
    if before is not None:  # transformers serve ignores n: about one request per caption, never many more
        sent = real_env.requests_seen() - before
        assert len(ids) < sent <= 2 * len(ids) + 2, sent


def test_attributes_on_a_server_that_ignores_response_format(cli, real_env, small_index, tmp_path):
    out = tmp_path / "out"
    res = cli("run", "--index", small_index, "--out", out, "--prompt-file", "attributes", *real_env.args(),
              *COMMON)
    assert res.code in (0, 1), res.err
    assert "Traceback" not in res.err and "internal error" not in res.err
    ids = set(index_ids(small_index))
    valid = {r["image_id"] for r in rows(out / "attributes.csv")} if (out / "attributes.csv").exists() else set()
    invalid = {r["image_id"] for r in error_rows(out) if r["reason"] in ("invalid", "empty")}
    assert valid | invalid == ids  # each image: a row of attributes.csv or a billed `invalid` in errors.csv
    assert not (out / "captions_all.csv").exists() or not rows(out / "captions_all.csv")


@pytest.mark.skipif(sys.platform == "win32", reason="send_signal(SIGINT) to a child is POSIX-only here")
def test_ctrl_c_keeps_what_was_written_and_rerun_finishes(cli, real_env, tmp_path):
    root = tmp_path / "Market-1501"
    synth.make_market_tree(root, n_ids=12, per_split=2, with_junk=False)
    index = prepare_index(cli, root, tmp_path / "index.json")
    n = len(index_ids(index))
    out = tmp_path / "out"
    args = ("run", "--index", index, "--out", out, "--prompt-file", "base", *real_env.args(),
            "--no-dashboard", "--concurrency", 1, "--max-tokens", 32, "--timeout", 120)
    proc = spawn(*args, key=real_env.key)
    all_csv = out / "captions_all.csv"
    try:
        wait_for_rows(all_csv, 2, timeout=120)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "stopped: Ctrl-C" in stdout and "Traceback" not in stderr
    kept = {(r["image_id"], r["caption"]) for r in rows(all_csv)}
    assert 2 <= len(kept) < n
    res = cli(*args)
    assert res.code in (0, 1), res.err
    after = rows(all_csv)
    assert kept <= {(r["image_id"], r["caption"]) for r in after}  # the rows written before Ctrl-C are kept
    empty = {r["image_id"] for r in error_rows(out) if r["reason"] == "empty"}
    assert {r["image_id"] for r in after} | empty == set(index_ids(index))


def test_wrong_model_stops_with_the_servers_words(cli, real_env, small_index, tmp_path):
    out = tmp_path / "out"
    res = cli("run", "--index", small_index, "--out", out, "--prompt-file", "base",
              *real_env.args(model="no-such-model-xyz"), *COMMON)
    assert res.code == 3, (res.out, res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1, res.err
    assert "no-such-model-xyz" in lines[0] and "Error code: 400" not in lines[0]
    if real_env.server is not None:
        assert "pinned" in lines[0]  # transformers serve's own words, from its `detail`
    assert not (out / "captions_all.csv").exists() or not rows(out / "captions_all.csv")


def test_probe_json_describes_the_server(cli, real_env):
    res = cli("probe", *real_env.args(), "--json", "--timeout", 60)
    assert res.code == 0, res.err
    found = json.loads(res.out)
    assert found["n"] in {"honoured", "ignored", "rejected"}
    assert "json_schema" in found
    assert isinstance(found["rate_limit_headers"], bool)
    assert isinstance(found["recommended_concurrency"], int) and found["recommended_concurrency"] >= 1
    if real_env.server is not None:  # what transformers serve is known to do
        assert found["n"] == "ignored"
        assert found["rate_limit_headers"] is False
