"""The loopback server's Batch API (/v1/files, /v1/batches), over real HTTP with the real openai SDK.

Each line must be answered exactly as /v1/chat/completions answers the same body: two servers with the
same config and seed, one asked online and one through a batch, must give the same answers.
"""

from __future__ import annotations

import base64
import io
import json
import time

import openai
import pytest
from PIL import Image

from pipeline.testing.batchserver import page_of, validate_input
from pipeline.testing.loopback import (
    DEFAULT_API_KEY,
    LoopbackServer,
    build_arg_parser,
    config_from_args,
    expected_caption,
    expected_json,
)

PROMPT = "Describe the person: clothes, colours, bags."
SCHEMA = {"type": "object", "properties": {"caption": {"type": "string"}, "gender": {"enum": ["male", "female"]}},
          "required": ["caption", "gender"], "additionalProperties": False}
TERMINAL = ("completed", "failed", "expired", "cancelled")


def image(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 128), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(buf, "PNG")
    return buf.getvalue()


def body(seed: int, n: int = 1, schema: bool = False, model: str = "gpt-4o-mini") -> dict:
    url = "data:image/png;base64," + base64.b64encode(image(seed)).decode()
    b: dict = {"model": model, "max_tokens": 120, "n": n, "temperature": 0.2,
               "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                         {"type": "image_url",
                                                          "image_url": {"url": url, "detail": "low"}}]}]}
    if schema:
        b["response_format"] = {"type": "json_schema",
                                "json_schema": {"name": "person", "strict": True, "schema": SCHEMA}}
    return b


def line(cid: str, b: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": b}


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def client(server: LoopbackServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=DEFAULT_API_KEY, **kw)


def submit(c: openai.OpenAI, data: bytes, metadata: dict | None = None, name: str = "in.jsonl"):
    f = c.files.create(file=(name, data), purpose="batch")
    return c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                            metadata=metadata)


def wait(c: openai.OpenAI, batch_id: str, timeout: float = 20.0, until: tuple[str, ...] = TERMINAL):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        b = c.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in until:
            return b, seen
        assert time.monotonic() < deadline, f"batch stuck in {b.status}"
        time.sleep(0.01)


