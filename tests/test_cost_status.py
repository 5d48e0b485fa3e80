"""Cost before and during a run, the budget stop, and `status`, end to end against the loopback server."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import anyio
import pytest
from rich.console import Console

from conftest import KEY, make_big_market, prepare_index, rows, spawn, wait_for_rows
from pipeline.cli import build_parser, config_from_args
from pipeline.review.estimate import estimate_for_run
from pipeline.ledger.outputs import read_table
from pipeline.review.dashboard import make_view
from pipeline.run.runner import prepare, run_prepared


def cfg_for(index: Path, out: Path, prompt: Path, server, *extra: object):
    args = build_parser().parse_args([str(a) for a in (
        "run", "--index", index, "--out", out, "--prompt-file", prompt, "--base-url", server.base_url,
        "--no-dashboard", *extra)])
    return config_from_args(args)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture
def big_index(cli, tmp_path):
    root = make_big_market(tmp_path / "data", n_ids=20, per_id=3)  # 140 images
    return prepare_index(cli, root, tmp_path / "index.json")


def test_dry_run_sends_nothing_and_changes_nothing(cli, server, monkeypatch, big_index, prompt_file, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a dry run needs no key
    out = tmp_path / "out"
    res = cli("run", "--index", big_index, "--out", out, "--prompt-file", prompt_file,
              "--base-url", server.base_url, "--dry-run")
    assert res.code == 0, res.err
    assert server.stats.requests == 0
    assert not out.exists()
    assert "140" in res.out and "$" in res.out and "gpt-4o-mini" in res.out


@pytest.mark.parametrize("model,detail", [("gpt-4o-mini", "low"), ("gpt-4o", "high"), ("gpt-4.1-mini", "low")])
def test_dry_run_estimate_within_5_percent_of_actual(server, api_env, big_index, prompt_file, tmp_path, model,
                                                     detail):
    out = tmp_path / "out"
    # a first slice of the run gives the estimate real answer lengths to go by, as it would in practice
    first = tmp_path / "first.json"
    data = json.loads(big_index.read_text(encoding="utf-8"))
    first.write_text(json.dumps(dict(data, images=data["images"][:25])), encoding="utf-8")
    cfg = cfg_for(first, out, prompt_file, server, "--model", model, "--detail", detail)
    anyio.run(lambda: run_prepared(prepare(cfg), install_signals=False))
    spent_before = manifest(out)["cost_usd_total"]

    cfg = cfg_for(big_index, out, prompt_file, server, "--model", model, "--detail", detail)
    est = estimate_for_run(prepare(cfg, readonly=True))
    assert est.requests == 140 - 25 and est.output_tokens_source != "given"
    result = anyio.run(lambda: run_prepared(prepare(cfg), install_signals=False))
    assert result.state == "finished"
    actual = manifest(out)["cost_usd_this_run"]
    assert actual > 0
    print(f"dry-run {model}/{detail}: estimate {est.cost_total:.6f} actual {actual:.6f} ratio {est.cost_total / actual:.4f}")
    assert abs(est.cost_total - actual) / actual <= 0.05, (est.cost_total, actual)
    assert manifest(out)["cost_usd_total"] == pytest.approx(spent_before + actual, rel=1e-6)
    # the per-row cost column sums to the manifest's total
    assert sum(float(r["cost_usd"]) for r in rows(out / "captions_all.csv")) == pytest.approx(
        manifest(out)["cost_usd_total"], rel=1e-4)


def test_budget_stops_new_requests_and_rerun_carries_on(cli, server, api_env, big_index, prompt_file, tmp_path):
    out = tmp_path / "out"
    # gpt-4o-mini low: ~2,900 input tokens ≈ $0.00045 per image; $0.02 buys ~40 images
    res = cli("run", "--index", big_index, "--out", out, "--prompt-file", prompt_file,
              "--base-url", server.base_url, "--no-dashboard", "--max-cost", "0.02", "--concurrency", 4)
    assert res.code == 4, res.err  # stopped by --max-cost
    assert "budget" in res.out
    m = manifest(out)
    assert m["state"] == "budget"
    spent = m["cost_usd_total"]
    assert 0.015 < spent <= 0.02
    done = len(rows(out / "captions_all.csv"))
    assert 20 < done < 140
    assert server.stats.requests == done  # in-flight answers were finished and written, none lost
    assert rows(out / "errors.csv") == []  # budget-stopped images are not errors
    # the same budget again: nothing is sent
    sent = server.stats.requests
    res = cli("run", "--index", big_index, "--out", out, "--prompt-file", prompt_file,
              "--base-url", server.base_url, "--no-dashboard", "--max-cost", "0.02")
    assert res.code == 4 and server.stats.requests <= sent + 1
    # a higher budget carries on to the end
    res = cli("run", "--index", big_index, "--out", out, "--prompt-file", prompt_file,
              "--base-url", server.base_url, "--no-dashboard", "--max-cost", "1.00")
    assert res.code == 0, res.err
    assert len(rows(out / "captions_all.csv")) == 140
    assert manifest(out)["state"] == "finished"


def test_status_finished_partial_and_crashed(cli, server, api_env, big_index, prompt_file, tmp_path):
    out = tmp_path / "out"
    res = cli("run", "--index", big_index, "--out", out, "--prompt-file", prompt_file,
              "--base-url", server.base_url, "--no-dashboard", "--max-cost", "0.01")
    assert res.code == 4
    st = cli("status", "--out", out, "--json")
    assert st.code == 0, st.err
    partial = json.loads(st.out)
    done = len(rows(out / "captions_all.csv"))
    assert partial["captioned"] == done and partial["left"] == 140 - done
    assert "budget" in json.dumps(partial)
    # finished
    assert cli("run", "--index", big_index, "--out", out, "--prompt-file", prompt_file,
               "--base-url", server.base_url, "--no-dashboard").code == 0
    finished = json.loads(cli("status", "--out", out, "--json").out)
    assert finished["captioned"] == 140 and finished["left"] == 0 and finished["state"] == "finished"
    assert finished["cost_usd"] == pytest.approx(manifest(out)["cost_usd_total"], rel=1e-4)
    table = cli("status", "--out", out)
    assert table.code == 0 and "140" in table.out
    assert KEY not in table.out


def test_status_of_a_crashed_and_of_a_running_folder(cli, server, big_index, prompt_file, tmp_path):
    if sys.platform == "win32":
        pytest.skip("SIGKILL is POSIX")
    server.configure(latency=0.2)
    out = tmp_path / "out"
    proc = spawn("run", "--index", big_index, "--out", out, "--prompt-file", prompt_file, "--no-dashboard",
                 "--concurrency", 4, base_url=server.base_url)
    all_csv = out / "captions_all.csv"
    wait_for_rows(all_csv, 8)
    running = json.loads(cli("status", "--out", out, "--json").out)  # while the run goes on
    assert running["state"] == "running" and 8 <= running["captioned"] < 140
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close(), proc.stderr.close()
    crashed = json.loads(cli("status", "--out", out, "--json").out)
    assert crashed["state"].startswith("crashed")
    assert crashed["captioned"] == len(read_table(all_csv).rows)


def test_live_dashboard_draws_the_run(server, api_env, big_index, prompt_file, tmp_path):
    console = Console(record=True, force_terminal=True, width=120, color_system=None)
    out = tmp_path / "out"
    server.configure(latency=0.01)
    cfg = cfg_for(big_index, out, prompt_file, server, "--rpm", "30000")
    cfg.dashboard = True
    result = anyio.run(lambda: run_prepared(
        prepare(cfg), views=lambda stats: make_view(stats, console, dashboard=True), install_signals=False))
    assert result.state == "finished"
    text = console.export_text()
    assert "140" in text and "30,000" in text  # items and the configured rpm limit
    assert "$" in text and "A person in image" in text  # cost and last captions
    assert KEY not in text
