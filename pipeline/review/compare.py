"""`compare`: a scoreboard of prompts (and models) across output folders, to choose the prompt to use.

One row per (model, prompt) (and per folder, when two folders hold the same model and prompt), scored
over the images every row attempted ("the images they share"), so rows are compared on the same
people. The figures and why each is there:

* cost per image and per 1,000 images (USD, answers billed in errors.csv included; None when a price is
  unknown), input/output tokens per image: what the prompt costs at scale.
* words per caption (mean, median; `pipeline.export.tokenize`: one token per CJK character), vocabulary
  (distinct words), distinct-1/2 (distinct uni/bigrams over all uni/bigrams, Li et al. 2016) and
  `same_shape`: the share of captions whose first sentence has the most common shape once colours,
  garments and person words are masked ("A [P] wearing a [C] [G] ..."). Captions from one static
  instruction share one shape; varied sentences trained better retrieval (Tan et al., CVPR 2024).
* refusal/empty rate: caption slots whose last state is an errors.csv row of reason `refused`/`empty`,
  or a caption the shared flags mark `refusal`, over all slots; `failed`: slots left with another error.
* cross-camera consistency: over pairs of answers about the same person from different cameras, the
  share of stated clothing attributes (colours, sleeve, lower length/type, gender, hair: things that do
  not change between cameras; carried items may be hidden from one side, so they are left out) on which
  the pair agrees (`pipeline.review.wording.compare`). ReID captions are wrong in exactly this way.
* flags: the share of answers carrying each per-caption flag (`pipeline.review.flags`, the same flags
  the gallery shows).
* detail: attributes stated per answer (the researchers' "detail" score: how many kinds it mentions).
* with `--attributes FILE` (market_attribute.mat / duke_attribute.mat): per labelled attribute, the
  share of answers that state it and agree with the person's label (`pipeline.data.labels.agreement`;
  structured answers field by field, free text by the words it states), with how many stated it;
  `labels_overall` is the mean over attributes (each attribute weighs the same).
* with `--retrieval clip`: Rank-1/5/10 and mAP of query captions against gallery images
  (`pipeline.review.clip`, `pipeline.review.retrieval`): every caption of a shared query image is one
  query (with `--captions-per-image 2`, two); structured answers take no part.

Rows are ordered by Rank-1, else label agreement, else consistency (best first), then by cost.
Reading folders is done here; everything else is plain functions over `CaptionItem`s.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline.errors import InputError, OutputError
from pipeline.export import tokenize
from pipeline.providers.base import ErrorKind
from pipeline.review.retrieval import DISTRACTOR_PIDS, JUNK_PIDS, RetrievalScores

REFUSAL_REASONS = frozenset({ErrorKind.REFUSED.value, ErrorKind.EMPTY.value})  # errors.csv reasons
# Attributes of a person that do not change between cameras (items carried may be hidden from one side).
CONSISTENCY_FIELDS: tuple[str, ...] = ("upper_colour", "lower_colour", "gender", "hair", "sleeve",
                                       "lower_length", "lower_type")
MAX_ANSWERS_PER_PERSON = 60  # pairs per person are quadratic: a person's first 60 answers (by image id)

# Sentence shapes: words masked to their class, so "A man wearing a red shirt" and "A woman wearing a
# blue jacket" are one shape. Small on purpose: the words a ReID caption varies.
_SHAPE_CLASSES: dict[str, str] = {
    **{w: "C" for w in (
        "black white red purple yellow gray grey blue green pink brown orange navy beige khaki dark light "
        "黑 白 红 紫 黄 灰 蓝 绿 粉 棕 褐 橙").split()},
    **{w: "G" for w in (
        "shirt shirts t tshirt tee top jacket coat sweater hoodie blouse vest dress skirt shorts pants "
        "trousers jeans leggings shoes sneakers boots sandals bag backpack handbag hat cap").split()},
    **{w: "P" for w in "man woman person boy girl lady gentleman guy male female he she his her".split()},
}
_SENTENCE_END = re.compile(r"[.!?。！？\n]")


# --------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class AttributeScore:
    agree: int      # answers that state the attribute and agree with the label
    compared: int   # answers that state the attribute (of persons the file labels)
    labelled: int   # answers about persons the file labels

    @property
    def rate(self) -> float | None:
        return self.agree / self.compared if self.compared else None

    @property
    def stated(self) -> float | None:
        return self.compared / self.labelled if self.labelled else None

    def to_dict(self) -> dict[str, Any]:
        return {"agree": self.rate, "stated": self.stated, "n": self.compared}


@dataclass
class ScoreRow:
    """One (model, prompt[, folder]) of the scoreboard."""

    model: str
    prompt: str
    folder: str
    label: str = ""                      # what the table and the plot call it
    kind: str = "caption"                # caption | attributes
    images: int = 0
    slots: int = 0
    answers: int = 0
    cost_usd: float | None = 0.0
    cost_per_image: float | None = None
    cost_per_1000: float | None = None
    prompt_tokens_per_image: float | None = None
    completion_tokens_per_image: float | None = None
    words_mean: float | None = None
    words_median: float | None = None
    vocabulary: int | None = None
    distinct_1: float | None = None
    distinct_2: float | None = None
    same_shape: float | None = None
    refusal_rate: float | None = None
    failed_rate: float | None = None
    consistency: float | None = None
    consistency_pairs: int = 0
    detail: float | None = None
    flags: dict[str, float] = field(default_factory=dict)
    labels: dict[str, AttributeScore] = field(default_factory=dict)
    labels_overall: float | None = None
    retrieval: RetrievalScores | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = {k: v.to_dict() for k, v in self.labels.items()}
        d["retrieval"] = self.retrieval.to_dict() if self.retrieval is not None else None
        return d


@dataclass
class Scoreboard:
    rows: list[ScoreRow]
    folders: list[str]
    shared_images: int
    scope: str                            # "shared" or "own" (rows share no image: each scored on its own)
    attributes_file: str | None = None
    retrieval: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"folders": self.folders, "shared_images": self.shared_images, "scope": self.scope,
                "attributes_file": self.attributes_file, "retrieval": self.retrieval, "notes": self.notes,
                "rows": [r.to_dict() for r in self.rows]}


@dataclass
class Group:
    """The answers and errors of one row, from one folder, before scoring."""

    model: str
    prompt: str
    folder: str
    label: str = ""
    items: list[Any] = field(default_factory=list)     # CaptionItem
    errors: list[Any] = field(default_factory=list)    # ErrorItem
    flags: dict[tuple[str, str, int], list[Any]] = field(default_factory=dict)
    said: dict[tuple[str, str, int], Any] = field(default_factory=dict)  # item key -> Mentions

    def image_ids(self) -> set[str]:
        return {i.image_id for i in self.items} | {e.image_id for e in self.errors}


# --------------------------------------------------------------------------------------------- text figures

def shape_of(text: str) -> tuple[str, ...]:
    """The first sentence's words with colours, garments and person words masked to C, G, P."""
    first = _SENTENCE_END.split(text.strip(), maxsplit=1)[0] if text.strip() else ""
    return tuple(_SHAPE_CLASSES.get(t, t) for t in tokenize(first))


