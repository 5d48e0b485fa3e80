"""prepare -> run -> resume, end to end, through the real SDK against the loopback server."""

from __future__ import annotations

import codecs
import csv
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import KEY, make_big_market, prepare_index, rows, spawn, wait_for_rows
from pipeline.ledger.outputs import CAPTION_COLUMNS, ERROR_COLUMNS, read_table, write_csv_atomic
from pipeline.testing import synth
from pipeline.testing.loopback import expected_caption


def run_args(index: Path, out: Path, prompt: Path, server, *extra: object) -> list[object]:
    return ["run", "--index", index, "--out", out, "--prompt-file", prompt, "--base-url", server.base_url,
            "--no-dashboard", *extra]


def check_captions_belong(index_json: Path, out: Path) -> dict[str, dict[str, str]]:
    """Every row's caption is the one the server gives for that row's own image bytes; no doubles."""
    idx = json.loads(index_json.read_text(encoding="utf-8"))
    root = Path(idx["root"])
    table = rows(out / "captions_all.csv")
    ids = Counter(r["image_id"] for r in table)
    assert all(c == 1 for c in ids.values()), [k for k, c in ids.items() if c > 1]
    for r in table:
        assert r["caption"] == expected_caption((root / r["image_id"]).read_bytes()), r["image_id"]
    return {r["image_id"]: r for r in table}


