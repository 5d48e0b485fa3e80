"""The seed's scripts: `scripts/batch_generate_captions.{sh,cmd}` and `scripts/setup_api_and_run.{sh,cmd}`.

The `.sh` scripts are run with bash in a temporary folder (the user's current folder), their questions
answered on stdin, against the loopback server. There is no Windows here, so the `.cmd` scripts are read:
the steps and variables they use, CRLF line endings, every `goto`/`call` label defined, and the same
steps in the same order as their `.sh` twins.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.testing import synth
from conftest import KEY, REPO, subprocess_env

SCRIPTS = REPO / "scripts"
BATCH_SH = SCRIPTS / "batch_generate_captions.sh"
SETUP_SH = SCRIPTS / "setup_api_and_run.sh"
BATCH_CMD = SCRIPTS / "batch_generate_captions.cmd"
SETUP_CMD = SCRIPTS / "setup_api_and_run.cmd"

ASK = "Batch size [20]: "
BASE_URL_ASK = "Base URL of an OpenAI-compatible server"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


# --- helpers ------------------------------------------------------------------------------------------

@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The user's folder: a small Market-1501 tree at ./data/market1501 and a prompt file."""
    synth.make_market_tree(tmp_path / "data" / "market1501", n_ids=2, per_split=1)
    (tmp_path / "prompt.txt").write_text("Describe the person's clothes, briefly.\n", encoding="utf-8")
    return tmp_path


def script_env(base_url: str | None, key: str | None = KEY, **extra: str) -> dict[str, str]:
    env = subprocess_env(base_url, key)
    for name in ("DATA_ROOT", "INDEX_FILE", "OUTPUT_DIR", "PROMPT_FILE", "REID_PROMPT_ARGS",
                 "DASHSCOPE_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY", "AZURE_OPENAI_API_KEY"):
        env.pop(name, None)
    env["PYTHON"] = sys.executable
    env["PROMPT_FILE"] = "prompt.txt"
    env.update(extra)
    return env


def bash(script: Path, cwd: Path, stdin: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], cwd=cwd, input=stdin, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


OUT = Path("outputs/captions/batch")
INDEX = Path("outputs/runs/index_batch.json")


# --- batch_generate_captions.sh ---------------------------------------------------------------------

@needs_bash
def test_enter_takes_batch_size_20_prepares_the_index_and_lists_the_files(server, work):
    res = bash(BATCH_SH, work, "\n", script_env(server.base_url))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(ASK) == 1
    assert "preparing the index outputs/runs/index_batch.json from ./data/market1501" in res.stdout
    assert (work / INDEX).is_file()
    m = manifest(work / OUT)
    assert m["batch_size"] == 20
    assert m["counts"]["captioned_this_run"] == m["work_items_total"] > 0
    listing = res.stdout.split("Files in outputs/captions/batch:", 1)[1]
    for name in ("captions_all.csv", "captions_part_0000.csv", "manifest.json"):
        assert re.search(rf"^  {re.escape(name)}  \(\d+ bytes\)$", listing, re.M), listing
    assert "Press Enter" not in res.stdout  # stdin is no terminal: no pause


