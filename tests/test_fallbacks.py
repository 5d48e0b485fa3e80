"""Fallbacks that keep the promise (issue 11): `n` rejected or ignored, `response_format` ignored or rejected,
a malformed answer repaired once, a wrong model stopping the run, answers with no letters or digits.

Pure tables for each decision; then the CLI through the real SDK against the loopback server in the mode of
each server quirk (llama-server's 400 for n > 1, transformers serve ignoring response_format and answering a
wrong model with 400 {"detail": ...}).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import prepare_index, rows
from pipeline.data.prompts import BUNDLED_PROMPTS_DIR, load_prompts
from pipeline.export import usable_caption
from pipeline.providers.base import ErrorKind, ImagePayload, ModelRequest
from pipeline.providers.classify import names_model, wrong_model
from pipeline.providers.openai import build_messages, build_request, judge_choice
from pipeline.providers.refusals import clean_text, is_empty
from pipeline.run.fallbacks import (
    FallbackState,
    FormatMode,
    apply_format,
    format_after_answer,
    format_after_invalid,
    n_after_answer,
    on_bad_request,
    repair_turns,
    request_format,
)
from pipeline.testing.loopback import JUNK_ANSWERS, expected_caption

ATTRIBUTES = BUNDLED_PROMPTS_DIR / "attributes.json"
N_LINE = "asking for each caption separately (each pays for the image again)"


# --- pure decisions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, empty", [
    (None, True), ("", True), ("   \n\t", True), ("…", True), ("\x00", True), ("\ufffd", True), ("\u200b", True),
    (" . \u200b …", True), ("\u200b\u200d\ufeff", True), ("?!", True), ("👍", True), ("\x1b[0m", False),  # "0m": a digit
    ("a", False), ("7", False), ("人", False), ("红色上衣", False), ("A person.", False), ("…a…", False),
])
def test_is_empty_means_no_letter_and_no_digit(text, empty):
    assert is_empty(text) is empty


def test_every_loopback_junk_answer_is_empty_once_cleaned():
    for junk in JUNK_ANSWERS:
        assert is_empty(clean_text(junk)), repr(junk)
        assert not usable_caption(junk), repr(junk)


@pytest.mark.parametrize("raw, stored", [
    ("A person\x00\x1b\x07 in red.\x7f", "A person in red."),
    ("line one\r\nline two\rthree", "line one\nline two\nthree"),
    ("tab\tseparated", "tab separated"),
    ("C1\x85 control\x9f", "C1 control"),
    ("lone \ud800surrogate", "lone surrogate"),
    ("keeps\u200djoiners and 中文", "keeps\u200djoiners and 中文"),
])
def test_clean_text_strips_control_characters_keeps_newlines(raw, stored):
    assert clean_text(raw) == stored


@pytest.mark.parametrize("content, kind, text", [
    ("A person\x00 in red.", None, "A person in red."),
    ("\x00", ErrorKind.EMPTY, None),
    ("…", ErrorKind.EMPTY, None),
    ("\u200b", ErrorKind.EMPTY, None),
    ("", ErrorKind.EMPTY, None),
    (None, ErrorKind.EMPTY, None),
])
def test_judge_choice_junk_is_empty_and_text_is_cleaned(content, kind, text):
    got_kind, got = judge_choice(content, None, "stop")
    assert got_kind is kind
    if kind is None:
        assert got == text
    else:
        assert "\x00" not in got and "\u200b" not in got  # the reason is printable


def test_usable_caption_refuses_junk():
    for junk in ("…", "\x00", "\ufffd", "\u200b", "\u200b…\u200b"):
        assert not usable_caption(junk)
    assert usable_caption("A person in a red coat.")


@pytest.mark.parametrize("message, model, named", [
    ("Model 'qwen-vl' not found", "qwen-vl", True),
    ("Failed to load model nosuch-vlm: it is neither a local folder", "nosuch-vlm", True),
    ("model `LLaVA:7b` is not loaded", "llava:7b", True),
    ("use qwen-vl.", "qwen-vl", True),
    ("qwen-vl-plus is not available", "qwen-vl", False),  # another, longer name
    ("see qwen-vl.5", "qwen-vl", False),
    ("Invalid image", "gpt-4o-mini", False),
    ("xx is bad", "xx", False),  # too short to tell
])
def test_names_model(message, model, named):
    assert names_model(message, model) is named


@pytest.mark.parametrize("status, message, model, wrong", [
    (400, "Failed to load model nosuch-vlm", "nosuch-vlm", True),
    (422, "model nosuch-vlm does not exist", "nosuch-vlm", True),
    (400, "Invalid image", "nosuch-vlm", False),
    (400, "response_format json_schema is not supported by nosuch-vlm", "nosuch-vlm", False),  # a fallback's
    (400, "Only one completion choice is allowed for nosuch-vlm", "nosuch-vlm", False),
    (500, "nosuch-vlm crashed", "nosuch-vlm", False),
    (400, "Failed to load model nosuch-vlm", None, False),
])
def test_wrong_model_rule(status, message, model, wrong):
    assert wrong_model(status, message, model) is wrong


@pytest.mark.parametrize("before, n_sent, choices, probe, verdict, says", [
    (None, 2, 2, False, "honoured", False),
    (None, 2, 1, False, "ignored", True),
    ("honoured", 3, 1, False, "ignored", True),
    (None, 1, 1, True, "rejected", True),  # the n = 1 retry of a 400 to n = 2 was answered
    (None, 1, 1, False, None, False),
    ("ignored", 2, 1, False, None, False),  # said once: a verdict against n is final
    ("rejected", 1, 1, True, None, False),
])
def test_n_verdicts(before, n_sent, choices, probe, verdict, says):
    state = FallbackState(n_support=before)
    got, line = n_after_answer(state, n_sent, choices, probe=probe)
    assert got == verdict
    assert (line is not None) is says
    if line:
        assert N_LINE in line


S, O, P = FormatMode.JSON_SCHEMA, FormatMode.JSON_OBJECT, FormatMode.PROMPT


@pytest.mark.parametrize("n_support, run_mode, n_sent, mode_sent, code, action, probe, mode", [
    (None, S, 2, None, None, "retry", "n", None),  # a 400 to n = 2: the first slot alone, n = 1
    ("honoured", S, 2, None, None, "retry", "n", None),
    ("rejected", S, 2, None, None, "retry", "", None),  # sent before the verdict: split, no probe
    (None, S, 1, None, None, "give_up", "", None),  # a text prompt, n = 1: the image's own 400
    (None, S, 1, S, None, "retry", "format", O),  # json_schema rejected? try json_object
    (None, S, 1, O, None, "retry", "format", P),  # json_object rejected too? the schema in the prompt
    (None, S, 1, P, None, "give_up", "", None),  # nothing left to drop: the image's
    (None, O, 1, S, None, "retry", "", O),  # sent before the run switched: again in the run's mode
    (None, P, 1, S, None, "retry", "", P),
    (None, S, 2, None, "invalid_image", "give_up", "", None),  # the code names the image
    (None, S, 1, S, "image_parse_error", "give_up", "", None),
])
def test_bad_request_decisions(n_support, run_mode, n_sent, mode_sent, code, action, probe, mode):
    got = on_bad_request(FallbackState(n_support=n_support, mode=run_mode), n_sent, mode_sent, code)
    assert (got.action, got.probe, got.mode) == (action, probe, mode)


@pytest.mark.parametrize("run_mode, sent, reason, new", [
    (S, S, "invalid_json", O),  # not JSON at all under strict json_schema: ignored
    (S, S, "schema_mismatch", None),  # JSON, wrong fields: a repair request, no switch
    (O, O, "invalid_json", P),
    (P, P, "invalid_json", None),
    (O, S, "invalid_json", None),  # sent before the switch: nothing new
])
def test_format_after_invalid(run_mode, sent, reason, new):
    got, line = format_after_invalid(FallbackState(mode=run_mode), sent, reason)
    assert got is new
    assert (line is not None) is (new is not None)
    if line:
        assert "ignores response_format" in line


@pytest.mark.parametrize("run_mode, sent, new", [(S, S, None), (S, O, O), (S, P, P), (O, P, P), (O, S, None), (P, O, None)])
def test_format_after_answer(run_mode, sent, new):
    got, line = format_after_answer(FallbackState(mode=run_mode), sent)
    assert got is new
    if new is not None:
        assert "rejects response_format" in line


def test_apply_format_records_each_mode_left():
    state = FallbackState()
    apply_format(state, P, "rejected")
    assert (state.mode, state.json_schema, state.json_object) == (P, "rejected", "rejected")
    state = FallbackState()
    apply_format(state, O, "ignored")
    assert (state.mode, state.json_schema, state.json_object) == (O, "ignored", None)


def test_say_once():
    state, said = FallbackState(), []
    assert state.say_once("n", "line", said.append)
    assert not state.say_once("n", "line again", said.append)
    assert said == ["line"] and state.lines == ["line"]


def test_request_format_per_mode():
    prompt = load_prompts([ATTRIBUTES])[0]
    text, rf = request_format(prompt, prompt.text, S)
    assert text == prompt.text and rf["type"] == "json_schema"
    text, rf = request_format(prompt, prompt.text, O)
    assert rf == {"type": "json_object"} and text.startswith(prompt.text) and "JSON" in text
    assert '"upper_color"' in text and "market1501_attributes" not in text
    text2, rf = request_format(prompt, prompt.text, P)
    assert rf is None and text2 == text


def test_repair_request_messages():
    image = ImagePayload("data:image/png;base64,AAAA", "image/png", 1, 1, 3)
    turns = repair_turns('{"gender": "x"', "invalid_json: Expecting ',' delimiter")
    req = ModelRequest("a.jpg", "Fill in.", image, "gpt-4o-mini", follow_up=turns)
    msgs = build_messages(req)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == '{"gender": "x"'
    assert "invalid_json: Expecting ',' delimiter" in msgs[2]["content"] and "corrected JSON" in msgs[2]["content"]
    assert build_request(req)["messages"] == msgs


# --- through the CLI against the loopback server -----------------------------------------------------------

def run(cli, server, index: Path, out: Path, *extra: object):
    return cli("run", "--index", index, "--out", out, "--base-url", server.base_url, "--no-dashboard", *extra)


@pytest.fixture
def index(cli, market, tmp_path):
    return prepare_index(cli, market, tmp_path / "index.json")


def n_images(index: Path) -> int:
    return len(json.loads(index.read_text(encoding="utf-8"))["images"])


def failures(out: Path) -> list[dict]:
    return [r for r in rows(out / "errors.csv") if not r["reason"].endswith("_retried")] \
        if (out / "errors.csv").exists() else []


def slots(out: Path) -> set[tuple[str, str]]:
    return {(r["image_id"], r["caption_index"]) for r in rows(out / "captions_all.csv")}


def test_n_rejected_one_request_per_caption(cli, server, api_env, index, prompt_file, tmp_path):
    server.configure(reject_n=True)
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", prompt_file, "--captions-per-image", 2, "--concurrency", 1)
    assert res.code == 0, res.err
    n = n_images(index)
    assert len(slots(out)) == 2 * n and len(rows(out / "captions_all.csv")) == 2 * n
    assert res.err.count(N_LINE) == 1 and "the server rejects n" in res.err
    # a 400 to the first n = 2 (and to the one the dispatcher had in hand), then one request per caption
    assert 1 <= server.stats.outcomes["400"] <= 2
    assert server.stats.requests == 2 * n + server.stats.outcomes["400"]
    assert failures(out) == []


def test_n_rejected_with_requests_in_flight(cli, server, api_env, index, prompt_file, tmp_path):
    server.configure(reject_n=True, latency=0.01)
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", prompt_file, "--captions-per-image", 3, "--concurrency", 8)
    assert res.code == 0, res.err
    n = n_images(index)
    assert len(slots(out)) == 3 * n
    assert res.err.count(N_LINE) == 1
    assert server.stats.requests == 3 * n + server.stats.outcomes["400"]  # every 400 costs one request more


def test_n_ignored_said_once(cli, server, api_env, index, prompt_file, tmp_path):
    server.configure(honour_n=False)
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", prompt_file, "--captions-per-image", 2)
    assert res.code == 0, res.err
    assert len(slots(out)) == 2 * n_images(index)
    assert res.err.count(N_LINE) == 1 and "the server ignores n" in res.err


def test_n_honoured_says_nothing(cli, server, api_env, index, prompt_file, tmp_path):
    res = run(cli, server, index, tmp_path / "out", "--prompt-file", prompt_file, "--captions-per-image", 2)
    assert res.code == 0, res.err
    assert N_LINE not in res.err and server.stats.requests == n_images(index)


def check_attributes(index: Path, out: Path) -> None:
    attrs = rows(out / "attributes.csv")
    assert len(attrs) == n_images(index) and len({r["image_id"] for r in attrs}) == len(attrs)
    assert all(r["hat"] in ("yes", "no") and r["gender"] in ("male", "female") for r in attrs)
    assert failures(out) == []


def test_json_schema_ignored_falls_back_to_json_object_with_schema_in_prompt(cli, server, api_env, index, tmp_path):
    server.configure(response_format_mode="ignore")
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", ATTRIBUTES, "--concurrency", 2)
    assert res.code == 0, res.err
    check_attributes(index, out)
    assert res.err.count("the server ignores response_format json_schema") == 1
    # the answers in json_schema mode before the switch were free text: each got its repair request
    retried = [r for r in rows(out / "errors.csv") if r["reason"] == "invalid_retried"]
    assert 1 <= len(retried) <= 2
    assert server.stats.requests == n_images(index) + len(retried)


def test_json_schema_rejected_falls_back_to_json_object(cli, server, api_env, index, tmp_path):
    server.configure(response_format_mode="reject_schema")
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", ATTRIBUTES, "--concurrency", 1)
    assert res.code == 0, res.err
    check_attributes(index, out)
    assert res.err.count("the server rejects response_format json_schema") == 1
    assert 1 <= server.stats.outcomes["400"] <= 2  # the first request, and the one the dispatcher had in hand
    assert server.stats.requests == n_images(index) + server.stats.outcomes["400"]


def test_response_format_rejected_falls_back_to_schema_in_prompt(cli, server, api_env, index, tmp_path):
    server.configure(response_format_mode="reject")
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", ATTRIBUTES, "--concurrency", 1)
    assert res.code == 0, res.err
    check_attributes(index, out)
    assert res.err.count("the server rejects response_format: the schema is written into the prompt") == 1
    assert 2 <= server.stats.outcomes["400"] <= 4  # json_schema then json_object, for one or two requests
    assert server.stats.requests == n_images(index) + server.stats.outcomes["400"]


def test_malformed_answer_gets_one_repair_request(cli, server, api_env, index, tmp_path):
    server.configure(p_invalid_json=1.0, repairable=True)  # every first answer malformed, every repair right
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", ATTRIBUTES)
    assert res.code == 0, res.err
    check_attributes(index, out)
    n = n_images(index)
    assert server.stats.requests == 2 * n
    retried = rows(out / "errors.csv")
    assert len(retried) == n and {r["reason"] for r in retried} == {"invalid_retried"}
    assert all(float(r["cost_usd"]) > 0 for r in retried)  # the malformed answers were paid for


def test_malformed_repair_fails_once_then_errors_csv(cli, server, api_env, index, tmp_path):
    server.configure(p_invalid_json=1.0)  # the repair is malformed too
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", ATTRIBUTES, "--max-attempts", 6)
    assert res.code == 1
    n = n_images(index)
    assert server.stats.requests == 2 * n  # one repair each, never more
    assert len(failures(out)) == n and {r["reason"] for r in failures(out)} == {"invalid"}


def test_wrong_model_400_detail_stops_with_the_servers_words(cli, server, api_env, index, prompt_file, tmp_path):
    server.configure(unknown_model="400_detail")
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", prompt_file, "--model", "nosuch-vlm", "--concurrency", 1,
              "--price-in", 0, "--price-out", 0)
    assert res.code == 3, res.err
    lines = [line for line in res.err.splitlines() if "Failed to load model nosuch-vlm" in line]
    assert len(lines) == 1 and "nosuch-vlm" in lines[0] and "Traceback" not in res.err
    assert server.stats.requests == 1  # stopped after the first answer
    assert failures(out) == []


def test_wrong_model_404_stops_with_the_servers_words(cli, server, api_env, index, prompt_file, tmp_path):
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", prompt_file, "--model", "nosuch-vlm", "--concurrency", 1,
              "--price-in", 0, "--price-out", 0)
    assert res.code == 3, res.err
    assert "does not exist" in res.err and "nosuch-vlm" in res.err
    assert server.stats.requests == 1


def test_junk_captions_are_empty_never_stored_never_exported(cli, server, api_env, index, prompt_file, tmp_path):
    server.configure(p_junk=1.0)
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", prompt_file)
    assert res.code == 1
    n = n_images(index)
    assert not (out / "captions_all.csv").exists() or rows(out / "captions_all.csv") == []
    errs = failures(out)
    assert len(errs) == n and {r["reason"] for r in errs} == {"empty"}
    assert all("no letters or digits" in r["detail"] and "\x00" not in r["detail"] for r in errs)


def test_export_skips_junk_rows_of_an_older_run(cli, server, api_env, index, prompt_file, tmp_path):
    out = tmp_path / "out"
    assert run(cli, server, index, out, "--prompt-file", prompt_file).code == 0
    table = (out / "captions_all.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    # an older run stored junk: rewrite two rows' captions by hand (same CSV quoting, no commas inside)
    first, second = rows(out / "captions_all.csv")[:2]
    text = "".join(table).replace(first["caption"], "\u200b…", 1).replace(second["caption"], "\ufffd", 1)
    (out / "captions_all.csv").write_text(text, encoding="utf-8")
    target = tmp_path / "export.jsonl"
    res = cli("export", "--out", out, "--format", "jsonl", "--to", target)
    assert res.code == 0, res.err
    exported = target.read_text(encoding="utf-8")
    assert "\u200b" not in exported and "\ufffd" not in exported
    assert first["image_id"] not in exported or first["caption"] not in exported


def test_control_characters_stripped_from_stored_captions(cli, server, api_env, index, prompt_file, market, tmp_path):
    server.configure(p_control=1.0)
    out = tmp_path / "out"
    res = run(cli, server, index, out, "--prompt-file", prompt_file)
    assert res.code == 0, res.err
    table = rows(out / "captions_all.csv")
    assert len(table) == n_images(index)
    raw = (out / "captions_all.csv").read_text(encoding="utf-8")
    assert not any(ch in raw for ch in "\x00\x1b\x07\x7f")
    root = Path(json.loads(index.read_text(encoding="utf-8"))["root"])
    for r in table:
        assert r["caption"] == expected_caption((root / r["image_id"]).read_bytes())


@pytest.mark.parametrize("learned, n_support, mode, usable", [
    (None, None, S, True),
    ({}, None, S, True),
    ({"n": "rejected", "structured_mode": "json_object"}, "rejected", O, False),
    ({"n": "ignored", "structured_mode": "prompt", "json_schema": "rejected"}, "ignored", P, False),
    ({"n": "honoured"}, "honoured", S, True),
    ({"n": "sometimes", "structured_mode": "yaml"}, None, S, True),  # a hand-edited manifest breaks nothing
    ("not a mapping", None, S, True),
])
def test_state_from_learned(learned, n_support, mode, usable):
    state = FallbackState.from_learned(learned)
    assert (state.n_support, state.mode, state.n_usable) == (n_support, mode, usable)


def test_rerun_starts_from_what_the_folder_learned(cli, server, api_env, index, prompt_file, tmp_path):
    server.configure(reject_n=True, response_format_mode="reject_schema")
    out = tmp_path / "out"
    first = run(cli, server, index, out, "--prompt-file", prompt_file, "--prompt-file", ATTRIBUTES,
                "--captions-per-image", 2, "--limit", 2, "--concurrency", 1)
    assert first.code == 0, first.err
    learned = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("learned") or {}
    assert learned.get("n") == "rejected" and learned.get("structured_mode") == "json_object"
    before = server.stats.outcomes["400"]
    res = run(cli, server, index, out, "--prompt-file", prompt_file, "--prompt-file", ATTRIBUTES,
              "--captions-per-image", 2, "--concurrency", 1)
    assert res.code == 0, res.err
    assert server.stats.outcomes["400"] == before  # neither n nor json_schema is tried again
    assert res.err.count("learned by an earlier run in this folder") == 1  # the n line
    assert res.err.count("json_object mode, as an earlier run in this folder") == 1
    assert len(slots(out)) == 2 * n_images(index) and len(rows(out / "attributes.csv")) == n_images(index)


def test_control_characters_escaped_in_json_strings_are_stripped_too():
    from pipeline.data.attributes import validate_answer

    schema = {"type": "object", "properties": {"upper": {"type": "string"}}, "required": ["upper"],
              "additionalProperties": False}
    assert validate_answer('{"upper": "red\\u0000 coat\\u001b"}', schema) == {"upper": "red coat"}
