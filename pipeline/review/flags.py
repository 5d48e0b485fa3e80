"""Per-caption flags: the one place that decides which captions deserve a second look.

The gallery shows them next to each caption and filters on them; the scoreboard (`compare`) counts them
per prompt. Both call `load_items` and `compute_flags` here, so a caption flagged on the page is the
caption counted in the table.

Flags (`FLAG_NAMES`), keyed by (image_id, prompt_name, caption_index):

* refusal: the text is empty or looks like a refusal or an apology (`pipeline.export.caption_kind`, the
  rule the export and the report use); only older folders hold such rows in captions_all.csv, newer runs
  put them in errors.csv (`ErrorItem`).
* length_outlier: a caption under 4 words, or, within its prompt (≥ 8 captions), outside
  median ± 3 × spread words, the spread being the MAD scaled to a standard deviation (× 1.4826) and at
  least 10 % of the median, so a prompt of very even lengths does not flag every slightly long caption.
* identity_conflict: within one prompt, one person described with a colour (upper, lower), lower garment
  type or length, or gender that the person's other images contradict: more of them state one other
  value than agree with it (two images, red and black: both flagged; three, two black and one red: the
  red one). Colours agree when they share one. Junk and distractor ids (Market -1 and 0) are not
  persons and never conflict.
* attributes_disagree: the same image has a free-text caption and a structured answer that state
  different values of the same attribute (`pipeline.review.wording`); both sides are flagged (which one
  is wrong is for the reviewer to see). A caption's generic "bag" agrees with any bag the answer has.
* labels_disagree: a caption or answer against the dataset's attribute labels of its person
  (`pipeline.data.labels`), attribute by attribute, only where both state the attribute.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.datasets import parse_cuhk03_name, parse_msmt_name, parse_reid_name_styled
from pipeline.data.labels import AttributeLabels, Mentions, agreement, compare, is_stated, value_of
from pipeline.errors import InputError
from pipeline.export import caption_kind, tokenize
from pipeline.ledger.cells import answer_cell as _cell
from pipeline.ledger.outputs import ATTRIBUTE_ROW_COLUMNS, read_attributes, read_captions, read_errors
from pipeline.review.wording import describe, mentions, mentions_from_fields

FLAG_NAMES: tuple[str, ...] = (
    "refusal", "length_outlier", "identity_conflict", "attributes_disagree", "labels_disagree",
)
FLAG_TITLES: dict[str, str] = {  # for pages and tables
    "refusal": "looks like a refusal or apology",
    "length_outlier": "length outlier",
    "identity_conflict": "conflicts with the same person's other images",
    "attributes_disagree": "caption and structured answer disagree",
    "labels_disagree": "disagrees with the dataset's attribute labels",
}

MIN_WORDS = 4
OUTLIER_SPREADS = 3.0
MIN_CAPTIONS_FOR_SPREAD = 8
_MAD_TO_SD = 1.4826
_MIN_SPREAD_SHARE = 0.1

# What identity_conflict compares across a person's images (upper garment names vary too much
# between describers, "jacket" vs "coat", to call a difference a conflict).
IDENTITY_FIELDS: tuple[str, ...] = ("upper_colour", "lower_colour", "lower_type", "lower_length", "gender")
_FIELD_TITLES: dict[str, str] = {
    "upper_colour": "upper colour", "lower_colour": "lower colour", "lower_type": "lower type",
    "lower_length": "lower length", "top_length": "top length",
}

Key = tuple[str, str, int]


@dataclass(frozen=True)
class CaptionItem:
    """One caption or one structured answer, as written in the output folder.

    `kind`: "caption" (captions_all.csv) or "attributes" (attributes.csv, or a JSON answer an older
    run left in captions_all.csv). `text`: the caption, or the answer's fields as compact JSON.
    `person_id` ("0002") and `camera` ("1") come from the image's file name (Market, Duke, CUHK03,
    MSMT17 rules); None when the name does not say, or for Market's junk (-1) and distractor (0) ids.
    """

    image_id: str
    prompt_name: str
    caption_index: int
    model: str
    kind: str
    text: str
    fields: dict[str, str] | None
    person_id: str | None
    camera: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None

    @property
    def key(self) -> Key:
        return (self.image_id, self.prompt_name, self.caption_index)


@dataclass(frozen=True)
class ErrorItem:
    """A slot that ended in errors.csv (and has no answer since): what the gallery shows instead."""

    image_id: str
    prompt_name: str
    caption_index: int
    reason: str
    detail: str
    cost_usd: float | None = None

    @property
    def key(self) -> Key:
        return (self.image_id, self.prompt_name, self.caption_index)


@dataclass(frozen=True)
class Flag:
    name: str  # one of FLAG_NAMES
    detail: str  # one line a reviewer reads: what was found, against what


# --- reading ------------------------------------------------------------------------------------------

def person_and_camera(image_id: str) -> tuple[str | None, str | None]:
    """("0002", "1") from `.../0002_c1s1_000451_03.jpg`; Duke, CUHK03-NP, CUHK03 and MSMT17 names too.

    The dataset is not known here (an output folder does not say), so the name decides: the
    `pid_c<cam>` rule first, then CUHK03's `1_001_1_01.png` (before MSMT17's, which it would also match).
    """
    name = image_id.replace("\\", "/").rsplit("/", 1)[-1]
    styled = parse_reid_name_styled(name)
    parsed = styled[0] if styled else (parse_cuhk03_name(name) or parse_msmt_name(name))
    if parsed is None or parsed.pid is None:
        return None, None
    camera = str(parsed.camid) if parsed.camid is not None else None
    if parsed.junk or parsed.pid < 0:
        return None, camera
    return f"{parsed.pid:04d}", camera


def is_junk_name(image_id: str) -> bool:
    """The file name is one of Market's junk (-1) or distractor (0000) crops: an image of no one person,
    never grouped into an identity here (`person_and_camera` gives it no person) nor by the gallery."""
    name = image_id.replace("\\", "/").rsplit("/", 1)[-1]
    styled = parse_reid_name_styled(name)
    return bool(styled) and styled[0].pid is not None and (styled[0].junk or styled[0].pid < 0)


def load_items(out_dir: Path, prompts: Sequence[str] | None = None) -> tuple[list[CaptionItem], list[ErrorItem]]:
    """Every answer and every unanswered error of an output folder, optionally of some prompts only.

    A slot written twice (a rerun, a redo) keeps its last usable row, else its last row, as the export
    does. errors.csv rows are kept only for slots with no answer (a later success supersedes them), the
    last per slot. Reading goes through the package's CSV reader (the `csv` module, BOM or not, torn
    tails and damaged rows skipped, nothing on disk changed). `prompts`: only theirs (`only_prompts`).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"output folder {out_dir} does not exist")
    items: dict[Key, CaptionItem] = {}
    for row in read_captions(out_dir):
        kind = caption_kind(row.caption)
        fields = _json_fields(row.caption) if kind == "structured" else None
        person, camera = person_and_camera(row.image_id)
        item = CaptionItem(
            image_id=row.image_id, prompt_name=row.prompt_name, caption_index=row.caption_index,
            model=row.model, kind="attributes" if fields is not None else "caption", text=row.caption,
            fields=fields, person_id=person, camera=camera, prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens, cost_usd=row.cost_usd,
        )
        old = items.get(item.key)
        # the last usable row of a slot, else its last row: a later refusal never hides a caption
        if old is None or kind not in ("refusal", "empty") or caption_kind(old.text) in ("refusal", "empty"):
            items[item.key] = item
    meta = set(ATTRIBUTE_ROW_COLUMNS)
    for d in read_attributes(out_dir):
        prompt_name = d.get("prompt_name") or ""
        image_id = d.get("image_id") or ""
        fields = {k: v for k, v in d.items() if k not in meta and k is not None}
        person, camera = person_and_camera(image_id)
        item = CaptionItem(
            image_id=image_id, prompt_name=prompt_name, caption_index=_int(d.get("caption_index")),
            model=d.get("model") or "", kind="attributes",
            text=json.dumps(fields, ensure_ascii=False, separators=(",", ":")), fields=fields,
            person_id=person, camera=camera, prompt_tokens=_int(d.get("prompt_tokens")),
            completion_tokens=_int(d.get("completion_tokens")), cost_usd=_cost(d.get("cost_usd")),
        )
        items[item.key] = item
    errors: dict[Key, ErrorItem] = {}
    for e in read_errors(out_dir):
        if e.key in items:
            continue
        errors[e.key] = ErrorItem(e.image_id, e.prompt_name, e.caption_index, e.reason, e.detail, e.cost_usd)
    order = sorted(items.values(), key=lambda i: (i.image_id, i.prompt_name, i.caption_index))
    errs = sorted(errors.values(), key=lambda e: (e.image_id, e.prompt_name, e.caption_index))
    return only_prompts(order, errs, prompts, out_dir) if prompts else (order, errs)


