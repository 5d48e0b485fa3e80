"""A real package: bundled prices and prompts as package data, a user's pricing file, prompts by name,
part numbers that widen.

Building a wheel and installing it in a fresh venv is slow, so .ci/run does that (and runs the offline
sample from another folder); here: what the package data is and how it is found, without a build.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from importlib import resources
from pathlib import Path

import pytest

from conftest import REPO, prepare_index, rows
from pipeline.data.prompts import (
    BUNDLED_PROMPTS_DIR,
    bundled_prompts,
    find_prompt_file,
    load_prompts,
    resolve_prompt_arg,
)
from pipeline.errors import ConfigError, PromptError
from pipeline.ledger.outputs import CAPTION_COLUMNS, part_digits, part_name, write_csv_atomic
from pipeline.ledger.recover import part_number_widths, plan_parts, recover_folder
from pipeline.ledger.writer import OutputWriter
from pipeline.providers.pricing import (
    DEFAULT_PRICING_PATH,
    PRICING_ENV,
    LOCAL_PRICING,
    choose_pricing_file,
    load_pricing,
    load_run_pricing,
    lookup,
    pricing_choice,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BUNDLED_NAMES = ["attributes", "attributes_duke", "base", "base_zh", "cuhk_pedes", "templated"]


# --- package data -----------------------------------------------------------------------------------------

def test_bundled_prices_and_prompts_load_through_importlib_resources():
    data = resources.files("pipeline.bundled")
    pricing = data.joinpath("pricing.toml")
    assert pricing.is_file() and "[meta]" in pricing.read_text(encoding="utf-8")
    assert Path(str(pricing)) == DEFAULT_PRICING_PATH
    table = load_pricing()
    assert table.source == DEFAULT_PRICING_PATH and lookup(table, "gpt-4o-mini") is not None

    names = sorted(p.name for p in data.joinpath("prompts").iterdir())
    assert "README.md" in names and "templated.templates.txt" in names
    assert Path(str(data.joinpath("prompts"))) == BUNDLED_PROMPTS_DIR
    assert sorted(bundled_prompts()) == BUNDLED_NAMES
    loaded = {p.name: p for p in load_prompts(BUNDLED_NAMES)}  # every bundled prompt, by name
    assert loaded["templated"].templates and loaded["attributes"].schema and loaded["attributes_duke"].schema
    assert all(p.path.parent == BUNDLED_PROMPTS_DIR for p in loaded.values())


def test_every_bundled_file_is_in_the_package_data_globs():
    """What the wheel ships is pyproject's package-data: a bundled file no glob covers would be missing
    from `pip install .` while every test in the checkout still passed."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["pipeline.bundled"]
    root = REPO / "pipeline" / "bundled"
    files = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert "pricing.toml" in files and "prompts/base.txt" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_no_second_copy_of_the_bundled_data_in_the_checkout():
    """One source of truth: top-level prompts/ and config/ are for a user's own files (their READMEs point
    at the package); a copy of a bundled file there would drift, and config/pricing.toml would silently
    override the bundled prices for every run started in the checkout."""
    bundled_names = {p.name for p in BUNDLED_PROMPTS_DIR.iterdir() if p.name != "README.md"} | {"pricing.toml"}
    for folder in (REPO / "prompts", REPO / "config"):
        assert (folder / "README.md").is_file()
        assert sorted(bundled_names & {p.name for p in folder.iterdir()}) == []


# --- --prompt-file NAME -----------------------------------------------------------------------------------

BUNDLED = {"base": Path("/b/base.txt"), "attributes": Path("/b/attributes.json")}


@pytest.mark.parametrize(
    ("arg", "exists", "want"),
    [
        ("base", False, Path("/b/base.txt")),
        ("base.txt", False, Path("/b/base.txt")),
        ("BASE.TXT", False, None),  # names are the files' stems, as written
        ("attributes", False, Path("/b/attributes.json")),
        ("attributes.json", False, Path("/b/attributes.json")),
        ("base.json", False, None),  # another extension is not that prompt
        ("mine/base.txt", False, None),  # a path, not a name
        ("mine\\base.txt", False, None),
        ("base", True, Path("/b/base.txt")),  # called only when no FILE `base` exists: a folder of that name
        ("notes", True, Path("notes")),  # exists (a folder): load_prompt says what it is
    ],
)
def test_resolve_prompt_arg(arg, exists, want):
    if want is None:
        with pytest.raises(PromptError) as info:
            resolve_prompt_arg(arg, exists, BUNDLED)
        assert str(info.value) == f"prompt file not found: {arg} (bundled prompts, usable by name: attributes, base)"
    else:
        assert resolve_prompt_arg(arg, exists, BUNDLED) == want