def read_lines(c: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    out = {}
    for raw in c.files.content(file_id).content.splitlines():
        rec = json.loads(raw)
        assert rec["custom_id"] not in out
        out[rec["custom_id"]] = rec
    return out


def test_full_lifecycle_answers_each_line_as_chat_would(server):
    server.configure(batch_step_s=0.01)
    c = client(server)
    lines = [line(f"img-{i}", body(i)) for i in range(4)]
    lines.append(line("two", body(7, n=2)))
    lines.append(line("json", body(8, schema=True)))
    b = submit(c, jsonl(lines), metadata={"reid_prompt_folder": "f" * 32, "reid_prompt_shard": "s000001"})
    assert b.status == "validating" and b.endpoint == "/v1/chat/completions" and b.completion_window == "24h"
    done, seen = wait(c, b.id)
    assert done.status == "completed"
    assert seen[0] in ("validating", "in_progress") and seen[-1] == "completed"
    assert done.request_counts.total == 6 and done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert done.error_file_id is None and done.output_file_id
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.metadata == {"reid_prompt_folder": "f" * 32, "reid_prompt_shard": "s000001"}
    out_file = c.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output"
    got = read_lines(c, done.output_file_id)
    assert set(got) == {x["custom_id"] for x in lines}
    for i in range(4):
        rec = got[f"img-{i}"]
        assert rec["error"] is None and rec["id"].startswith("batch_req_")
        assert rec["response"]["status_code"] == 200 and rec["response"]["request_id"]
        completion = rec["response"]["body"]
        assert completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"]["content"] == expected_caption(image(i))
        assert completion["usage"]["prompt_tokens"] > 0
    two = got["two"]["response"]["body"]["choices"]
    assert [ch["message"]["content"] for ch in two] == [expected_caption(image(7), 0), expected_caption(image(7), 1)]
    answer = json.loads(got["json"]["response"]["body"]["choices"][0]["message"]["content"])
    assert answer == expected_json(image(8), SCHEMA)
    st = server.stats.snapshot()
    assert st["requests"] == 0  # batch lines are not chat requests
    assert st["batches_created"][("f" * 32, "s000001")] == 1
    assert st["batch_calls"]["upload"] == 1 and st["batch_calls"]["create"] == 1
    assert st["batch_lines"]["200"] == 6
    assert sum(server.batch_line_stats.snapshot()["ok_digests"].values()) == 6
    assert json.dumps(server.stats.as_dict())  # JSON-able for the CLI's STATS line
    assert server.batches.batches_for("f" * 32, "s000001")[0]["id"] == b.id


def test_faults_match_the_chat_endpoint_line_for_line():
    """Same config, same seed: online answers on one server equal batch lines on another."""
    faults = dict(seed=5, p_5xx=0.2, p_refusal=0.15, p_empty=0.1, p_content_filter=0.1, p_drop=0.1, p_429=0.1)
    bodies = {f"c{i}": body(i, schema=(i % 3 == 0)) for i in range(16)}
    with LoopbackServer(**faults) as online, LoopbackServer(**faults) as batch:
        oc = client(online, max_retries=0)
        online_answers = {}
        for cid, b in bodies.items():
            try:
                r = oc.chat.completions.with_raw_response.create(**b)
                online_answers[cid] = (200, json.loads(r.text))
            except openai.APIStatusError as e:
                online_answers[cid] = (e.status_code, e.response.json())
            except openai.APIConnectionError:
                online_answers[cid] = ("drop", None)
        bc = client(batch)
        done, _ = wait(bc, submit(bc, jsonl([line(cid, b) for cid, b in bodies.items()])).id)
        assert done.status == "completed"
        got = read_lines(bc, done.output_file_id) | read_lines(bc, done.error_file_id)
    assert set(got) == set(bodies)
    kinds = set()
    for cid, (status, ans) in online_answers.items():
        rec = got[cid]["response"]
        if status in ("drop", 429):  # transport faults: a batch line is answered
            assert rec["status_code"] == 200
            kinds.add(status)
            continue
        assert rec["status_code"] == status
        if status != 200:
            assert rec["body"] == ans
            kinds.add(status)
            continue
        mine = rec["body"]
        for key in ("model", "usage"):
            assert mine[key] == ans[key]
        assert [ch["message"] for ch in mine["choices"]] == [ch["message"] for ch in ans["choices"]]
        assert [ch["finish_reason"] for ch in mine["choices"]] == [ch["finish_reason"] for ch in ans["choices"]]
        kinds.add(ans["choices"][0]["finish_reason"] if ans["choices"][0]["message"]["content"] is not None
                  else ("refusal" if ans["choices"][0]["message"]["refusal"] else "none"))
    assert {"stop"} < kinds and len(kinds) >= 3, kinds  # several kinds of answer were compared


def test_line_failures_go_to_the_error_file(server):
    server.configure(batch_line_fail_p=0.5, seed=1)
    c = client(server)
    lines = [line(f"x{i}", body(i)) for i in range(20)]
    done, _ = wait(c, submit(c, jsonl(lines)).id)
    assert done.status == "completed"
    ok, bad = read_lines(c, done.output_file_id), read_lines(c, done.error_file_id)
    assert set(ok) | set(bad) == {x["custom_id"] for x in lines} and not set(ok) & set(bad)
    assert 0 < len(bad) < 20
    assert done.request_counts.failed == len(bad) and done.request_counts.completed == len(ok)
    for rec in bad.values():
        assert rec["response"]["status_code"] == 500 and rec["error"] is None
        assert rec["response"]["body"]["error"]["type"] == "server_error"
    assert c.files.retrieve(done.error_file_id).purpose == "batch_output"


def test_expiry_keeps_finished_lines_and_marks_the_rest(server):
    server.configure(batch_expire_after=3)
    c = client(server)
    lines = [line(f"e{i}", body(i)) for i in range(5)]
    done, seen = wait(c, submit(c, jsonl(lines)).id)
    assert done.status == "expired" and done.expired_at and "finalizing" not in seen
    ok, bad = read_lines(c, done.output_file_id), read_lines(c, done.error_file_id)
    assert len(ok) == 3 and len(bad) == 2 and set(ok) | set(bad) == {x["custom_id"] for x in lines}
    for cid, rec in ok.items():
        i = int(cid[1:])
        assert rec["response"]["body"]["choices"][0]["message"]["content"] == expected_caption(image(i))
    for rec in bad.values():
        assert rec["response"] is None and rec["error"]["code"] == "batch_expired"
    assert done.request_counts.completed == 3 and done.request_counts.failed == 2
    assert server.stats.snapshot()["batch_lines"]["expired"] == 2


@pytest.mark.parametrize("case, code, line_no", [
    ("duplicate", "duplicate_custom_id", 3),
    ("too_many", "too_many_tasks", None),
    ("too_big", "file_too_large", None),
    ("malformed", "invalid_json_line", 2),
    ("url", "url_mismatch", 1),
    ("models", "model_mismatch", 2),
])
def test_validation_failures(server, case, code, line_no):
    server.configure(batch_max_lines=3, batch_max_bytes=10_000)
    c = client(server)
    good = [line(f"v{i}", body(i)) for i in range(3)]
    data = jsonl(good)
    if case == "duplicate":
        data = jsonl(good[:2] + [line("v0", body(5))])
    elif case == "too_many":
        data = jsonl(good + [line("v9", body(9))])
    elif case == "too_big":
        data = jsonl(good[:1]) + jsonl([line("big", dict(body(1), metadata={"pad": "x" * 10_000}))])
    elif case == "malformed":
        data = jsonl(good[:1]) + b'{"custom_id": "broken", \n' + jsonl(good[1:])
    elif case == "url":
        data = jsonl([line("v0", body(0), url="/v1/embeddings")] + good[1:])
    elif case == "models":
        data = jsonl([good[0], line("v1", body(1, model="gpt-4o"))])
    done, _ = wait(c, submit(c, data).id)
    assert done.status == "failed" and done.failed_at
    assert done.errors.data[0].code == code and done.errors.data[0].line == line_no
    assert done.output_file_id is None and done.error_file_id is None
    assert server.stats.snapshot()["batch_lines"] == {}


def test_validate_input_is_pure():
    lines, errors = validate_input(jsonl([line("a", body(0)), line("b", body(1))]), "/v1/chat/completions", 10, 10**6)
    assert [x["custom_id"] for x in lines] == ["a", "b"] and errors == []
    lines, errors = validate_input(b"", "/v1/chat/completions", 10, 10**6)
    assert lines == [] and errors[0]["code"] == "empty_file"
    items = [{"id": f"i{k}"} for k in range(5)]
    page = page_of(items, "i1", 2)
    assert [x["id"] for x in page["data"]] == ["i2", "i3"] and page["has_more"] and page["last_id"] == "i3"
    assert page_of(items, "i3", 5)["has_more"] is False


def test_enqueued_token_limit(server):
    c = client(server)
    one = jsonl([line(f"t{i}", body(i)) for i in range(3)])
    per_batch = sum(server.prompt_tokens_of(body(i)) for i in range(3))
    server.configure(batch_enqueued_token_limit=per_batch + 10, batch_step_s=0.05)
    first = submit(c, one)
    wait(c, first.id, until=("in_progress",))
    second, _ = wait(c, submit(c, jsonl([line(f"u{i}", body(i + 10)) for i in range(3)])).id)
    assert second.status == "failed"
    err = second.errors.data[0]
    assert err.code == "token_limit_exceeded" and "Enqueued token limit reached for gpt-4o-mini" in err.message
    assert wait(c, first.id)[0].status == "completed"
    server.configure(batch_step_s=0.0)
    again, _ = wait(c, submit(c, jsonl([line(f"u{i}", body(i + 10)) for i in range(3)])).id)
    assert again.status == "completed"  # the limit freed once the first batch ended


def test_cancel_keeps_answered_lines(server):
    server.configure(batch_step_s=0.03)
    c = client(server)
    lines = [line(f"k{i}", body(i)) for i in range(30)]
    b = submit(c, jsonl(lines))
    wait(c, b.id, until=("in_progress",))
    time.sleep(0.1)
    cancelling = c.batches.cancel(b.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done, _ = wait(c, b.id)
    assert done.status == "cancelled" and done.cancelled_at
    ok, bad = read_lines(c, done.output_file_id), read_lines(c, done.error_file_id)
    assert set(ok) | set(bad) == {x["custom_id"] for x in lines} and len(bad) > 0
    assert all(r["error"]["code"] == "batch_cancelled" and r["response"] is None for r in bad.values())
    with pytest.raises(openai.BadRequestError):
        c.batches.cancel(b.id)
    assert server.stats.snapshot()["batch_calls"]["cancel"] == 2


def test_lists_paging_retrieve_delete(server):
    c = client(server)
    ids = [submit(c, jsonl([line("a", body(k))]), metadata={"k": str(k)}).id for k in range(5)]
    page = c.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in c.batches.list(limit=2)] == ids[::-1]  # the SDK follows `after`
    assert [b.id for b in c.batches.list(limit=2, after=ids[3]).data] == [ids[2], ids[1]]
    for b_id in ids:
        wait(c, b_id)
    inputs = list(c.files.list(purpose="batch"))
    outputs = list(c.files.list(purpose="batch_output"))
    assert len(inputs) == 5 and len(outputs) == 5
    f = inputs[0]
    assert c.files.retrieve(f.id).filename == "in.jsonl"
    assert c.files.content(f.id).content.startswith(b'{"custom_id": "a"')
    deleted = c.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        c.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    st = server.stats.snapshot()["batch_calls"]
    assert st["delete"] == 1 and st["list"] >= 4 and st["file_list"] >= 2 and st["content"] == 1


def test_bad_uploads_and_creates(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=("in.csv", b"x"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=("in.jsonl", b"x"), purpose="nonsense")
    f = c.files.create(file=("in.jsonl", jsonl([line("a", body(0))])), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="48h")
    with pytest.raises(openai.BadRequestError):
        c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong-key-000").files.list().data
    assert server.stats.snapshot()["batch_calls"]["create"] == 0


def test_held_answers_leave_the_work_done(server):
    """Kill-test knobs: the server stores the upload / creates the batch, then holds the answer."""
    server.configure(batch_delay_upload_s=5.0, batch_delay_create_s=5.0)
    c = client(server, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        c.files.create(file=("held.jsonl", jsonl([line("a", body(0))])), purpose="batch")
    (stored,) = server.batches.files.values()
    assert stored.filename == "held.jsonl"
    with pytest.raises(openai.APITimeoutError):
        c.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"reid_prompt_folder": "t", "reid_prompt_shard": "s000002"})
    server.configure(batch_delay_upload_s=0.0, batch_delay_create_s=0.0)
    (b,) = server.batches.batches_for("t", "s000002")
    done, _ = wait(client(server), b["id"])
    assert done.status == "completed"


def test_a_restarted_server_finishes_its_batches(server):
    server.configure(batch_step_s=0.02)
    c = client(server)
    lines = [line(f"r{i}", body(i)) for i in range(10)]
    b = submit(c, jsonl(lines))
    wait(c, b.id, until=("in_progress",))
    server.stop()
    server.start()
    done, _ = wait(client(server), b.id)
    assert done.status == "completed" and done.request_counts.completed == 10
    assert len(read_lines(c, done.output_file_id)) == 10


def test_cli_flags():
    cfg = config_from_args(build_arg_parser().parse_args([
        "--batch-step-s", "0.5", "--batch-line-fail-p", "0.1", "--batch-expire-after", "7",
        "--batch-enqueued-token-limit", "9000", "--batch-max-lines", "100", "--batch-max-bytes", "1000",
        "--batch-delay-upload-s", "1", "--batch-delay-create-s", "2", "--batch-delay-content-s", "3"]))
    assert (cfg.batch_step_s, cfg.batch_line_fail_p, cfg.batch_expire_after, cfg.batch_enqueued_token_limit,
            cfg.batch_max_lines, cfg.batch_max_bytes) == (0.5, 0.1, 7, 9000, 100, 1000)
    assert (cfg.batch_delay_upload_s, cfg.batch_delay_create_s, cfg.batch_delay_content_s) == (1, 2, 3)
    default = config_from_args(build_arg_parser().parse_args([]))
    assert default.batch_expire_after is None and default.batch_enqueued_token_limit is None
