"""--provider presets, the Qwen-VL and Gemini image-token rules, prefixed model names in the pricing
file, and error bodies in every provider's shape: pure tables first, then end to end through the real
SDK against the loopback server."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import KEY, rows
from pipeline.errors import ConfigError
from pipeline.providers.base import ErrorKind
from pipeline.providers.classify import classify_status
from pipeline.providers.errorbody import error_code, error_message, error_type
from pipeline.providers.openai import azure_client_args, is_azure_v1
from pipeline.providers.presets import (
    AZURE_API_VERSION,
    LOCAL_PLACEHOLDER_KEY,
    PRESETS,
    get_preset,
    preset_prices,
    resolve_api_version,
    resolve_endpoint,
    resolve_key,
)
from pipeline.providers.pricing import guess_image_rule, load_pricing, lookup, lookup_names, resolve_price
from pipeline.providers.tokens import GEMINI, QWEN_VL_28, QWEN_VL_32, TILE_4O, image_tokens, qwen_resize
from pipeline.testing import synth
from pipeline.testing.loopback import (
    DEFAULT_MODELS,
    ERROR_SHAPES,
    LoopbackServer,
    gemini_image_tokens,
    qwen_image_tokens,
    shape_error,
)
from pipeline.testing.loopback import image_tokens as billed_tokens

KEY_VARS = ("OPENAI_API_KEY", "DASHSCOPE_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY", "AZURE_OPENAI_API_KEY")


# --- presets: endpoint, key, prices (pure) ------------------------------------------------------------

@pytest.mark.parametrize("provider, url", [
    ("dashscope", "https://dashscope.aliyuncs.com/compatible-mode/v1"),
    ("dashscope-intl", "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"),
    ("gemini", "https://generativelanguage.googleapis.com/v1beta/openai/"),
    ("openrouter", "https://openrouter.ai/api/v1"),
    ("vllm", "http://localhost:8000/v1"),
    ("ollama", "http://localhost:11434/v1"),
    ("lmstudio", "http://localhost:1234/v1"),
])
def test_preset_endpoint_and_what_overrides_it(provider, url):
    assert resolve_endpoint(provider, None, {}).base_url == url
    # --base-url points any preset elsewhere; $OPENAI_BASE_URL (ambient) does not beat a chosen provider
    assert resolve_endpoint(provider, "http://127.0.0.1:9/v1", {}).base_url == "http://127.0.0.1:9/v1"
    got = resolve_endpoint(provider, None, {"OPENAI_BASE_URL": "http://proxy/v1"})
    assert (got.base_url, got.source) == (url, "preset")


def test_openai_endpoint_is_what_it_always_was():
    assert resolve_endpoint(None, None, {}).base_url is None  # the SDK's default
    assert resolve_endpoint("openai", None, {"OPENAI_BASE_URL": " http://x/v1 "}).base_url == "http://x/v1"
    assert resolve_endpoint("openai", "http://y/v1", {"OPENAI_BASE_URL": "http://x/v1"}).base_url == "http://y/v1"


def test_azure_endpoint_comes_from_its_variable_or_base_url():
    env = {"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com/"}
    assert resolve_endpoint("azure", None, env).source == "AZURE_OPENAI_ENDPOINT"
    assert resolve_endpoint("azure", "https://other.openai.azure.com", env).base_url == "https://other.openai.azure.com"
    with pytest.raises(ConfigError, match="AZURE_OPENAI_ENDPOINT"):
        resolve_endpoint("azure", None, {"OPENAI_BASE_URL": "http://x/v1"})
    assert resolve_api_version("azure", None, {}) == AZURE_API_VERSION
    assert resolve_api_version("azure", None, {"OPENAI_API_VERSION": "2025-01-01"}) == "2025-01-01"
    assert resolve_api_version("azure", "2024-06-01", {"OPENAI_API_VERSION": "x"}) == "2024-06-01"
    assert resolve_api_version("dashscope", "2024-06-01", {}) is None


def test_azure_v1_api_takes_the_plain_client():
    assert is_azure_v1("https://res.openai.azure.com/openai/v1/")
    assert not is_azure_v1("https://res.openai.azure.com/") and not is_azure_v1("https://res.openai.azure.com/openai")
    assert not is_azure_v1(None)


def test_azure_client_args_split_resource_url_from_base_url():
    assert azure_client_args("https://res.openai.azure.com/", "v") == {
        "azure_endpoint": "https://res.openai.azure.com", "api_version": "v"}
    assert azure_client_args("https://res.openai.azure.com/openai", "v") == {
        "base_url": "https://res.openai.azure.com/openai", "api_version": "v"}


@pytest.mark.parametrize("provider, variable", [
    ("openai", "OPENAI_API_KEY"), ("dashscope", "DASHSCOPE_API_KEY"), ("dashscope-intl", "DASHSCOPE_API_KEY"),
    ("gemini", "GEMINI_API_KEY"), ("openrouter", "OPENROUTER_API_KEY"), ("azure", "AZURE_OPENAI_API_KEY"),
])
def test_key_variable_per_provider_falls_back_to_openai_key(provider, variable):
    assert get_preset(provider).key_env == variable
    got = resolve_key(provider, {variable: " k-1 "})
    assert (got.key, got.variable) == ("k-1", variable)
    if variable != "OPENAI_API_KEY":
        got = resolve_key(provider, {variable: " k-1 ", "OPENAI_API_KEY": "k-2"})
        assert (got.key, got.variable) == ("k-1", variable)
        got = resolve_key(provider, {variable: "  ", "OPENAI_API_KEY": "k-2"})  # blank counts as unset
        assert (got.key, got.variable) == ("k-2", "OPENAI_API_KEY")
    with pytest.raises(ConfigError) as exc:
        resolve_key(provider, {})
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{variable} is not set")
    assert "k-" not in repr(got)  # the key never reaches a repr


@pytest.mark.parametrize("provider", ["vllm", "ollama", "lmstudio"])
def test_local_servers_need_no_key_and_cost_nothing(provider):
    assert resolve_key(provider, {}).key == LOCAL_PLACEHOLDER_KEY
    assert resolve_key(provider, {"OPENAI_API_KEY": "mine"}).key == "mine"  # vllm --api-key
    assert preset_prices(provider, None, None, None) == (0.0, 0.0, 0.0)
    assert preset_prices(provider, 0.5, None, None) == (0.5, 0.0, 0.5)
    assert preset_prices("dashscope", None, None, None) == (None, None, None)


def test_unknown_provider_is_one_line():
    with pytest.raises(ConfigError, match="unknown provider 'bedrock': choose one of openai, dashscope"):
        get_preset("bedrock")
    assert set(PRESETS) >= {"openai", "dashscope", "dashscope-intl", "gemini", "openrouter", "azure", "vllm",
                            "ollama", "lmstudio"}


# --- image-token rules (pure) -----------------------------------------------------------------------------

@pytest.mark.parametrize("rule, size, tokens", [
    # Qwen2/2.5-VL, 28-px patches, 4..1280: 64x128 -> 56x140 -> 2x5 + 2
    (QWEN_VL_28, (64, 128), 12),
    (QWEN_VL_28, (1920, 1080), 1224),  # 69x39 patches > 1280: scaled to 47x26
    (QWEN_VL_28, (10, 10), 6),  # below 4 patches: scaled up to 56x56
    (QWEN_VL_28, (28, 28), 6),
    (QWEN_VL_28, (8000, 6000), 1232),  # 41x30
    (QWEN_VL_28, (42, 70), 6),  # 1.5 and 2.5 patches: round() ties to even, as the reference code does
    # Qwen3-VL, 32-px patches, 4..2560
    (QWEN_VL_32, (64, 128), 10),
    (QWEN_VL_32, (1920, 1080), 2042),  # 60x34
    (QWEN_VL_32, (10, 10), 6),
    (QWEN_VL_32, (8000, 6000), 2496),
    # Gemini 2.x: 258 up to 384x384, else 258 per crop tile of side min(w,h)/1.5 in 256..768
    (GEMINI, (64, 128), 258),
    (GEMINI, (384, 384), 258),
    (GEMINI, (385, 100), 516),  # tile 256 px: 2x1
    (GEMINI, (1920, 1080), 1548),  # tile 720 px: 3x2
    (GEMINI, (8000, 6000), 22704),  # tile 768 px: 11x8
    (GEMINI, (10, 10), 258),
])
def test_image_token_rules(rule, size, tokens):
    for detail in ("low", "high", "auto"):  # neither family has a detail setting
        assert image_tokens(rule, size[0], size[1], detail) == tokens


def test_qwen_resize_keeps_multiples_and_bounds():
    for w, h in [(1, 300), (64, 128), (333, 777), (1920, 1080), (4000, 3000), (5000, 30)]:
        rw, rh = qwen_resize(w, h, 28, 4, 1280)
        assert rw % 28 == 0 and rh % 28 == 0
        assert 4 <= (rw // 28) * (rh // 28) <= 1280


@pytest.mark.parametrize("model", ["qwen-vl-plus", "qwen2.5-vl-7b-instruct", "qwen3-vl-plus",
                                   "qwen-vl-max-2025-08-13", "gemini-2.0-flash", "gemini-2.5-flash"])
@pytest.mark.parametrize("size", [(64, 128), (1920, 1080), (10, 10), (8000, 6000)])
def test_estimate_matches_what_the_provider_bills_within_2_percent(model, size):
    """The pipeline's estimate (the pricing file's rule) against the loopback server's bill, which
    implements each provider's published rule separately; a 64x128 crop must be within 2 %."""
    rule = resolve_price(load_pricing(), model).image_rule
    estimate = image_tokens(rule, size[0], size[1], "low")
    billed = billed_tokens(model, size[0], size[1], "low")
    assert abs(estimate - billed) <= 0.02 * billed, (model, size, estimate, billed)