def only_prompts(items: Sequence[CaptionItem], errors: Sequence[ErrorItem], prompts: Sequence[str],
                 out_dir: Path) -> tuple[list[CaptionItem], list[ErrorItem]]:
    """The items and errors of `prompts` only. A prompt with neither an answer nor an error in the
    folder is bad input (a typo would otherwise show an empty page)."""
    wanted = set(prompts)
    known = {it.prompt_name for it in items} | {e.prompt_name for e in errors}
    missing = sorted(wanted - known)
    if missing:
        raise InputError(f"no answers for prompt {', '.join(map(repr, missing))} in {out_dir} "
                         f"(it has: {', '.join(sorted(known)) or 'none'})")
    return [it for it in items if it.prompt_name in wanted], [e for e in errors if e.prompt_name in wanted]


def _json_fields(text: str) -> dict[str, str] | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return {str(k): _cell(v) for k, v in value.items()}


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _cost(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


# --- what each item states ------------------------------------------------------------------------------

def mentions_by_key(items: Iterable[CaptionItem]) -> dict[Key, Mentions]:
    """What each caption or structured answer states (`pipeline.review.wording`), each distinct caption
    text read once (templated prompts and repeated answers are common, and reading words is the slow
    part of flagging)."""
    seen: dict[str, Mentions] = {}
    out: dict[Key, Mentions] = {}
    for item in items:
        if item.kind == "attributes" and item.fields is not None:
            out[item.key] = mentions_from_fields(item.fields)
            continue
        m = seen.get(item.text)
        if m is None:
            m = seen[item.text] = mentions(item.text)
        out[item.key] = m
    return out


def word_count(text: str) -> int:
    """Words as the report and the export count them (one per CJK character; control characters and
    spacing, which `clean_caption` would remove first, are never tokens anyway)."""
    return len(tokenize(text))


# --- flags ----------------------------------------------------------------------------------------------

def compute_flags(
    items: Sequence[CaptionItem],
    labels: AttributeLabels | None = None,
    *,
    said: dict[Key, Mentions] | None = None,
) -> dict[Key, list[Flag]]:
    """Flags per item key (only keys with at least one flag), in FLAG_NAMES order.

    `said`: the items' mentions when the caller has them already (`mentions_by_key(items)`, which a
    scoreboard also needs for its agreement figures); computed here otherwise. Pure: no I/O.
    """
    # a caption's kind once per item: "text" (a usable caption), "empty", "refusal"; answers: "answer"
    kinds = {item.key: "answer" if item.kind == "attributes" else caption_kind(item.text) for item in items}
    if said is None:
        said = mentions_by_key(items)
    usable = [item for item in items if kinds[item.key] in ("text", "answer")]
    found: dict[Key, list[Flag]] = defaultdict(list)
    for key, flag in _refusals(items, kinds):
        found[key].append(flag)
    for key, flag in _length_outliers(i for i in usable if i.kind == "caption"):
        found[key].append(flag)
    for key, flag in _identity_conflicts(usable, said):
        found[key].append(flag)
    for key, flag in _attribute_disagreements(usable, said):
        found[key].append(flag)
    if labels is not None:
        for key, flag in _label_disagreements(usable, said, labels):
            found[key].append(flag)
    order = {name: i for i, name in enumerate(FLAG_NAMES)}
    return {k: sorted(v, key=lambda f: order[f.name]) for k, v in found.items()}


def _refusals(items: Iterable[CaptionItem], kinds: dict[Key, str]) -> Iterable[tuple[Key, Flag]]:
    for item in items:
        kind = kinds[item.key]
        if kind == "empty":
            yield item.key, Flag("refusal", "empty answer")
        elif kind == "refusal":
            yield item.key, Flag("refusal", "looks like a refusal or apology")


def length_band(counts: Sequence[int]) -> tuple[float, float] | None:
    """(low, high) word counts outside which a caption of this prompt is an outlier; None when the
    prompt has too few captions to say."""
    if len(counts) < MIN_CAPTIONS_FOR_SPREAD:
        return None
    med = statistics.median(counts)
    mad = statistics.median(abs(c - med) for c in counts)
    spread = max(_MAD_TO_SD * mad, _MIN_SPREAD_SHARE * med, 1.0)
    return med - OUTLIER_SPREADS * spread, med + OUTLIER_SPREADS * spread


def _length_outliers(captions: Iterable[CaptionItem]) -> Iterable[tuple[Key, Flag]]:
    by_prompt: dict[str, list[tuple[Key, int]]] = defaultdict(list)
    for item in captions:
        by_prompt[item.prompt_name].append((item.key, word_count(item.text)))
    for rows in by_prompt.values():
        band = length_band([n for _, n in rows])
        med = statistics.median(n for _, n in rows)
        for key, n in rows:
            if n < MIN_WORDS:
                yield key, Flag("length_outlier", f"{n} word{'s' if n != 1 else ''} (fewer than {MIN_WORDS})")
            elif band is not None and not band[0] <= n <= band[1]:
                yield key, Flag("length_outlier", f"{n} words; this prompt's median is {med:g}, "
                                                  f"{max(0, round(band[0]))}–{round(band[1])} expected")


def _title(name: str) -> str:
    return _FIELD_TITLES.get(name, name.replace("_", " "))


def _identity_conflicts(items: Sequence[CaptionItem], said: dict[Key, Mentions]) -> Iterable[tuple[Key, Flag]]:
    groups: dict[tuple[str, str], list[CaptionItem]] = defaultdict(list)
    for item in items:
        if item.person_id is not None:
            groups[(item.prompt_name, item.person_id)].append(item)
    for (_, person), group in groups.items():
        if len(group) < 2 or len({i.image_id for i in group}) < 2:
            continue
        for name in IDENTITY_FIELDS:
            stated: list[tuple[CaptionItem, object, frozenset]] = []
            per_image: dict[str, set[object]] = defaultdict(set)  # what each image's items state
            for i in group:
                value = value_of(said[i.key], name)
                if is_stated(value):
                    mine = value if isinstance(value, frozenset) else frozenset((value,))
                    stated.append((i, value, mine))
                    per_image[i.image_id] |= mine
            if len(per_image) < 2:
                continue
            images_with: dict[object, int] = defaultdict(int)  # value -> images stating it
            for vals in per_image.values():
                for v in vals:
                    images_with[v] += 1
            for i, value, mine in stated:
                own = per_image[i.image_id]
                if len(mine) == 1:
                    (v,) = mine
                    agree = images_with[v] - 1  # the item's own image states it
                else:
                    agree = sum(1 for img, vals in per_image.items() if img != i.image_id and vals & mine)
                support = {v: n - (v in own) for v, n in images_with.items() if v not in mine}
                top = max(support.values(), default=0)
                if top > agree:
                    yield i.key, _conflict(name, value, person, i.image_id, support, top, per_image, group)


def _conflict(name: str, value: object, person: str, image_id: str, support: dict[object, int], top: int,
              per_image: dict[str, set[object]], group: Sequence[CaptionItem]) -> Flag:
    """The flag's one line: what this image says, what most of the others say, on which cameras."""
    best = sorted((v for v, n in support.items() if n == top), key=str)
    others = len(per_image) - 1
    camera_of = {i.image_id: i.camera for i in group}
    against = [img for img, vals in per_image.items() if img != image_id and vals & set(best)]
    cams = sorted({camera_of[img] for img in against if camera_of.get(img)}, key=_cam_order)
    where = f" (camera{'s' if len(cams) > 1 else ''} {', '.join(cams)})" if cams else ""  # type: ignore[arg-type]
    return Flag("identity_conflict",
                f"{_title(name)} {describe(value)} here; {'/'.join(map(describe, best))} in {top} of {others} "
                f"other image{'s' if others > 1 else ''} of person {person}{where}")


def _cam_order(camera: str) -> tuple[int, str]:
    return (int(camera), "") if camera.isdigit() else (10**9, camera)


def _bags_reconciled(caption: Mentions, answer: Mentions, result: dict[str, bool]) -> dict[str, bool]:
    """A caption's generic "bag" is whatever bag the answer has: not a disagreement when the answer
    has a handbag or a backpack instead of a shoulder bag."""
    if result.get("bag") is False and caption.bag is True and (answer.handbag or answer.backpack):
        result = {k: v for k, v in result.items() if k != "bag"}
    return result


def _mismatch_text(names: Iterable[str], here: Mentions, there: Mentions, where: str) -> str:
    parts = [f"{_title(n)}: {describe(value_of(here, n))} here, {describe(value_of(there, n))} in {where}"
             for n in names]
    return "; ".join(parts)


def _attribute_disagreements(items: Sequence[CaptionItem], said: dict[Key, Mentions]) -> Iterable[tuple[Key, Flag]]:
    answers_of: dict[str, list[CaptionItem]] = defaultdict(list)
    for item in items:
        if item.kind == "attributes":
            answers_of[item.image_id].append(item)
    if not answers_of:
        return
    for cap in items:
        if cap.kind == "caption" and cap.image_id in answers_of:
            for ans in answers_of[cap.image_id]:
                result = _bags_reconciled(said[cap.key], said[ans.key], compare(said[cap.key], said[ans.key]))
                wrong = [n for n, ok in result.items() if not ok]
                if not wrong:
                    continue
                yield cap.key, Flag("attributes_disagree", _mismatch_text(
                    wrong, said[cap.key], said[ans.key], f"the answer of {ans.prompt_name}"))
                yield ans.key, Flag("attributes_disagree", _mismatch_text(
                    wrong, said[ans.key], said[cap.key], f"caption {cap.prompt_name} #{cap.caption_index}"))


def _label_disagreements(items: Sequence[CaptionItem], said: dict[Key, Mentions],
                         labels: AttributeLabels) -> Iterable[tuple[Key, Flag]]:
    for item in items:
        truth = labels.for_person(item.person_id)
        if truth is None:
            continue
        result = agreement(said[item.key], truth, labels.fields)
        wrong = [n for n, ok in result.items() if not ok]
        if wrong:
            yield item.key, Flag("labels_disagree", _mismatch_text(
                wrong, said[item.key], truth, f"the labels of person {item.person_id}"))