@needs_bash
def test_typed_batch_size_bad_answers_asked_again_and_index_reused(server, work):
    env = script_env(server.base_url)
    first = bash(BATCH_SH, work, "3\n", env)
    assert first.returncode == 0, first.stderr
    assert manifest(work / OUT)["batch_size"] == 3
    index_bytes = (work / INDEX).read_bytes()
    index_mtime = (work / INDEX).stat().st_mtime_ns

    second = bash(BATCH_SH, work, "abc\n0\n-4\n2.5\n 7 \n", env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count(ASK) == 5
    assert second.stdout.count("please type a positive whole number") == 4
    assert "using the index outputs/runs/index_batch.json" in second.stdout
    assert "preparing the index" not in second.stdout
    assert (work / INDEX).read_bytes() == index_bytes and (work / INDEX).stat().st_mtime_ns == index_mtime
    assert manifest(work / OUT)["batch_size"] == 7


@needs_bash
def test_variables_choose_data_index_output_and_extra_options(work):
    """DATA_ROOT, INDEX_FILE, OUTPUT_DIR, PROMPT_FILE and REID_PROMPT_ARGS; offline needs no key."""
    (work / "data" / "market1501").rename(work / "mine")
    env = script_env(None, key=None, DATA_ROOT="mine", INDEX_FILE="idx/my_index.json", OUTPUT_DIR="caps",
                     REID_PROMPT_ARGS="--backend offline --no-dashboard")
    res = bash(BATCH_SH, work, "4\n", env)
    assert res.returncode == 0, res.stderr
    assert (work / "idx" / "my_index.json").is_file()
    m = manifest(work / "caps")
    assert m["batch_size"] == 4 and m["backend"] == "offline"
    assert "Files in caps:" in res.stdout
    assert not (work / "outputs").exists()


@needs_bash
def test_wrong_key_exit_code_comes_out_of_the_script(server, work):
    res = bash(BATCH_SH, work, "\n", script_env(server.base_url, key="sk-not-the-right-key-123456"))
    assert res.returncode == 3, (res.stdout, res.stderr)
    assert "sk-not-the-right-key-123456" not in res.stdout + res.stderr


@needs_bash
def test_no_key_stops_before_anything_is_prepared(work):
    res = bash(BATCH_SH, work, "\n", script_env(None, key=None))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: no API key")
    assert ASK not in res.stdout
    assert not (work / "outputs").exists()


@needs_bash
def test_python_missing_or_without_the_package_says_what_to_do(work, tmp_path_factory):
    res = bash(BATCH_SH, work, "\n", script_env(None, PYTHON=str(work / "no-such-python")))
    assert res.returncode == 2
    assert res.stderr.startswith("error: Python was not found") and res.stderr.count("\n") == 1

    # A Python without site-packages, and the script copied away from the checkout: no fallback either.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    fake = elsewhere / "python-no-site"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n', encoding="utf-8")
    fake.chmod(0o755)
    (elsewhere / "scripts").mkdir()
    copy = shutil.copy(BATCH_SH, elsewhere / "scripts" / BATCH_SH.name)
    env = script_env(None, PYTHON=str(fake))
    env.pop("PYTHONPATH")
    res = bash(Path(copy), work, "\n", env)
    assert res.returncode == 2
    assert res.stderr.startswith("error: reid-prompt is not installed") and "pip install ." in res.stderr
    assert res.stderr.count("\n") == 1


@needs_bash
def test_started_inside_scripts_folder_works_in_the_folder_above(work):
    """A double-click starts the script in its own folder; the seed's layout has the data one folder up."""
    (work / "scripts").mkdir()
    copy = Path(shutil.copy(BATCH_SH, work / "scripts" / BATCH_SH.name))
    env = script_env(None, key=None, PROMPT_FILE="prompt.txt", REID_PROMPT_ARGS="--backend offline")
    res = bash(copy, work / "scripts", "\n", env)
    assert res.returncode == 0, res.stderr
    assert f"working in {work.resolve()}" in res.stdout
    assert (work / OUT / "captions_all.csv").is_file() and not (work / "scripts" / "outputs").exists()


@needs_bash
def test_default_prompt_is_the_bundled_base(server, work):
    env = script_env(server.base_url)
    env.pop("PROMPT_FILE")
    res = bash(BATCH_SH, work, "\n", env)
    assert res.returncode == 0, res.stderr
    assert [p["name"] for p in manifest(work / OUT)["prompts"]] == ["base"]


# --- setup_api_and_run.sh ---------------------------------------------------------------------------

@needs_bash
def test_setup_saves_key_and_base_url_in_dotenv_without_echoing(server, work):
    (work / ".env").write_text("# mine\nOTHER=1\nOPENAI_API_KEY=sk-old-one\n", encoding="utf-8")
    answers = f"{KEY}\n{server.base_url}\n\n\n5\n"  # key, base URL, model (default), save (Y), batch size
    res = bash(SETUP_SH, work, answers, script_env(None, key=None))
    assert res.returncode == 0, res.stderr
    assert KEY not in res.stdout + res.stderr
    lines = (work / ".env").read_text(encoding="utf-8").splitlines()
    assert lines == ["# mine", "OTHER=1", f"OPENAI_API_KEY={KEY}", f"OPENAI_BASE_URL={server.base_url}"]
    if os.name == "posix":
        assert stat.S_IMODE((work / ".env").stat().st_mode) == 0o600
    assert "saved in" in res.stdout
    assert manifest(work / OUT)["batch_size"] == 5

    # Next time the batch script alone finds the key and the server in .env.
    again = bash(BATCH_SH, work, "\n", script_env(None, key=None))
    assert again.returncode == 0, again.stderr
    assert KEY not in again.stdout + again.stderr
    assert manifest(work / OUT)["batch_size"] == 20


@needs_bash
def test_setup_not_saved_still_runs_with_the_typed_key(server, work):
    answers = f"{KEY}\n{server.base_url}\n\nn\n\n"
    res = bash(SETUP_SH, work, answers, script_env(None, key=None))
    assert res.returncode == 0, res.stderr
    assert "not saved" in res.stdout and not (work / ".env").exists()
    assert KEY not in res.stdout + res.stderr
    assert manifest(work / OUT)["batch_size"] == 20


@needs_bash
def test_setup_enter_keeps_the_key_already_set(server, work):
    res = bash(SETUP_SH, work, "\n\n8\n", script_env(server.base_url))  # key kept, no base URL, batch size
    assert res.returncode == 0, res.stderr
    assert "Save it in .env" not in res.stdout and not (work / ".env").exists()
    assert manifest(work / OUT)["batch_size"] == 8


@needs_bash
def test_setup_passes_the_run_exit_code_on_and_needs_a_key(server, work):
    bad = "sk-typed-but-wrong-987654"
    res = bash(SETUP_SH, work, f"{bad}\n{server.base_url}\n\nn\n\n", script_env(None, key=None))
    assert res.returncode == 3
    assert bad not in res.stdout + res.stderr

    res = bash(SETUP_SH, work, "\n", script_env(None, key=None))
    assert res.returncode == 2 and res.stderr.startswith("error: no API key given")
    assert BASE_URL_ASK not in res.stdout


# --- the .cmd scripts, read ---------------------------------------------------------------------------

def cmd_text(path: Path) -> str:
    return path.read_bytes().decode("ascii")


@pytest.mark.parametrize("path", [BATCH_CMD, SETUP_CMD], ids=lambda p: p.name)
def test_cmd_scripts_have_crlf_line_endings_and_git_keeps_them(path):
    raw = path.read_bytes()
    assert raw.endswith(b"\r\n")
    assert raw.count(b"\n") == raw.count(b"\r\n") and raw.count(b"\r") == raw.count(b"\r\n")
    attributes = (REPO / ".gitattributes").read_text(encoding="utf-8").split("\n")
    assert "*.cmd text eol=crlf" in attributes and "*.sh text eol=lf" in attributes


@pytest.mark.parametrize("path", [BATCH_CMD, SETUP_CMD], ids=lambda p: p.name)
def test_cmd_labels_exist_and_blocks_balance(path):
    text = cmd_text(path)
    labels = {m.group(1).lower() for m in re.finditer(r"^:(\w+)", text, re.M)}
    targets = {m.group(1).lower() for m in re.finditer(r"\b(?:goto|call) :(\w+)", text, re.I)}
    assert targets and targets <= labels, targets - labels
    for n, line in enumerate(text.splitlines(), 1):
        if line.lower().startswith("rem ") or line.lower() == "rem":
            continue
        bare = re.sub(r'"[^"]*"', "", line).replace("echo(", "echo ")  # quoted text and `echo(` open no block
        assert bare.count("(") == bare.count(")"), (n, line)


def test_batch_cmd_steps_and_variables():
    text = cmd_text(BATCH_CMD)
    for needle in [
        "@echo off",
        "setlocal EnableExtensions DisableDelayedExpansion",
        "chcp 65001 >nul",
        'if not defined DATA_ROOT set "DATA_ROOT=./data/market1501"',
        'if not defined INDEX_FILE set "INDEX_FILE=outputs/runs/index_batch.json"',
        'if not defined OUTPUT_DIR set "OUTPUT_DIR=outputs/captions/batch"',
        'if not defined PROMPT_FILE set "PROMPT_FILE=base"',
        "v >= (3, 10)",
        '%PYTHON% -c "import pipeline.cli"',
        "if defined OPENAI_API_KEY goto :batch_size",
        "if defined DASHSCOPE_API_KEY goto :batch_size",
        '".env"',
        'set /p "BATCH_SIZE=Batch size [20]: "',
        'if not defined BATCH_SIZE set "BATCH_SIZE=20"',
        'if exist "%INDEX_FILE_W%" goto :index_found',
        '%PYTHON% -m pipeline prepare --root "%DATA_ROOT%" --out "%INDEX_FILE%"',
        '%PYTHON% -m pipeline run --index "%INDEX_FILE%" --out "%OUTPUT_DIR%" --prompt-file "%PROMPT_FILE%"'
        " --batch-size %BATCH_SIZE% %REID_PROMPT_ARGS%",
        'set "RC=%ERRORLEVEL%"',
        'for %%F in ("%OUTPUT_DIR_W%\\*") do echo',
        "if not defined REID_PROMPT_NO_PAUSE pause",
        "exit /b %RC%",
    ]:
        assert needle in text, needle
    assert "cd /d" not in text.replace('cd /d "%~dp0.."', "")  # no cd but the double-click case
    assert "OPENAI_API_KEY%" not in text and "echo %OPENAI_API_KEY" not in text  # the key is never printed


def test_setup_cmd_steps():
    text = cmd_text(SETUP_CMD)
    for needle in [
        "chcp 65001 >nul",
        "Read-Host -AsSecureString",
        'set /p "BASE_URL=',
        'set /p "ANSWER=Save it in .env in this folder? [Y/n]: "',
        "call :set_env_line OPENAI_API_KEY",
        'call "%~dp0batch_generate_captions.cmd"',
        "exit /b %RC%",
        "pause",
    ]:
        assert needle in text, needle
    assert "echo %NEW_KEY%" not in text and "echo %OPENAI_API_KEY%" not in text


# The same steps in the same order: (step, marker in the .sh, marker in the .cmd), searched in turn from
# the first line after the header comments.
BATCH_STEPS = [
    ("UTF-8", "PYTHONIOENCODING=utf-8", "chcp 65001"),
    ("double-click folder", "the folder above the script's own", "the folder above the script's own"),
    ("Python found", "error: Python was not found", "error: Python was not found"),
    ("Python >= 3.10", "v >= (3, 10)", "v >= (3, 10)"),
    ("package", '-c "import pipeline.cli"', '-c "import pipeline.cli"'),
    ("package from the checkout", "PYTHONPATH=", "PYTHONPATH="),
    ("install hint", "-m pip install .", "-m pip install ."),
    ("key variables", "OPENAI_API_KEY", "OPENAI_API_KEY"),
    ("key in .env", ".env", ".env"),
    ("keyless servers", "lmstudio", "lmstudio"),
    ("no key", "error: no API key", "error: no API key"),
    ("batch size question", ASK, ASK),
    ("default 20", "20}", '"BATCH_SIZE=20"'),
    ("asked again", "please type a positive whole number", "please type a positive whole number"),
    ("prepare if missing", "preparing the index", "preparing the index"),
    ("prepare", "-m pipeline prepare --root", "-m pipeline prepare --root"),
    ("reuse", "using the index", "using the index"),
    ("run", "-m pipeline run --index", "-m pipeline run --index"),
    ("batch size passed", '--batch-size "$batch_size"', "--batch-size %BATCH_SIZE%"),
    ("extra options", "extra_args", "%REID_PROMPT_ARGS%"),
    ("exit code kept", "rc=$?", 'set "RC=%ERRORLEVEL%"'),
    ("files listed", "Files in", "Files in"),
    ("pause and exit code", 'finish "$rc"', "pause"),
]
SETUP_STEPS = [
    ("UTF-8", "PYTHONIOENCODING=utf-8", "chcp 65001"),
    ("key question", "API key (input hidden; Enter keeps the key already set): ",
     "API key (input hidden; Enter keeps the key already set): "),
    ("hidden", "read -r -s key", "Read-Host -AsSecureString"),
    ("key already set", "OPENAI_API_KEY", "OPENAI_API_KEY"),
    ("no key", "error: no API key given", "error: no API key given"),
    ("base URL", BASE_URL_ASK, BASE_URL_ASK),
    ("model", "Model on that server (Enter for reid-prompt's default; e.g. qwen-vl-plus): ",
     "Model on that server (Enter for reid-prompt's default; e.g. qwen-vl-plus): "),
    ("save question", "Save it in .env in this folder? [Y/n]: ", "Save it in .env in this folder? [Y/n]: "),
    ("save key", "set_env_line OPENAI_API_KEY", "set_env_line OPENAI_API_KEY"),
    ("save base URL", "set_env_line OPENAI_BASE_URL", "set_env_line OPENAI_BASE_URL"),
    ("caption", "batch_generate_captions.sh", "batch_generate_captions.cmd"),
    ("exit code", "exit $?", "exit /b %RC%"),
]


def _body(text: str, first_line: str) -> str:
    return text[text.index(first_line):]


def _in_order(body: str, markers: list[tuple[str, str]]) -> None:
    pos = 0
    for step, marker in markers:
        found = body.find(marker, pos)
        assert found >= 0, f"step {step!r}: {marker!r} not found after position {pos}"
        pos = found + len(marker)


@pytest.mark.parametrize("sh, cmd, steps", [(BATCH_SH, BATCH_CMD, BATCH_STEPS), (SETUP_SH, SETUP_CMD, SETUP_STEPS)],
                         ids=["batch", "setup"])
def test_sh_and_cmd_do_the_same_steps_in_the_same_order(sh, cmd, steps):
    sh_body = _body(sh.read_text(encoding="utf-8"), "set -u")
    cmd_body = _body(cmd_text(cmd), "setlocal EnableExtensions")
    _in_order(sh_body, [(s, m) for s, m, _ in steps])
    _in_order(cmd_body, [(s, m) for s, _, m in steps])


def test_sh_and_cmd_ask_the_same_questions():
    for sh, cmd in [(BATCH_SH, BATCH_CMD), (SETUP_SH, SETUP_CMD)]:
        sh_questions = [m.group(2) for m in re.finditer(r"printf (['\"])([A-Z].*?: )\1", sh.read_text(encoding="utf-8"))]
        cmd_questions = re.findall(r'set /p "\w*=([A-Z][^"]*?: )"', cmd_text(cmd))
        assert sh_questions and sh_questions == cmd_questions