def text_figures(texts: Sequence[str]) -> dict[str, Any]:
    """Words, vocabulary, distinct-1/2 and same-shape share of captions (None when there are none)."""
    if not texts:
        return {"words_mean": None, "words_median": None, "vocabulary": None, "distinct_1": None,
                "distinct_2": None, "same_shape": None}
    toks = [tokenize(t) for t in texts]
    lengths = [len(t) for t in toks]
    unigrams: Counter[str] = Counter()
    bigrams: Counter[tuple[str, str]] = Counter()
    for t in toks:
        unigrams.update(t)
        bigrams.update(zip(t, t[1:]))
    n_uni, n_bi = sum(unigrams.values()), sum(bigrams.values())
    shapes = Counter(shape_of(t) for t in texts)
    return {
        "words_mean": sum(lengths) / len(lengths),
        "words_median": float(statistics.median(lengths)),
        "vocabulary": len(unigrams),
        "distinct_1": len(unigrams) / n_uni if n_uni else None,
        "distinct_2": len(bigrams) / n_bi if n_bi else None,
        "same_shape": shapes.most_common(1)[0][1] / len(texts),
    }


# --------------------------------------------------------------------------------------------- agreement

def _int_pid(person_id: str | None) -> int | None:
    try:
        return int(person_id) if person_id is not None else None
    except ValueError:
        return None