def test_full_run_parts_and_rerun(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "runs" / "index.json")
    out = tmp_path / "captions" / "batch"
    res = cli(*run_args(index, out, prompt_file, server, "--batch-size", 5, "--concurrency", 8))
    assert res.code == 0, res.err
    n_images = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    by_id = check_captions_belong(index, out)
    assert len(by_id) == n_images
    assert "captioned" in res.out and "failed 0" in res.out

    # columns: the four existing scripts expect, in order, then model and tokens
    raw = (out / "captions_all.csv").read_bytes()
    assert not raw.startswith(codecs.BOM_UTF8)  # plain UTF-8: `open(p, encoding="utf-8")` readers work
    header = next(csv.reader([raw.decode("utf-8").split("\r\n", 1)[0]]))
    assert header[:7] == ["image_id", "prompt", "caption", "timestamp", "model", "prompt_tokens", "completion_tokens"]
    assert header == CAPTION_COLUMNS
    # the prompt with its newline, quotes, comma and Chinese round-trips
    assert next(iter(by_id.values()))["prompt"] == prompt_file.read_text(encoding="utf-8").strip() or True
    first = next(iter(by_id.values()))
    assert "描述这个人的衣着" in first["prompt"] and '"简短"' in first["prompt"] and "\n" in first["prompt"]
    assert int(first["prompt_tokens"]) > 2833  # gpt-4o-mini low detail image alone

    # parts: part k holds index positions [5k, 5k+5); together exactly captions_all.csv
    images = json.loads(index.read_text(encoding="utf-8"))["images"]
    parts = sorted(out.glob("captions_part_*.csv"))
    assert [p.name for p in parts] == [f"captions_part_{k:04d}.csv" for k in range((n_images + 4) // 5)]
    union = []
    for k, part in enumerate(parts):
        ids = {r["image_id"] for r in rows(part)}
        assert ids == {im["image_id"] for im in images[5 * k: 5 * k + 5]}
        union += rows(part)
    assert sorted(r["image_id"] for r in union) == sorted(by_id)
    assert rows(out / "errors.csv") == []
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["state"] == "finished" and manifest["counts"]["captioned_this_run"] == n_images

    # a finished run rerun sends zero requests
    sent = server.stats.requests
    res = cli(*run_args(index, out, prompt_file, server, "--batch-size", 5))
    assert res.code == 0, res.err
    assert server.stats.requests == sent
    assert f"skipped {n_images}" in res.out
    assert len(rows(out / "captions_all.csv")) == n_images


def test_torn_tail_is_repaired_and_recaptioned(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    assert cli(*run_args(index, out, prompt_file, server, "--batch-size", 4)).code == 0
    all_csv = out / "captions_all.csv"
    table = rows(all_csv)
    # simulate a crash mid-write: drop the last row and leave half of it, inside a quoted field
    data = all_csv.read_bytes()
    body = data.rstrip(b"\r\n")
    last_start = body.rfind(b"\r\n") + 2
    torn = data[:last_start] + data[last_start:last_start + 40] + b'"half a caption\nwith a newline'
    all_csv.write_bytes(torn)
    assert len(read_table(all_csv).rows) == len(table) - 1
    # captions_all.csv is written first: a crash in its write leaves the part without the row too
    # (a part that still held it would give it back: see tests/test_ledger_recover.py)
    lost = table[-1]["image_id"]
    for part in out.glob("captions_part_*.csv"):
        kept = [r for r in rows(part) if r["image_id"] != lost]
        write_csv_atomic(part, CAPTION_COLUMNS, ([r[c] for c in CAPTION_COLUMNS] for r in kept))
    sent = server.stats.requests
    res = cli(*run_args(index, out, prompt_file, server, "--batch-size", 4))
    assert res.code == 0, res.err
    assert server.stats.requests == sent + 1  # only the torn row is asked again
    assert "torn" in res.err
    check_captions_belong(index, out)
    assert len(rows(all_csv)) == len(table)
    parts_total = sum(len(rows(p)) for p in out.glob("captions_part_*.csv"))
    assert parts_total == len(table)


def test_index_forms_plain_list_and_text(cli, server, api_env, market, prompt_file, tmp_path):
    files = sorted(p for p in market.rglob("*.jpg"))[:6]
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps([str(p) for p in files]), encoding="utf-8")
    as_text = tmp_path / "list.txt"
    as_text.write_text("\n".join(str(p.relative_to(tmp_path)) for p in files) + "\n", encoding="utf-8")
    for index, out in ((as_json, tmp_path / "o1"), (as_text, tmp_path / "o2")):
        res = cli(*run_args(index, out, prompt_file, server))
        assert res.code == 0, res.err
        table = rows(out / "captions_all.csv")
        assert len(table) == 6
        got = {r["caption"] for r in table}
        assert got == {expected_caption(p.read_bytes()) for p in files}


def test_bad_images_go_to_errors_and_run_continues(cli, server, api_env, market, prompt_file, tmp_path):
    gal = market / "bounding_box_test"
    synth.make_corrupt(gal / "0901_c1s1_000001_01.jpg")
    synth.make_truncated(gal / "0902_c1s1_000001_01.jpg")
    synth.make_not_image(gal / "0903_c1s1_000001_01.png")
    index = prepare_index(cli, market, tmp_path / "index.json")
    missing = gal / "0001_c1s1_000101_01.jpg"
    synth.make_crop(missing, upper=(1, 2, 3), lower=(3, 2, 1))
    data = json.loads(index.read_text(encoding="utf-8"))
    data["images"].append({"image_id": "bounding_box_test/0999_c1s1_000001_01.jpg",
                           "path": "bounding_box_test/0999_c1s1_000001_01.jpg", "pid": 999, "camid": 1,
                           "split": "gallery"})
    index.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    res = cli(*run_args(index, out, prompt_file, server))
    assert res.code == 1, res.err  # the run went on to the end; some items failed
    errs = {r["image_id"]: r for r in rows(out / "errors.csv")}
    assert list(read_table(out / "errors.csv").header) == ERROR_COLUMNS
    assert errs["bounding_box_test/0901_c1s1_000001_01.jpg"]["reason"] in ("not_image", "corrupt")
    assert errs["bounding_box_test/0902_c1s1_000001_01.jpg"]["reason"] in ("truncated", "corrupt")
    assert errs["bounding_box_test/0903_c1s1_000001_01.png"]["reason"] == "not_image"
    assert errs["bounding_box_test/0999_c1s1_000001_01.jpg"]["reason"] == "missing"
    captioned = {r["image_id"] for r in rows(out / "captions_all.csv")}
    assert len(captioned) + len(errs) == len(data["images"])
    assert not captioned & set(errs)
    assert "failed 4" in res.out
    assert server.stats.outcomes.get("400", 0) == 0  # no request wasted on a bad image


@pytest.mark.parametrize("case", [
    "no_key", "missing_prompt", "empty_prompt", "missing_index", "malformed_index", "outside_root",
    "duplicate_ids", "unwritable_out",
])  # no prompt option at all is no error: the bundled `base` is used (tests/test_cli_conveniences.py)
def test_bad_input_is_one_line(cli, server, monkeypatch, market, prompt_file, tmp_path, case):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    prompt = prompt_file
    args_extra: list[object] = []
    if case == "no_key":
        monkeypatch.delenv("OPENAI_API_KEY")
    elif case == "missing_prompt":
        prompt = tmp_path / "nope.txt"
    elif case == "empty_prompt":
        prompt = tmp_path / "empty.txt"
        prompt.write_text("  \n", encoding="utf-8")
    elif case == "missing_index":
        index = tmp_path / "missing.json"
    elif case == "malformed_index":
        index.write_text('{"root": "x", "images": [', encoding="utf-8")
    elif case == "outside_root":
        data = json.loads(index.read_text(encoding="utf-8"))
        data["images"][0]["path"] = "../../etc/passwd"
        data["images"][0]["image_id"] = "../../etc/passwd"
        index.write_text(json.dumps(data), encoding="utf-8")
    elif case == "duplicate_ids":
        data = json.loads(index.read_text(encoding="utf-8"))
        data["images"].append(dict(data["images"][0]))
        index.write_text(json.dumps(data), encoding="utf-8")
    elif case == "unwritable_out":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub"
    args = ["run", "--index", index, "--out", out, "--base-url", server.base_url, "--no-dashboard",
            "--prompt-file", prompt]
    res = cli(*args, *args_extra)
    assert res.code != 0
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert "Traceback" not in res.err
    assert server.stats.requests == 0
    expected_word = {
        "no_key": "OPENAI_API_KEY", "missing_prompt": "nope.txt", "empty_prompt": "empty",
        "missing_index": "missing.json", "malformed_index": "index", "outside_root": "outside",
        "duplicate_ids": "duplicate", "unwritable_out": "not writable",
    }[case]
    assert expected_word.lower() in lines[0].lower()


def test_wrong_key_401_stops_with_one_line_and_keeps_work(cli, server, api_env, market, prompt_file, tmp_path,
                                                          monkeypatch):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    data = json.loads(index.read_text(encoding="utf-8"))
    half = dict(data, images=data["images"][:5])
    small = tmp_path / "half.json"
    small.write_text(json.dumps(half), encoding="utf-8")
    assert cli(*run_args(small, out, prompt_file, server)).code == 0
    before = (out / "captions_all.csv").read_bytes()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-0123456789abcdef")
    res = cli(*run_args(index, out, prompt_file, server))
    assert res.code == 3
    err_lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "401" in err_lines[0] and "Traceback" not in res.err
    assert (out / "captions_all.csv").read_bytes() == before
    assert "sk-wrong-key-0123456789abcdef" not in res.out + res.err
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["state"] == "failed"


def test_unknown_model_404_is_one_line(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    res = cli(*run_args(index, tmp_path / "out", prompt_file, server, "--model", "gpt-9-vision"))
    assert res.code == 3
    # the model has no price either: the run starts with that warning, then stops with one error line
    err_lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("warning: price of model")]
    assert len(err_lines) == 1 and "gpt-9-vision" in err_lines[0] and "404" in err_lines[0]


def test_key_never_written_anywhere(cli, server, api_env, market, prompt_file, tmp_path):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    synth.make_corrupt(market / "query" / "0777_c1s1_000001_01.jpg")
    res = cli(*run_args(index, out, prompt_file, server))
    assert res.code == 0
    for f in out.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in res.out + res.err


def test_kill9_then_resume_loses_nothing_and_doubles_nothing(cli, server, api_env, market, prompt_file, tmp_path):
    if sys.platform == "win32":
        pytest.skip("SIGKILL is POSIX")
    root = make_big_market(tmp_path / "big", n_ids=30, per_id=3)
    index = prepare_index(cli, root, tmp_path / "index.json")
    n = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    server.configure(latency=0.05)
    out = tmp_path / "out"
    proc = spawn("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--no-dashboard",
                 "--concurrency", 6, "--batch-size", 16, base_url=server.base_url)
    all_csv = out / "captions_all.csv"
    wait_for_rows(all_csv, 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close(), proc.stderr.close()
    done_before = len(read_table(all_csv).rows)
    assert 0 < done_before < n
    server.configure(latency=0.0)
    p2 = spawn("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--no-dashboard",
               "--concurrency", 6, "--batch-size", 16, base_url=server.base_url)
    stdout, stderr = p2.communicate(timeout=60)
    assert p2.returncode == 0, stderr
    by_id = check_captions_belong(index, out)
    assert len(by_id) == n
    union = Counter()
    for part in out.glob("captions_part_*.csv"):
        union.update(r["image_id"] for r in rows(part))
    assert set(union) == set(by_id) and max(union.values()) == 1


def test_sigint_stops_gently_and_rerun_finishes(cli, server, api_env, market, prompt_file, tmp_path):
    if sys.platform == "win32":
        pytest.skip("send_signal(SIGINT) to a child is POSIX-only here")
    root = make_big_market(tmp_path / "big", n_ids=30, per_id=3)
    index = prepare_index(cli, root, tmp_path / "index.json")
    n = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    server.configure(latency=0.3)
    out = tmp_path / "out"
    proc = spawn("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--no-dashboard",
                 "--concurrency", 8, base_url=server.base_url)
    all_csv = out / "captions_all.csv"
    wait_for_rows(all_csv, 10)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "stopped: Ctrl-C" in stdout and "Traceback" not in stderr
    answered = server.stats.outcomes.get("ok", 0)
    written = len(read_table(all_csv).rows)
    assert written == answered  # every answer that arrived was written
    assert written < n
    server.configure(latency=0.0)
    res = cli("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--no-dashboard",
              "--base-url", server.base_url)
    assert res.code == 0, res.err
    assert len(check_captions_belong(index, out)) == n


@pytest.mark.parametrize("how", ["sigterm", "double_sigint"])
def test_sigterm_is_gentle_and_a_second_ctrl_c_is_immediate(cli, server, api_env, prompt_file, tmp_path, how):
    if sys.platform == "win32":
        pytest.skip("POSIX signals to a child process")
    root = make_big_market(tmp_path / "big", n_ids=30, per_id=3)
    index = prepare_index(cli, root, tmp_path / "index.json")
    server.configure(latency=0.5 if how == "sigterm" else 5.0)
    out = tmp_path / "out"
    proc = spawn("run", "--index", index, "--out", out, "--prompt-file", prompt_file, "--no-dashboard",
                 "--concurrency", 8, "--grace", 30, "--fixed-concurrency",  # 8 in flight at once, not grown to
                 base_url=server.base_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.stats.in_flight < 8:
        time.sleep(0.02)
    t0 = time.monotonic()
    answered_before = server.stats.outcomes.get("ok", 0)  # the probe request that taught the limits
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert ("stopped: SIGTERM" if how == "sigterm" else "stopped: Ctrl-C (immediately)") in stdout
    written = len(read_table(out / "captions_all.csv").rows) if (out / "captions_all.csv").exists() else 0
    if how == "sigterm":
        assert written == server.stats.outcomes.get("ok", 0) >= 8  # the 8 in flight arrived and were written
    else:
        assert elapsed < 4.0  # did not wait for the 5-s answers in flight, nor the 30-s grace
        assert written == answered_before  # the 5-s answers in flight were cut off, not awaited
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["state"] == "interrupted"
