""".env, --limit, --sample/--seed, --config run.toml, run --print-config, no abbreviations, the command name
in usage lines, the default batch size and the default prompt: through the CLI against the loopback server,
and the pure parts (sampling, command name, config values) without any I/O."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import KEY, prepare_index, rows, subprocess_env
from pipeline.records import IndexEntry
from pipeline.run.sample import sample_entries, select_entries
from pipeline.config import SubsetConfig
from pipeline.settings import command_name, hide_secrets_in_url


# --- pure: sampling ----------------------------------------------------------------------------------

def grid(persons: int, cameras: int, per_camera: int = 2) -> list[IndexEntry]:
    """Every person seen by every camera, `per_camera` images each, in index order."""
    out = []
    for p in range(1, persons + 1):
        for c in range(1, cameras + 1):
            for k in range(per_camera):
                out.append(IndexEntry(f"{p:04d}_c{c}s1_{k:06d}_01.jpg", Path("x"), pid=p, camid=c))
    return [IndexEntry(e.image_id, e.path, e.pid, e.camid, position=i) for i, e in enumerate(out)]


def take_order(entries: list[IndexEntry], n: int, seed: int) -> list[IndexEntry]:
    """The order images join the sample (the choice for k is a prefix of the choice for k + 1)."""
    order: list[IndexEntry] = []
    for k in range(1, n + 1):
        new = set(e.image_id for e in sample_entries(entries, k, seed)) - {e.image_id for e in order}
        assert len(new) == 1, k
        order.append(next(e for e in entries if e.image_id in new))
    return order


def test_sample_covers_every_person_and_camera_before_any_repeats() -> None:
    entries = grid(persons=7, cameras=6, per_camera=3)
    order = take_order(entries, 7 * 6 + 5, seed=3)
    # every person once before any person twice, in every round
    for start in range(0, 7 * 6, 7):
        assert len({e.pid for e in order[start:start + 7]}) == 7
    # each person's cameras: all of them once before any twice
    for pid in range(1, 8):
        cams = [e.camid for e in order if e.pid == pid]
        assert len(set(cams[:6])) == 6 and Counter(cams).most_common(1)[0][1] <= 2
    # and across the sample: the 6 cameras all seen before any camera a second time
    assert len({e.camid for e in order[:6]}) == 6
    assert len({e.image_id for e in order}) == len(order)


def test_sample_is_deterministic_by_seed_in_index_order_and_a_prefix() -> None:
    entries = grid(persons=20, cameras=4)
    a = sample_entries(entries, 10, seed=1)
    assert a == sample_entries(list(entries), 10, seed=1)  # same seed, same images
    assert [e.position for e in a] == sorted(e.position for e in a)  # returned in index order
    assert len({e.pid for e in a}) == 10  # 10 of 20 persons, none twice
    assert {e.image_id for e in sample_entries(entries, 10, seed=2)} != {e.image_id for e in a}
    assert {e.image_id for e in a} <= {e.image_id for e in sample_entries(entries, 25, seed=1)}
    assert len(sample_entries(entries, 10_000, seed=1)) == len(entries)
    assert sample_entries(entries, 0, seed=1) == []


def test_sample_groups_without_ids_and_keeps_junk_last() -> None:
    loose = [IndexEntry(f"img{i}.jpg", Path("x"), position=i) for i in range(5)]  # no pid, no camera
    assert len(sample_entries(loose, 5, seed=0)) == 5  # each its own person: all five, none refused
    junk = [IndexEntry("-1_c1s1_000001_01.jpg", Path("x"), pid=-1, camid=1, position=5, junk=True),
            IndexEntry("0000_c2s1_000001_01.jpg", Path("x"), pid=0, camid=2, position=6, junk=True)]
    same_person = [IndexEntry(f"0009_c1s1_{i:06d}_01.jpg", Path("x"), pid=9, camid=1, position=7 + i)
                   for i in range(3)]
    entries = loose + junk + same_person
    chosen = sample_entries(entries, 6, seed=0)
    assert not any(e.junk for e in chosen)  # 5 loose images + person 9 come before any junk crop
    assert len([e for e in chosen if e.pid == 9]) == 1
    assert any(e.junk for e in sample_entries(entries, 9, seed=0))


def test_select_entries_limit_and_everything() -> None:
    entries = grid(persons=3, cameras=2)
    assert select_entries(entries, SubsetConfig()) == entries
    assert select_entries(entries, SubsetConfig(limit=4)) == entries[:4]
    assert len(select_entries(entries, SubsetConfig(sample=3, seed=9))) == 3


# --- pure: the command that was typed, secrets in URLs -------------------------------------------------

@pytest.mark.parametrize("argv0, expected", [
    ("/home/u/.venv/bin/reid-prompt", "reid-prompt"),
    ("reid-prompt", "reid-prompt"),
    (r"C:\Users\u\venv\Scripts\reid-prompt.exe", "reid-prompt"),
    (r"C:\Users\u\venv\Scripts\REID-PROMPT.EXE", "reid-prompt"),
    (r"C:\Python\Scripts\reid-prompt-script.py", "reid-prompt"),
    ("/repo/pipeline/__main__.py", "python -m pipeline"),
    (r"C:\repo\pipeline\__main__.py", "python -m pipeline"),
    ("", "python -m pipeline"),
    ("/usr/bin/pytest", "python -m pipeline"),
])
def test_command_name(argv0: str, expected: str) -> None:
    assert command_name(argv0) == expected


def test_urls_are_shown_without_credentials() -> None:
    assert hide_secrets_in_url("https://user:sk-x@example.invalid/v1?key=sk-y") == "https://***@example.invalid/v1?***"
    assert hide_secrets_in_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


# --- the command line ----------------------------------------------------------------------------------

def base_args(index: Path, out: Path, prompt: Path, server, *extra: object) -> list[object]:
    return ["run", "--index", index, "--out", out, "--prompt-file", prompt, "--base-url", server.base_url,
            "--no-dashboard", *extra]


def index_ids(index: Path) -> list[str]:
    return [img["image_id"] for img in json.loads(index.read_text(encoding="utf-8"))["images"]]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


# (`--mode` is a flag of its own since the Batch API: online | batch)
@pytest.mark.parametrize("typo", [["--mod", "gpt-4o"], ["--mo", "x"], ["--prompt", "p.txt"], ["--conc", "4"]])
def test_abbreviations_are_errors(cli, api_env, tmp_path, typo) -> None:
    res = cli("run", "--index", tmp_path / "i.json", "--out", tmp_path / "o", *typo)
    assert res.code == 2
    assert "unrecognized arguments" in res.err and typo[0] in res.err
    assert res.err.count("\n") == 1 and "python -m pipeline run --help" in res.err


def test_limit_then_more_then_all_resumes(cli, server, api_env, market, prompt_file, tmp_path) -> None:
    index = prepare_index(cli, market, tmp_path / "index.json")
    ids = index_ids(index)
    out = tmp_path / "out"
    res = cli(*base_args(index, out, prompt_file, server, "--limit", 3))
    assert res.code == 0, res.err
    assert f"subset --limit 3: the first 3 of {len(ids)} images in index order" in res.err
    assert "subset --limit 3 (exit 0" in res.out
    assert sorted(r["image_id"] for r in rows(out / "captions_all.csv")) == sorted(ids[:3])
    assert server.stats.requests == 3
    m = manifest(out)
    assert m["subset"] == {"limit": 3, "sample": None, "seed": None, "images": 3, "index_images": len(ids)}

    assert cli(*base_args(index, out, prompt_file, server, "--limit", 3)).code == 0  # nothing new to do
    assert server.stats.requests == 3
    dry = cli(*base_args(index, out, prompt_file, server, "--limit", 5, "--dry-run"))
    assert dry.code == 0 and "subset --limit 5" in dry.err
    assert server.stats.requests == 3
    assert cli(*base_args(index, out, prompt_file, server, "--limit", 5)).code == 0
    assert server.stats.requests == 5  # only the two images not done yet
    res = cli(*base_args(index, out, prompt_file, server))
    assert res.code == 0 and "subset" not in res.out + res.err
    assert "skipped 5" in res.out
    assert sorted(r["image_id"] for r in rows(out / "captions_all.csv")) == sorted(ids)
    assert server.stats.requests == len(ids)


def test_sample_through_the_cli(cli, server, api_env, market, prompt_file, tmp_path) -> None:
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    res = cli(*base_args(index, out, prompt_file, server, "--sample", 8, "--seed", 5))
    assert res.code == 0, res.err
    assert "subset --sample 8 --seed 5: 8 of 22 images spread across 8 persons" in res.err
    got = {r["image_id"] for r in rows(out / "captions_all.csv")}
    assert len(got) == 8
    pids = {Path(i).name.split("_")[0] for i in got}
    assert len(pids) == 8 and not pids & {"-1", "0000"}  # 8 persons, junk and distractors last
    assert cli(*base_args(index, out, prompt_file, server, "--sample", 8, "--seed", 5)).code == 0
    assert server.stats.requests == 8  # the same 8: nothing new
    both = cli(*base_args(index, out, prompt_file, server, "--sample", 2, "--limit", 2))
    assert both.code == 2 and "not allowed with" in both.err


def test_dotenv_is_read_and_the_environment_wins(cli, server, market, prompt_file, tmp_path, monkeypatch) -> None:
    index = prepare_index(cli, market, tmp_path / "index.json")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    (work / ".env").write_text(f"# the key for the loopback server\nOPENAI_API_KEY={KEY}\n"
                               f"export OPENAI_BASE_URL='{server.base_url}'\n", encoding="utf-8")
    res = cli("run", "--index", index, "--out", tmp_path / "a", "--prompt-file", prompt_file, "--no-dashboard",
              "--limit", 2)
    assert res.code == 0, res.err
    assert server.stats.requests == 2  # key and base URL from .env
    assert KEY not in res.out + res.err

    # the environment wins over .env: a wrong key in the file is not used
    (work / ".env").write_text("\ufeffOPENAI_API_KEY=sk-wrong-from-dotenv\n", encoding="utf-8")  # Notepad's BOM
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    res = cli(*base_args(index, tmp_path / "b", prompt_file, server, "--limit", 1))
    assert res.code == 0, res.err
    show = cli(*base_args(index, tmp_path / "b", prompt_file, server, "--print-config"))
    assert show.code == 0 and "OPENAI_API_KEY: set (from the environment)" in show.out
    assert KEY not in show.out and "sk-wrong" not in show.out

    # only the current folder's .env: one in a parent folder is not read
    monkeypatch.delenv("OPENAI_API_KEY")
    (work / ".env").rename(tmp_path / ".env")
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={KEY}\n", encoding="utf-8")
    res = cli(*base_args(index, tmp_path / "c", prompt_file, server))
    assert res.code == 2 and "OPENAI_API_KEY is not set" in res.err


def test_default_batch_size_and_default_prompt(cli, server, api_env, market, tmp_path) -> None:
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, "--base-url", server.base_url, "--no-dashboard")
    assert res.code == 0, res.err
    assert "no prompt given: using the bundled prompt 'base'" in res.err
    m = manifest(out)
    assert m["batch_size"] == 20
    assert [p["name"] for p in m["prompts"]] == ["base"]
    assert {r["prompt_name"] for r in rows(out / "captions_all.csv")} == {"base"}
    assert len(list(out.glob("captions_part_*.csv"))) == math.ceil(len(index_ids(index)) / 20)


def test_default_prompt_note_waits_for_the_checks(cli, server, market, tmp_path, monkeypatch) -> None:
    index = prepare_index(cli, market, tmp_path / "index.json")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    res = cli("run", "--index", index, "--out", tmp_path / "out", "--base-url", server.base_url)
    assert res.code == 2 and res.err.startswith("error: OPENAI_API_KEY") and res.err.count("\n") == 1, res.err
    dry = cli("run", "--index", index, "--out", tmp_path / "out", "--dry-run", "--sample", 3)
    assert dry.code == 0, dry.err
    assert "note: no prompt given: using the bundled prompt 'base'" in dry.err and "subset --sample 3" in dry.err


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_with_command_line_overrides(cli, server, api_env, market, prompt_file, tmp_path) -> None:
    index = prepare_index(cli, market, tmp_path / "index.json")
    other = tmp_path / "other.txt"
    other.write_text("Describe the clothes.\n", encoding="utf-8")
    out = tmp_path / "out"
    cfg = write_toml(tmp_path / "run.toml", f"""