def test_a_file_that_exists_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("base.txt").write_text("My own base prompt.\n", encoding="utf-8")
    assert find_prompt_file("base.txt") == Path("base.txt")
    assert find_prompt_file("base") == BUNDLED_PROMPTS_DIR / "base.txt"  # no file named `base` here
    assert load_prompts(["base.txt"])[0].text == "My own base prompt."


def test_prompt_file_base_through_the_cli_from_another_folder(cli, market, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no prompts/ here: the name finds the bundled file
    index = prepare_index(cli, market, tmp_path / "index.json")
    res = cli("run", "--index", index, "--out", "out", "--prompt-file", "base", "--prompt-file", "base_zh",
              "--backend", "offline", "--no-dashboard")
    assert res.code == 0, res.err
    table = rows(tmp_path / "out" / "captions_all.csv")
    n = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    assert len(table) == 2 * n and {r["prompt_name"] for r in table} == {"base", "base_zh"}
    want = (BUNDLED_PROMPTS_DIR / "base.txt").read_text(encoding="utf-8").strip()
    assert {r["prompt"] for r in table if r["prompt_name"] == "base"} == {want}


def test_unknown_prompt_name_is_one_line_listing_the_bundled_names(cli, market, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    res = cli("run", "--index", index, "--out", tmp_path / "out", "--prompt-file", "bsae",
              "--backend", "offline", "--no-dashboard")
    assert res.code == 2
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert lines == [f"error: prompt file not found: bsae (bundled prompts, usable by name: {', '.join(BUNDLED_NAMES)})"]
    assert not (tmp_path / "out" / "captions_all.csv").exists()


# --- a user's pricing file ------------------------------------------------------------------------------------

BUNDLED_FILE = Path("/pkg/pricing.toml")


@pytest.mark.parametrize(
    ("flag", "env", "local", "path", "origin"),
    [
        (Path("mine.toml"), {PRICING_ENV: "env.toml"}, True, Path("mine.toml"), "--pricing"),
        (None, {PRICING_ENV: "env.toml"}, True, Path("env.toml"), PRICING_ENV),
        (None, {PRICING_ENV: "  "}, True, LOCAL_PRICING, "config/pricing.toml in the current folder"),
        (None, {}, True, LOCAL_PRICING, "config/pricing.toml in the current folder"),
        (None, {}, False, BUNDLED_FILE, "bundled"),
    ],
)
def test_pricing_file_choice_order(flag, env, local, path, origin):
    choice = choose_pricing_file(flag, env, local, BUNDLED_FILE)
    assert (choice.path, choice.origin, choice.bundled) == (path, origin, origin == "bundled")


def _pricing(path: Path, model: str, price_in: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[meta]\ntaken_on = "2027-01-02"\n\n[models."{model}"]\ninput = {price_in}\noutput = 1.0\n'
                    'image_rule = "tile"\nimage_base = 85\nimage_per_tile = 170\n', encoding="utf-8")
    return path


def test_pricing_override_reads_env_and_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PRICING_ENV, raising=False)
    assert pricing_choice().bundled and load_run_pricing().source == DEFAULT_PRICING_PATH
    _pricing(tmp_path / "config" / "pricing.toml", "local-model", 1.0)
    assert "local-model" in load_run_pricing().models
    monkeypatch.setenv(PRICING_ENV, str(_pricing(tmp_path / "env.toml", "env-model", 2.0)))
    assert "env-model" in load_run_pricing().models
    assert "flag-model" in load_run_pricing(_pricing(tmp_path / "flag.toml", "flag-model", 3.0)).models
    monkeypatch.setenv(PRICING_ENV, str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError) as info:
        load_run_pricing()
    assert str(info.value) == f"pricing file not found: {tmp_path / 'gone.toml'} (chosen by {PRICING_ENV})"


def test_pricing_flag_prices_the_dry_run(cli, market, tmp_path, monkeypatch):
    monkeypatch.delenv(PRICING_ENV, raising=False)
    index = prepare_index(cli, market, tmp_path / "index.json")
    mine = _pricing(tmp_path / "my prices.toml", "my-vlm", 7.0)
    args = ["run", "--index", index, "--out", tmp_path / "out", "--prompt-file", "base", "--model", "my-vlm",
            "--dry-run", "--no-dashboard"]
    res = cli(*args, "--pricing", mine)
    assert res.code == 0, res.err
    assert "$7.00 in" in res.out and "taken on 2027-01-02" in res.out
    missing = cli(*args, "--pricing", tmp_path / "nope.toml")
    assert missing.code == 2 and missing.err.strip() == f"error: pricing file not found: {tmp_path / 'nope.toml'}"


# --- part numbers that widen ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("images", "batch", "digits", "last"),
    [
        (1, 20, 4, "captions_part_0000.csv"),
        (100_000, 20, 4, "captions_part_4999.csv"),  # 5,000 parts
        (200_000, 20, 4, "captions_part_9999.csv"),  # 10,000 parts: still 4 digits
        (200_001, 20, 5, "captions_part_10000.csv"),
        (1_000_000, 20, 5, "captions_part_49999.csv"),  # 50,000 parts
        (1_000_000, 1, 6, "captions_part_999999.csv"),
    ],
)
def test_part_names_widen_so_they_still_sort(images, batch, digits, last):
    assert part_digits(images - 1, batch) == digits
    assert part_name(images - 1, batch, digits) == last
    assert part_name(0, batch, digits) == "captions_part_" + "0" * digits + ".csv"
    positions = sorted({p for p in (0, batch, 9 * batch, 10 * batch, 10_000 * batch, images - 1) if p < images})
    names = [part_name(p, batch, digits) for p in positions]
    assert sorted(names) == names


