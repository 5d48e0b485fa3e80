"""Shared fixtures: a real OpenAI-compatible server on 127.0.0.1, synthetic datasets, a CLI runner.

Nothing is mocked: the pipeline talks HTTP through the real `openai` SDK to `LoopbackServer`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.ledger.outputs import read_table
from pipeline.testing import synth
from pipeline.testing.loopback import DEFAULT_API_KEY, LoopbackServer

KEY = DEFAULT_API_KEY
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def _environment_restored():
    """`main()` reads `.env` into os.environ (variables not already set): undo that after every test."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _bundled_prices(monkeypatch):
    """Tests price with the bundled pricing.toml, whatever REID_PROMPT_PRICING the developer's shell has."""
    monkeypatch.delenv("REID_PROMPT_PRICING", raising=False)


@pytest.fixture
def server():
    srv = LoopbackServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `python -m pipeline ...` in-process; returns exit code, stdout, stderr."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def subprocess_env(base_url: str | None = None, key: str | None = KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    if key is not None:
        env["OPENAI_API_KEY"] = key
    if base_url is not None:
        env["OPENAI_BASE_URL"] = base_url
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn(*args: object, base_url: str | None = None, key: str | None = KEY) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *[str(a) for a in args]],
        env=subprocess_env(base_url, key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )


@pytest.fixture
def market(tmp_path):
    """A small Market-1501 tree (4 train ids x 2, 4 test ids x (1 query + 2 gallery), junk + distractor)."""
    root = tmp_path / "Market-1501-v15.09.15"
    synth.make_market_tree(root, n_ids=4, per_split=2)
    return root


def make_big_market(root: Path, n_ids: int, per_id: int) -> Path:
    synth.make_market_tree(root, n_ids=n_ids, per_split={"train": per_id, "query": 1, "gallery": per_id},
                           with_junk=False)
    return root


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "base.txt"
    p.write_text('Describe the person, briefly.\n描述这个人的衣着, "简短".\n', encoding="utf-8")
    return p


def rows(path: Path) -> list[dict[str, str]]:
    return read_table(path).rows


def wait_for_rows(path: Path, n: int, timeout: float = 30.0) -> int:
    """Wait until a CSV being written by another process holds at least `n` whole rows."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(read_table(path).rows) >= n:
            break
        time.sleep(0.02)
    return len(read_table(path).rows) if path.exists() else 0


def prepare_index(cli, root: Path, out: Path, *extra: object) -> Path:
    res = cli("prepare", "--root", root, "--out", out, *extra)
    assert res.code == 0, res.err
    return out
