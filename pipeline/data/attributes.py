"""Structured attribute answers: the request's `response_format`, and checking what comes back.

The bundled schemas (attributes.json, attributes_duke.json in pipeline/bundled/prompts/) mirror the Market-1501 and
DukeMTMC-reID attribute annotations. Yes/no attributes (hat, backpack, bag, handbag, boots) are JSON
booleans: strict mode supports them and they cannot be misspelt; attributes.csv shows them as yes/no
(`pipeline.ledger.outputs`).

The validator covers exactly the JSON-schema subset those files use — type (object, string, boolean,
integer, number, array, null, or a list of them), enum, properties, required, additionalProperties false,
items — and `schema_problems` refuses any schema that leaves that subset, so an answer that passes here
is an answer the schema really allows. Servers that ignore `response_format` (some local ones) may still
answer outside the schema; `validate_answer` is the check that catches it. No new dependency.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.errors import ImageError, PromptError
from pipeline.ledger.outputs import ATTRIBUTE_META_COLUMNS
from pipeline.providers.refusals import clean_text
from pipeline.records import Prompt

SUPPORTED_TYPES = ("object", "string", "boolean", "integer", "number", "array", "null")
SUPPORTED_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "enum", "items", "description", "title"}
)
_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_MAX_DETAIL_PROBLEMS = 3


class AttributeValidationError(ImageError):
    """A structured answer that is not JSON (`invalid_json`) or not what the schema allows
    (`schema_mismatch`). An ImageError: the image goes to errors.csv, the run goes on."""


# --- request side ------------------------------------------------------------------------------------

def response_format(prompt: Prompt) -> dict:
    """The OpenAI `response_format` for a structured prompt (strict json_schema).

    The name is the schema's title (the JSON file's "name") or else the prompt name, reduced to the
    characters the API accepts; the title itself is not sent twice.
    """
    if prompt.schema is None:
        raise PromptError(f"prompt {prompt.name!r} has no schema (only .json prompts are structured)")
    schema = {k: v for k, v in prompt.schema.items() if k != "title"}
    name = _NAME_OK.sub("_", str(prompt.schema.get("title") or prompt.name))[:64] or "attributes"
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


def field_names(schema: dict) -> list[str]:
    """Top-level field names in schema order: the order of attributes.csv's columns."""
    return list(schema.get("properties", {}))


def attribute_columns(schema: dict) -> list[str]:
    """attributes.csv header: the fixed meta columns, then one column per field."""
    return list(ATTRIBUTE_META_COLUMNS) + field_names(schema)


# --- schema check ------------------------------------------------------------------------------------

def schema_problems(schema: dict, path: str = "$") -> list[str]:
    """Why `schema` is not strict-compatible or leaves the supported subset (empty list = fine).

    Strict mode needs every object to list all its properties in `required` and to set
    `additionalProperties: false`; the root must be an object.
    """
    problems: list[str] = []
    if path == "$" and schema.get("type") != "object":
        return ["the root schema must have type \"object\""]
    unknown = sorted(set(schema) - SUPPORTED_KEYWORDS)
    if unknown:
        problems.append(f"{path}: unsupported keyword {unknown[0]!r}")
    types = _types(schema.get("type"))
    if not types or any(t not in SUPPORTED_TYPES for t in types):
        problems.append(f"{path}: type must be one of {', '.join(SUPPORTED_TYPES)}")
        return problems
    if "enum" in schema:
        enum = schema["enum"]
        if not isinstance(enum, list) or not enum:
            problems.append(f"{path}: enum must be a non-empty list")
        else:
            bad = [v for v in enum if not any(_is_type(v, t) for t in types)]
            if bad:
                problems.append(f"{path}: enum value {bad[0]!r} does not match type {'/'.join(types)}")
    if "object" in types:
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            problems.append(f"{path}: an object needs properties")
        else:
            if schema.get("additionalProperties") is not False:
                problems.append(f"{path}: additionalProperties must be false")
            required = schema.get("required")
            if not isinstance(required, list) or set(required) != set(props):
                problems.append(f"{path}: required must list every property")
            for key, sub in props.items():
                if not isinstance(sub, dict):
                    problems.append(f"{path}.{key}: must be a schema object")
                else:
                    problems.extend(schema_problems(sub, f"{path}.{key}"))
    if "array" in types:
        items = schema.get("items")
        if not isinstance(items, dict):
            problems.append(f"{path}: an array needs an items schema")
        else:
            problems.extend(schema_problems(items, f"{path}[]"))
    return problems


# --- answer check ------------------------------------------------------------------------------------

def validate_answer(text: str, schema: dict) -> dict:
    """Parse a structured answer and check it against `schema`; return the parsed object.

    A single Markdown code fence around the JSON is tolerated (servers without strict mode add one);
    NaN/Infinity are not JSON and are refused.
    """
    body = (text or "").strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise AttributeValidationError("invalid_json", f"{msg} in {_clip(body)}") from None
    if not isinstance(value, dict):
        raise AttributeValidationError("schema_mismatch", f"$: expected an object, got {_json_type(value)}")
    problems = answer_problems(value, schema)
    if problems:
        more = len(problems) - _MAX_DETAIL_PROBLEMS
        detail = "; ".join(problems[:_MAX_DETAIL_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
        raise AttributeValidationError("schema_mismatch", detail)
    return _clean_strings(value)


def _clean_strings(value: Any) -> Any:
    """Control characters escaped inside JSON strings ("\\u0000") never reach attributes.csv either."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {k: _clean_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_strings(v) for v in value]
    return value


def answer_problems(value: Any, schema: dict, path: str = "$") -> list[str]:
    """Every way `value` breaks `schema` (empty list = valid), each as `path: what`."""
    types = _types(schema.get("type"))
    if types and not any(_is_type(value, t) for t in types):
        return [f"{path}: expected {'/'.join(types)}, got {_json_type(value)}"]
    if "enum" in schema and (value not in schema["enum"] or _bool_in_number_enum(value, schema)):
        return [f"{path}: {value!r} is not one of {', '.join(map(str, schema['enum']))}"]
    problems: list[str] = []
    if isinstance(value, dict):
        props: dict = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}: missing {key!r}")
        if schema.get("additionalProperties") is False:
            for key in value:
                if key not in props:
                    problems.append(f"{path}: unexpected {key!r}")
        for key, sub in props.items():
            if key in value:
                problems.extend(answer_problems(value[key], sub, f"{path}.{key}"))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems.extend(answer_problems(item, schema["items"], f"{path}[{i}]"))
    return problems


def _types(spec: object) -> list[str]:
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, list) and all(isinstance(t, str) for t in spec):
        return list(spec)
    return []


def _is_type(value: object, t: str) -> bool:
    """JSON types, not Python's: a bool is not an integer, and 2.0 is one."""
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    if isinstance(value, bool):
        return False
    if t == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if t == "number":
        return isinstance(value, (int, float))
    return False


def _bool_in_number_enum(value: object, schema: dict) -> bool:
    """`True in [1]` is true in Python; in JSON a boolean never equals a number."""
    enum = schema.get("enum")
    return isinstance(enum, list) and isinstance(value, bool) and not any(isinstance(v, bool) for v in enum)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _clip(text: str, limit: int = 80) -> str:
    one_line = " ".join(text.split())
    return repr(one_line if len(one_line) <= limit else one_line[: limit - 1] + "…")
