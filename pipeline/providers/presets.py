"""`--provider` presets: where a provider's OpenAI-compatible endpoint is, which variable holds its key,
and whether it costs anything; and how a run's endpoint, key and prices are resolved from them.

The table is data (`PRESETS`); resolution is pure functions of the flags and an environment mapping, so
both are tested without a server. The rules:

- base URL: `--base-url` wins; else a provider's own endpoint; else (provider `openai`) `$OPENAI_BASE_URL`,
  else the SDK's default. For `openai` this is what it always was. For another provider its endpoint
  beats `$OPENAI_BASE_URL`, because `--provider` is said on the command line and the variable is
  ambient (often left over from an earlier proxy); `--base-url` still points any preset elsewhere (a
  test server, a gateway) while the preset keeps its key variable and prices. Azure's endpoint comes
  from `--base-url` or `$AZURE_OPENAI_ENDPOINT`.
- key: the preset's variable (`DASHSCOPE_API_KEY`, `GEMINI_API_KEY`, ...), else `$OPENAI_API_KEY`;
  a missing key is one line naming the variable. Local servers need none (a placeholder is sent).
- prices: local servers cost 0 unless `--price-*` says otherwise; others come from the pricing file.

DashScope has one endpoint per region and a key per region: `dashscope` is China (Beijing),
`dashscope-intl` international (Singapore), `dashscope-us` the US (Virginia).

Azure OpenAI: `--model` is the deployment name; requests go through the SDK's `AsyncAzureOpenAI`, which
puts it in the path (`/openai/deployments/<model>/chat/completions?api-version=...`) and the key in the
`api-key` header. An endpoint ending in `/openai/v1` is Azure's newer v1 API and goes through the plain
client (pipeline.providers.openai).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from pipeline.errors import ConfigError, InputError

__all__ = [
    "ProviderPreset",
    "PRESETS",
    "DEFAULT_PROVIDER",
    "AZURE_API_VERSION",
    "LOCAL_PLACEHOLDER_KEY",
    "provider_names",
    "get_preset",
    "Endpoint",
    "resolve_endpoint",
    "ResolvedKey",
    "resolve_key",
    "resolve_api_version",
    "preset_prices",
    "default_model",
    "model_or_default",
]

DEFAULT_PROVIDER = "openai"
# Azure OpenAI's data-plane API version used when neither --api-version nor $OPENAI_API_VERSION is set:
# the latest generally-available (non-preview) version we know of. Check Microsoft's "API version
# lifecycle" page; any version your resource supports can be passed with --api-version.
AZURE_API_VERSION = "2024-10-21"
# What is sent as the key to a local server that checks none (vLLM without --api-key, Ollama, LM Studio).
LOCAL_PLACEHOLDER_KEY = "sk-no-key-required"


@dataclass(frozen=True)
class ProviderPreset:
    """One provider: its endpoint, its key variable, and what it costs.

    `base_url` None means the SDK's default (OpenAI) or, for Azure, the resource endpoint the user gives.
    `key_env` None means the server needs no key. `free` servers run on the user's own hardware: price 0.
    `default_model` is used when --model is not given (None: the user must name one, e.g. a local
    server's or an Azure deployment's own name).
    """

    name: str
    title: str
    base_url: str | None
    key_env: str | None
    free: bool = False
    azure: bool = False
    default_model: str | None = None


PRESETS: dict[str, ProviderPreset] = {
    p.name: p
    for p in (
        ProviderPreset("openai", "OpenAI", None, "OPENAI_API_KEY", default_model="gpt-4o-mini"),
        ProviderPreset(
            "dashscope", "Alibaba Cloud Model Studio (DashScope, China/Beijing)",
            "https://dashscope.aliyuncs.com/compatible-mode/v1", "DASHSCOPE_API_KEY",
            default_model="qwen-vl-plus",
        ),
        ProviderPreset(
            "dashscope-intl", "Alibaba Cloud Model Studio (DashScope, international/Singapore)",
            "https://dashscope-intl.aliyuncs.com/compatible-mode/v1", "DASHSCOPE_API_KEY",
            default_model="qwen-vl-plus",
        ),
        ProviderPreset(
            "dashscope-us", "Alibaba Cloud Model Studio (DashScope, US/Virginia)",
            "https://dashscope-us.aliyuncs.com/compatible-mode/v1", "DASHSCOPE_API_KEY",
            default_model="qwen3-vl-plus",
        ),
        ProviderPreset(
            "gemini", "Google Gemini (OpenAI-compatible endpoint)",
            "https://generativelanguage.googleapis.com/v1beta/openai/", "GEMINI_API_KEY",
            default_model="gemini-2.5-flash",
        ),
        ProviderPreset("openrouter", "OpenRouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
        ProviderPreset("azure", "Azure OpenAI", None, "AZURE_OPENAI_API_KEY", azure=True),
        ProviderPreset("vllm", "vLLM (local)", "http://localhost:8000/v1", None, free=True),
        ProviderPreset("ollama", "Ollama (local)", "http://localhost:11434/v1", None, free=True),
        ProviderPreset("lmstudio", "LM Studio (local)", "http://localhost:1234/v1", None, free=True),
    )
}


def provider_names() -> list[str]:
    """The names `--provider` takes, in the table's order."""
    return list(PRESETS)


