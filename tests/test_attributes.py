"""Structured attribute prompts: response_format, columns, and the small schema validator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.attributes import (
    AttributeValidationError,
    attribute_columns,
    field_names,
    response_format,
    schema_problems,
    validate_answer,
)
from pipeline.errors import ImageError, PromptError
from pipeline.ledger.outputs import ATTRIBUTE_META_COLUMNS, attribute_record
from pipeline.data.prompts import BUNDLED_PROMPTS_DIR, load_prompts
from pipeline.records import AttributeRow, Prompt

MARKET_FIELDS = [
    "gender", "age", "hair_length", "sleeve_length", "lower_length", "lower_type",
    "hat", "backpack", "bag", "handbag", "upper_color", "lower_color",
    "upper", "lower", "shoes", "accessories",
]
DUKE_FIELDS = [
    "gender", "top_length", "boots", "hat", "backpack", "bag", "handbag", "shoes_color",
    "upper_color", "lower_color", "upper", "lower", "shoes", "accessories",
]


@pytest.fixture(scope="module")
def market() -> Prompt:
    return load_prompts([BUNDLED_PROMPTS_DIR / "attributes.json"])[0]


@pytest.fixture(scope="module")
def duke() -> Prompt:
    return load_prompts([BUNDLED_PROMPTS_DIR / "attributes_duke.json"])[0]


def market_answer(**changes: object) -> dict:
    answer = {
        "gender": "female", "age": "adult", "hair_length": "long", "sleeve_length": "short",
        "lower_length": "long", "lower_type": "pants", "hat": False, "backpack": False, "bag": True,
        "handbag": False, "upper_color": "white", "lower_color": "blue",
        "upper": "white t-shirt", "lower": "blue jeans", "shoes": "white sneakers", "accessories": "",
    }
    answer.update(changes)
    return answer


def test_bundled_schemas_fields_and_enums(market: Prompt, duke: Prompt) -> None:
    assert market.name == "attributes" and duke.name == "attributes_duke"
    assert field_names(market.schema) == MARKET_FIELDS
    assert field_names(duke.schema) == DUKE_FIELDS
    props = market.schema["properties"]
    assert props["age"]["enum"] == ["young", "teenager", "adult", "old"]
    assert props["upper_color"]["enum"] == ["black", "white", "red", "purple", "yellow", "gray", "blue", "green"]
    assert props["lower_color"]["enum"] == ["black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown"]
    assert props["hat"]["type"] == "boolean" and props["upper"]["type"] == "string"
    dprops = duke.schema["properties"]
    assert dprops["shoes_color"]["enum"] == ["dark", "light"]
    assert dprops["upper_color"]["enum"] == ["black", "white", "red", "purple", "gray", "blue", "green", "brown"]
    assert dprops["lower_color"]["enum"] == ["black", "white", "red", "gray", "blue", "green", "brown"]
    assert schema_problems(market.schema) == [] and schema_problems(duke.schema) == []


def test_response_format(market: Prompt) -> None:
    rf = response_format(market)
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["name"] == "market1501_attributes"
    assert rf["json_schema"]["strict"] is True
    schema = rf["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == list(schema["properties"])
    assert "title" not in schema
    json.dumps(rf)  # serialisable as the request body


def test_response_format_name_falls_back_to_prompt_name() -> None:
    p = Prompt(name="my attrs!", text="x", schema={"type": "object", "properties": {}})
    assert response_format(p)["json_schema"]["name"] == "my_attrs_"
    with pytest.raises(PromptError):
        response_format(Prompt(name="base", text="x"))


def test_attribute_columns(market: Prompt) -> None:
    assert attribute_columns(market.schema) == ATTRIBUTE_META_COLUMNS + MARKET_FIELDS


def test_valid_answer_round_trips_into_a_csv_record(market: Prompt) -> None:
    answer = market_answer()
    parsed = validate_answer(json.dumps(answer), market.schema)
    assert parsed == answer
    record = attribute_record(AttributeRow("a.jpg", "attributes", parsed), field_names(market.schema))
    assert record[len(ATTRIBUTE_META_COLUMNS):][6:10] == ["no", "no", "yes", "no"]


def test_fenced_answer_is_accepted(market: Prompt) -> None:
    text = "```json\n" + json.dumps(market_answer()) + "\n```"
    assert validate_answer(text, market.schema)["gender"] == "female"


@pytest.mark.parametrize("text", ["", "not json", "{\"gender\": ", "{\"x\": NaN}", "I'm sorry, I can't."])
def test_invalid_json(market: Prompt, text: str) -> None:
    with pytest.raises(AttributeValidationError) as err:
        validate_answer(text, market.schema)
    assert err.value.reason == "invalid_json"
    assert isinstance(err.value, ImageError) and "\n" not in err.value.detail


@pytest.mark.parametrize(
    "answer, fragment",
    [
        (market_answer(gender="unknown"), "$.gender: 'unknown' is not one of male, female"),
        (market_answer(hat="no"), "$.hat: expected boolean, got string"),
        (market_answer(upper=None), "$.upper: expected string, got null"),
        ({k: v for k, v in market_answer().items() if k != "shoes"}, "missing 'shoes'"),
        (market_answer(colour="teal"), "unexpected 'colour'"),
        ([1, 2], "expected an object, got array"),
    ],
)
def test_schema_mismatch(market: Prompt, answer: object, fragment: str) -> None:
    with pytest.raises(AttributeValidationError) as err:
        validate_answer(json.dumps(answer), market.schema)
    assert err.value.reason == "schema_mismatch"
    assert fragment in err.value.detail


def test_many_problems_are_summarised_on_one_line(market: Prompt) -> None:
    with pytest.raises(AttributeValidationError) as err:
        validate_answer(json.dumps({"a": 1, "b": 2}), market.schema)
    assert "more" in err.value.detail and "\n" not in err.value.detail


def test_json_types_not_python_types() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "maybe": {"type": ["string", "null"]},
            "level": {"type": "integer", "enum": [0, 1]},
        },
        "required": ["n", "x", "tags", "maybe", "level"],
        "additionalProperties": False,
    }
    assert schema_problems(schema) == []
    good = {"n": 2.0, "x": 1, "tags": ["a", "b"], "maybe": None, "level": 1}
    assert validate_answer(json.dumps(good), schema) == good
    for bad, fragment in [
        ({**good, "n": True}, "$.n: expected integer, got boolean"),
        ({**good, "n": 2.5}, "$.n: expected integer"),
        ({**good, "x": "1"}, "$.x: expected number"),
        ({**good, "tags": ["a", "c"]}, "$.tags[1]: 'c' is not one of a, b"),
        ({**good, "level": True}, "$.level: expected integer, got boolean"),
    ]:
        with pytest.raises(AttributeValidationError, match="schema_mismatch") as err:
            validate_answer(json.dumps(bad), schema)
        assert fragment in err.value.detail


def test_nested_objects_are_checked() -> None:
    inner = {"type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"], "additionalProperties": False}
    schema = {"type": "object", "properties": {"o": inner}, "required": ["o"], "additionalProperties": False}
    assert schema_problems(schema) == []
    with pytest.raises(AttributeValidationError) as err:
        validate_answer('{"o": {"c": 1, "d": 2}}', schema)
    assert "$.o.c: expected string" in err.value.detail and "$.o: unexpected 'd'" in err.value.detail


@pytest.mark.parametrize(
    "schema, fragment",
    [
        ({"type": "array", "items": {"type": "string"}}, "root schema"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, "additionalProperties"),
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}, "required": ["a"], "additionalProperties": False}, "unsupported keyword 'pattern'"),
        ({"type": "object", "properties": {"a": {"type": "date"}}, "required": ["a"], "additionalProperties": False}, "type must be"),
        ({"type": "object", "properties": {"a": {"type": "string", "enum": [1]}}, "required": ["a"], "additionalProperties": False}, "enum value 1"),
        ({"type": "object", "properties": {"a": {"type": "array"}}, "required": ["a"], "additionalProperties": False}, "items"),
    ],
)
def test_schema_problems(schema: dict, fragment: str) -> None:
    problems = schema_problems(schema)
    assert problems and fragment in problems[0]


def test_json_prompt_keeps_its_own_title(tmp_path: Path) -> None:
    schema = {"type": "object", "title": "own", "properties": {"a": {"type": "boolean"}},
              "required": ["a"], "additionalProperties": False}
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"instruction": "Fill.", "name": "other", "schema": schema}), encoding="utf-8")
    p = load_prompts([f])[0]
    assert response_format(p)["json_schema"]["name"] == "own"
