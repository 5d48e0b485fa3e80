"""Quality report on the captions of an output folder: is this text fit to train a model on?

The numbers answer the questions that matter before training: does every image have its captions, are
captions too short or too long, is the vocabulary rich or does one sentence repeat across images, do
several captions of one image differ at all, do the captions agree with the structured attributes on
colour, and which images got refusals instead of captions.

Definitions (what the tests check):
* Text statistics use the captions an export would write (`pipeline.export.captions_by_image`): not
  empty, not a refusal, not a structured JSON answer; a key (image, prompt, caption index) seen twice
  counts once (its last usable row).
* unusable_captions / unusable_image_ids: caption slots (and their images) that ended as an empty or
  refusal answer with no usable caption for the same slot.
* "words" are `pipeline.export.tokenize` tokens (punctuation dropped, one token per CJK character, so
  Chinese captions get a meaningful length); "chars" count the caption after whitespace is collapsed.
* Percentiles interpolate linearly between the closest ranks (numpy's default).
* duplicate_caption_share: usable captions whose exact text is also a caption of another image, over
  all usable captions.
* identical_within_prompt_share: images with some prompt whose ≥2 captions are all the same, over images
  with some prompt holding ≥2 captions (None when no image has two captions under one prompt).
* colour_agreement: over images whose attributes give both upper_color and lower_color, the share of
  their captions that name the upper colour, the lower colour, and both, anywhere in the caption; colour
  words are read by `pipeline.review.wording` (grey = gray, navy = blue, Chinese names count), the same
  reading the gallery's and the scoreboard's flags use (`pipeline.review.flags`). Empty and refusal
  answers are told by `pipeline.export.caption_kind`, also the flags' rule.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.errors import OutputError
from pipeline.export import caption_kind, captions_by_image, clean_caption, tokenize
from pipeline.records import CaptionRow
from pipeline.review.wording import canonical_colour, colours_named

_MAX_LISTED_IDS = 20


# --- numbers -----------------------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; q in [0, 1]."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    value = sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
    return round(value, 3)


def length_summary(values: list[int]) -> dict[str, float | None]:
    """min / p50 / mean / p95 / max of a list of lengths (all None when empty)."""
    s = sorted(values)
    if not s:
        return {"min": None, "p50": None, "mean": None, "p95": None, "max": None}
    return {
        "min": s[0],
        "p50": percentile(s, 0.5),
        "mean": round(sum(s) / len(s), 3),
        "p95": percentile(s, 0.95),
        "max": s[-1],
    }


def count_summary(counts: list[int]) -> dict:
    """min / mean / max and a histogram {count: images} (string keys, so it survives JSON unchanged)."""
    if not counts:
        return {"min": None, "mean": None, "max": None, "histogram": {}}
    hist = Counter(counts)
    return {
        "min": min(counts),
        "mean": round(sum(counts) / len(counts), 3),
        "max": max(counts),
        "histogram": {str(k): hist[k] for k in sorted(hist)},
    }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# --- building ----------------------------------------------------------------------------------------

def build_report(captions: list[CaptionRow], attributes: list[dict[str, str]] | None = None) -> dict:
    """All the report's numbers as a JSON-ready dict (see the module docstring for definitions)."""
    latest: dict[tuple[str, str, int], CaptionRow] = {}
    for row in captions:
        latest[row.key] = row
    rows = list(latest.values())  # what each slot ended as: its refusals count as refusals

    kinds = {r.key: caption_kind(r.caption) for r in rows}
    structured = sum(1 for k in kinds.values() if k == "structured")
    rows = [r for r in rows if kinds[r.key] != "structured"]  # attribute answers are not captions
    images: list[str] = sorted({r.image_id for r in rows})
    usable = [r for group in captions_by_image(captions).values() for r in group]
    texts = {r.key: clean_caption(r.caption) for r in usable}
    tokens = {r.key: tokenize(texts[r.key]) for r in usable}

    per_image = Counter(r.image_id for r in usable)
    prompts: dict[str, dict] = {}
    for name in sorted({r.prompt_name for r in rows}):
        seen = sorted({r.image_id for r in rows if r.prompt_name == name})
        counts = Counter(r.image_id for r in usable if r.prompt_name == name)
        prompts[name] = {
            "captions": sum(counts.values()),
            "images": len(seen),
            "per_image": count_summary([counts[i] for i in seen]),
        }

    usable_keys = {r.key for r in usable}
    refused = [r for r in rows if kinds[r.key] in ("empty", "refusal") and r.key not in usable_keys]
    return {
        "images": len(images),
        "captions": len(usable),
        "structured_answers": structured,
        "captions_per_image": count_summary([per_image[i] for i in images]),
        "prompts": prompts,
        "length_words": length_summary([len(tokens[r.key]) for r in usable]),
        "length_chars": length_summary([len(texts[r.key]) for r in usable]),
        "vocabulary": len({t for toks in tokens.values() for t in toks}),
        "duplicate_caption_share": _duplicate_share(usable, texts),
        **_identical_within_prompt(usable, texts),
        "colour_agreement": _colour_agreement(usable, texts, attributes or []),
        "unusable_captions": len(refused),
        "unusable_image_ids": sorted({r.image_id for r in refused}),
    }


