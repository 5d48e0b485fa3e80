"""An HTTP error answer as an ErrorKind: by status, the error's `code` and `type`, never the message.

Every provider's failures become one of these kinds (`pipeline.providers.base.ErrorKind`); the retry
policy and the CLI read only the kind.
"""

from __future__ import annotations

import re
from typing import Mapping

from pipeline.providers.base import ErrorKind
from pipeline.providers.headers import exceeds_token_limit

__all__ = ["classify_status", "names_model", "wrong_model"]


# Codes are compared lower-cased. Besides OpenAI's: DashScope's "Arrearage" (400: the account is overdue)
# and "AllocationQuota.FreeTierOnly" (403: the free quota is used up and paid use is off) are out of money;
# DashScope's "InvalidApiKey" and Google's ErrorInfo reason "API_KEY_INVALID" (sent with a 400) are a bad
# key; Google's "FAILED_PRECONDITION" (400: e.g. the API is not offered in the caller's region without
# billing) refuses every request alike, so it stops the run as a refusal of access.
_QUOTA_CODES = frozenset({
    "insufficient_quota", "billing_not_active", "billing_hard_limit_reached",
    "arrearage", "allocationquota.freetieronly",
})
_TOO_LARGE_CODES = frozenset(
    {"request_too_large", "context_length_exceeded", "string_above_max_length", "tokens_exceeded"}
)
_AUTH_CODES = frozenset({"invalid_api_key", "invalid_authentication", "invalidapikey", "api_key_invalid"})
_PERMISSION_CODES = frozenset({"failed_precondition"})


def classify_status(
    status: int,
    code: str | None,
    *,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    reserve_tokens: int | None = None,
) -> ErrorKind:
    """Map an HTTP status and the error's `code` (and optionally `type`) to an ErrorKind.

    `code` is what `pipeline.providers.errorbody.error_code` finds in any provider's body (OpenAI's
    `error.code`, DashScope's top-level `code`, Google's ErrorInfo reason or status).

    Codes refine the status; messages are never read. Notes:
    - 429 is a rate limit unless the code/type says quota (OpenAI has sent insufficient_quota with
      code null and type "insufficient_quota", hence `error_type`). "Request too large" arrives as 429
      rate_limit_exceeded; pass the 429's `headers` and the request's `reserve_tokens` to detect it
      (`exceeds_token_limit`), otherwise it is retried as a rate limit until attempts run out.
    - 413 and context-length codes are TOO_LARGE; 402 (payment required, used by some compatible
      gateways) is QUOTA; 409 (conflict/lock, retried by the SDK too) and 5xx are SERVER.
    """
    c = (code or "").strip().lower()
    t = (error_type or "").strip().lower()
    if status == 429:
        if c in _QUOTA_CODES or t in _QUOTA_CODES:
            return ErrorKind.QUOTA
        if c in _TOO_LARGE_CODES:
            return ErrorKind.TOO_LARGE
        if headers is not None and reserve_tokens is not None and exceeds_token_limit(headers, reserve_tokens):
            return ErrorKind.TOO_LARGE
        return ErrorKind.RATE_LIMIT
    if status == 413 or c in _TOO_LARGE_CODES:
        return ErrorKind.TOO_LARGE
    if status == 402 or c in _QUOTA_CODES:
        return ErrorKind.QUOTA
    if status == 401 or c in _AUTH_CODES:
        return ErrorKind.AUTH
    if status == 403 or c in _PERMISSION_CODES:
        return ErrorKind.PERMISSION
    if status == 404 or c == "model_not_found":
        return ErrorKind.NOT_FOUND
    if status == 408:
        return ErrorKind.TIMEOUT
    if status == 409 or 500 <= status <= 599:
        return ErrorKind.SERVER
    if status in (400, 422):
        return ErrorKind.BAD_REQUEST
    return ErrorKind.OTHER


# A 400 that names a request parameter we may drop is about that parameter, not about the model, even if the
# model's name is in it ("json_schema is not supported by model X"): the format fallback handles it.
_PARAMETER_WORDS = ("response_format", "json_schema", "json_object", "completion choice")
_NAME_CHARS = r"A-Za-z0-9._:/@-"


def names_model(message: str, model: str) -> bool:
    """Does the server's `message` name `model` as a word of its own (case-insensitive)?

    "Model 'qwen-vl' not found" names qwen-vl; "qwen-vl-plus is not available" does not name qwen-vl
    (the name must not run on into letters, digits, `_ / @ -`, or `.`/`:` followed by more of a name).
    Names under 3 characters never
    count: too likely to match by chance.
    """
    name = (model or "").strip()
    if len(name) < 3 or not message:
        return False
    pattern = rf"(?<![{_NAME_CHARS}]){re.escape(name)}(?![A-Za-z0-9_/@-]|[.:][A-Za-z0-9])"
    return re.search(pattern, message, re.IGNORECASE) is not None


def wrong_model(status: int, message: str, model: str | None) -> bool:
    """A 400/422 that is the server saying the model does not exist (-> NOT_FOUND, the run stops).

    OpenAI, vLLM and Ollama say so with 404 (classified by status); `transformers serve` and some
    gateways answer 400 with the reason only in words (`{"detail": "..."}`) and no code. There being no
    code to read, the rule is the model name: a 400 or 422 whose message names the requested model
    (`names_model`) and names none of the optional parameters the pipeline can drop (`response_format`,
    `n`: those have fallbacks, see `pipeline.run.fallbacks`).
    """
    if status not in (400, 422) or not model:
        return False
    lowered = message.lower()
    if any(word in lowered for word in _PARAMETER_WORDS):
        return False
    return names_model(message, model)