def _real_person(person_id: str | None) -> bool:
    pid = _int_pid(person_id)
    if pid is None:
        return person_id is not None and person_id.strip() != ""
    return pid not in JUNK_PIDS and pid not in DISTRACTOR_PIDS


def _values(m: Any) -> tuple[Any, ...]:
    """The CONSISTENCY_FIELDS values of Mentions, None where not stated (the inner loop compares these)."""
    from pipeline.review.wording import is_stated, value_of

    return tuple(v if is_stated(v := value_of(m, name)) else None for name in CONSISTENCY_FIELDS)


def _agree(a: Any, b: Any) -> bool:
    """`pipeline.review.wording.compare`'s rule: colour sets agree when they share a colour."""
    return bool(a & b) if isinstance(a, frozenset) else a == b


def consistency(answers: Sequence[Any], said: dict[tuple[str, str, int], Any]) -> tuple[float | None, int]:
    """Agreement between answers about one person from different cameras, pooled over persons.

    Returns (agreeing attribute comparisons / all comparisons, pairs compared). Same-camera pairs are
    left out: the same view says little about whether a caption tracks the person.
    """
    by_person: dict[str, list[Any]] = defaultdict(list)
    for a in answers:
        if _real_person(a.person_id) and a.camera is not None:
            by_person[a.person_id].append(a)
    agree = total = pairs = 0
    for person_answers in by_person.values():
        chosen = sorted(person_answers, key=lambda a: (a.image_id, a.caption_index))[:MAX_ANSWERS_PER_PERSON]
        values = [(a.camera, _values(said[a.key])) for a in chosen]
        for i, (cam_a, va) in enumerate(values):
            for cam_b, vb in values[i + 1:]:
                if cam_a == cam_b:
                    continue
                compared = [_agree(x, y) for x, y in zip(va, vb) if x is not None and y is not None]
                if compared:
                    pairs += 1
                    agree += sum(compared)
                    total += len(compared)
    return (agree / total if total else None), pairs


def label_agreement(answers: Sequence[Any], said: dict[tuple[str, str, int], Any],
                    labels: Any) -> dict[str, AttributeScore]:
    """Per attribute the label file has: how many answers state it and agree with their person's label."""
    from pipeline.data.labels import agreement

    agree: Counter[str] = Counter()
    compared: Counter[str] = Counter()
    labelled = 0
    for a in answers:
        truth = labels.for_person(a.person_id) if _real_person(a.person_id) else None
        if truth is None:
            continue
        labelled += 1
        for name, ok in agreement(said[a.key], truth, labels.fields).items():
            compared[name] += 1
            agree[name] += int(ok)
    return {name: AttributeScore(agree[name], compared[name], labelled) for name in labels.fields}


# --------------------------------------------------------------------------------------------- scoring

def _mentions(items: Iterable[Any]) -> dict[tuple[str, str, int], Any]:
    from pipeline.review.flags import mentions_by_key

    return mentions_by_key(items)


def _latest(items: Iterable[Any]) -> dict[tuple[str, int], Any]:
    """One answer per (image, caption index): the last one written (a rerun's row wins)."""
    out: dict[tuple[str, int], Any] = {}
    for it in items:
        out[(it.image_id, it.caption_index)] = it
    return out


