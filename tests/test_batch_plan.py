"""Batch planning, pure and on real files: custom_ids, request lines, shards on lines, bytes and tokens,
the streaming writer. No server."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.batch.ids import make_custom_id, parse_custom_id
from pipeline.batch.ledger import BatchLedger
from pipeline.batch.lines import BatchLine, LineSettings, build_line, job_lines, pending_jobs
from pipeline.batch.plan import ShardLimits, ShardPacker, plan_shards, summarize_shards, write_shards
from pipeline.data.images import prepare_payload
from pipeline.data.prompts import find_prompt_file, load_prompt, render_prompt
from pipeline.errors import ImageError
from pipeline.ledger.donekeys import DoneKeys
from pipeline.providers.pricing import load_pricing, resolve_price
from pipeline.providers.tokens import estimate_request
from pipeline.records import IndexEntry, Prompt
from pipeline.run.dispatch import Job
from pipeline.run.fallbacks import FormatMode
from pipeline.testing import synth

# --- custom_id --------------------------------------------------------------------------------------------

ODD = [
    ("0002_c1s1_000451_03.jpg", "base", (0,)),
    ("bounding_box_test/0001_c1s1_000150_03.jpg", "base", (0, 1, 2)),
    ("a/b/c d%20e.jpg", "描述 简短", (3,)),
    ("人物/张三 (1).png", "中文提示", (0, 1)),
    ("100%/..//%2F.jpg", "a/b%c", (7,)),
    ("tab\there, comma \"quote\" 'single'.jpg", "prompt.v2", (11, 12)),
    ("emoji 🙂.webp", "ü-ß", (0,)),
    ("x" * 300, "p" * 80, tuple(range(10))),
]


@pytest.mark.parametrize(("image_id", "prompt", "indices"), ODD)
def test_custom_ids_round_trip(image_id, prompt, indices):
    cid = make_custom_id(image_id, prompt, indices)
    assert parse_custom_id(cid) == (image_id, prompt, indices)
    assert cid.isascii() and "\n" not in cid and cid.count("/") == 3


def test_custom_ids_are_unique_per_work_item():
    items = [(i, p, s) for i, p, _ in ODD for s in [(0,), (1,), (0, 1)]]
    items += [("a/b.jpg", "c", (0,)), ("b.jpg", "a/c", (0,)), ("a%2Fb.jpg", "c", (0,))]
    assert len({make_custom_id(*it) for it in items}) == len(set(items))


@pytest.mark.parametrize("bad", [
    "", "rp1", "rp2/base/0/a.jpg", "rp1/base/0", "rp1/base/0/a.jpg/b", "rp1/base//a.jpg", "rp1/base/x/a.jpg",
    "rp1/base/01/a.jpg", "rp1/base/-1/a.jpg", "rp1/base/ 1/a.jpg", "rp1//0/a.jpg", "rp1/base/0/",
    "rp1/base/0/a b.jpg", "rp1/base/0/%ZZ", "rp1/base/0/%ff", "rp1/%62ase/0/a.jpg", "custom-1",
])
def test_ids_not_made_by_us_are_refused(bad):
    with pytest.raises(ValueError):
        parse_custom_id(bad)


@pytest.mark.parametrize("args", [("", "p", (0,)), ("a", "", (0,)), ("a", "p", ()), ("a", "p", (-1,)),
                                  ("a", "p", (True,))])
def test_make_refuses_what_could_not_be_parsed_back(args):
    with pytest.raises(ValueError):
        make_custom_id(*args)


# --- the pure planner -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FakeLine:
    name: str
    nbytes: int
    est_input_tokens: int = 0


def shards_of(lines, limits):
    refused: list[tuple[str, str]] = []
    shards = [[ln.name for ln in s] for s in plan_shards(lines, limits, lambda ln, why: refused.append((ln.name, why)))]
    return shards, refused


def test_shards_split_by_lines():
    lines = [FakeLine(str(i), 10) for i in range(7)]
    shards, refused = shards_of(lines, ShardLimits(max_requests=3, max_bytes=10**6))
    assert shards == [["0", "1", "2"], ["3", "4", "5"], ["6"]] and not refused


def test_shards_split_by_bytes_exactly_at_the_limit():
    lines = [FakeLine(str(i), n) for i, n in enumerate([40, 60, 1, 99, 100, 50, 50, 1])]
    shards, refused = shards_of(lines, ShardLimits(max_requests=100, max_bytes=100))
    assert shards == [["0", "1"], ["2", "3"], ["4"], ["5", "6"], ["7"]] and not refused


def test_shards_split_by_token_cap():
    lines = [FakeLine(str(i), 1, t) for i, t in enumerate([500, 400, 200, 900, 100])]
    shards, _ = shards_of(lines, ShardLimits(max_requests=100, max_bytes=10**6, max_tokens=1000))
    assert shards == [["0", "1"], ["2"], ["3", "4"]]


def test_every_limit_at_once():
    lines = [FakeLine(str(i), 30 + (i % 5) * 10, 100 + (i % 3) * 50) for i in range(200)]
    limits = ShardLimits(max_requests=7, max_bytes=200, max_tokens=600)
    shards = list(plan_shards(lines, limits, lambda ln, why: pytest.fail("nothing is too large")))
    assert [ln for s in shards for ln in s] == lines  # every line once, in order
    for s in shards:
        assert 1 <= len(s) <= 7
        assert sum(ln.nbytes for ln in s) <= 200
        assert sum(ln.est_input_tokens for ln in s) <= 600
    for a, b in zip(shards, shards[1:]):  # a shard closes only when the next line would break a limit
        nxt = b[0]
        assert (len(a) == 7 or sum(ln.nbytes for ln in a) + nxt.nbytes > 200
                or sum(ln.est_input_tokens for ln in a) + nxt.est_input_tokens > 600)


def test_an_oversize_single_line_is_reported_never_put_in_a_shard():
    lines = [FakeLine("a", 50), FakeLine("huge", 101), FakeLine("b", 50), FakeLine("many-tokens", 10, 5000)]
    shards, refused = shards_of(lines, ShardLimits(max_requests=10, max_bytes=100, max_tokens=1000))
    assert shards == [["a", "b"]]
    assert [name for name, _ in refused] == ["huge", "many-tokens"]
    assert "101 bytes" in refused[0][1] and "--batch-max-bytes" in refused[0][1]
    assert "--batch-max-tokens" in refused[1][1]
    only_huge, refused = shards_of([FakeLine("huge", 101)], ShardLimits(max_bytes=100))
    assert only_huge == [] and len(refused) == 1  # never an empty shard


def test_packer_states():
    p = ShardPacker(ShardLimits(max_requests=2, max_bytes=10))
    assert [p.place(4, 0), p.place(4, 0), p.place(4, 0), p.place(11, 0), p.place(6, 0), p.place(1, 0)] == \
        ["same", "same", "new", "too_large", "same", "new"]


@pytest.mark.parametrize("bad", [dict(max_requests=0), dict(max_bytes=0), dict(max_tokens=0)])
def test_limits_must_be_positive(bad):
    with pytest.raises(ValueError):
        ShardLimits(**bad)


# --- request lines from real images -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def price():
    return resolve_price(load_pricing(), "gpt-4o-mini")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[IndexEntry]:
    """Crops of growing size (the base64 grows with them), one PNG, named oddly."""
    root = tmp_path_factory.mktemp("imgs")
    sizes = [(64, 128), (64, 128), (128, 256), (96, 192), (256, 512), (64, 128)]
    out = []
    for k, size in enumerate(sizes):
        name = f"人/{k:04d}_c1 s{k}%.{'png' if k == 3 else 'jpg'}"
        synth.make_crop(root / name, upper=(200, 30, 30), lower=(20, 20, 200), size=size, seed=k)
        out.append(IndexEntry(name, root / name, position=k))
    return out


def settings(price, **kw) -> LineSettings:
    base = dict(model="gpt-4o-mini", detail="low", max_tokens=300, temperature=None, image_rule=price.image_rule)
    base.update(kw)
    return LineSettings(**base)


BASE = Prompt("base", "Describe the person.\n描述这个人, \"briefly\".")


def test_a_line_is_the_online_request(images, price):
    entry = images[3]
    line = build_line(Job(entry, BASE, (0, 1)), settings(price, temperature=0.7))
    assert line.data.endswith(b"\n") and line.data.count(b"\n") == 1  # one JSONL line
    obj = json.loads(line.data)
    assert obj["custom_id"] == line.custom_id == make_custom_id(entry.image_id, "base", (0, 1))
    assert (obj["method"], obj["url"]) == ("POST", "/v1/chat/completions")
    body = obj["body"]
    assert (body["model"], body["max_tokens"], body["n"], body["temperature"]) == ("gpt-4o-mini", 300, 2, 0.7)
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": BASE.text}
    assert image["image_url"] == {"url": prepare_payload(entry.path).data_url, "detail": "low"}
    assert "response_format" not in body
    assert line.n == 2 and line.est_output_tokens == 600
    payload = prepare_payload(entry.path)
    online = estimate_request(price.image_rule, BASE.text, payload.width, payload.height, "low", 300, n=2)
    assert (line.est_input_tokens, line.est_output_tokens) == (online.input_tokens, online.max_output_tokens)
    assert line.est_input_tokens > 2833  # gpt-4o-mini's low-detail image, plus the text
    assert parse_custom_id(line.custom_id) == (entry.image_id, "base", (0, 1))


def test_a_structured_prompt_is_sent_in_json_schema_mode(images, price):
    prompt = load_prompt(find_prompt_file("attributes"))
    body = json.loads(build_line(Job(images[0], prompt, (0,)), settings(price)).data)["body"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["messages"][0]["content"][0]["text"] == prompt.text
    # a folder that learned the server needs json_object: the schema goes into the prompt
    body = json.loads(build_line(Job(images[0], prompt, (0,)),
                                 settings(price, format_mode=FormatMode.JSON_OBJECT)).data)["body"]
    assert body["response_format"] == {"type": "json_object"}
    assert "JSON schema" in body["messages"][0]["content"][0]["text"]


def test_a_templated_prompt_renders_as_online(images, price):
    prompt = load_prompt(find_prompt_file("templated"))
    line = build_line(Job(images[1], prompt, (2,)), settings(price))
    text = json.loads(line.data)["body"]["messages"][0]["content"][0]["text"]
    assert text == render_prompt(prompt, images[1].image_id, 2) and "{template}" not in text


def test_an_unreadable_image_is_an_image_error(tmp_path, images, price):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    jobs = [Job(images[0], BASE, (0,)), Job(IndexEntry("bad.jpg", bad), BASE, (0,)),
            Job(IndexEntry("gone.jpg", tmp_path / "gone.jpg"), BASE, (0,))]
    errors: list[tuple[str, str]] = []
    lines = list(job_lines(jobs, settings(price), lambda job, exc: errors.append((job.entry.image_id, exc.reason))))
    assert [ln.custom_id for ln in lines] == [make_custom_id(images[0].image_id, "base", (0,))]
    assert errors == [("bad.jpg", "not_image"), ("gone.jpg", "missing")]
    with pytest.raises(ImageError):
        build_line(jobs[1], settings(price))


def test_shards_split_by_bytes_counting_base64_images(tmp_path, images, price):
    lines = [build_line(Job(e, BASE, (0,)), settings(price)) for e in images]
    sizes = [ln.nbytes for ln in lines]
    assert max(sizes) > 3 * min(sizes)  # the image is most of a line
    cap = sorted(sizes)[-2] + min(sizes)  # the largest line is over it alone only if it is the largest
    led = BatchLedger.load(tmp_path / "out")
    refused: list[str] = []
    records = list(write_shards(led, lines, ShardLimits(max_requests=100, max_bytes=cap),
                                lambda ln, why: refused.append(ln.custom_id), price=price.batch()))
    placed = [cid for r in records for cid in led.read_ids(r)]
    assert sorted(placed + refused) == sorted(ln.custom_id for ln in lines)
    for rec in records:
        data = led.resolve(rec.jsonl).read_bytes()
        assert len(data) == rec.bytes <= cap
        assert hashlib.sha256(data).hexdigest() == rec.sha256
        assert [json.loads(x)["custom_id"] for x in data.splitlines()] == list(led.read_ids(rec))
        assert rec.lines == len(data.splitlines()) and rec.state == "planned"
    assert max(sizes) > cap and refused == [lines[sizes.index(max(sizes))].custom_id]  # the 256x512 crop


def test_writer_and_summary_agree(tmp_path, images, price):
    lines = [build_line(Job(e, BASE, (0,)), settings(price)) for e in images] * 3
    limits = ShardLimits(max_requests=4, max_bytes=10**6)
    summary = list(summarize_shards(lines, limits, lambda ln, why: None, price=price.batch()))
    led = BatchLedger.load(tmp_path)
    records = list(write_shards(led, lines, limits, lambda ln, why: None, price=price.batch()))
    assert [(s.lines, s.bytes, s.est_input_tokens) for s in summary] == \
        [(r.lines, r.bytes, r.est_input_tokens) for r in records]
    assert [r.shard_id for r in records] == ["s000001", "s000002", "s000003", "s000004", "s000005"]
    assert sum(r.est_cost_usd for r in records) == pytest.approx(sum(s.est_cost_usd for s in summary))
    assert BatchLedger.load(tmp_path).to_dict() == led.to_dict()


def test_a_failure_mid_shard_leaves_no_part_file_and_no_record(tmp_path, images, price):
    def lines() -> Iterator[BatchLine]:
        yield build_line(Job(images[0], BASE, (0,)), settings(price))
        yield build_line(Job(images[1], BASE, (0,)), settings(price))
        raise RuntimeError("killed")

    led = BatchLedger.load(tmp_path)
    with pytest.raises(RuntimeError):
        list(write_shards(led, lines(), ShardLimits(), lambda ln, why: None))
    assert led.shards == [] and not led.path.exists()
    assert list(led.folder.iterdir()) == []
    # a part file a kill -9 left behind is removed by the next plan
    (led.folder / "s000001.jsonl.part").write_bytes(b"half a li")
    records = list(write_shards(led, [build_line(Job(images[0], BASE, (0,)), settings(price))], ShardLimits(),
                                lambda ln, why: None))
    assert [r.shard_id for r in records] == ["s000001"]
    assert sorted(p.name for p in led.folder.iterdir()) == ["ledger.json", "s000001.ids", "s000001.jsonl"]


def synthetic_lines(n: int, size: int = 2_000) -> Iterator[BatchLine]:
    pad = "A" * size
    for i in range(n):
        cid = make_custom_id(f"{i:07d}.jpg", "base", (0,))
        yield BatchLine(cid, (json.dumps({"custom_id": cid, "body": pad}) + "\n").encode(), 100, 300)


def peak_while_writing(tmp_path: Path, n: int) -> int:
    led = BatchLedger.load(tmp_path)
    tracemalloc.start()
    try:
        for _ in write_shards(led, synthetic_lines(n), ShardLimits(max_requests=10**6, max_bytes=10**9),
                              lambda ln, why: None):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writing_shards_streams_memory_does_not_grow_with_the_lines(tmp_path):
    small = peak_while_writing(tmp_path / "a", 200)  # 0.4 MB of lines
    large = peak_while_writing(tmp_path / "b", 4_000)  # 8 MB of lines, one shard
    assert (tmp_path / "b" / "batches" / "s000001.jsonl").stat().st_size > 8_000_000
    assert large < small + 256 * 1024, (small, large)


# --- the work a batch plans -------------------------------------------------------------------------------

def test_pending_jobs_leave_out_done_and_covered_slots(images):
    done = DoneKeys([(images[0].image_id, "base", 0)])
    covered = DoneKeys([(images[1].image_id, "base", 1), (images[2].image_id, "base", 0),
                        (images[2].image_id, "base", 1)])
    jobs = list(pending_jobs(images[:4], [BASE], 2, done, covered))
    assert [(j.entry.image_id, j.indices) for j in jobs] == [
        (images[0].image_id, (1,)), (images[1].image_id, (0,)), (images[3].image_id, (0, 1))]