def _duplicate_share(usable: list[CaptionRow], texts: dict) -> float | None:
    """Share of captions whose exact text also describes another image: a template answer, not a look."""
    images_of: dict[str, set[str]] = defaultdict(set)
    for r in usable:
        images_of[texts[r.key]].add(r.image_id)
    dup = sum(1 for r in usable if len(images_of[texts[r.key]]) > 1)
    return _share(dup, len(usable))


def _identical_within_prompt(usable: list[CaptionRow], texts: dict) -> dict:
    """Several captions of one image under one prompt that are all the same add nothing to training."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in usable:
        groups[(r.image_id, r.prompt_name)].append(texts[r.key])
    multi: set[str] = set()
    identical: set[str] = set()
    for (image_id, _), group in groups.items():
        if len(group) >= 2:
            multi.add(image_id)
            if len(set(group)) == 1:
                identical.add(image_id)
    return {
        "identical_within_prompt_share": _share(len(identical), len(multi)),
        "identical_within_prompt_images": len(identical),
    }


def _names(colour: str, named: frozenset[str]) -> bool:
    """Does a caption naming `named` (canonical colours) name the attribute's `colour`?"""
    return (canonical_colour(colour) or colour.strip().lower()) in named


def _colour_agreement(usable: list[CaptionRow], texts: dict, attributes: list[dict[str, str]]) -> dict | None:
    """Do captions name the colours the structured answer gave? A cheap cross-check of both."""
    colours: dict[str, tuple[str, str]] = {}
    for row in attributes:
        image_id = row.get("image_id") or ""
        upper = (row.get("upper_color") or "").strip()
        lower = (row.get("lower_color") or "").strip()
        if image_id and upper and lower and image_id not in colours:
            colours[image_id] = (upper, lower)
    checked = [r for r in usable if r.image_id in colours]
    if not checked:
        return None
    up = low = both = 0
    for r in checked:
        upper, lower = colours[r.image_id]
        named = colours_named(texts[r.key])
        u = _names(upper, named)
        lo = _names(lower, named)
        up += u
        low += lo
        both += u and lo
    return {
        "images": len({r.image_id for r in checked}),
        "captions": len(checked),
        "upper": _share(up, len(checked)),
        "lower": _share(low, len(checked)),
        "both": _share(both, len(checked)),
    }


# --- output ------------------------------------------------------------------------------------------

def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if not value.is_integer() else str(int(value))
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def render_report(report: dict, console: Console) -> None:
    """Print the report as rich tables."""
    overview = Table(title="Captions", show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    for label, value in [
        ("images", _fmt(report["images"])),
        ("captions (usable)", _fmt(report["captions"])),
        ("structured answers", _fmt(report["structured_answers"])),
        ("empty / refusal answers", _fmt(report["unusable_captions"])),
        ("vocabulary", _fmt(report["vocabulary"])),
        ("duplicate captions (across images)", _pct(report["duplicate_caption_share"])),
        ("images with identical captions under one prompt", _pct(report["identical_within_prompt_share"])),
    ]:
        overview.add_row(label, value)
    console.print(overview)

    counts = Table(title="Captions per image")
    for col in ("prompt", "images", "captions", "min", "mean", "max", "histogram"):
        counts.add_column(col, justify="left" if col in ("prompt", "histogram") else "right")
    rows = [("all", report["images"], report["captions"], report["captions_per_image"])]
    rows += [(name, p["images"], p["captions"], p["per_image"]) for name, p in report["prompts"].items()]
    for name, n_images, n_captions, summary in rows:
        hist = "  ".join(f"{k}:{v}" for k, v in summary["histogram"].items())
        counts.add_row(
            Text(name), _fmt(n_images), _fmt(n_captions),
            _fmt(summary["min"]), _fmt(summary["mean"]), _fmt(summary["max"]), hist,
        )
    console.print(counts)

    lengths = Table(title="Caption length")
    for col in ("unit", "min", "p50", "mean", "p95", "max"):
        lengths.add_column(col, justify="left" if col == "unit" else "right")
    for unit, key in (("words", "length_words"), ("chars", "length_chars")):
        s = report[key]
        lengths.add_row(unit, *(_fmt(s[k]) for k in ("min", "p50", "mean", "p95", "max")))
    console.print(lengths)

    colour = report.get("colour_agreement")
    if colour:
        table = Table(title="Captions naming the attribute colours")
        for col in ("images", "captions", "upper", "lower", "both"):
            table.add_column(col, justify="right")
        table.add_row(
            _fmt(colour["images"]), _fmt(colour["captions"]),
            _pct(colour["upper"]), _pct(colour["lower"]), _pct(colour["both"]),
        )
        console.print(table)

    ids = report["unusable_image_ids"]
    if ids:
        shown = ", ".join(ids[:_MAX_LISTED_IDS])
        more = f" … and {len(ids) - _MAX_LISTED_IDS} more" if len(ids) > _MAX_LISTED_IDS else ""
        heading = (f"Images with empty or refusal answers ({len(ids)}):", "bold")
        console.print(Text.assemble(heading, " ", shown + more))  # Text: ids are never read as markup


def save_report(report: dict, path: Path) -> None:
    """Write the report as JSON (UTF-8, readable non-ASCII), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            json.dump(report, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write report {path}: {exc.strerror or exc}") from None