def score_group(group: Group, images: set[str], labels: Any | None = None) -> ScoreRow:
    """All figures of one row over `images` (pure: the group's items, errors and flags)."""
    answers_by_slot = _latest(i for i in group.items if i.image_id in images)
    errors = [e for e in group.errors if e.image_id in images]
    errors_by_slot: dict[tuple[str, int], Any] = {}
    for e in errors:
        errors_by_slot[(e.image_id, e.caption_index)] = e
    slots = set(answers_by_slot) | set(errors_by_slot)
    answers = list(answers_by_slot.values())
    row = ScoreRow(model=group.model, prompt=group.prompt, folder=group.folder,
                   kind="attributes" if answers and all(a.kind == "attributes" for a in answers) else "caption",
                   images=len({s[0] for s in slots}), slots=len(slots), answers=len(answers))

    # cost and tokens: every billed answer of these images, errors included
    billed = [i for i in group.items if i.image_id in images]
    costs = [i.cost_usd for i in billed] + [e.cost_usd for e in errors]
    row.cost_usd = None if any(c is None for c in costs) else float(sum(costs))
    if row.images:
        if row.cost_usd is not None:
            row.cost_per_image = row.cost_usd / row.images
            row.cost_per_1000 = row.cost_per_image * 1000
        row.prompt_tokens_per_image = sum(i.prompt_tokens for i in billed) / row.images
        row.completion_tokens_per_image = sum(i.completion_tokens for i in billed) / row.images

    # refusals and failures, per caption slot
    flag_names = {a.key: {f.name for f in group.flags.get(a.key, ())} for a in answers}

    def flagged(item: Any, name: str) -> bool:
        return name in flag_names[item.key]

    refused = sum(1 for a in answers if flagged(a, "refusal"))
    failed = 0
    for slot, e in errors_by_slot.items():
        if slot in answers_by_slot:
            continue  # asked again and answered: the error is history
        if e.reason in REFUSAL_REASONS:
            refused += 1
        else:
            failed += 1
    if row.slots:
        row.refusal_rate = refused / row.slots
        row.failed_rate = failed / row.slots

    # text (captions only: a structured answer's text is JSON)
    captions = [a.text for a in answers if a.kind == "caption" and not flagged(a, "refusal")]
    for k, v in text_figures(captions).items():
        setattr(row, k, v)

    # flags, detail, consistency, labels
    if answers:
        from pipeline.review.flags import FLAG_NAMES

        row.flags = {name: sum(1 for a in answers if flagged(a, name)) / len(answers) for name in FLAG_NAMES}
        usable = [a for a in answers if not flagged(a, "refusal")]
        said = group.said if all(a.key in group.said for a in usable) else _mentions(usable)
        if usable:
            row.detail = sum(len(said[a.key].stated()) for a in usable) / len(usable)
        row.consistency, row.consistency_pairs = consistency(usable, said)
        if labels is not None:
            row.labels = label_agreement(usable, said, labels)
            rates = [s.rate for s in row.labels.values() if s.rate is not None]
            row.labels_overall = sum(rates) / len(rates) if rates else None
    return row


def group_items(folder: str, items: Sequence[Any], errors: Sequence[Any], flags: dict,
                fallback_model: str = "?", said: dict | None = None) -> list[Group]:
    """A folder's answers by (model, prompt); errors (which name no model) join their prompt's group
    of the folder's most common model for that prompt, else `fallback_model` (the manifest's)."""
    groups: dict[tuple[str, str], Group] = {}
    models_of_prompt: dict[str, Counter[str]] = defaultdict(Counter)
    for it in items:
        model = it.model or fallback_model
        g = groups.setdefault((model, it.prompt_name), Group(model, it.prompt_name, folder, flags=flags,
                                                                 said=said or {}))
        g.items.append(it)
        models_of_prompt[it.prompt_name][model] += 1
    for e in errors:
        counts = models_of_prompt.get(e.prompt_name)
        model = counts.most_common(1)[0][0] if counts else fallback_model
        g = groups.setdefault((model, e.prompt_name), Group(model, e.prompt_name, folder, flags=flags,
                                                                said=said or {}))
        g.errors.append(e)
    return list(groups.values())