def get_preset(name: str | None) -> ProviderPreset:
    """The preset called `name` (None: openai); an unknown name is one ConfigError listing the choices."""
    key = (name or DEFAULT_PROVIDER).strip().lower()
    preset = PRESETS.get(key)
    if preset is None:
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(PRESETS)}")
    return preset


def default_model(name: str | None) -> str | None:
    """The model a provider is asked for when --model is not given (None: it has to be named)."""
    return get_preset(name).default_model


def model_or_default(name: str, model: str | None) -> str:
    """--model, else the provider's default; a provider without one (azure, openrouter) needs --model:
    one line (exit 2). `run` and `probe` choose the model alike."""
    chosen = model or default_model(name)
    if not chosen:
        raise InputError(f"--provider {name} needs --model: the name of the model "
                         f"{'deployment ' if name == 'azure' else ''}to ask")
    return chosen


@dataclass(frozen=True)
class Endpoint:
    """Where a run's requests go, and which rule chose it (said in errors and recorded in the manifest)."""

    base_url: str | None  # None: the SDK's default (api.openai.com)
    source: str  # "--base-url" | "preset" | "OPENAI_BASE_URL" | "AZURE_OPENAI_ENDPOINT" | "default"


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def resolve_endpoint(name: str | None, base_url_flag: str | None, env: Mapping[str, str]) -> Endpoint:
    """The base URL of a run (see the module's rules). Pure: `env` is the environment to read."""
    preset = get_preset(name)
    flag = _clean(base_url_flag)
    if flag is not None:
        return Endpoint(flag, "--base-url")
    if preset.azure:
        endpoint = _clean(env.get("AZURE_OPENAI_ENDPOINT"))
        if endpoint is None:
            raise ConfigError(
                "--provider azure needs the resource endpoint: set AZURE_OPENAI_ENDPOINT or pass "
                "--base-url https://<resource>.openai.azure.com"
            )
        return Endpoint(endpoint, "AZURE_OPENAI_ENDPOINT")
    if preset.base_url is not None:
        return Endpoint(preset.base_url, "preset")
    from_env = _clean(env.get("OPENAI_BASE_URL"))
    if from_env is not None:
        return Endpoint(from_env, "OPENAI_BASE_URL")
    return Endpoint(None, "default")


@dataclass(frozen=True)
class ResolvedKey:
    """The key a run sends and the variable it came from (the key itself never printed)."""

    key: str = field(repr=False)
    variable: str  # "DASHSCOPE_API_KEY", "OPENAI_API_KEY", "api_key" (given by code), "none" (local placeholder)


def resolve_key(name: str | None, env: Mapping[str, str], explicit: str | None = None) -> ResolvedKey:
    """The key for provider `name`: `explicit` (a key handed over by code), else the preset's variable,
    else $OPENAI_API_KEY; local servers fall back to a placeholder. Pure.

    A missing key is one ConfigError that names the variable to set. Empty and blank values count as
    unset. The key is returned stripped; whether it can go into a header is checked by the caller.
    """
    preset = get_preset(name)
    if explicit is not None and explicit.strip():
        return ResolvedKey(explicit.strip(), "api_key")
    variables = [v for v in (preset.key_env, "OPENAI_API_KEY") if v]
    for variable in dict.fromkeys(variables):
        value = _clean(env.get(variable))
        if value is not None:
            return ResolvedKey(value, variable)
    if preset.key_env is None:
        return ResolvedKey(LOCAL_PLACEHOLDER_KEY, "none")
    if preset.key_env == "OPENAI_API_KEY":
        raise ConfigError(
            "OPENAI_API_KEY is not set: export your key (or use --backend offline to rehearse without one)"
        )
    raise ConfigError(
        f"{preset.key_env} is not set: export your {preset.title} key as {preset.key_env} "
        "(OPENAI_API_KEY is used when it is absent)"
    )


def resolve_api_version(name: str | None, flag: str | None, env: Mapping[str, str]) -> str | None:
    """Azure's api-version: --api-version, else $OPENAI_API_VERSION, else `AZURE_API_VERSION`.
    None for every other provider (they take no api-version)."""
    if not get_preset(name).azure:
        return None
    return _clean(flag) or _clean(env.get("OPENAI_API_VERSION")) or AZURE_API_VERSION


def preset_prices(
    name: str | None, price_in: float | None, price_out: float | None, price_cached_in: float | None
) -> tuple[float | None, float | None, float | None]:
    """The --price-* overrides a run uses: a local server's are 0 where not given; others unchanged."""
    if not get_preset(name).free:
        return price_in, price_out, price_cached_in
    return (
        0.0 if price_in is None else price_in,
        0.0 if price_out is None else price_out,
        price_cached_in if price_cached_in is not None else (price_in if price_in is not None else 0.0),
    )