index = {json.dumps(str(index))}
out = {json.dumps(str(out))}
prompt-file = [{json.dumps(str(prompt_file))}]
base_url = {json.dumps(server.base_url)}
model = "gpt-4o"
concurrency = 2
max_tokens = 120
no-dashboard = true
limit = 4
""")
    res = cli("run", "--config", cfg, "--concurrency", 3, "--prompt-file", other, "--sample", 2)
    assert res.code == 0, res.err
    m = manifest(out)
    assert m["model"] == "gpt-4o" and m["max_tokens"] == 120  # from the file
    assert m["concurrency"] == 3  # the command line wins
    assert [p["name"] for p in m["prompts"]] == ["other"]  # replaced, not appended to
    assert m["subset"]["sample"] == 2 and m["subset"]["limit"] is None  # --sample drops the file's limit
    assert server.stats.requests == 2

    show = cli("run", "--config", cfg, "--print-config", "--concurrency", 3)
    assert show.code == 0, show.err
    lines = {ln.split()[0]: ln for ln in show.out.splitlines()[1:] if ln.strip()}
    assert "gpt-4o" in lines["--model"] and f"(config file {cfg})" in lines["--model"]
    assert "3" in lines["--concurrency"] and "(command line)" in lines["--concurrency"]
    assert "20" in lines["--batch-size"] and "(default)" in lines["--batch-size"]
    assert "(config file" in lines["--limit"]
    assert lines["OPENAI_API_KEY:"].strip() == "OPENAI_API_KEY: set (from the environment)"
    assert KEY not in show.out
    assert server.stats.requests == 2  # --print-config runs nothing


@pytest.mark.parametrize("text, words", [
    ('moddel = "gpt-4o"\n', ["unknown option 'moddel'", "did you mean 'model'"]),  # (`modle` is nearer `mode`)
    ('concurrency = "eight"\n', ["concurrency", "expected a whole number"]),
    ("concurrency = 0\n", ["concurrency", "at least 1"]),
    ('detail = "mid"\n', ["detail", "not one of low, high, auto"]),
    ("no-dashboard = 1\n", ["no-dashboard", "expected true or false"]),
    ("model = 4\n", ["model", "expected text"]),
    ("limit = 3\nsample = 4\n", ["cannot be combined"]),
    ("index = [\n", ["not valid TOML"]),
])
def test_config_file_errors_are_one_line(cli, api_env, tmp_path, text, words) -> None:
    cfg = write_toml(tmp_path / "run.toml", text)
    res = cli("run", "--config", cfg, "--index", tmp_path / "i.json", "--out", tmp_path / "o")
    assert res.code == 2
    assert res.err.startswith("error: ") and res.err.count("\n") == 1, res.err
    assert str(cfg) in res.err
    for w in words:
        assert w in res.err
    missing = cli("run", "--config", tmp_path / "nope.toml", "--index", tmp_path / "i.json", "--out", tmp_path / "o")
    assert missing.code == 2 and "nope.toml not found" in missing.err


def test_print_config_names_dotenv_and_never_the_key(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DASHSCOPE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-very-secret-value\n"
                                   "OPENAI_BASE_URL=https://u:sk-in-url@example.invalid/v1\n", encoding="utf-8")
    res = cli("run", "--index", "i.json", "--out", "o", "--print-config")
    assert res.code == 0, res.err
    assert "OPENAI_API_KEY: set (from .env)" in res.out
    assert "sk-very-secret-value" not in res.out + res.err and "sk-in-url" not in res.out
    base = next(ln for ln in res.out.splitlines() if ln.strip().startswith("--base-url"))
    assert "(.env OPENAI_BASE_URL)" in base and "https://***@example.invalid/v1" in base
    prompt = next(ln for ln in res.out.splitlines() if ln.strip().startswith("--prompt-file"))
    assert "base" in prompt and "no prompt given" in prompt
    assert not (tmp_path / "o").exists()  # nothing ran

    # a provider preset: its key variable is listed, its endpoint and default model named as the source
    preset = cli("run", "--index", "i.json", "--out", "o", "--provider", "dashscope", "--print-config")
    assert preset.code == 0, preset.err
    assert "DASHSCOPE_API_KEY: not set" in preset.out
    assert re.search(r"--base-url\s+https://dashscope\S+\s+\(--provider dashscope\)", preset.out)
    assert "(default for --provider dashscope)" in preset.out


def reid_prompt_script() -> str | None:
    near = Path(sys.executable).with_name("reid-prompt")
    return str(near) if near.exists() else shutil.which("reid-prompt")


@pytest.mark.skipif(reid_prompt_script() is None, reason="the reid-prompt console script is not installed")
def test_usage_names_the_command_typed(tmp_path) -> None:
    env = subprocess_env()
    for command, typed in (([reid_prompt_script()], "reid-prompt"), ([sys.executable, "-m", "pipeline"],
                                                                      "python -m pipeline")):
        res = subprocess.run([*command, "run", "--index", "i.json", "--out", "o", "--mod", "gpt-4o"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2
        assert res.stderr == f"error: unrecognized arguments: --mod gpt-4o (see `{typed} run --help`)\n"
        helped = subprocess.run([*command, "run", "--help"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0 and helped.stdout.startswith(f"usage: {typed} run ")
    top = subprocess.run([reid_prompt_script(), "nonsense"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 2 and "(see `reid-prompt --help`)" in top.stderr