def _labels_of(groups: Sequence[Group]) -> None:
    """Each group's label: model · prompt, plus the folder when two groups would read the same."""
    seen = Counter((g.model, g.prompt) for g in groups)
    for g in groups:
        g.label = f"{g.prompt} · {g.model}" + (f" [{g.folder}]" if seen[(g.model, g.prompt)] > 1 else "")


def _sort_key(row: ScoreRow) -> tuple:
    def neg(v: float | None) -> float:
        return -v if v is not None else float("inf")

    r1 = row.retrieval.rank(1) if row.retrieval is not None else None
    return (neg(r1), neg(row.labels_overall), neg(row.consistency),
            row.cost_per_image if row.cost_per_image is not None else float("inf"), row.label)


Retrieval = Callable[[list[tuple[ScoreRow, Group, set[str]]]], dict[str, Any]]


def build_scoreboard(groups: Sequence[Group], labels: Any | None = None, retrieval: Retrieval | None = None,
                     attributes_file: str | None = None) -> Scoreboard:
    """Score every group over the images all of them attempted (each its own when they share none)."""
    if not groups:
        raise InputError("nothing to compare: the folders hold no captions, answers or errors")
    _labels_of(groups)
    sets = [g.image_ids() for g in groups]
    shared = set.intersection(*sets) if sets else set()
    notes: list[str] = []
    scope = "shared"
    if not shared:
        scope = "own"
        notes.append("the rows share no image: each row is scored over its own images")
    scored: list[tuple[ScoreRow, Group, set[str]]] = []
    for g, own in zip(groups, sets):
        images = shared if shared else own
        row = score_group(g, images, labels)
        row.label = g.label
        scored.append((row, g, images))
    folders = list(dict.fromkeys(g.folder for g in groups))
    board = Scoreboard(rows=[r for r, _, _ in scored], folders=folders, shared_images=len(shared), scope=scope,
                       attributes_file=attributes_file, notes=notes)
    if retrieval is not None:
        board.retrieval = retrieval(scored)
    board.rows.sort(key=_sort_key)
    return board


# --------------------------------------------------------------------------------------------- output

def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def _money(v: float | None) -> str:
    if v is None:
        return "?"
    return f"${v:,.2f}" if v >= 1 or v == 0 else f"${v:,.4f}"


def _table(title: str, first: str, columns: Sequence[str]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False)
    t.add_column(first, overflow="fold", min_width=3)
    for c in columns:
        t.add_column(c, justify="right", no_wrap=True)
    return t


