"""`run --mode batch` on the command line without a server: the flags, `--dry-run --mode batch` and
`--batch-files-only DIR` on the bundled sample dataset (34 images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import rows
from pipeline.batch.ids import parse_custom_id
from pipeline.batch.ledger import BatchLedger
from pipeline.cli import build_parser, config_from_args
from pipeline.config import BatchConfig
from pipeline.ledger.manifest import read_manifest

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "Market-1501-sample"
IMAGES = 34


@pytest.fixture
def index(tmp_path, cli) -> Path:
    path = tmp_path / "index.json"
    assert cli("prepare", "--root", SAMPLE, "--out", path).code == 0
    return path


@pytest.fixture
def no_key(monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DASHSCOPE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parent)  # no .env of the developer's is read


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_online_is_the_default_and_unchanged():
    a = build_parser().parse_args(["run", "--index", "i.json", "--out", "o", "--model", "m"])
    assert config_from_args(a).batch == BatchConfig()
    assert not config_from_args(a).batch.enabled


def test_batch_flags_reach_the_config():
    a = build_parser().parse_args(["run", "--index", "i.json", "--out", "o", "--mode", "batch",
                                   "--batch-max-requests", "10", "--batch-max-bytes", "5000",
                                   "--batch-max-tokens", "90000", "--no-wait", "--keep-batch-files",
                                   "--poll-max", "0.5"])
    assert config_from_args(a).batch == BatchConfig("batch", 10, 5000, 90000, None, True, True, 0.5)


@pytest.mark.parametrize(("args", "says"), [
    (["--batch-files-only", "files"], "--batch-files-only is an option of --mode batch"),
    (["--no-wait"], "--no-wait is an option of --mode batch"),
    (["--batch-max-requests", "10"], "--batch-max-requests is an option of --mode batch"),
    (["--mode", "batch", "--backend", "offline"], "the offline backend has none"),
    (["--mode", "batch", "--batch-files-only", "f", "--no-wait"], "--no-wait does not go with it"),
    (["--mode", "batch", "--batch-files-only", "f", "--dry-run"], "--dry-run does not go with it"),
    (["--mode", "batch", "--batch-max-bytes", "0"], "must be at least 1"),
    (["--mode", "batch", "--batch-max-tokens", "many"], "expected a whole number"),
    (["--mode", "fast"], "invalid choice"),
])
def test_invalid_combinations_are_one_line_and_exit_2(tmp_path, cli, index, no_key, args, says):
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, *args)
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], res.err
    assert not out.exists()


def test_dry_run_prints_the_shard_plan_at_the_batch_price_and_writes_nothing(tmp_path, cli, index, no_key):
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, "--mode", "batch", "--dry-run", "--batch-max-requests", "10",
              "--model", "gpt-4o-mini", "--no-dashboard")
    assert res.code == 0, res.err
    rows = [line.split() for line in res.out.splitlines() if line.strip().startswith("s0000")]
    assert [r[0] for r in rows] == ["s000001", "s000002", "s000003", "s000004"]
    assert [int(r[1]) for r in rows] == [10, 10, 10, 4]
    assert all(int(r[-1].replace(",", "")) > 0 for r in rows)  # estimated queued tokens
    text = " ".join(res.out.split())
    assert "cost at the batch price: $" in text and "online: $" in text and "50% off online prices" in text
    assert "limits per shard: 10 lines" in text and "nothing was sent" in text
    assert not out.exists()  # nothing written


def test_dry_run_costs_half_of_online(tmp_path, cli, index, no_key):
    res = cli("run", "--index", index, "--out", tmp_path / "out", "--mode", "batch", "--dry-run",
              "--model", "gpt-4o")
    text = " ".join(res.out.split())
    batch = float(text.split("cost at the batch price: $")[1].split()[0])
    online = float(text.split("online: $")[1].split()[0])
    assert batch == pytest.approx(online / 2, abs=2e-4)


def read_lines(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("s*.jsonl")):
        for raw in f.read_bytes().splitlines():
            out.append(json.loads(raw))
    return out


def test_batch_files_only_writes_shards_for_another_server(tmp_path, cli, index, no_key):
    out, files = tmp_path / "out", tmp_path / "files"
    res = cli("run", "--index", index, "--out", out, "--mode", "batch", "--batch-files-only", files,
              "--batch-max-bytes", "40000", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--provider", "vllm",
              "--captions-per-image", "2")
    assert res.code == 0, res.err
    assert "nothing sent" in res.out and "vllm run-batch" in res.out and "collect --out" in res.out
    shards = sorted(files.glob("s*.jsonl"))
    assert len(shards) >= 2 and all(p.stat().st_size <= 40000 for p in shards)
    assert all(f"wrote {p}" in res.out for p in shards)
    lines = read_lines(files)
    assert len(lines) == IMAGES
    ids = [parse_custom_id(line["custom_id"]) for line in lines]
    assert len({line["custom_id"] for line in lines}) == IMAGES
    assert {i for _, _, i in ids} == {(0, 1)}  # two captions asked together with n
    for line in lines:
        assert (line["method"], line["url"]) == ("POST", "/v1/chat/completions")
        body = line["body"]
        assert body["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and body["n"] == 2
        assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    # the folder's ledger records them as local, with their ids kept in OUT/batches
    ledger = BatchLedger.load(out)
    assert [r.state for r in ledger.shards] == ["local"] * len(shards)
    assert sorted(ledger.resolve(r.jsonl) for r in ledger.shards) == [p.resolve() for p in shards]
    assert sum(r.lines for r in ledger.shards) == IMAGES
    assert len(ledger.covered_ids()) == IMAGES
    # the manifest names the index and prompts (what `collect` reads), never a key
    manifest = read_manifest(out)
    assert manifest["index"] == str(index.resolve()) and manifest["prompts"][0]["name"] == "base"
    assert manifest["batch"]["mode"] == "files_only" and manifest["state"] == "batch files written"
    # the same command again plans nothing twice
    again = cli("run", "--index", index, "--out", out, "--mode", "batch", "--batch-files-only", files,
                "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--provider", "vllm", "--captions-per-image", "2")
    assert again.code == 0 and "nothing left to write" in again.out
    assert len(read_lines(files)) == IMAGES


def test_batch_files_only_needs_no_api_key_even_for_openai(tmp_path, cli, index, no_key):
    res = cli("run", "--index", index, "--out", tmp_path / "out", "--mode", "batch",
              "--batch-files-only", tmp_path / "files", "--prompt-file", "attributes")
    assert res.code == 0, res.err
    lines = read_lines(tmp_path / "files")
    assert len(lines) == IMAGES
    assert all(line["body"]["response_format"]["type"] == "json_schema" for line in lines)
    assert "files-only" not in (tmp_path / "out" / "manifest.json").read_text()  # the stand-in key is no key


def test_dry_run_and_files_only_agree_and_a_dry_run_leaves_out_what_is_in_a_shard(tmp_path, cli, index, no_key):
    out, files = tmp_path / "out", tmp_path / "files"
    args = ["--index", index, "--out", out, "--mode", "batch", "--batch-max-requests", "8", "--limit", "20"]
    dry = cli("run", *args, "--dry-run")
    planned = [line.split()[:3] for line in dry.out.splitlines() if line.strip().startswith("s0000")]
    assert cli("run", *args, "--batch-files-only", files).code == 0
    ledger = BatchLedger.load(out)
    assert [[r.shard_id, str(r.lines)] for r in ledger.shards] == [p[:2] for p in planned]
    # the rest of the index: the first 20 images are in shards already
    rest = cli("run", "--index", index, "--out", out, "--mode", "batch", "--dry-run")
    rows = [line.split() for line in rest.out.splitlines() if line.strip().startswith("s0000")]
    assert [(r[0], r[1]) for r in rows] == [("s000004", str(IMAGES - 20))]
    assert "3 earlier shard(s) not collected yet (20 lines)" in " ".join(rest.out.split())


def test_an_unreadable_image_goes_to_errors_csv(tmp_path, cli, no_key):
    root = tmp_path / "Market-1501-sample"
    shutil.copytree(SAMPLE, root)
    victim = sorted((root / "query").glob("*.jpg"))[0]
    index = tmp_path / "index.json"
    assert cli("prepare", "--root", root, "--out", index).code == 0
    victim.write_bytes(b"not an image at all")
    out, files = tmp_path / "out", tmp_path / "files"
    dry = cli("run", "--index", index, "--out", out, "--mode", "batch", "--dry-run")
    assert dry.code == 0 and "1 caption(s) would get no line: not_image" in " ".join(dry.out.split())
    assert f"s000001 {IMAGES - 1} " in " ".join(dry.out.split())
    res = cli("run", "--index", index, "--out", out, "--mode", "batch", "--batch-files-only", files)
    assert res.code == 1 and "got no line (not_image 1)" in res.err
    assert len(read_lines(files)) == IMAGES - 1
    errors = (out / "errors.csv").read_text(encoding="utf-8")
    assert f"query/{victim.name}" in errors and "not_image" in errors


def test_an_oversize_request_goes_to_errors_csv(tmp_path, cli, index, no_key):
    out, files = tmp_path / "out", tmp_path / "files"
    res = cli("run", "--index", index, "--out", out, "--mode", "batch", "--batch-files-only", files,
              "--batch-max-bytes", "1000")
    assert res.code == 1 and f"request_too_large {IMAGES}" in res.err
    assert read_lines(files) == [] and "nothing left to write" in res.out
    assert (out / "errors.csv").read_text(encoding="utf-8").count("request_too_large") == IMAGES


def test_dry_run_counts_a_batch_at_its_full_estimate_against_the_budget(tmp_path, cli, index, no_key):
    res = cli("run", "--index", index, "--out", tmp_path / "out", "--mode", "batch", "--dry-run",
              "--max-cost", "0.001")
    text = " ".join(res.out.split())
    assert res.code == 0 and "budget $0.0010" in text and "over budget" in text
    fits = cli("run", "--index", index, "--out", tmp_path / "out", "--mode", "batch", "--dry-run", "--max-cost", "5")
    assert "over budget" not in " ".join(fits.out.split())


def test_print_config_names_the_mode(tmp_path, cli, index, no_key):
    res = cli("run", "--index", index, "--out", tmp_path / "o", "--mode", "batch", "--print-config")
    assert res.code == 0 and "--mode" in res.out and "batch" in res.out


def test_an_online_run_never_asks_again_for_work_in_a_batch(tmp_path, cli, index, no_key):
    out, files = tmp_path / "out", tmp_path / "files"
    assert cli("run", "--index", index, "--out", out, "--mode", "batch", "--batch-files-only", files,
               "--limit", "10").code == 0
    # batch files for another server: said, and asked online (the user may have chosen not to run them)
    res = cli("run", "--index", index, "--out", out, "--backend", "offline", "--limit", "10", "--no-dashboard")
    assert res.code == 0, res.err
    assert "1 batch file(s) written for another server (10 requests)" in " ".join(res.err.split())
    # a shard on its way to the Batch API: its work is left to it (one note), the rest is done online
    out = tmp_path / "out2"
    assert cli("run", "--index", index, "--out", out, "--mode", "batch", "--batch-files-only", files,
               "--limit", "10").code == 0
    BatchLedger.load(out).update("s000001", state="submitted", batch_id="batch_x")
    res = cli("run", "--index", index, "--out", out, "--backend", "offline", "--no-dashboard")
    assert res.code == 0, res.err
    said = " ".join(res.err.split())
    assert "1 batch shard(s) of this folder are not collected yet (10 requests): this online run leaves their " \
           "work to them" in said
    asked = {r["image_id"] for r in rows(out / "captions_all.csv")}
    in_batch = {parse_custom_id(c)[0] for c in (out / "batches" / "s000001.ids").read_text().split()}
    assert asked and not asked & in_batch
    assert len(asked) + len(in_batch) == len(json.loads(Path(index).read_text(encoding="utf-8"))["images"])