def test_loopback_bills_qwen_and_gemini_by_their_rules():
    assert qwen_image_tokens(128, 64) == 12 and qwen_image_tokens(128, 64, 32, 2560) == 10
    assert gemini_image_tokens(64, 128) == 258 and gemini_image_tokens(1920, 1080) == 1548
    assert billed_tokens("qwen-vl-plus", 64, 128) == 12
    assert billed_tokens("qwen3-vl-flash", 64, 128) == 10
    assert billed_tokens("gemini-2.5-flash-lite", 64, 128) == 258
    assert billed_tokens("gpt-4o", 64, 128, "low") == 85  # OpenAI models as before


# --- pricing file: the new models, their sources, prefixed names ------------------------------------------

def test_every_model_says_where_its_figures_came_from():
    table = load_pricing()
    for name, price in table.models.items():
        assert price.source, name
    for name in ("qwen-vl-plus", "qwen-vl-max", "qwen2.5-vl-72b-instruct", "qwen2.5-vl-32b-instruct",
                 "qwen2.5-vl-7b-instruct", "qwen2.5-vl-3b-instruct", "qwen3-vl-plus", "qwen3-vl-flash",
                 "gemini-2.0-flash", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gpt-5", "gpt-5-mini",
                 "gpt-4.1", "o4-mini"):
        assert name in table.models, name
        assert table.models[name].taken_on, name


