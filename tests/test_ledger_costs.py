"""Every paid answer on the books, and no price ever taken for $0: end to end against the loopback server.

The loopback server bills every 200 answer, refusals and empty ones too, and counts the tokens it billed
(`server.stats.prompt_tokens/completion_tokens`), so the folder's books can be checked against what the
server charged: the sum of `cost_usd` over captions_all.csv, attributes.csv and errors.csv must be exactly
the price of those tokens, nothing missing and nothing twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import prepare_index, rows
from pipeline.data.prompts import BUNDLED_PROMPTS_DIR
from pipeline.review.dashboard import fmt_spent
from pipeline.ledger.costs import Spent, is_failure, open_failures, row_spent
from pipeline.ledger.manifest import cost_fields
from pipeline.records import ErrorRow
from pipeline.testing.loopback import DEFAULT_MODELS

FT = "ft:gpt-4o-mini:acme::x"  # a fine-tune: not in the bundled pricing.toml
MINI_IN, MINI_OUT = 0.15, 0.60  # gpt-4o-mini, USD per 1M tokens (bundled pricing.toml)
N_IMAGES = 22  # the `market` fixture


def run(cli, server, index: Path, out: Path, prompt: Path, *extra: object):
    return cli("run", "--index", index, "--out", out, "--prompt-file", prompt, "--base-url", server.base_url,
               "--no-dashboard", *extra)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def status(cli, out: Path) -> dict:
    res = cli("status", "--out", out, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out)


def billed_by_server(server, price_in: float = MINI_IN, price_out: float = MINI_OUT) -> float:
    return (server.stats.prompt_tokens * price_in + server.stats.completion_tokens * price_out) / 1_000_000


def cost_sum(path: Path) -> float:
    """The known costs of a CSV (an empty cell is an unknown cost, left out)."""
    return sum(float(r["cost_usd"]) for r in rows(path) if r["cost_usd"]) if path.exists() else 0.0


def folder_rows_cost(out: Path) -> float:
    return cost_sum(out / "captions_all.csv") + cost_sum(out / "attributes.csv") + cost_sum(out / "errors.csv")


@pytest.fixture
def index(cli, market, tmp_path) -> Path:
    return prepare_index(cli, market, tmp_path / "index.json")


# --- billed failures ----------------------------------------------------------------------------------

def test_refused_answers_carry_their_cost_into_errors_manifest_and_status(cli, server, api_env, index, prompt_file,
                                                                          tmp_path):
    server.configure(p_refusal=1.0)
    out = tmp_path / "out"
    res = run(cli, server, index, out, prompt_file)
    assert res.code == 1, res.err  # every item failed
    errs = rows(out / "errors.csv")
    # each image: the refusal that got one more try (a bill), then the refusal that failed it
    assert sorted(r["reason"] for r in errs) == ["refused"] * N_IMAGES + ["refused_retried"] * N_IMAGES
    assert len({r["run_id"] for r in errs}) == 1 and errs[0]["run_id"]
    for r in errs:
        assert r["model"] == "gpt-4o-mini"
        assert int(r["prompt_tokens"]) > 0 and int(r["completion_tokens"]) > 0 and float(r["cost_usd"]) > 0
    spent = billed_by_server(server)
    assert spent > 0 and server.stats.requests == 2 * N_IMAGES
    assert cost_sum(out / "errors.csv") == pytest.approx(spent, rel=1e-6)
    m = manifest(out)
    assert m["cost_usd_total"] == pytest.approx(spent, rel=1e-6)
    assert m["cost_usd_this_run"] == pytest.approx(spent, rel=1e-6) and m["price_known"] is True
    st = status(cli, out)
    assert st["cost_usd"] == pytest.approx(spent, rel=1e-6)
    assert st["cost_usd_failures"] == pytest.approx(spent, rel=1e-6)
    assert st["failed"] == N_IMAGES and st["failed_by_reason"] == {"refused": N_IMAGES}  # bills are not failures
    assert st["captioned"] == 0 and st["left"] == 0
    assert "failed 22" in res.out and "$0.0000" not in res.out


def test_folder_total_is_the_sum_of_every_paid_row_across_runs(cli, server, api_env, index, prompt_file, tmp_path):
    """Refusals that were retried and then captioned stay on the books; a second run adds, never doubles."""
    server.configure(p_refusal=0.4, p_empty=0.2, seed=3)
    out = tmp_path / "out"
    run(cli, server, index, out, prompt_file)
    errs = rows(out / "errors.csv")
    caps = {r["image_id"] for r in rows(out / "captions_all.csv")}
    assert any(not is_failure(r["reason"]) and r["image_id"] in caps for r in errs)  # a paid retry, then a caption
    assert folder_rows_cost(out) == pytest.approx(billed_by_server(server), rel=1e-6)
    assert manifest(out)["cost_usd_total"] == pytest.approx(billed_by_server(server), rel=1e-6)

    server.configure(p_refusal=0.0, p_empty=0.0)
    res = run(cli, server, index, out, prompt_file)
    assert res.code == 0, res.err
    assert len(rows(out / "captions_all.csv")) == N_IMAGES
    total = billed_by_server(server)  # both runs: the server's counters are cumulative
    assert folder_rows_cost(out) == pytest.approx(total, rel=1e-6)
    m = manifest(out)
    assert m["cost_usd_total"] == pytest.approx(total, rel=1e-6)
    assert m["cost_usd_before"] + m["cost_usd_this_run"] == pytest.approx(total, rel=1e-6)
    st = status(cli, out)
    assert st["cost_usd"] == pytest.approx(total, rel=1e-6)
    assert st["failed"] == 0 and st["captioned"] == N_IMAGES  # old failures are captioned since


def test_invalid_structured_answers_carry_their_cost(cli, server, api_env, index, tmp_path):
    server.configure(p_invalid_json=1.0)
    out = tmp_path / "out"
    res = run(cli, server, index, out, BUNDLED_PROMPTS_DIR / "attributes.json")
    assert res.code == 1, res.err
    errs = rows(out / "errors.csv")
    assert {r["reason"] for r in errs} == {"invalid", "invalid_retried"}
    assert all(float(r["cost_usd"]) > 0 for r in errs)
    assert folder_rows_cost(out) == pytest.approx(billed_by_server(server), rel=1e-6)
    assert manifest(out)["cost_usd_total"] == pytest.approx(billed_by_server(server), rel=1e-6)


def test_max_cost_counts_billed_failures(cli, server, api_env, index, prompt_file, tmp_path):
    """Refused answers are paid: a budget that only counted captions would never stop this run."""
    server.configure(p_refusal=1.0)
    out = tmp_path / "out"
    budget = 0.006  # 44 refusals cost about $0.019
    res = run(cli, server, index, out, prompt_file, "--max-cost", budget, "--concurrency", 2)
    assert res.code == 4, res.err
    m = manifest(out)
    assert m["state"] == "budget"
    assert 0 < m["cost_usd_total"] <= budget
    assert server.stats.requests < 2 * N_IMAGES
    assert folder_rows_cost(out) == pytest.approx(billed_by_server(server), rel=1e-6)
    # the same budget again: the folder's spent total (all of it billed failures) leaves nothing to send
    sent = server.stats.requests
    res = run(cli, server, index, out, prompt_file, "--max-cost", budget)
    assert res.code == 4, res.err
    assert server.stats.requests == sent
    assert manifest(out)["cost_usd_before"] == pytest.approx(billed_by_server(server), rel=1e-6)


def test_errors_csv_is_append_only_across_runs(cli, server, api_env, index, prompt_file, tmp_path):
    server.configure(p_refusal=1.0)
    out = tmp_path / "out"
    run(cli, server, index, out, prompt_file)
    first = (out / "errors.csv").read_bytes()
    first_ids = {r["run_id"] for r in rows(out / "errors.csv")}
    run(cli, server, index, out, prompt_file)
    assert (out / "errors.csv").read_bytes().startswith(first)  # earlier rows kept byte for byte
    errs = rows(out / "errors.csv")
    run_ids = {r["run_id"] for r in errs}
    assert len(first_ids) == 1 and len(run_ids) == 2 and first_ids < run_ids
    assert len(errs) == 4 * N_IMAGES
    st = status(cli, out)
    assert st["failed"] == N_IMAGES  # distinct items, not rows
    assert st["cost_usd"] == pytest.approx(billed_by_server(server), rel=1e-6)
    # once captioned, the old failures are history: kept in the file, no longer counted as failed
    server.configure(p_refusal=0.0)
    assert run(cli, server, index, out, prompt_file).code == 0
    assert len(rows(out / "errors.csv")) == 4 * N_IMAGES
    st = status(cli, out)
    assert st["failed"] == 0 and st["left"] == 0
    assert st["cost_usd"] == pytest.approx(billed_by_server(server), rel=1e-6)


# --- unknown prices -------------------------------------------------------------------------------------

@pytest.fixture
def ft_server(server):
    server.configure(models=(*DEFAULT_MODELS, FT))
    return server


def test_unpriced_model_with_a_budget_is_refused_before_any_request(cli, ft_server, api_env, index, prompt_file,
                                                                    tmp_path):
    out = tmp_path / "out"
    for extra in ((), ("--dry-run",)):
        res = run(cli, ft_server, index, out, prompt_file, "--model", FT, "--max-cost", 5, *extra)
        assert res.code == 2
        lines = [ln for ln in res.err.splitlines() if ln.strip()]
        assert lines == [f"error: model '{FT}' has no price in the bundled pricing.toml: give --price-in and "
                         f"--price-out to use --max-cost"]
    assert ft_server.stats.requests == 0
    assert not (out / "captions_all.csv").exists() and not (out / "manifest.json").exists()
    # with both prices given the budget can be kept
    res = run(cli, ft_server, index, out, prompt_file, "--model", FT, "--max-cost", 5, "--price-in", MINI_IN,
              "--price-out", MINI_OUT)
    assert res.code == 0, res.err
    assert "warning" not in res.err
    assert manifest(out)["cost_usd_total"] == pytest.approx(billed_by_server(ft_server), rel=1e-6)


def test_unpriced_model_without_a_budget_warns_and_every_view_says_unknown(cli, ft_server, api_env, index,
                                                                           prompt_file, tmp_path):
    out = tmp_path / "out"
    dry = run(cli, ft_server, index, out, prompt_file, "--model", FT, "--dry-run")
    assert dry.code == 0, dry.err
    assert "cost unknown" in dry.out and "$0.0000" not in dry.out
    ft_server.configure(p_refusal=0.3, seed=5)
    res = run(cli, ft_server, index, out, prompt_file, "--model", FT, "--progress-every", 0)
    warnings = [ln for ln in res.err.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: price of model '{FT}' unknown: costs are shown as unknown; "
                        f"give --price-in/--price-out"]
    caps, errs = rows(out / "captions_all.csv"), rows(out / "errors.csv")
    assert caps and errs
    assert {r["cost_usd"] for r in caps} == {""} and {r["cost_usd"] for r in errs} == {""}
    assert all(int(r["prompt_tokens"]) > 0 for r in caps + errs)  # the tokens are on the books all the same
    assert "cost unknown" in res.out and "$0.0000" not in res.out
    m = manifest(out)
    assert m["price_known"] is False
    assert m["cost_usd_this_run"] is None and m["cost_usd_total"] is None
    assert m["cost_unknown_rows"] == len(caps) + len(errs)
    st = status(cli, out)
    assert st["cost_usd"] is None and st["cost_unknown_rows"] == len(caps) + len(errs)
    table = cli("status", "--out", out)
    assert "cost unknown" in table.out and "$0.0000" not in table.out

    # the rest at a known price: the folder's total is a lower bound, and says so
    ft_server.configure(p_refusal=0.0)
    res = run(cli, ft_server, index, out, prompt_file, "--model", FT, "--price-in", MINI_IN, "--price-out",
              MINI_OUT)
    assert res.code == 0, res.err
    assert "warning" not in res.err
    known = cost_sum(out / "captions_all.csv")
    assert known > 0
    m = manifest(out)
    assert m["price_known"] is True and m["cost_usd_this_run"] == pytest.approx(known, rel=1e-6)
    assert m["cost_usd_total"] is None and m["cost_usd_total_at_least"] == pytest.approx(known, rel=1e-6)
    table = cli("status", "--out", out)
    assert "at least $" in table.out and "some unknown" in table.out


def test_offline_backend_is_free_and_known(cli, index, prompt_file, tmp_path):
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--backend", "offline",
              "--no-dashboard", "--max-cost", 1)
    assert res.code == 0, res.err
    assert "warning" not in res.err and "cost $0.0000" in res.out
    m = manifest(out)
    assert m["price_known"] is True and m["cost_usd_total"] == 0.0


# --- the pure parts -------------------------------------------------------------------------------------

def test_spent_and_its_words() -> None:
    assert fmt_spent(Spent(0.0412)) == "$0.0412"
    assert fmt_spent(Spent(0.0, 3)) == "cost unknown"
    assert fmt_spent(Spent(0.0412, 3)) == "at least $0.0412 (some unknown)"
    assert (Spent(1.0, 1) + Spent(0.5)).json_value() is None
    assert (Spent(1.0) + Spent(0.5)).json_value() == 1.5
    # an empty cell is unknown only if tokens were billed: old files and unbilled failures cost 0
    assert row_spent({"cost_usd": "", "prompt_tokens": "10", "completion_tokens": "0"}) == Spent(0.0, 1)
    assert row_spent({"cost_usd": "", "prompt_tokens": "0", "completion_tokens": "0"}) == Spent()
    assert row_spent({"image_id": "a.jpg"}) == Spent()
    assert row_spent({"cost_usd": "0.25000000", "prompt_tokens": "10"}) == Spent(0.25)


def test_open_failures_are_items_not_captioned_since_and_never_bills() -> None:
    def err(image: str, reason: str) -> ErrorRow:
        return ErrorRow(image, reason, "", 1, "")

    errors = [err("a", "refused_retried"), err("a", "refused"), err("b", "timeout"), err("b", "empty"),
              err("c", "refused_retried"), err("d", "timeout")]
    done = {("d", "base", 0)}
    assert open_failures(errors, done) == {("a", "base", 0): "refused", ("b", "base", 0): "empty"}


def test_manifest_cost_fields() -> None:
    assert cost_fields(Spent(1.0), Spent(0.5), True) == {
        "price_known": True, "cost_usd_before": 1.0, "cost_usd_this_run": 0.5, "cost_usd_total": 1.5}
    unknown = cost_fields(Spent(1.0), Spent(0.0, 4), False, 4)
    assert unknown["cost_usd_this_run"] is None and unknown["cost_usd_total"] is None
    assert unknown["cost_usd_before"] == 1.0 and unknown["cost_usd_total_at_least"] == 1.0
    assert unknown["cost_unknown_rows"] == 4 and unknown["price_known"] is False


def test_views_never_show_a_false_zero_at_an_unknown_price() -> None:
    from pipeline.review.dashboard import progress_line, render_summary, summary_line
    from pipeline.run.stats import RunStats

    from test_dashboard import draw

    stats = RunStats(total=10, price_known=False)
    assert "cost unknown" in progress_line(stats.snapshot())  # before the first answer too
    stats.usage(2_900, 20, None)
    stats.captioned("a.jpg", "a caption", 0.5)
    snap = stats.snapshot()
    assert snap.projected_cost_usd is None
    for text in (progress_line(snap), summary_line(snap), draw(render_summary(snap, Path("out")))):
        assert "unknown" in text and "$0.0000" not in text
    # earlier runs at a known price, this one unknown: the folder's total is a lower bound
    stats = RunStats(total=10, price_known=False, cost_before_usd=0.25)
    stats.usage(2_900, 20, None)
    assert "folder at least $0.2500 (some unknown)" in progress_line(stats.snapshot())
    # a billed failure counts like any answer
    known = RunStats(total=10)
    known.usage(2_900, 20, 0.0004)
    known.failed("refused")
    assert "$0.0004" in summary_line(known.snapshot())
