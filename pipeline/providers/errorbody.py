"""The server's own words and codes from an error answer, whatever shape the provider gives it.

OpenAI-compatible servers agree on the request and disagree on the error body:

- OpenAI, vLLM, Ollama, LM Studio, Azure, OpenRouter, DashScope's compatible mode:
  ``{"error": {"message", "type", "code", "param"}}``;
- DashScope's native shape: ``{"code": "InvalidParameter", "message": "...", "request_id": "..."}``;
- Gemini's OpenAI-compatible endpoint: often a list, ``[{"error": {"code": 400, "message", "status":
  "INVALID_ARGUMENT", "details": [{"@type": ".../google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}]``;
- FastAPI servers (``transformers serve``): ``{"detail": "..."}`` or a list of validation errors
  ``{"detail": [{"loc": [...], "msg": "..."}]}``;
- others: ``{"message": "..."}``, ``{"error": "..."}``, or plain text (a proxy's HTML page included).

`error_message` finds the words a person should read, `error_code` the machine-readable code that
classification (`pipeline.providers.classify`) keys on, `error_type` the OpenAI-style `type`. All three
are pure and take the decoded body as it comes (dict, list, str or None), so they are table-tested
without a server. Messages are only ever shown, never matched: classification reads codes and statuses.
"""

from __future__ import annotations

import re
from typing import Any, Callable

__all__ = ["error_message", "error_code", "error_type", "one_line"]

_MESSAGE_KEYS = ("message", "detail", "msg", "error_description", "Message", "errorMessage")
_TAG = re.compile(r"<[^>]+>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1>", re.IGNORECASE | re.DOTALL)


def one_line(text: str, limit: int = 300) -> str:
    """`text` with its whitespace collapsed to single spaces, cut to `limit` characters."""
    return " ".join(str(text).split())[:limit]


def _from_text(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("<"):  # an HTML error page from a proxy or gateway: keep its words only
        stripped = _TAG.sub(" ", _SCRIPT.sub(" ", stripped))
    return one_line(stripped)


def _validation_errors(items: list[Any]) -> str:
    """FastAPI's 422 detail: [{"loc": ["body", "model"], "msg": "field required", ...}, ...]."""
    parts: list[str] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("msg"), str):
            loc = item.get("loc")
            where = ".".join(str(x) for x in loc) if isinstance(loc, (list, tuple)) else ""
            parts.append(f"{where}: {item['msg']}" if where else item["msg"])
        else:
            found = error_message(item)
            if found:
                parts.append(found)
    return one_line("; ".join(parts))


def error_message(body: Any) -> str:
    """The server's own message in an error body of any shape ("" if it holds none).

    Looks into `error` first (an object or a string), then `message`, `detail` (a string, an object or
    FastAPI's list of validation errors), `msg` and a few rarer spellings; a list is read item by item
    (Gemini); a string is the message itself (HTML tags dropped).
    """
    if body is None:
        return ""
    if isinstance(body, (bytes, bytearray)):
        return _from_text(body.decode("utf-8", "replace"))
    if isinstance(body, str):
        return _from_text(body)
    if isinstance(body, list):
        for item in body:
            found = error_message(item)
            if found:
                return found
        return ""
    if not isinstance(body, dict):
        return one_line(str(body))
    inner = body.get("error")
    if isinstance(inner, (dict, list)):
        found = error_message(inner)
        if found:
            return found
    elif isinstance(inner, str) and inner.strip():
        return _from_text(inner)
    for key in _MESSAGE_KEYS:
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            return _from_text(value)
        if key == "detail" and isinstance(value, list) and value:
            found = _validation_errors(value)
            if found:
                return found
        if isinstance(value, dict):
            found = error_message(value)
            if found:
                return found
    return ""


def _reason(details: Any) -> str | None:
    """Google's structured reason (`google.rpc.ErrorInfo.reason`, e.g. API_KEY_INVALID), if any."""
    if not isinstance(details, list):
        return None
    for item in details:
        if isinstance(item, dict) and isinstance(item.get("reason"), str) and item["reason"].strip():
            return item["reason"].strip()
    return None


def _first_found(body: Any, own: Callable[[dict], str | None]) -> str | None:
    """`own(obj)` of the innermost error object that says something: a list is read item by item
    (Gemini), an `error` object or list inside is asked before its parent."""
    if isinstance(body, list):
        for item in body:
            found = _first_found(item, own)
            if found:
                return found
        return None
    if not isinstance(body, dict):
        return None
    inner = body.get("error")
    if isinstance(inner, (dict, list)):
        found = _first_found(inner, own)
        if found:
            return found
    return own(body)


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _own_code(obj: dict) -> str | None:
    return _text(obj.get("code")) or _reason(obj.get("details")) or _text(obj.get("status"))


def error_code(body: Any) -> str | None:
    """The machine-readable error code in an error body of any shape (None if it holds none).

    In order: the `code` of the `error` object (OpenAI, DashScope compatible mode), the top-level `code`
    (DashScope's native shape, e.g. "Arrearage", "InvalidApiKey"), Google's ErrorInfo `reason`
    (API_KEY_INVALID), then Google's `status` (RESOURCE_EXHAUSTED). A numeric `code` is Google's copy of
    the HTTP status and says nothing the status does not, so it is skipped.
    """
    return _first_found(body, _own_code)


def error_type(body: Any) -> str | None:
    """OpenAI's error `type` (e.g. "insufficient_quota", "invalid_request_error"), wherever it sits."""
    return _first_found(body, lambda obj: _text(obj.get("type")))