@pytest.mark.parametrize("model, listed, kind", [
    ("qwen/qwen2.5-vl-72b-instruct", "qwen2.5-vl-72b-instruct", "qwen"),  # OpenRouter
    ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b-instruct", "qwen"),  # vLLM serving a HF repo
    ("google/gemini-2.0-flash-001", "gemini-2.0-flash", "gemini"),  # OpenRouter
    ("models/gemini-2.5-flash", "gemini-2.5-flash", "gemini"),  # Gemini's own spelling
    ("gemini-2.0-flash-lite-001", "gemini-2.0-flash-lite", "gemini"),  # not gemini-2.0-flash
    ("openai/gpt-4o-mini", "gpt-4o-mini", "tile"),
    ("qwen-vl-max-latest", "qwen-vl-max", "qwen"),
    ("qwen3-vl-235b-a22b-instruct", "qwen3-vl-235b-a22b", "qwen"),
    ("gpt-5-mini-2025-08-07", "gpt-5-mini", "patch"),
])
def test_lookup_understands_provider_prefixed_names(model, listed, kind):
    price = lookup(load_pricing(), model)
    assert price is not None and price.model == listed and price.image_rule.kind == kind


def test_lookup_names_and_free_variants():
    assert lookup_names("qwen/qwen-vl-plus:free") == [
        "qwen/qwen-vl-plus:free", "qwen/qwen-vl-plus", "qwen-vl-plus:free", "qwen-vl-plus"]
    free = resolve_price(load_pricing(), "qwen/qwen-vl-plus:free")
    assert free.known and (free.input, free.output) == (0.0, 0.0) and free.image_rule.kind == "qwen"
    assert resolve_price(load_pricing(), "qwen/qwen-vl-plus").input > 0