def caption(i: int) -> list[str]:
    return [f"img/{i:06d}.jpg", "p", f"caption {i}", "2027-01-01T00:00:00+00:00", "gpt-4o-mini", "10", "5",
            "0.0001", "base", "0", "1", "0.100", "abcd1234abcd1234"]


def test_a_folder_whose_index_grows_past_10000_parts_is_renamed_and_resumes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = [0, 1, 5, 9_999]  # positions with a caption; batch size 1: one part per position
    recs = {i: caption(i) for i in done}
    write_csv_atomic(out / "captions_all.csv", CAPTION_COLUMNS, list(recs.values()))
    small = {caption(i)[0]: i for i in range(10_000)}  # 10,000 parts: 4 digits, as the folder was made
    assert recover_folder(out, batch_size=1, positions=small).notes == [
        f"captions_part_{i:04d}.csv: rebuilt from captions_all.csv (0 -> 1 rows)" for i in done]
    assert recover_folder(out, batch_size=1, positions=small).notes == []  # an existing 4-digit folder resumes
    before = (out / "captions_all.csv").read_bytes()

    grown = {caption(i)[0]: i for i in range(10_001)}  # one image more: part 10000 needs 5 digits
    rec = recover_folder(out, batch_size=1, positions=grown)
    assert rec.notes == ["part files renamed to 5-digit numbers (captions_part_00000.csv, ...) so they still "
                         "sort: the index now needs 10,001 parts"]
    parts = sorted(p.name for p in out.glob("captions_part_*.csv"))
    assert parts == [f"captions_part_{i:05d}.csv" for i in done]
    assert all([r["image_id"] for r in rows(out / f"captions_part_{i:05d}.csv")] == [recs[i][0]] for i in done)
    assert (out / "captions_all.csv").read_bytes() == before  # the record of what is done is untouched
    assert recover_folder(out, batch_size=1, positions=grown).notes == []
    assert OutputWriter(out, 1, grown).part_digits == 5  # new answers go to 5-digit parts
    assert part_number_widths(parts) == {5}


def test_plan_parts_uses_the_width_of_the_whole_index():
    positions = {caption(i)[0]: i for i in range(20_001)}
    plan = plan_parts([dict(zip(CAPTION_COLUMNS, caption(3)))], positions, batch_size=2)
    assert list(plan) == ["captions_part_00001.csv"]  # 10,001 parts, though only part 1 has a row