def render_scoreboard(board: Scoreboard, console: Any) -> None:
    """The scoreboard as rich tables, rows numbered best first (#1 ...) with a legend, so each table
    stays narrow enough for an 80-column terminal: cost and text, quality, and (attributes as rows,
    one column per scoreboard row) agreement with the labels."""
    from rich.markup import escape

    scope = (f"{board.shared_images:,} images shared by {len(board.rows)} rows" if board.scope == "shared"
             else "rows scored over their own images (none shared)")
    console.print(f"[bold]Prompt scoreboard[/bold]: {scope}, best first")
    for n, r in enumerate(board.rows, 1):
        kind = ", structured answers" if r.kind == "attributes" else ""
        console.print(f"  #{n}  {escape(r.label)}  ({r.images:,} images{kind})")
    ids = [f"#{n}" for n in range(1, len(board.rows) + 1)]
    t = _table("Cost and text", "",
               ["$/1k img", "tok in", "tok out", "words", "vocab", "dist-1", "dist-2", "1 shape"])
    for i, r in zip(ids, board.rows):
        t.add_row(i, _money(r.cost_per_1000), _num(r.prompt_tokens_per_image, "{:,.0f}"),
                  _num(r.completion_tokens_per_image, "{:,.0f}"), _num(r.words_mean), _num(r.vocabulary, "{:,}"),
                  _num(r.distinct_1, "{:.2f}"), _num(r.distinct_2, "{:.2f}"), _pct(r.same_shape))
    console.print(t)
    has_r = any(r.retrieval is not None for r in board.rows)
    has_l = any(r.labels for r in board.rows)
    cols = ["refused", "failed", "cross-cam", "detail"] + (["labels"] if has_l else []) + (
        ["R1", "R5", "R10", "mAP"] if has_r else [])
    q = _table("Quality", "", cols)
    for i, r in zip(ids, board.rows):
        cells = [_pct(r.refusal_rate), _pct(r.failed_rate), _pct(r.consistency), _num(r.detail)]
        if has_l:
            cells.append(_pct(r.labels_overall))
        if has_r:
            s = r.retrieval
            cells += [_pct(s.rank(k)) if s else "—" for k in (1, 5, 10)] + [_pct(s.mAP) if s else "—"]
        q.add_row(i, *cells)
    console.print(q)
    if has_l:
        names = list(dict.fromkeys(n for r in board.rows for n in r.labels))
        lt = _table(f"Agreement with {escape(Path(str(board.attributes_file)).name)}: agree % (answers stating it)",
                    "attribute", ids)
        for name in names:
            lt.add_row(name.replace("_", " "),
                       *[f"{_pct(r.labels[name].rate)} ({r.labels[name].compared})" if name in r.labels else "—"
                         for r in board.rows])
        console.print(lt)
    if board.retrieval:
        console.print(f"retrieval: {escape(str(board.retrieval.get('summary', '')))}")
    for note in board.notes:
        console.print(f"note: {escape(note)}")


