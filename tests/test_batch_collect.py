"""The join of batch output lines on custom_id and the online rules applied to each line (pure: no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.batch.collect import Judge, LineOutcome, job_for, join_lines, judge_line, read_output_line
from pipeline.batch.flow import Poll, slot_keys, uncovered
from pipeline.batch.ids import make_custom_id
from pipeline.providers.pricing import ModelPrice
from pipeline.providers.tokens import ImageRule
from pipeline.records import AttributeRow, CaptionRow, ErrorRow, IndexEntry, Prompt
from pipeline.run.dispatch import Job

PRICE = ModelPrice("gpt-4o-mini", input=0.075, cached_input=0.0375, output=0.3, image_rule=ImageRule("tile"))
PROMPT = Prompt("base", "Describe the person.")
SCHEMA = {"type": "object", "properties": {"gender": {"type": "string", "enum": ["male", "female"]}},
          "required": ["gender"], "additionalProperties": False}
ATTR = Prompt("attributes", "Fill in the fields.", schema=SCHEMA)
ENTRY = IndexEntry("query/0001_c1s1_000151_01.jpg", Path("/x/0001.jpg"), position=3)


def judge(**kw) -> Judge:
    return Judge(PRICE, kw.pop("run_id", "batch-s000001-abcd"), "gpt-4o-mini", kw.pop("max_attempts", 3),
                 rand=lambda: 0.5, **kw)


def completion(*texts: str | None, refusal: str | None = None, usage=(100, 10)) -> dict:
    choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t,
                                                                  "refusal": refusal if i == 0 else None}}
               for i, t in enumerate(texts)]
    return {"object": "chat.completion", "model": "gpt-4o-mini-2024-07-18", "choices": choices,
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}


def out_line(cid: str, status: int | None = 200, body=None, error=None) -> str:
    response = None if status is None else {"status_code": status, "request_id": "r", "body": body}
    return json.dumps({"id": "batch_req_1", "custom_id": cid, "response": response, "error": error})


CID = make_custom_id(ENTRY.image_id, "base", (0, 1))


def test_join_on_custom_id_whatever_the_order_and_reports_what_does_not_belong():
    a, b, c = (make_custom_id(f"img{k}.jpg", "base", (0,)) for k in range(3))
    lines = [out_line(c, 200, completion("C")), "{torn", "", out_line("rp1/base/0/elsewhere.jpg", 200, {}),
             out_line(a, 500, {"error": {"message": "boom"}}), out_line(a, 200, completion("A")),
             out_line(a, 200, completion("A again"))]
    join = join_lines([a, b, c], lines, where="s000001")
    assert join.outcomes[c].status == 200
    assert join.outcomes[a].status == 200 and join.outcomes[a].body["choices"][0]["message"]["content"] == "A"
    assert join.outcomes[b].missing and join.outcomes[b].unanswered
    assert (join.unknown, join.malformed, join.duplicates) == (1, 1, 2)
    assert any("s000001: line 2" in e for e in join.examples)


def test_read_output_line_error_file_shapes():
    expired = read_output_line(out_line(CID, None, error={"code": "batch_expired", "message": "window over"}))
    assert expired.unanswered and expired.error_code == "batch_expired"
    with pytest.raises(ValueError):
        read_output_line(json.dumps({"custom_id": CID, "response": None, "error": None}))
    with pytest.raises(ValueError):
        read_output_line(json.dumps([1, 2]))


def test_a_200_fills_slots_with_rows_at_the_given_price():
    job = Job(ENTRY, PROMPT, (0, 1), attempts=1)
    v = judge_line(LineOutcome(CID, 200, completion("first caption", "second caption")), job, judge())
    assert [type(r) for r in v.rows] == [CaptionRow, CaptionRow]
    assert [r.caption for r in v.rows] == ["first caption", "second caption"]
    assert [r.caption_index for r in v.rows] == [0, 1] and v.rows[0].position == 3
    # usage split as online: input on the first row, output shared; cost at the (batch) price
    assert (v.rows[0].prompt_tokens, v.rows[1].prompt_tokens) == (100, 0)
    assert v.rows[0].cost_usd == pytest.approx((100 * 0.075 + 5 * 0.3) / 1e6)
    assert v.captioned == 2 and not v.retry and v.cost == pytest.approx((100 * 0.075 + 10 * 0.3) / 1e6)


def test_slots_done_meanwhile_are_not_written_again():
    job, done_n, _ = job_for(CID, lambda i: ENTRY, {"base": PROMPT}, {(ENTRY.image_id, "base", 0)}, 1)
    assert job.indices == (1,) and done_n == 1
    v = judge_line(LineOutcome(CID, 200, completion("first", "second")), job, judge())
    assert [r.caption_index for r in v.rows] == [1] and v.already_done == 1
    none, all_done, why = job_for(CID, lambda i: ENTRY, {"base": PROMPT},
                                  {(ENTRY.image_id, "base", 0), (ENTRY.image_id, "base", 1)}, 1)
    assert none is None and all_done == 2 and why == ""
    assert job_for("nonsense", lambda i: ENTRY, {}, set(), 1)[2]
    assert "not in the index" in job_for(CID, lambda i: None, {"base": PROMPT}, set(), 1)[2]


def test_refusal_is_billed_and_tried_once_more_then_errors_csv():
    cid = make_custom_id(ENTRY.image_id, "base", (0,))
    body = completion(None, refusal="I can't help with that.")
    first = judge_line(LineOutcome(cid, 200, body), Job(ENTRY, PROMPT, (0,), attempts=1), judge())
    assert [j.indices for j in first.retry] == [(0,)]
    assert [(r.reason, r.prompt_tokens) for r in first.rows] == [("refused_retried", 100)]
    again = Job(ENTRY, PROMPT, (0,), attempts=2, soft_failures=1)  # (the flow counts the rows of round 1)
    second = judge_line(LineOutcome(cid, 200, body), again, judge())
    assert not second.retry and second.failed == {"refused": 1}
    assert isinstance(second.rows[0], ErrorRow) and second.rows[0].cost_usd > 0


def test_one_more_try_is_per_work_item_as_online_not_only_in_round_one():
    """Online counts answers that were no caption apart from the 5xx before them: a first refusal in
    round 2 (after a 500 in round 1) is tried once more, a second one is not, and rounds still cap it."""
    cid = make_custom_id(ENTRY.image_id, "base", (0,))
    body = completion(None, refusal="I can't help with that.")
    after_5xx = judge_line(LineOutcome(cid, 200, body), Job(ENTRY, PROMPT, (0,), attempts=2), judge())
    assert [j.indices for j in after_5xx.retry] == [(0,)] and after_5xx.rows[0].reason == "refused_retried"
    empty = completion("")
    twice = judge_line(LineOutcome(cid, 200, empty), Job(ENTRY, PROMPT, (0,), attempts=2, soft_failures=1), judge())
    assert not twice.retry and twice.failed == {"empty": 1}
    last_round = judge_line(LineOutcome(cid, 200, body), Job(ENTRY, PROMPT, (0,), attempts=3), judge())
    assert not last_round.retry and last_round.failed == {"refused": 1}


def test_5xx_retried_until_rounds_run_out_and_4xx_never():
    cid = make_custom_id(ENTRY.image_id, "base", (0,))
    err = {"error": {"message": "boom", "type": "server_error", "code": None}}
    assert judge_line(LineOutcome(cid, 500, err), Job(ENTRY, PROMPT, (0,), attempts=2), judge()).retry
    last = judge_line(LineOutcome(cid, 500, err), Job(ENTRY, PROMPT, (0,), attempts=3), judge())
    assert last.failed == {"server_error": 1} and "HTTP 500" in last.rows[0].detail
    bad = judge_line(LineOutcome(cid, 400, {"error": {"message": "bad image", "code": "invalid_image"}}),
                     Job(ENTRY, PROMPT, (0,), attempts=1), judge())
    assert bad.failed == {"bad_request": 1} and not bad.retry


def test_unanswered_lines_replanned_or_left():
    cid = make_custom_id(ENTRY.image_id, "base", (0,))
    expired = LineOutcome(cid, None, None, "batch_expired", "window over")
    assert judge_line(expired, Job(ENTRY, PROMPT, (0,), attempts=1), judge()).retry
    out = judge_line(expired, Job(ENTRY, PROMPT, (0,), attempts=3), judge())
    assert out.failed == {"batch_expired": 1}
    cancelled = LineOutcome(cid, None, None, "batch_cancelled", "")
    left = judge_line(cancelled, Job(ENTRY, PROMPT, (0,), attempts=1), judge(replan=False))
    assert left.left == 1 and not left.rows and not left.retry


def test_structured_answers_validated_as_online():
    cid = make_custom_id(ENTRY.image_id, "attributes", (0,))
    ok = judge_line(LineOutcome(cid, 200, completion('{"gender": "female"}')), Job(ENTRY, ATTR, (0,), attempts=1),
                    judge())
    assert isinstance(ok.rows[0], AttributeRow) and ok.rows[0].fields == {"gender": "female"}
    bad = judge_line(LineOutcome(cid, 200, completion('{"gender": "robot"}')), Job(ENTRY, ATTR, (0,), attempts=1),
                     judge())
    assert bad.retry and bad.rows[0].reason == "invalid_retried" and bad.rows[0].completion_tokens == 10


def test_fewer_choices_than_n_asks_again_one_by_one():
    v = judge_line(LineOutcome(CID, 200, completion("only one")), Job(ENTRY, PROMPT, (0, 1), attempts=1), judge())
    assert [r.caption_index for r in v.rows] == [0] and [j.indices for j in v.retry] == [(1,)]


def test_uncovered_drops_slots_held_elsewhere_and_poll_backs_off():
    held = slot_keys([make_custom_id(ENTRY.image_id, "base", (1,)), "not ours"])
    jobs = list(uncovered([Job(ENTRY, PROMPT, (0, 1)), Job(ENTRY, PROMPT, (1,))], held))
    assert [j.indices for j in jobs] == [(0,)]
    poll = Poll(max_s=3.0)
    assert [poll.next() for _ in range(5)] == [1.0, 1.5, 2.25, 3.0, 3.0]
    poll.reset()
    assert poll.next() == 1.0 and Poll(max_s=0.2).next() == 0.2


def test_a_body_that_is_no_chat_completion_is_a_server_fault():
    cid = make_custom_id(ENTRY.image_id, "base", (0,))
    for body in ({"choices": ["not an object"]}, {"choices": 5}, "text"):
        v = judge_line(LineOutcome(cid, 200, body), Job(ENTRY, PROMPT, (0,), attempts=3), judge())
        assert v.failed == {"server_error": 1} and not v.retry
