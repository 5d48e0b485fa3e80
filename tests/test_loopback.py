"""The loopback OpenAI-compatible server, exercised over real HTTP with the real openai SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from PIL import Image

from pipeline.testing.loopback import (
    APOLOGY_TEXT,
    DEFAULT_API_KEY,
    REFUSAL_TEXT,
    LoopbackConfig,
    LoopbackServer,
    estimate_text_tokens,
    expected_caption,
    expected_json,
    format_go_duration,
    image_digest,
    image_tokens,
    message_overhead,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the person: gender, clothes and their colours, bags."


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make_image(seed: int = 0, size=(64, 128), fmt: str = "JPEG") -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def messages(data: bytes, detail: str | None = "low", prompt: str = PROMPT, mime: str = "image/jpeg") -> list:
    image_url = {"url": data_url(data, mime)}
    if detail:
        image_url["detail"] = detail
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": image_url}]}]


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def client_for(srv: LoopbackServer, **kw) -> openai.AsyncOpenAI:
    kw.setdefault("api_key", DEFAULT_API_KEY)
    kw.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=srv.base_url, **kw)


async def ask(client: openai.AsyncOpenAI, data: bytes, model: str = "gpt-4o-mini", **kw):
    return await client.chat.completions.create(model=model, messages=messages(data), **kw)


# --- pure helpers ------------------------------------------------------------


def test_go_durations_and_image_token_rules():
    assert [format_go_duration(s) for s in (1, 360, 0.02, 90.5, 0.644)] == ["1s", "6m0s", "20ms", "1m30.5s", "644ms"]
    assert image_tokens("gpt-4o", 64, 128, "low") == 85
    assert image_tokens("gpt-4o", 64, 128, "high") == 255
    assert image_tokens("gpt-4o", 1024, 1024, "high") == 765
    assert image_tokens("gpt-4o", 2048, 4096, "high") == 1105
    assert image_tokens("gpt-4o-mini", 64, 128, "low") == 2833
    assert image_tokens("gpt-4o-mini", 64, 128, "high") == 8500
    assert image_tokens("gpt-4.1-mini", 64, 128, "low") == 13
    assert image_tokens("gpt-4.1-nano", 64, 128, "high") == 20
    assert image_tokens("gpt-4.1-mini", 1024, 1024) == 1659
    assert image_tokens("loopback", 64, 128, "high") == 255  # unknown: gpt-4o rule
    assert estimate_text_tokens("穿红色上衣") == 5


# --- answers -------------------------------------------------------------------


@pytest.mark.anyio
async def test_caption_proves_image_and_usage(server):
    data = make_image(1)
    async with client_for(server) as client:
        r = await ask(client, data)
        models = await client.models.list()
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == expected_caption(data) == f"A person in image {image_digest(data)}."
    assert r.choices[0].message.refusal is None and r.choices[0].finish_reason == "stop"
    text = estimate_text_tokens(PROMPT) + message_overhead(1)
    assert r.usage.prompt_tokens == 2833 + text
    assert r.usage.completion_tokens == estimate_text_tokens(expected_caption(data))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert {m.id for m in models.data} >= {"gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"}
    assert server.stats.outcomes["ok"] == 1 and server.stats.ok_digests[image_digest(data)] == 1


@pytest.mark.anyio
async def test_image_tokens_by_model_and_detail(server):
    data = make_image(2)
    text = estimate_text_tokens(PROMPT) + message_overhead(1)
    async with client_for(server) as client:
        high = await client.chat.completions.create(model="gpt-4o-mini", messages=messages(data, "high"))
        g4o = await client.chat.completions.create(model="gpt-4o", messages=messages(data, "low"))
        nano = await client.chat.completions.create(model="gpt-4.1-nano", messages=messages(data, "low"))
    assert high.usage.prompt_tokens == 8500 + text
    assert g4o.usage.prompt_tokens == 85 + text
    assert nano.usage.prompt_tokens == 20 + text


@pytest.mark.anyio
async def test_n_choices_and_servers_that_ignore_n(server):
    data = make_image(3)
    async with client_for(server) as client:
        r = await ask(client, data, n=3)
        contents = [c.message.content for c in r.choices]
        assert contents == [expected_caption(data, i) for i in range(3)]
        assert len(set(contents)) == 3
        assert r.usage.completion_tokens == sum(estimate_text_tokens(c) for c in contents)
        server.config.honour_n = False
        r1 = await ask(client, data, n=3)
    assert len(r1.choices) == 1 and r1.choices[0].message.content == expected_caption(data)


@pytest.mark.anyio
async def test_any_image_format_accepted_and_bad_payloads_rejected(server):
    gif = make_image(4, fmt="GIF")
    async with client_for(server) as client:
        r = await client.chat.completions.create(model="gpt-4o", messages=messages(gif, mime="image/gif"))
        assert r.choices[0].message.content == expected_caption(gif)
        bad_b64 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,@@@"}}]}]
        with pytest.raises(openai.BadRequestError) as e1:
            await client.chat.completions.create(model="gpt-4o", messages=bad_b64)
        with pytest.raises(openai.BadRequestError) as e2:
            await client.chat.completions.create(model="gpt-4o", messages=messages(b"not an image at all"))
    assert e1.value.code == "invalid_image" and "base64" in e1.value.message
    assert e2.value.code == "invalid_image" and e2.value.type == "invalid_request_error"
    assert server.stats.outcomes["400"] == 2


# --- auth, models, quota --------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_key_unknown_model_and_quota(server):
    data = make_image(5)
    async with client_for(server, api_key="sk-wrong-key-abcd") as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            await ask(bad, data)
    assert e.value.code == "invalid_api_key"
    assert "sk-" in e.value.message and e.value.message.count("abcd") == 1 and "wrong" not in e.value.message
    async with client_for(server) as client:
        with pytest.raises(openai.NotFoundError) as nf:
            await ask(client, data, model="gpt-9")
        assert nf.value.code == "model_not_found"
        server.configure(quota_exhausted=True)
        with pytest.raises(openai.RateLimitError) as q:
            await ask(client, data)
        assert q.value.code == "insufficient_quota"
    server.configure(quota_exhausted=False, api_key=None)
    async with client_for(server, api_key="anything") as anykey:
        assert (await ask(anykey, data)).choices[0].message.content == expected_caption(data)
    assert server.stats.outcomes["401"] == 1 and server.stats.outcomes["404"] == 1


# --- rate limits -------------------------------------------------------------------


@pytest.mark.anyio
async def test_rpm_limit_gives_429_with_retry_after(server):
    server.configure(rpm=60)  # 1 request/s, bucket of 1
    data = make_image(6)
    async with client_for(server) as client:
        await ask(client, data)
        with pytest.raises(openai.RateLimitError) as e:
            await ask(client, data)
    err = e.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "requests"
    assert "Please try again in" in err.message
    h = err.response.headers
    assert 900 <= int(h["retry-after-ms"]) <= 1000 and h["retry-after"] == "1"
    assert h["x-ratelimit-limit-requests"] == "60"
    assert server.stats.rate_limited["requests"] == 1 and len(server.stats.timestamps_429) == 1


@pytest.mark.anyio
async def test_tpm_limit_counts_prompt_and_max_tokens(server):
    data = make_image(7)
    cost = 2833 + estimate_text_tokens(PROMPT) + message_overhead(1) + 100
    server.configure(tpm=int(cost * 60 * 1.5))  # bucket holds 1.5 requests
    async with client_for(server) as client:
        await ask(client, data, max_tokens=100)
        with pytest.raises(openai.RateLimitError) as e:
            await ask(client, data, max_tokens=100)
    assert e.value.type == "tokens" and int(e.value.response.headers["retry-after-ms"]) > 0


@pytest.mark.anyio
async def test_ratelimit_headers_present_or_absent(server):
    server.configure(rpm=600, tpm=1_000_000)
    data = make_image(8)
    async with client_for(server) as client:
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages(data))
        assert raw.parse().choices[0].message.content == expected_caption(data)
        h = raw.headers
        assert h["x-ratelimit-limit-requests"] == "600" and h["x-ratelimit-remaining-requests"] == "599"
        assert h["x-ratelimit-reset-requests"] == "100ms"
        assert h["x-ratelimit-limit-tokens"] == "1000000"
        assert int(h["x-ratelimit-remaining-tokens"]) < 1_000_000
        assert h["x-ratelimit-reset-tokens"].endswith("s")
        server.configure(send_headers=False)
        raw2 = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages(data))
    assert not [k for k in raw2.headers if k.lower().startswith("x-ratelimit")]


@pytest.mark.anyio
async def test_storm_returns_429_for_its_duration(server):
    server.configure(storms=[(2, 0.4)])
    data = make_image(9)
    async with client_for(server) as client:
        await ask(client, data)
        await ask(client, data)
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            await ask(client, data)
        assert 0 < int(e.value.response.headers["retry-after-ms"]) <= 410  # ceil of the storm time left
        with pytest.raises(openai.RateLimitError):
            await ask(client, data)
        await asyncio.sleep(max(0.0, 0.45 - (time.monotonic() - t0)))
        assert (await ask(client, data)).choices[0].message.content == expected_caption(data)
    assert server.stats.rate_limited["storm"] == 2


# --- faults ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_refusal_apology_content_filter_empty(server):
    data = make_image(10)
    async with client_for(server) as client:
        server.configure(p_refusal=1.0)
        r = await ask(client, data)
        assert r.choices[0].message.content is None and r.choices[0].message.refusal == REFUSAL_TEXT
        assert r.choices[0].finish_reason == "stop"
        server.configure(p_refusal=0.0, p_apology=1.0)
        assert (await ask(client, data)).choices[0].message.content == APOLOGY_TEXT
        server.configure(p_apology=0.0, p_content_filter=1.0)
        cf = await ask(client, data)
        assert cf.choices[0].finish_reason == "content_filter" and cf.choices[0].message.content is None
        server.configure(p_content_filter=0.0, p_empty=1.0)
        assert (await ask(client, data)).choices[0].message.content == ""
    o = server.stats.outcomes
    assert (o["refusal"], o["apology"], o["content_filter"], o["empty"]) == (1, 1, 1, 1)
    assert server.stats.ok_digests[image_digest(data)] == 0


@pytest.mark.anyio
async def test_drop_raises_connection_error(server):
    server.configure(p_drop=1.0)
    async with client_for(server) as client:
        with pytest.raises(openai.APIConnectionError) as e:
            await ask(client, make_image(11))
    assert not isinstance(e.value, openai.APITimeoutError)
    assert server.stats.outcomes["drop"] == 1


@pytest.mark.anyio
async def test_hang_then_client_timeout(server):
    server.configure(p_hang=1.0, hang_s=30)
    async with client_for(server, timeout=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            await ask(client, make_image(12))
        assert time.monotonic() - t0 < 2.0
    for _ in range(50):  # the client gave up: the hung handler is cancelled
        if server.stats.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert server.stats.in_flight == 0 and server.stats.outcomes["hang"] == 1


def test_stop_closes_hung_handlers():
    srv = LoopbackServer(p_hang=1.0).start()

    async def go():
        async with client_for(srv, timeout=30) as client:
            task = asyncio.create_task(ask(client, make_image(13)))
            while srv.stats.in_flight == 0:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await asyncio.to_thread(srv.stop)
            with pytest.raises(openai.APIConnectionError):
                await task
            return time.monotonic() - t0

    assert asyncio.run(go()) < 3.0


@pytest.mark.anyio
async def test_fail_first_attempts_counted_as_extra_requests(server):
    server.configure(fail_first_attempts=2)
    images = [make_image(20 + i) for i in range(3)]
    async with client_for(server) as client:
        for data in images:
            for _ in range(2):
                with pytest.raises(openai.InternalServerError):
                    await ask(client, data)
            assert (await ask(client, data)).choices[0].message.content == expected_caption(data)
    st = server.stats
    assert st.requests == 9 and st.extra_requests == 6
    assert st.outcomes["5xx"] == 6 and st.outcomes["ok"] == 3
    assert all(st.attempts[(image_digest(d), PROMPT)] == 3 for d in images)
    server.reset_stats()
    assert server.stats.requests == 0 and server.stats.extra_requests == 0


@pytest.mark.anyio
async def test_sdk_retries_injected_429_and_5xx(server):
    server.configure(p_429=1.0, fault_retry_after_s=0.05)
    data = make_image(30)
    async with client_for(server, max_retries=1) as client:
        with pytest.raises(openai.RateLimitError) as e:
            await ask(client, data)
        assert e.value.response.headers["retry-after-ms"] == "50"
    assert server.stats.requests == 2 and server.stats.rate_limited["injected"] == 2


@pytest.mark.anyio
async def test_faults_deterministic_regardless_of_order():
    images = [make_image(40 + i) for i in range(24)]

    async def run(order):
        with LoopbackServer(seed=7, p_5xx=0.3, p_refusal=0.2, p_empty=0.1) as srv:
            async with client_for(srv) as client:

                async def one(d):
                    try:
                        r = await ask(client, d)
                        m = r.choices[0].message
                        return image_digest(d), m.content if m.refusal is None else "refusal"
                    except openai.InternalServerError:
                        return image_digest(d), "5xx"

                return dict(await asyncio.gather(*(one(d) for d in order)))

    a = await run(images)
    b = await run(list(reversed(images)))
    assert a == b
    assert {"5xx", "refusal"} <= set(a.values()) and any(v.startswith("A person") for v in a.values())


# --- structured output -----------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "gender": {"type": "string", "enum": ["male", "female", "unknown"]},
        "backpack": {"type": "boolean"},
        "age": {"type": "integer", "minimum": 1, "maximum": 90},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "colours": {"type": "array", "items": {"type": "string"}},
        "upper": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": ["black", "white", "red"]}, "sleeve": {"type": "string"}},
            "required": ["colour", "sleeve"],
            "additionalProperties": False,
        },
    },
    "required": ["caption", "gender", "backpack", "age", "confidence", "colours", "upper"],
    "additionalProperties": False,
}


def conforms(value, schema) -> bool:
    if "enum" in schema and value not in schema["enum"]:
        return False
    t = schema.get("type")
    if t == "object":
        props = schema.get("properties", {})
        if not isinstance(value, dict) or any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(conforms(value[k], props[k]) for k in value if k in props)
    if t == "array":
        return isinstance(value, list) and all(conforms(v, schema.get("items", {})) for v in value)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t in ("integer", "number"):
        ok = isinstance(value, int) if t == "integer" else isinstance(value, (int, float))
        return ok and not isinstance(value, bool) and schema.get("minimum", value) <= value <= schema.get("maximum", value)
    return True


@pytest.mark.anyio
async def test_json_schema_answer_conforms_and_invalid_json_injection(server):
    data = make_image(50)
    rf = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": SCHEMA}}
    async with client_for(server) as client:
        r = await ask(client, data, response_format=rf)
        obj = json.loads(r.choices[0].message.content)
        assert conforms(obj, SCHEMA)
        assert obj == expected_json(data, SCHEMA)
        assert obj["caption"] == expected_caption(data)
        server.configure(p_invalid_json=1.0)
        bad = await ask(client, data, response_format=rf)
    try:
        bad_obj = json.loads(bad.choices[0].message.content)
    except ValueError:
        bad_obj = None
    assert bad_obj is None or not conforms(bad_obj, SCHEMA)
    assert server.stats.outcomes["invalid_json"] == 1


def test_config_is_a_mutable_dataclass():
    cfg = LoopbackConfig(rpm=60)
    srv = LoopbackServer(cfg, latency=0.01)
    assert srv.config is cfg and cfg.latency == 0.01
    with pytest.raises(TypeError):
        srv.configure(no_such_field=1)


# --- CLI ---------------------------------------------------------------------------


def test_cli_listens_serves_and_reports_stats():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.testing.loopback", "--port", "0", "--latency", "0.01",
         "--rpm", "600", "--no-headers", "--api-key", "sk-cli-test"],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("LISTENING http://127.0.0.1:") and line.endswith("/v1")
        base_url = line.split()[1]
        data = make_image(60)

        async def go():
            async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-cli-test", max_retries=0) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=messages(data)
                )
                return raw.parse().choices[0].message.content, dict(raw.headers)

        content, headers = asyncio.run(go())
        assert content == expected_caption(data)
        assert not [k for k in headers if k.lower().startswith("x-ratelimit")]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    stats_lines = [ln for ln in out.splitlines() if ln.startswith("STATS ")]
    assert len(stats_lines) == 1
    stats = json.loads(stats_lines[0][len("STATS "):])
    assert stats["requests"] == 1 and stats["outcomes"] == {"ok": 1}