def test_unlisted_models_get_their_familys_image_rule():
    assert guess_image_rule("qwen2.5vl:7b") == QWEN_VL_28  # Ollama's name
    assert guess_image_rule("Qwen/Qwen3-VL-4B-Instruct") == QWEN_VL_32
    assert guess_image_rule("gemini-3-whatever") == GEMINI
    assert guess_image_rule("llava:13b") == TILE_4O
    price = resolve_price(load_pricing(), "qwen2.5vl:7b")
    assert not price.known and price.image_rule.kind == "qwen"


# --- error bodies in every provider's shape (pure) ----------------------------------------------------

OPENAI_429 = {"error": {"message": "Rate limit reached for requests", "type": "requests",
                        "code": "rate_limit_exceeded", "param": None}}
GEMINI_KEY = [{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                         "status": "INVALID_ARGUMENT",
                         "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                      "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}]


@pytest.mark.parametrize("body, message, code, etype", [
    (OPENAI_429, "Rate limit reached for requests", "rate_limit_exceeded", "requests"),
    (OPENAI_429["error"], "Rate limit reached for requests", "rate_limit_exceeded", "requests"),  # SDK-unwrapped
    ({"code": "Arrearage", "message": "Access denied, please make sure your account is in good standing.",
      "request_id": "a1b2"}, "Access denied, please make sure your account is in good standing.", "Arrearage", None),
    ({"code": "InvalidParameter", "message": "The image is too  small\n(min 10px)", "request_id": "x"},
     "The image is too small (min 10px)", "InvalidParameter", None),
    ({"error": {"code": "invalid_parameter_error", "message": "bad image", "type": "invalid_request_error"},
      "request_id": "r"}, "bad image", "invalid_parameter_error", "invalid_request_error"),  # DashScope compat
    (GEMINI_KEY, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID", None),
    ([{"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}],
     "Resource has been exhausted", "RESOURCE_EXHAUSTED", None),
    ({"detail": "Model gpt-x not found"}, "Model gpt-x not found", None, None),  # transformers serve
    ({"detail": [{"loc": ["body", "messages"], "msg": "field required", "type": "missing"}]},
     "body.messages: field required", None, None),  # FastAPI validation
    ({"message": "server busy, please try again."}, "server busy, please try again.", None, None),
    ({"error": "model 'qwen' not found"}, "model 'qwen' not found", None, None),  # Ollama native
    ("Internal Server Error", "Internal Server Error", None, None),
    ("<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>",
     "502 Bad Gateway 502 Bad Gateway", None, None),
    (b"upstream timed out", "upstream timed out", None, None),
    (None, "", None, None),
    ({}, "", None, None),
    ({"error": {"code": 500}}, "", None, None),  # a numeric code is only the status again
])
def test_error_bodies_of_every_shape(body, message, code, etype):
    assert error_message(body) == message
    assert error_code(body) == code
    assert error_type(body) == etype


@pytest.mark.parametrize("status, body, kind", [
    (400, {"code": "Arrearage", "message": "Access denied"}, ErrorKind.QUOTA),  # DashScope: overdue account
    (403, {"code": "AllocationQuota.FreeTierOnly", "message": "free tier used up"}, ErrorKind.QUOTA),
    (401, {"code": "InvalidApiKey", "message": "Invalid API-key provided."}, ErrorKind.AUTH),
    (400, GEMINI_KEY, ErrorKind.AUTH),  # Gemini says a bad key with a 400
    (400, [{"error": {"code": 400, "message": "User location is not supported for the API use.",
                      "status": "FAILED_PRECONDITION"}}], ErrorKind.PERMISSION),
    (429, [{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}], ErrorKind.RATE_LIMIT),
    (400, {"code": "DataInspectionFailed", "message": "Input data may contain inappropriate content."},
     ErrorKind.BAD_REQUEST),
    (400, {"detail": "Model not found"}, ErrorKind.BAD_REQUEST),
    (503, "server busy, please try again. maximum pending requests exceeded", ErrorKind.SERVER),
    (429, OPENAI_429, ErrorKind.RATE_LIMIT),
])
def test_classification_reads_codes_in_every_shape(status, body, kind):
    assert classify_status(status, error_code(body), error_type=error_type(body)) is kind


def test_loopback_shapes_its_errors():
    body = {"error": {"message": "boom", "type": "server_error", "code": None}}
    for shape in ERROR_SHAPES:
        data, content_type = shape_error(500, body, shape)
        decoded = data.decode() if content_type == "text/plain" else json.loads(data)
        assert error_message(decoded) == "boom", shape


# --- end to end: the CLI, the real SDK, the loopback server -------------------------------------------

@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Three 64x128 crops and one 1920x1080 frame, indexed as a plain JSON list of paths (made once:
    the tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("crops")
    root = tmp_path / "imgs"
    paths = [synth.make_crop(root / f"000{i}_c1s1_00000{i}_01.jpg", upper=(200, 30 * i, 30), lower=(20, 20, 90))
             for i in range(1, 4)]
    frame = root / "0004_c2s1_000004_01.jpg"
    Image.new("RGB", (1920, 1080), (40, 90, 140)).save(frame, quality=80)
    paths.append(frame)
    index = tmp_path / "index.json"
    index.write_text(json.dumps([p.name for p in paths]), encoding="utf-8")
    prompt = tmp_path / "base.txt"
    prompt.write_text("Describe the person's clothes in one sentence.\n", encoding="utf-8")
    return index, root, prompt


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No key, endpoint or api-version variable from the caller's environment, and a current folder
    without a .env."""
    for var in (*KEY_VARS, "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION"):
        monkeypatch.delenv(var, raising=False)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return monkeypatch


def _server(**config) -> LoopbackServer:
    return LoopbackServer(**config).start()


def _args(crops, out: Path, *extra: object) -> list[object]:
    index, root, prompt = crops
    return ["run", "--index", index, "--root", root, "--out", out, "--prompt-file", prompt,
            "--no-dashboard", *extra]


def test_dashscope_run_uses_its_key_variable_qwen_prices_and_qwen_tokens(cli, crops, tmp_path, clean_env):
    clean_env.setenv("DASHSCOPE_API_KEY", KEY)
    out = tmp_path / "out"
    srv = _server(models=(*DEFAULT_MODELS, "qwen-vl-plus"))
    try:
        # the dry run estimates images by the Qwen rule: 3 crops x 12 + the 1080p frame's 1224
        dry = cli(*_args(crops, out, "--provider", "dashscope", "--base-url", srv.base_url, "--dry-run"))
        assert dry.code == 0, dry.err
        assert srv.stats.requests == 0
        image = int(re.search(r"\(image ([\d,]+),", dry.out).group(1).replace(",", ""))
        assert image == 3 * 12 + 1224 == 3 * qwen_image_tokens(64, 128) + qwen_image_tokens(1920, 1080)

        res = cli(*_args(crops, out, "--provider", "dashscope", "--base-url", srv.base_url))
        assert res.code == 0, res.err
        assert srv.stats.requests == 4
    finally:
        srv.stop()
    price = resolve_price(load_pricing(), "qwen-vl-plus")
    table = rows(out / "captions_all.csv")
    assert {r["model"] for r in table} == {"qwen-vl-plus"}  # the preset's default model
    for r in table:
        expected = (int(r["prompt_tokens"]) * price.input + int(r["completion_tokens"]) * price.output) / 1e6
        assert math.isclose(float(r["cost_usd"]), expected, rel_tol=1e-6, abs_tol=1e-12), r
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["provider"] == "dashscope" and manifest["base_url"] == srv.base_url
    assert manifest["price"]["source"] == price.source and manifest["price"]["taken_on"]
    assert KEY not in (out / "manifest.json").read_text(encoding="utf-8")


def test_missing_provider_key_is_one_line_naming_the_variable(cli, crops, tmp_path, clean_env):
    srv = _server()
    try:
        res = cli(*_args(crops, tmp_path / "out", "--provider", "gemini", "--base-url", srv.base_url))
    finally:
        srv.stop()
    assert res.code == 2
    lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: GEMINI_API_KEY is not set"), res.err
    assert srv.stats.requests == 0


def test_provider_without_default_model_asks_for_one(cli, crops, tmp_path, clean_env):
    clean_env.setenv("OPENROUTER_API_KEY", KEY)
    res = cli(*_args(crops, tmp_path / "out", "--provider", "openrouter", "--base-url", "http://127.0.0.1:9/v1"))
    assert res.code == 2 and "--provider openrouter needs --model" in res.err


def test_local_server_preset_needs_no_key_and_costs_nothing(cli, crops, tmp_path, clean_env):
    out = tmp_path / "out"
    srv = _server(api_key=None)
    try:
        res = cli(*_args(crops, out, "--provider", "vllm", "--base-url", srv.base_url, "--model", "loopback"))
    finally:
        srv.stop()
    assert res.code == 0, res.err
    assert {float(r["cost_usd"]) for r in rows(out / "captions_all.csv")} == {0.0}


def test_azure_deployment_url_api_version_and_key_header(cli, crops, tmp_path, clean_env):
    """Through AsyncAzureOpenAI the backend's low-level client.post("/chat/completions") reaches
    /openai/deployments/<deployment>/chat/completions?api-version=..., the key in the api-key header."""
    clean_env.setenv("AZURE_OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    srv = _server(models=(*DEFAULT_MODELS, "my-4o-deployment"))
    try:
        clean_env.setenv("AZURE_OPENAI_ENDPOINT", srv.base_url.rsplit("/v1", 1)[0])
        res = cli(*_args(crops, out, "--provider", "azure", "--model", "my-4o-deployment"))
        assert res.code == 0, res.err
        paths = list(srv.stats.azure_requests)
    finally:
        srv.stop()
    assert len(paths) == 4
    assert set(paths) == {("/openai/deployments/my-4o-deployment/chat/completions", AZURE_API_VERSION)}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["provider"] == "azure" and manifest["api_version"] == AZURE_API_VERSION


@pytest.mark.parametrize("shape", ERROR_SHAPES)
def test_error_bodies_reach_errors_csv_in_the_servers_words(cli, crops, tmp_path, clean_env, shape):
    clean_env.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    srv = _server(fail_first_attempts=1, error_shape=shape)
    try:
        res = cli(*_args(crops, out, "--base-url", srv.base_url, "--model", "loopback", "--max-attempts", 1))
    finally:
        srv.stop()
    assert res.code == 1, res.err  # every image failed once and had no second attempt
    errors = rows(out / "errors.csv")
    assert len(errors) == 4
    for e in errors:
        assert e["reason"] == "server_error"
        assert "The server had an error while processing your request" in e["detail"], (shape, e["detail"])
        assert e["detail"].startswith("HTTP 500")
