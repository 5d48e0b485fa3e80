"""Prompt files: loading them, and turning a prompt into the text sent for one image.

A prompt is a file; its name is the file stem, and that name is what captions_all.csv records in
`prompt_name`, so two prompts may never share a stem. Two kinds of file:

* `NAME.txt` — plain instruction text. It may hold one or more literal `{template}` slots; then the
  sibling `NAME.templates.txt` lists sentence shapes (one per line, `#` comments), and each caption of
  each image gets one of them. Varied sentence shapes beat one static instruction for text-to-image ReID
  training (Tan et al., CVPR 2024).
* `NAME.json` — a structured (attribute) prompt: `{"instruction", "name", "schema"}`; see
  `pipeline.data.attributes` for the schema rules. `Prompt.text` is the instruction, `Prompt.schema` the schema.

The package ships prompts of both kinds (`pipeline/bundled/prompts/`, package data); `--prompt-file`
takes a path or a bundled prompt's name (`base`, `attributes`...), so an installed wheel needs no checkout.

The template is chosen by a stable hash of (seed, prompt name, image id, caption index), never by
Python's salted `hash()` or a global RNG, so a resumed or rerun job asks exactly the same question.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from pipeline import bundled
from pipeline.data.attributes import schema_problems
from pipeline.errors import PromptError
from pipeline.records import Prompt

TEMPLATE_SLOT = "{template}"
TEMPLATES_SUFFIX = ".templates.txt"
PROMPT_SUFFIXES = (".txt", ".json")

# The prompts shipped with the package (package data, `pipeline/bundled/prompts/`): usable by name,
# `--prompt-file base`, from any folder and from an installed wheel.
BUNDLED_PROMPTS_DIR = bundled.bundled_path(bundled.PROMPTS)


# --- loading -----------------------------------------------------------------------------------------

def load_prompts(files: list[Path], directory: Path | None = None) -> list[Prompt]:
    """Load the prompts named on the command line: each of `files`, then every prompt in `directory`.

    Order is kept (files as given, then the folder's prompts sorted by file name) because the run's
    work items and the exports follow it. No files and no folder → an empty list; the CLI picks a default.
    Each of `files` is a path or the name of a bundled prompt (`find_prompt_file`).
    """
    paths = [find_prompt_file(f) for f in files]
    if directory is not None:
        paths.extend(prompt_files_in(Path(directory)))
    prompts: list[Prompt] = []
    seen: dict[str, Path] = {}
    for path in paths:
        prompt = load_prompt(path)
        if prompt.name in seen:
            raise PromptError(f"two prompts are named {prompt.name!r}: {seen[prompt.name]} and {path}")
        seen[prompt.name] = path
        prompts.append(prompt)
    return prompts


def find_prompt_file(arg: Path | str) -> Path:
    """The file `--prompt-file ARG` means: a file at ARG, else the bundled prompt ARG names (`base`,
    `base.txt`, `attributes`...). Looks at the disk; the decision is `resolve_prompt_arg`."""
    path = Path(arg)
    if path.is_file():
        return path
    return resolve_prompt_arg(str(arg), path.exists(), bundled_prompts())


def bundled_prompts() -> dict[str, Path]:
    """The bundled prompts by name (file stem): what `--prompt-file NAME` accepts."""
    return {p.stem: p for p in prompt_files_in(BUNDLED_PROMPTS_DIR)}


def resolve_prompt_arg(arg: str, exists: bool, bundled_files: Mapping[str, Path]) -> Path:
    """Pure: the file for a `--prompt-file` argument that is not a file on disk.

    A bare name (no folder separator) with no extension, or with the bundled file's own extension, that
    names a bundled prompt is that prompt; a user's own file of that name, when there is one, has been
    taken already (a path that exists wins). Something else that exists (a folder) is returned for
    `load_prompt` to refuse with its own message. Otherwise one line listing the bundled names.
    """
    if not any(sep in arg for sep in ("/", "\\")):
        stem, suffix = arg, ""
        for known in PROMPT_SUFFIXES:
            if arg.lower().endswith(known):
                stem, suffix = arg[: -len(known)], known
        found = bundled_files.get(stem)
        if found is not None and (not suffix or found.suffix.lower() == suffix):
            return found
    if exists:
        return Path(arg)
    names = ", ".join(sorted(bundled_files)) or "none"
    raise PromptError(f"prompt file not found: {arg} (bundled prompts, usable by name: {names})")


def prompt_files_in(directory: Path) -> list[Path]:
    """The prompt files of a `--prompts DIR` folder, sorted by name.

    Template lists (`*.templates.txt`), READMEs and hidden files are not prompts; neither are subfolders.
    """
    if not directory.is_dir():
        raise PromptError(f"prompt folder not found: {directory}")
    found = [
        p
        for p in sorted(directory.iterdir(), key=lambda p: p.name)
        if p.is_file()
        and p.suffix.lower() in PROMPT_SUFFIXES
        and not is_template_list(p)
        and not p.name.startswith(".")
        and not p.stem.upper().startswith("README")
    ]
    if not found:
        raise PromptError(f"no prompt files (*.txt, *.json) in {directory}")
    return found


def is_template_list(path: Path) -> bool:
    return path.name.lower().endswith(TEMPLATES_SUFFIX)


def load_prompt(path: Path) -> Prompt:
    """One prompt file → Prompt. Every problem is a one-line PromptError naming the file."""
    path = Path(path)
    if is_template_list(path):
        raise PromptError(f"{path} is a template list, not a prompt; pass its prompt file instead")
    suffix = path.suffix.lower()
    name = path.stem
    raw = _read_text(path)
    if not raw.strip():
        raise PromptError(f"prompt file is empty: {path}")
    schema: dict | None = None
    if suffix == ".json":
        text, schema = _parse_json_prompt(raw, path)
    else:
        text = raw.strip()
    templates: tuple[str, ...] = ()
    if TEMPLATE_SLOT in text:
        templates = load_templates(template_path(path))
    return Prompt(name=name, text=text, templates=templates, schema=schema, path=path)


def template_path(prompt_path: Path) -> Path:
    """`dir/NAME.txt` → `dir/NAME.templates.txt` (the sibling holding NAME's sentence shapes)."""
    return prompt_path.with_name(prompt_path.stem + TEMPLATES_SUFFIX)


def load_templates(path: Path) -> tuple[str, ...]:
    """Sentence templates: the non-empty lines that do not start with `#`, stripped, in file order."""
    if not path.is_file():
        raise PromptError(f"prompt has a {TEMPLATE_SLOT} slot but its template list is missing: {path}")
    lines = [line.strip() for line in _read_text(path).splitlines()]
    templates = tuple(line for line in lines if line and not line.startswith("#"))
    if not templates:
        raise PromptError(f"template list has no templates: {path}")
    return templates


def _read_text(path: Path) -> str:
    """UTF-8, with or without a BOM (Notepad writes one)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptError(f"prompt file not found: {path}") from None
    except IsADirectoryError:
        raise PromptError(f"prompt path is a folder, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt file is not UTF-8 text: {path} (byte {exc.start})") from None
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None


def _parse_json_prompt(raw: str, path: Path) -> tuple[str, dict]:
    """A structured prompt: {"instruction": str, "name": str, "schema": {...}} → (instruction, schema).

    The schema is checked here (strict-mode rules) so a bad file fails before any request is paid for.
    The file's "name" becomes the schema's "title" unless it has one: it is the json_schema name sent
    to the API (`pipeline.data.attributes.response_format`), while the prompt's own name stays the file stem.
    """
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PromptError(f"prompt file is not valid JSON: {path} (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise PromptError(f"JSON prompt must be an object with instruction and schema: {path}")
    instruction = data.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise PromptError(f"JSON prompt has no \"instruction\" text: {path}")
    schema = data.get("schema")
    if not isinstance(schema, dict):
        raise PromptError(f"JSON prompt has no \"schema\" object: {path}")
    problems = schema_problems(schema)
    if problems:
        raise PromptError(f"JSON prompt schema is not strict-compatible: {path}: {problems[0]}")
    schema = dict(schema)
    title = data.get("name")
    if isinstance(title, str) and title.strip() and "title" not in schema:
        schema["title"] = title.strip()
    return instruction.strip(), schema


# --- rendering ---------------------------------------------------------------------------------------

def _digest(*parts: object) -> int:
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:16], "big")


def choose_template(
    image_id: str, prompt_name: str, templates: Sequence[str], caption_index: int = 0, seed: int = 0
) -> str:
    """The template for caption `caption_index` of `image_id` under `prompt_name`.

    Per (seed, prompt, image) a stable hash picks a start `a` and a step `b` coprime with the number of
    templates n; caption k gets template (a + b·k) mod n. So reruns ask the same thing, captions
    0..n-1 of one image always get n different shapes, and which shapes come together varies per image.
    """
    n = len(templates)
    if n == 0:
        raise PromptError(f"prompt {prompt_name!r} has a {TEMPLATE_SLOT} slot but no templates")
    h = _digest(seed, prompt_name, image_id)
    start = h % n
    steps = [s for s in range(1, n) if math.gcd(s, n) == 1] or [1]
    step = steps[(h >> 64) % len(steps)]
    return templates[(start + step * caption_index) % n]


def render_prompt(prompt: Prompt, image_id: str, caption_index: int = 0, seed: int = 0) -> str:
    """The text sent for this image and caption slot.

    Only the literal `{template}` is replaced (not `str.format`), so other braces — JSON examples,
    `{...}` in a user's prompt — reach the model untouched.
    """
    if TEMPLATE_SLOT not in prompt.text:
        return prompt.text
    template = choose_template(image_id, prompt.name, prompt.templates, caption_index, seed)
    return prompt.text.replace(TEMPLATE_SLOT, template)


def has_templates(prompt: Prompt) -> bool:
    """True when captions of one image differ in the question asked (so they need separate requests)."""
    return TEMPLATE_SLOT in prompt.text


def billed_text(prompt: Prompt, rendered: str) -> str:
    """The text a request is billed for as input: the rendered prompt, plus a structured prompt's schema
    (the response_format counts as input tokens). The limiter's reservation and the dry-run both use it."""
    if prompt.schema is None:
        return rendered
    return rendered + json.dumps(prompt.schema, separators=(",", ":"))
