"""Fallbacks that keep the promise on servers that do not do what was asked: `n` and `response_format`.

Local OpenAI-compatible servers differ from OpenAI (see README, "local servers"):
- `n` (several captions in one request, the image paid once): vLLM honours it; Ollama and
  `transformers serve` ignore it (one choice comes back); llama.cpp's `llama-server` rejects it
  (400 "Only one completion choice is allowed"). Ignored or rejected, the run asks for each caption
  separately from then on: each request pays for the image again, so the cost changes; said in one line.
- `response_format` json_schema (attribute prompts): OpenAI enforces it; `transformers serve` ignores it;
  some servers reject it (400). The run falls back to `json_object` with the schema written into the
  prompt, then to the schema in the prompt alone (no `response_format`); answers are always validated
  (`pipeline.data.attributes.validate_answer`) and a malformed one gets ONE repair request (the model is
  shown its answer and the validation error and asked for the corrected JSON); each switch said in one line.

How each is detected (there is no error code to classify by, so these are rules on what was sent and what
came back, never on the server's wording):
- `n` ignored: an answer with fewer choices than the `n` sent.
- `n` rejected: a 400 to a request with n > 1 is retried once with n = 1 for the same caption slot; if
  that one is answered, the 400 was about `n`. If it also gets a 400, the image is at fault (the run's
  verdict on `n` stays open).
- json_schema / json_object rejected: a 400 to a request that carried that `response_format` is retried
  for the same item with the next mode; an answer to it means the mode before was rejected. A 400 in the
  last mode (schema in the prompt, nothing to drop) is the image's own.
- json_schema / json_object ignored: an answer that is not JSON at all while the mode was sent. A server
  that enforces a strict schema cannot answer non-JSON, so the first such answer is proof; an answer that
  is JSON but breaks the schema is not (models slip under lax enforcement too): it gets the repair request.

Everything here is pure: `FallbackState` is a small record on the run's Context, the decision functions
take it and what happened and return what to do; the runner does the I/O.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from pipeline.data.attributes import response_format as schema_response_format
from pipeline.records import Prompt

__all__ = [
    "FormatMode",
    "FallbackState",
    "NVerdict",
    "n_after_answer",
    "on_bad_request",
    "format_after_answer",
    "format_after_invalid",
    "request_format",
    "schema_prompt",
    "repair_turns",
    "N_LINE",
]


class FormatMode(str, enum.Enum):
    """How a structured prompt asks for JSON, strictest first."""

    JSON_SCHEMA = "json_schema"  # response_format strict json_schema; the instruction alone
    JSON_OBJECT = "json_object"  # response_format json_object; the schema written into the prompt
    PROMPT = "prompt"  # no response_format; the schema written into the prompt

    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    def next(self) -> "FormatMode | None":
        i = self.rank + 1
        return _ORDER[i] if i < len(_ORDER) else None


_ORDER = (FormatMode.JSON_SCHEMA, FormatMode.JSON_OBJECT, FormatMode.PROMPT)

NVerdict = Literal["honoured", "ignored", "rejected"]

N_LINE = "the server {how} n: asking for each caption separately (each pays for the image again)"


@dataclass
class FallbackState:
    """What the run has learned about the server's `n` and `response_format`, and the lines said.

    `n_support` / `json_schema` / `json_object` are None until known; the runner copies them to RunStats
    (`n_support`, `json_schema_support`, `json_object_support`) for the manifest, the probe and the views.
    """

    n_support: NVerdict | None = None
    mode: FormatMode = FormatMode.JSON_SCHEMA
    json_schema: str | None = None  # "enforced" | "ignored" | "rejected"
    json_object: str | None = None  # "enforced" | "ignored" | "rejected" (the probe's words)
    said: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)

    @property
    def n_usable(self) -> bool:
        return self.n_support not in ("ignored", "rejected")

    @classmethod
    def from_learned(cls, learned: Mapping[str, Any] | None) -> "FallbackState":
        """The state an earlier run of the folder learned (manifest `learned`, same server and model), so
        a rerun neither pays the 400s again nor asks `n` of a server that ignores it. Unknown values are
        ignored (a hand-edited manifest cannot break a run)."""
        state = cls()
        if not isinstance(learned, Mapping):
            return state
        if learned.get("n") in ("honoured", "ignored", "rejected"):
            state.n_support = learned["n"]
        try:
            state.mode = FormatMode(learned.get("structured_mode") or FormatMode.JSON_SCHEMA.value)
        except ValueError:
            pass
        if learned.get("json_schema") in ("enforced", "ignored", "rejected"):
            state.json_schema = learned["json_schema"]
        if learned.get("json_object") in ("enforced", "accepted", "ignored", "rejected"):
            state.json_object = learned["json_object"]
        return state

    def resumed_lines(self, captions_per_image: int, structured: bool) -> list[tuple[str, str]]:
        """(key, line) a run that starts from learned facts says at the start (the cost differs from OpenAI's)."""
        lines = []
        if captions_per_image > 1 and not self.n_usable:
            how = "ignores" if self.n_support == "ignored" else "rejects"
            lines.append(("n", N_LINE.format(how=how) + " (learned by an earlier run in this folder)"))
        if structured and self.mode is not FormatMode.JSON_SCHEMA:
            lines.append((f"format:{self.mode.value}", f"structured prompts are asked in {self.mode.value} mode, as an earlier run in this folder "
                         "found the server needs (answers are validated; a malformed one gets one repair request)"))
        return lines

    def say_once(self, key: str, line: str, notify: Callable[[str], None] | None = None) -> bool:
        """Record `line` under `key` unless a line with that key was said; True if it is new."""
        if key in self.said:
            return False
        self.said.add(key)
        self.lines.append(line)
        if notify is not None:
            notify(line)
        return True


# --- n -------------------------------------------------------------------------------------------------

def n_after_answer(state: FallbackState, n_sent: int, choices: int, probe: bool = False) -> tuple[NVerdict | None, str | None]:
    """The verdict on `n` after an answer with `choices` choices to a request that sent `n_sent`.

    `probe`: this was the n = 1 retry of a request with n > 1 that got a 400 (so `n` is rejected).
    Returns (new verdict or None if unchanged, the one line to say or None). Ignored and rejected are
    final; honoured is not (a later short answer still shows the server ignores `n` sometimes).
    """
    if state.n_support in ("ignored", "rejected"):
        return None, None
    if probe:
        return "rejected", N_LINE.format(how="rejects")
    if n_sent > 1 and choices < n_sent:
        return "ignored", N_LINE.format(how="ignores")
    if n_sent > 1 and state.n_support is None:
        return "honoured", None
    return None, None


# --- response_format -----------------------------------------------------------------------------------

FORMAT_LINES = {
    ("ignored", FormatMode.JSON_OBJECT): "the server ignores response_format json_schema: asking with json_object "
    "and the schema written into the prompt (answers are validated; a malformed one gets one repair request)",
    ("rejected", FormatMode.JSON_OBJECT): "the server rejects response_format json_schema: asking with json_object "
    "and the schema written into the prompt (answers are validated; a malformed one gets one repair request)",
    ("ignored", FormatMode.PROMPT): "the server ignores response_format: the schema is written into the prompt "
    "and no response_format is sent (answers are validated; a malformed one gets one repair request)",
    ("rejected", FormatMode.PROMPT): "the server rejects response_format: the schema is written into the prompt "
    "and no response_format is sent (answers are validated; a malformed one gets one repair request)",
}


@dataclass(frozen=True)
class BadRequestAction:
    """What follows a 400: `retry` the same slots with `n`/`mode` changed (a probe), or `give_up`."""

    action: Literal["retry", "give_up"]
    probe: Literal["", "n", "format"] = ""
    mode: FormatMode | None = None  # the mode of the retry (format probe)


def on_bad_request(state: FallbackState, n_sent: int, mode_sent: FormatMode | None,
                   code: str | None = None) -> BadRequestAction:
    """A 400 to a request that sent `n_sent` choices and structured mode `mode_sent` (None: a text prompt).

    - a code that names the image (`invalid_image`, `image_parse_error`): the image's own fault, give up;
    - n > 1 sent: retry the first slot alone with n = 1 (probe "n"; just a retry once `n` is known to be
      rejected: a request sent before the verdict), the other slots as a job of their own;
    - a `response_format` sent: retry with the mode after the later of the mode sent and the run's mode
      (probe "format"); a request sent before the run switched just goes again in the run's mode;
    - otherwise the 400 is the image's: give up (errors.csv with the server's words).
    """
    if code and "image" in code.lower():
        return BadRequestAction("give_up")
    if n_sent > 1:
        return BadRequestAction("retry", "n" if state.n_support != "rejected" else "")
    if mode_sent is not None and mode_sent is not FormatMode.PROMPT:
        if state.mode.rank > mode_sent.rank:
            return BadRequestAction("retry", "", state.mode)
        nxt = mode_sent.next()
        if nxt is not None:
            return BadRequestAction("retry", "format", nxt)
    return BadRequestAction("give_up")


def format_after_answer(state: FallbackState, mode_sent: FormatMode) -> tuple[FormatMode | None, str | None]:
    """After an HTTP answer (valid or not) to a request sent in `mode_sent`.

    An answer in a mode beyond the run's can only come from a format probe: the modes before it were
    rejected, so the run switches to `mode_sent` (returned with its line).
    """
    if mode_sent.rank > state.mode.rank:
        return mode_sent, FORMAT_LINES[("rejected", mode_sent)]
    return None, None


def format_after_invalid(state: FallbackState, mode_sent: FormatMode, reason: str) -> tuple[FormatMode | None, str | None]:
    """After an answer that failed validation with `reason` ("invalid_json" | "schema_mismatch").

    Not JSON at all while a `response_format` was sent and was the run's mode: the server ignores it;
    the run moves to the next mode (returned with its line). Anything else: no change (repair request).
    """
    if reason != "invalid_json" or mode_sent is FormatMode.PROMPT or mode_sent is not state.mode:
        return None, None
    nxt = mode_sent.next()
    if nxt is None:
        return None, None
    return nxt, FORMAT_LINES[("ignored", nxt)]


def apply_format(state: FallbackState, new_mode: FormatMode, how: str) -> None:
    """Record a switch to `new_mode` (`how`: "ignored" or "rejected") and what it says about each mode."""
    for m in _ORDER[state.mode.rank:new_mode.rank]:
        if m is FormatMode.JSON_SCHEMA:
            state.json_schema = how
        elif m is FormatMode.JSON_OBJECT:
            state.json_object = how
    state.mode = new_mode


# --- requests ------------------------------------------------------------------------------------------

SCHEMA_PROMPT = (
    "Answer with only a JSON object, no other text, that follows this JSON schema "
    "(every property required, no other properties):\n{schema}"
)


def schema_prompt(instruction: str, schema: dict) -> str:
    """The instruction with the schema written into it, for servers that do not enforce one."""
    body = {k: v for k, v in schema.items() if k != "title"}
    return f"{instruction}\n\n" + SCHEMA_PROMPT.format(schema=json.dumps(body, ensure_ascii=False, indent=1))


def request_format(prompt: Prompt, text: str, mode: FormatMode) -> tuple[str, dict | None]:
    """(prompt text, response_format) of a structured prompt's request in `mode`."""
    assert prompt.schema is not None
    if mode is FormatMode.JSON_SCHEMA:
        return text, schema_response_format(prompt)
    with_schema = schema_prompt(text, prompt.schema)
    if mode is FormatMode.JSON_OBJECT:
        return with_schema, {"type": "json_object"}
    return with_schema, None


REPAIR_PROMPT = (
    "That answer is not valid: {error}. Reply with only the corrected JSON object, no other text."
)


def repair_turns(answer: str, error: str) -> tuple[tuple[str, str], ...]:
    """The turns after the first message of a repair request: the model's answer, then what is wrong."""
    return (("assistant", answer), ("user", REPAIR_PROMPT.format(error=error)))
