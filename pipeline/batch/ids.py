"""The `custom_id` of a batch line: the work item's key, unique and reversible.

A job is one image, one prompt and the caption slots it asks for with `n`; its answers come back in any
order and are joined on this id alone, so it must say exactly which (image, prompt, slots) it was:

    rp1/<quote(prompt_name)>/<i.j.k>/<quote(image_id)>

Both names are percent-encoded with nothing kept safe, so a `/` in an image id (`query/0001_c1.jpg`),
spaces, `%` or Chinese cannot be mistaken for the separators; the id is plain ASCII. `rp1` is the
format's version: an id made by anything else (another tool's batch, a hand-edited file) is refused.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

__all__ = ["ID_PREFIX", "make_custom_id", "parse_custom_id"]

ID_PREFIX = "rp1"


def make_custom_id(image_id: str, prompt_name: str, indices: tuple[int, ...]) -> str:
    """The id of the work item (`image_id`, `prompt_name`, caption slots `indices`). Pure."""
    if not image_id or not prompt_name:
        raise ValueError("a custom_id needs an image id and a prompt name")
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(f"caption slots must be non-negative whole numbers, got {indices!r}")
    slots = ".".join(str(i) for i in indices)
    return f"{ID_PREFIX}/{quote(prompt_name, safe='')}/{slots}/{quote(image_id, safe='')}"


def parse_custom_id(cid: str) -> tuple[str, str, tuple[int, ...]]:
    """(image_id, prompt_name, indices) of an id `make_custom_id` made; ValueError for anything else.

    Only ids that `make_custom_id` gives back unchanged are accepted, so two spellings never name one
    work item (an answer is joined to exactly one item or refused)."""
    if not isinstance(cid, str):
        raise ValueError(f"custom_id is not a string: {cid!r}")
    parts = cid.split("/")
    if len(parts) != 4 or parts[0] != ID_PREFIX:
        raise ValueError(f"not a reid-prompt custom_id: {cid[:80]!r}")
    _, prompt_q, slots, image_q = parts
    try:
        indices = tuple(int(s) for s in slots.split("."))
    except ValueError:
        raise ValueError(f"custom_id has bad caption slots: {cid[:80]!r}") from None
    try:
        image_id = unquote(image_q, errors="strict")
        prompt_name = unquote(prompt_q, errors="strict")
        again = make_custom_id(image_id, prompt_name, indices)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"not a reid-prompt custom_id: {cid[:80]!r}") from None
    if again != cid:
        raise ValueError(f"custom_id is not in its canonical form: {cid[:80]!r}")
    return image_id, prompt_name, indices
