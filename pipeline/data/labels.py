"""A dataset's own attribute labels (Market-1501's and DukeMTMC-reID's .mat files), as `Mentions`.

Lin et al. (Pattern Recognition 2019) annotated every identity of Market-1501 with 27 attributes and
every identity of DukeMTMC-reID with 23, and published them as MATLAB v5 files: `market_attribute.mat`
and `duke_attribute.mat`. Both hold one struct (`market_attribute` / `duke_attribute`) with `train` and
`test` structs of 1×N arrays, one per attribute, plus `image_index` (the 4-digit person id). Values are
1/2 codes; the field order differs between the splits, so everything is read by name.

They are the ground truth the scoreboard scores captions against, so they are expressed in exactly the
vocabulary `pipeline.review.wording.mentions` gives a caption: comparing a caption with its person's
labels is then a field-by-field equality (`agreement`). That vocabulary, `Mentions`, is defined here
rather than in `pipeline.review.wording` (which reads captions into it and re-exports it) because
`pipeline.data` never imports from the views. scipy reads the files: the .mat v5 container (compressed
elements, nested structs, cell strings) is not worth re-implementing.

Codes (from the datasets' attribute readmes):
* both: gender 1 male 2 female; hat, backpack, bag, handbag 1 no 2 yes; colour flags 1 no 2 yes, one
  "yes" per identity for the upper and one for the lower colour (some identities have none: multi-colour
  clothing; their colour is then "not stated").
* Market only: age 1 young (child) 2 teenager 3 adult 4 old; hair 1 short 2 long; up (sleeve) 1 long
  2 short; down (lower-body length) 1 long 2 short; clothes (lower type) 1 dress 2 pants.
* Duke only: top (upper-body clothing length) 1 short 2 long; boots 1 no 2 yes; shoes 1 dark 2 light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, first_line

# --- the shared vocabulary -------------------------------------------------------------------------------
# Mentions lives here, below the views, because labels are expressed in it and `pipeline.data` never
# imports from `pipeline.review`; `pipeline.review.wording` (which reads captions into it) re-exports it.

COLOURS: tuple[str, ...] = (
    "black", "white", "red", "purple", "yellow", "gray", "blue", "green", "pink", "brown", "orange",
)


@dataclass(frozen=True)
class Mentions:
    """What a text (or a structured answer, or a dataset's labels) states about one person.

    Sets are empty and single values None when nothing is stated. Colours are canonical names from
    COLOURS; garments are canonical names (t-shirt, shirt, jacket, coat, sweater, hoodie, top, dress,
    skirt, shorts, pants). `lower_type` is Market-1501's "clothes": "dress" (a dress or a skirt) or
    "pants" (trousers, jeans or shorts). `age`: young (a child), teenager, adult, old. `top_length`
    (DukeMTMC's "top") comes from structured answers and labels only; `shoes` ("dark"/"light") also
    from a caption's shoe colour (white -> light; black, brown -> dark) or its "dark shoes".
    """

    upper_colours: frozenset[str] = frozenset()
    lower_colours: frozenset[str] = frozenset()
    garments: frozenset[str] = frozenset()
    bag: bool | None = None
    backpack: bool | None = None
    handbag: bool | None = None
    hat: bool | None = None
    boots: bool | None = None
    gender: str | None = None
    hair: str | None = None
    sleeve: str | None = None
    lower_length: str | None = None
    lower_type: str | None = None
    age: str | None = None
    top_length: str | None = None
    shoes: str | None = None

    def stated(self) -> dict[str, object]:
        """The fields this states (non-empty, non-None), by name: what a page shows next to a caption."""
        return {f.name: getattr(self, f.name) for f in dc_fields(self)
                if getattr(self, f.name) not in (None, frozenset())}


# Comparable attributes, in display order. Colour fields compare sets (agree = they share a colour);
# the others compare single values.
COMPARABLE: tuple[str, ...] = (
    "upper_colour", "lower_colour", "gender", "hair", "sleeve", "lower_length", "lower_type", "age",
    "hat", "backpack", "bag", "handbag", "boots", "top_length", "shoes",
)
_SET_FIELDS = {"upper_colour": "upper_colours", "lower_colour": "lower_colours"}


def value_of(m: Mentions, name: str) -> object:
    """The value of comparable attribute `name` in `m` (None or an empty set: not stated)."""
    return getattr(m, _SET_FIELDS.get(name, name))


def is_stated(value: object) -> bool:
    return value is not None and value != frozenset()


def compare(a: Mentions, b: Mentions, names: tuple[str, ...] = COMPARABLE) -> dict[str, bool]:
    """Per attribute both state: do they agree? Colour sets agree when they share a colour."""
    out: dict[str, bool] = {}
    for name in names:
        va, vb = value_of(a, name), value_of(b, name)
        if not (is_stated(va) and is_stated(vb)):
            continue
        if isinstance(va, frozenset) and isinstance(vb, frozenset):
            out[name] = bool(va & vb)
        else:
            out[name] = va == vb
    return out


# --- label files -----------------------------------------------------------------------------------------

LAYOUTS: tuple[str, ...] = ("market1501", "dukemtmc")

# The attributes each layout labels, in the names `pipeline.review.wording` compares.
LAYOUT_FIELDS: dict[str, tuple[str, ...]] = {
    "market1501": ("upper_colour", "lower_colour", "gender", "hair", "sleeve", "lower_length", "lower_type",
                   "age", "hat", "backpack", "bag", "handbag"),
    "dukemtmc": ("upper_colour", "lower_colour", "gender", "top_length", "hat", "backpack", "bag", "handbag",
                 "boots", "shoes"),
}
# Every attribute a label file can state (the union, Market's order first).
ATTRIBUTE_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(LAYOUT_FIELDS["market1501"] + LAYOUT_FIELDS["dukemtmc"]))

_MARKER_FIELDS = {"market1501": ("clothes", "up", "down"), "dukemtmc": ("top", "boots", "shoes")}
_COMMON = ("gender", "hat", "backpack", "bag", "handbag", "image_index")
_CODES: dict[str, tuple[str, str]] = {  # field -> (value for 1, value for 2)
    "gender": ("male", "female"),
    "hair": ("short", "long"),
    "up": ("long", "short"),
    "down": ("long", "short"),
    "clothes": ("dress", "pants"),
    "top": ("short", "long"),
    "shoes": ("dark", "light"),
}
_AGES = {1: "young", 2: "teenager", 3: "adult", 4: "old"}


@dataclass(frozen=True)
class AttributeLabels:
    """One label file: each person's attributes as Mentions, keyed by the person id without leading
    zeros ("2" for "0002"), so an id parsed from an image name or read from a file finds it alike."""

    layout: str  # "market1501" or "dukemtmc"
    persons: dict[str, Mentions] = field(repr=False)
    splits: dict[str, str] = field(repr=False)  # person key -> "train" / "test"
    source: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        """The attributes this file labels (LAYOUT_FIELDS of its layout)."""
        return LAYOUT_FIELDS[self.layout]

    def __len__(self) -> int:
        return len(self.persons)

    def for_person(self, person_id: str | int | None) -> Mentions | None:
        """The labels of a person ("0002", "2" or 2), or None when the file does not label them."""
        if person_id is None:
            return None
        return self.persons.get(person_key(person_id))


def person_key(person_id: str | int) -> str:
    """"0002" -> "2"; non-numeric ids are kept as written (stripped)."""
    text = str(person_id).strip()
    try:
        return str(int(text))
    except ValueError:
        return text


def agreement(stated: Mentions, truth: Mentions, names: tuple[str, ...] = ATTRIBUTE_FIELDS) -> dict[str, bool]:
    """Per attribute that both sides state: does `stated` (a caption, an answer) agree with `truth`?

    Colours agree when the caption names the labelled colour among the ones it names ("a black and
    white shirt" agrees with upper colour white); everything else is equality.
    """
    return compare(stated, truth, names)


# --- reading ----------------------------------------------------------------------------------------------

def load_attribute_labels(path: Path) -> AttributeLabels:
    """Read `market_attribute.mat` or `duke_attribute.mat` (the layout is told by its fields).

    Any problem (missing, not a .mat file, another structure) is an InputError of one line.
    """
    path = Path(path)
    try:
        import scipy.io
    except ImportError:  # a core dependency; only a broken install lacks it
        raise InputError("reading attribute labels needs scipy: pip install scipy") from None
    try:
        data = scipy.io.loadmat(str(path), squeeze_me=False, struct_as_record=True)
    except FileNotFoundError:
        raise InputError(f"attribute file {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read attribute file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... on a bad file
        raise InputError(f"{path} is not a MATLAB attribute file ({first_line(exc)})") from None
    return labels_from_mat(data, source=str(path))


def labels_from_mat(data: dict[str, Any], source: str = "") -> AttributeLabels:
    """The labels in a loaded .mat dict (`scipy.io.loadmat` output); InputError when the layout is not
    Market's or Duke's."""
    where = source or "the attribute file"
    names = [k for k in data if not k.startswith("__")]
    root = None
    for key in ("market_attribute", "duke_attribute", *names):
        if key in data and _field_names(data[key]) and {"train", "test"} & set(_field_names(data[key])):
            root = data[key]
            break
    if root is None:
        raise InputError(f"{where} has no market_attribute or duke_attribute struct with train/test "
                         f"(variables: {', '.join(names) or 'none'})")
    record = _struct(root)
    persons: dict[str, Mentions] = {}
    splits: dict[str, str] = {}
    layout = None
    for split in ("train", "test"):
        if split not in _field_names(root):
            continue
        part = _struct(record[split])
        if part is None:
            raise InputError(f"{where}: {split} is not a struct of attribute arrays")
        this_layout = _layout_of(part, where)
        if layout is not None and this_layout != layout:
            raise InputError(f"{where}: train and test have different attribute layouts")
        layout = this_layout
        for key, mention in _read_split(part, layout, where, split):
            persons[key] = mention
            splits[key] = split
    if layout is None or not persons:
        raise InputError(f"{where} labels no person")
    return AttributeLabels(layout=layout, persons=persons, splits=splits, source=source)


def _field_names(value: Any) -> tuple[str, ...]:
    names = getattr(getattr(value, "dtype", None), "names", None)
    return tuple(names) if names else ()


def _struct(value: Any) -> Any | None:
    """The record of a 1×1 struct array (as loadmat gives it), or None."""
    if not _field_names(value):
        return None
    try:
        return value.reshape(-1)[0]
    except (AttributeError, IndexError, ValueError):
        return None


def _layout_of(part: Any, where: str) -> str:
    have = set(part.dtype.names)
    missing = [f for f in _COMMON if f not in have]
    if missing:
        raise InputError(f"{where}: no {', '.join(missing)} field (not a Market-1501/DukeMTMC attribute file)")
    for layout, markers in _MARKER_FIELDS.items():
        if all(m in have for m in markers):
            return layout
    raise InputError(f"{where}: neither the Market-1501 (clothes, up, down) nor the DukeMTMC (top, boots, "
                     "shoes) attribute fields")


def _column(part: Any, name: str, n: int, where: str) -> list[int]:
    import numpy as np

    try:
        values = np.asarray(part[name]).reshape(-1)
        ints = [int(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{where}: field {name} is not a list of numbers") from None
    if len(ints) != n:
        raise InputError(f"{where}: field {name} has {len(ints)} values for {n} persons")
    bad = sorted({v for v in ints if v not in _allowed(name)})
    if bad:
        allowed = "/".join(map(str, sorted(_allowed(name))))
        raise InputError(f"{where}: field {name} holds {bad[0]} (expected {allowed})")
    return ints


def _allowed(name: str) -> frozenset[int]:
    return frozenset({1, 2, 3, 4}) if name == "age" else frozenset({1, 2})


def _ids(part: Any, where: str) -> list[str]:
    import numpy as np

    out: list[str] = []
    for cell in np.asarray(part["image_index"]).reshape(-1):
        value = cell
        while hasattr(value, "shape") and getattr(value, "size", 0) == 1 and value.dtype == object:
            value = value.reshape(-1)[0]
        if hasattr(value, "reshape"):
            flat = value.reshape(-1)
            value = flat[0] if flat.size else ""
        text = str(value).strip()
        if not text:
            raise InputError(f"{where}: an empty image_index entry")
        out.append(text)
    return out


def _read_split(part: Any, layout: str, where: str, split: str) -> list[tuple[str, Mentions]]:
    ids = _ids(part, f"{where} ({split})")
    n = len(ids)
    names = set(part.dtype.names)
    up_colours = [c for c in COLOURS if f"up{c}" in names]
    down_colours = [c for c in COLOURS if f"down{c}" in names]
    if not up_colours or not down_colours:
        raise InputError(f"{where} ({split}): no up<colour>/down<colour> fields")
    col = {name: _column(part, name, n, f"{where} ({split})")
           for name in names if name != "image_index"}
    out: list[tuple[str, Mentions]] = []
    for i, pid in enumerate(ids):
        def code(name: str) -> str | None:
            return _CODES[name][col[name][i] - 1] if name in col else None

        def yes(name: str) -> bool | None:
            return col[name][i] == 2 if name in col else None

        common = dict(
            upper_colours=frozenset(c for c in up_colours if col[f"up{c}"][i] == 2),
            lower_colours=frozenset(c for c in down_colours if col[f"down{c}"][i] == 2),
            gender=code("gender"), hat=yes("hat"), backpack=yes("backpack"), bag=yes("bag"),
            handbag=yes("handbag"),
        )
        if layout == "market1501":
            mention = Mentions(**common, hair=code("hair"), sleeve=code("up"), lower_length=code("down"),
                               lower_type=code("clothes"), age=_AGES.get(col["age"][i]) if "age" in col else None)
        else:
            mention = Mentions(**common, top_length=code("top"), boots=yes("boots"), shoes=code("shoes"))
        out.append((person_key(pid), mention))
    return out