def save_scoreboard(board: Scoreboard, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(board.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------- folders (I/O)

def load_groups(out_dirs: Sequence[Path], labels: Any | None = None) -> tuple[list[Group], dict[str, Path]]:
    """Every folder's answers, errors and flags (with the labels' flag when given), grouped by
    (model, prompt). Also folder name -> path."""
    from pipeline.ledger.manifest import read_manifest
    from pipeline.review.flags import compute_flags, load_items

    groups: list[Group] = []
    names: dict[str, Path] = {}
    seen: dict[Path, Path] = {}
    for out in out_dirs:
        out = Path(out)
        if not out.is_dir():
            raise InputError(f"output folder {out} does not exist")
        same = seen.setdefault(out.resolve(), out)
        if same is not out:  # its rows would be compared with themselves
            raise InputError(f"--out {out} is given twice" + (f" (as {same})" if str(same) != str(out) else ""))
        name = _folder_name(out, names)
        names[name] = out
        items, errors = load_items(out)
        manifest = read_manifest(out) or {}
        said = _mentions(items)  # read once: the flags and the scoreboard use the same mentions
        groups.extend(group_items(name, items, errors, compute_flags(items, labels, said=said),
                                  str(manifest.get("model") or "?"), said))
    return groups, names


def _folder_name(out: Path, taken: dict[str, Path]) -> str:
    """The folder's name in labels: its last part, its full path when another folder has that name."""
    name = out.name or str(out)
    if name in taken:
        name = str(out.resolve())
    return name


def check_writable(path: Path, option: str) -> None:
    """Before any work: the folder of `--save`/`--plot` exists or can be made, so a scoreboard that took
    minutes of CLIP is never lost to a typo in a path."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot make its folder {folder} ({exc.strerror or exc})") from None
    if Path(path).is_dir():
        raise InputError(f"{option} {path} is a folder: give a file name")


@dataclass(frozen=True)
class ImageInfo:
    """An image of a folder's index, as the retrieval protocol needs it."""

    image_id: str
    path: Path
    pid: int | None
    camid: int | None
    split: str | None


def folder_images(out: Path) -> list[ImageInfo]:
    """The images of the index a folder was captioned from (its manifest names the index and the image
    root). CLIP needs the gallery's pixels and the dataset's split. A folder captioned from the query
    split alone (the usual way: only query captions are needed) gets the gallery split from the
    dataset root the manifest names, scanned as `prepare --splits gallery` would."""
    from pipeline.data.index import load_index, scan_index
    from pipeline.ledger.manifest import read_manifest
    from pipeline.review.flags import person_and_camera

    manifest = read_manifest(out) or {}
    index = manifest.get("index")
    if not index:
        raise InputError(f"{out} has no manifest.json naming its index: --retrieval clip needs the images")
    root = manifest.get("root")
    try:
        loaded = load_index(Path(index), Path(root) if root else None)
    except InputError as exc:
        raise InputError(f"--retrieval clip needs the images of {out}: {exc}") from None
    except OSError as exc:
        raise InputError(f"--retrieval clip needs the index {index} named in {out}/manifest.json: "
                         f"{exc.strerror or exc}") from None
    images = []
    for e in loaded.entries:
        pid, camid = e.pid, e.camid
        if pid is None or camid is None:  # a plain folder's index: Market-style names still tell
            person, camera = person_and_camera(e.image_id)
            pid = pid if pid is not None else _int_pid(person)
            camid = camid if camid is not None else _int_pid(camera)
        images.append(ImageInfo(e.image_id, Path(e.path), pid, camid, e.split))
    splits = {im.split for im in images}
    if "query" in splits and "gallery" not in splits and root:
        root_abs, _, found = scan_index(Path(root), str(manifest.get("dataset") or "auto"), splits={"gallery"})
        images += [ImageInfo(im.image_id, root_abs / im.image_id, im.pid, im.camid, im.split) for im in found]
    return images


def clip_retrieval_for(folders: dict[str, Path], model_name: str,
                       progress: Callable[[str], None] | None = None) -> Retrieval:
    """The `--retrieval clip` step: every row's query captions against the folders' gallery images."""
    from pipeline.review.clip import ClipEncoder, GalleryImage, Query, clip_retrieval
    from pipeline.review.retrieval import ProtocolImage, protocol_sets

    def run(scored: list[tuple[ScoreRow, Group, set[str]]]) -> dict[str, Any]:
        images: dict[str, ImageInfo] = {}
        for name in dict.fromkeys(g.folder for _, g, _ in scored):
            for im in folder_images(folders[name]):
                images.setdefault(im.image_id, im)
        queries, gallery, rule = protocol_sets(
            ProtocolImage(im.image_id, im.pid, im.camid, im.split) for im in images.values())
        if not queries or not gallery:
            raise InputError(f"--retrieval clip needs query and gallery images: the index has {len(queries):,} "
                             f"query and {len(gallery):,} gallery images of known persons")
        query_ids = {q.image_id: q for q in queries}
        per_row: dict[str, list[Query]] = {}
        for row, group, shared in scored:
            answers = _latest(i for i in group.items if i.image_id in shared and i.kind == "caption")
            per_row[row.label] = [Query(a.text, int(query_ids[a.image_id].pid or 0),
                                        int(query_ids[a.image_id].camid or 0))
                                  for _, a in sorted(answers.items()) if a.image_id in query_ids]
        encoder = ClipEncoder(model_name)
        g_images = [GalleryImage(images[g.image_id].path, int(g.pid or 0), int(g.camid or 0)) for g in gallery]
        scores = clip_retrieval(encoder, per_row, g_images, progress)
        for row, _, _ in scored:
            if row.kind == "caption":
                row.retrieval = scores.get(row.label)
        return {"model": model_name, "rule": rule, "query_images": len(queries), "gallery": len(gallery),
                "summary": f"CLIP {model_name}; {rule}; {len(queries):,} query images, "
                           f"{len(gallery):,} gallery images"}

    return run
