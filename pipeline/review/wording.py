"""What a caption states about a person, as canonical values: colours, garments, carried items, gender, ...

The gallery's flags, the scoreboard's agreement figures and the report's colour check all compare what
captions say with each other, with the structured answers and with a dataset's attribute labels. They can
only do that on one vocabulary: "grey hoodie", "charcoal sweatshirt" and "灰色卫衣" must all come out as
upper colour `gray`. This module is that vocabulary, and the only place that reads words.

It is a heuristic, not a parser, and tuned for what vision models write about pedestrian crops (English,
plus the Chinese colour and garment words as a bonus):

* A colour belongs to the garment it modifies: the next clothing noun within a few words ("a red
  short-sleeved T-shirt", "black and white striped shirt"), else the clothing noun just before it in
  the same clause ("his trousers are black"). Colours of hair, shoes, bags and hats are not clothing
  colours and are dropped; a dress's colour is both upper and lower (it covers both).
* Colour words are folded to the Market-1501 set plus orange: grey -> gray, navy -> blue, "dark blue"
  -> blue, beige/khaki/tan -> brown, maroon -> red, ...
* Carried items and the hat are True when stated, False when negated ("no bag", "without a hat",
  "neither a hat nor a bag", "not carrying a backpack"), None when not mentioned.
* gender, hair, sleeve, lower length, lower type and age only when the words say so; nothing is inferred
  from a garment except what its name means (shorts are short, trousers are long, a skirt is a dress).
  Shoes are "dark" or "light" (DukeMTMC's label) when white, black or brown, or said to be dark/light.

Pure functions, no I/O.
"""

from __future__ import annotations

import re
from pipeline.data.labels import COLOURS, COMPARABLE, Mentions, compare, is_stated, value_of

__all__ = ["COLOURS", "COMPARABLE", "Mentions", "canonical_colour", "colours_named", "compare", "describe",
           "is_stated", "mentions", "mentions_from_fields", "value_of"]

# --- vocabulary ----------------------------------------------------------------------------------------

# word -> canonical colour (lower-case single words; "-ish" forms included)
_COLOUR_WORDS: dict[str, str] = {
    **{c: c for c in COLOURS},
    "grey": "gray", "charcoal": "gray", "silver": "gray", "ash": "gray",
    "navy": "blue", "turquoise": "blue", "cyan": "blue", "azure": "blue", "cobalt": "blue", "indigo": "blue",
    "denim": "blue",
    "violet": "purple", "lavender": "purple", "lilac": "purple", "mauve": "purple", "plum": "purple",
    "maroon": "red", "burgundy": "red", "crimson": "red", "scarlet": "red", "wine": "red",
    "beige": "brown", "khaki": "brown", "tan": "brown", "camel": "brown", "chocolate": "brown", "coffee": "brown",
    "olive": "green", "teal": "green", "lime": "green",
    "gold": "yellow", "golden": "yellow", "mustard": "yellow",
    "cream": "white", "ivory": "white",
    "rose": "pink", "magenta": "pink", "fuchsia": "pink", "peach": "pink",
    "reddish": "red", "bluish": "blue", "blueish": "blue", "greenish": "green", "yellowish": "yellow",
    "grayish": "gray", "greyish": "gray", "pinkish": "pink", "brownish": "brown", "purplish": "purple",
    "whitish": "white", "blackish": "black", "orangish": "orange",
}
# Chinese colour characters (each usually followed by 色)
_ZH_COLOURS: dict[str, str] = {
    "黑": "black", "白": "white", "红": "red", "紫": "purple", "黄": "yellow", "灰": "gray", "蓝": "blue",
    "绿": "green", "粉": "pink", "棕": "brown", "褐": "brown", "咖": "brown", "橙": "orange", "橘": "orange",
}

# Words that may sit between a colour and its noun without ending the phrase ("dark blue cotton shirt").
_MODIFIERS: frozenset[str] = frozenset({
    "and", "or", "dark", "light", "pale", "bright", "deep", "navy", "pastel", "faded", "solid", "plain",
    "striped", "checked", "checkered", "plaid", "patterned", "printed", "colored", "coloured", "color",
    "colour", "toned", "tone", "short", "long", "sleeved", "sleeve", "sleeveless", "loose", "tight",
    "fitting", "fitted", "slim", "baggy", "casual", "cotton", "knit", "knitted", "leather", "denim",
    "wool", "woolen", "thin", "thick", "zip", "up", "button", "down", "hooded", "puffer", "padded",
    "sports", "sport", "athletic", "formal", "crop", "large", "small", "big", "little",
    "oversized", "cropped", "skinny", "ripped", "torn", "midi", "mini", "maxi", "ankle", "knee",
    "length", "high", "waisted", "simple", "polka", "dot", "dotted", "floral", "graphic", "logo",
    "lettered", "matching", "cargo", "chino", "track", "running", "tennis", "canvas", "suede", "pleated",
    "flared", "straight", "wide", "leg", "jean", "baseball", "rain", "hiking", "work", "dress", "business",
    "summer", "winter", "quilted", "fleece", "silk", "lace", "mesh", "polo",
})

# noun -> (part, canonical garment or item). Parts: upper, lower, dress (both), shoes, bag, hat, hair, other
_NOUNS: dict[str, tuple[str, str]] = {
    "tshirt": ("upper", "t-shirt"), "tee": ("upper", "t-shirt"), "tees": ("upper", "t-shirt"),
    "tshirts": ("upper", "t-shirt"),
    "shirt": ("upper", "shirt"), "shirts": ("upper", "shirt"), "blouse": ("upper", "shirt"),
    "polo": ("upper", "shirt"),
    "jacket": ("upper", "jacket"), "windbreaker": ("upper", "jacket"), "blazer": ("upper", "jacket"),
    "parka": ("upper", "coat"), "coat": ("upper", "coat"), "overcoat": ("upper", "coat"),
    "raincoat": ("upper", "coat"), "trenchcoat": ("upper", "coat"),
    "sweater": ("upper", "sweater"), "jumper": ("upper", "sweater"), "pullover": ("upper", "sweater"),
    "cardigan": ("upper", "sweater"), "jersey": ("upper", "sweater"),
    "hoodie": ("upper", "hoodie"), "sweatshirt": ("upper", "hoodie"),
    "top": ("upper", "top"), "vest": ("upper", "top"), "tank": ("upper", "top"), "camisole": ("upper", "top"),
    "uniform": ("upper", "top"),
    "uppergarment": ("upper", ""), "lowergarment": ("lower", ""), "bottoms": ("lower", ""),  # half, no kind
    "dress": ("dress", "dress"), "gown": ("dress", "dress"),
    "skirt": ("lower", "skirt"), "miniskirt": ("lower", "skirt"),
    "shorts": ("lower", "shorts"),
    "pants": ("lower", "pants"), "trousers": ("lower", "pants"), "jeans": ("lower", "pants"),
    "slacks": ("lower", "pants"), "leggings": ("lower", "pants"), "sweatpants": ("lower", "pants"),
    "joggers": ("lower", "pants"), "trouser": ("lower", "pants"), "capris": ("lower", "pants"),
    "shoes": ("shoes", "shoes"), "shoe": ("shoes", "shoes"), "sneakers": ("shoes", "shoes"),
    "trainers": ("shoes", "shoes"), "sandals": ("shoes", "shoes"), "heels": ("shoes", "shoes"),
    "slippers": ("shoes", "shoes"), "loafers": ("shoes", "shoes"), "flats": ("shoes", "shoes"),
    "footwear": ("shoes", "shoes"), "boots": ("shoes", "boots"), "boot": ("shoes", "boots"),
    "socks": ("shoes", "socks"),
    "backpack": ("bag", "backpack"), "rucksack": ("bag", "backpack"), "knapsack": ("bag", "backpack"),
    "schoolbag": ("bag", "backpack"), "backpacks": ("bag", "backpack"),
    "handbag": ("bag", "handbag"), "purse": ("bag", "handbag"), "clutch": ("bag", "handbag"),
    "tote": ("bag", "handbag"),
    "bag": ("bag", "bag"), "bags": ("bag", "bag"), "satchel": ("bag", "bag"), "briefcase": ("bag", "handbag"),
    "hat": ("hat", "hat"), "cap": ("hat", "hat"), "beanie": ("hat", "hat"), "hats": ("hat", "hat"),
    "hair": ("hair", "hair"), "haired": ("hair", "hair"), "ponytail": ("hair", "hair"),
    "scarf": ("other", "scarf"), "umbrella": ("other", "umbrella"), "mask": ("other", "mask"),
    "glasses": ("other", "glasses"), "sunglasses": ("other", "glasses"), "belt": ("other", "belt"),
    "gloves": ("other", "gloves"), "helmet": ("other", "helmet"), "headphones": ("other", "headphones"),
}

# DukeMTMC labels shoes dark or light; only the colours that say so without doubt count.
_SHOE_TONES: dict[str, str] = {"white": "light", "black": "dark", "brown": "dark"}

# Bag kind from the word before "bag": "shoulder bag" is a bag, "hand bag" and "plastic bag" are held.
_BAG_BEFORE: dict[str, str] = {
    "hand": "handbag", "plastic": "handbag", "shopping": "handbag", "paper": "handbag", "tote": "handbag",
    "school": "backpack", "shoulder": "bag", "messenger": "bag", "crossbody": "bag", "sling": "bag",
    "waist": "bag", "side": "bag",
}

_MALE = frozenset({"man", "men", "male", "boy", "gentleman", "guy", "he", "his", "him", "himself"})
_FEMALE = frozenset({"woman", "women", "female", "girl", "lady", "she", "her", "hers", "herself"})
_MALE_NOUNS = frozenset({"man", "men", "male", "boy", "gentleman", "guy"})
_FEMALE_NOUNS = frozenset({"woman", "women", "female", "girl", "lady"})
_PERSON_NOUNS = frozenset({"man", "woman", "lady", "person", "gentleman", "guy", "people", "couple"})

_NEGATORS = frozenset({"no", "not", "without", "never", "nor", "neither", "none"})
_NEGATION_SCOPE = 5  # words between a negator and the item it negates
_NEGATION_BREAKS = frozenset({"and", "but", "while", "with", "though", "although", "yet"})
_LOOKAHEAD = 6  # words between a colour and its noun
_LOOKBACK = 4  # words between a noun and a colour stated after it ("the jacket is black")
_BACK_LINKS = frozenset({"is", "are", "was", "were", "appears", "appear", "looks", "look", "seems", "in",
                         "of", "colored", "coloured", "which", "that", "also", "both", "mostly", "mainly",
                         "all", "entirely", "a", "an", "the", "color", "colour", "shade"})

_TOKEN = re.compile(r"[a-z]+|[,.;:!?()\"]|[\u4e00-\u9fff]")
_CLAUSE_END = frozenset(",.;:!?()\"")

# Multi-word forms folded before tokenising, so "T-shirt" and "short-sleeved" are one idea each.
_FOLDS: tuple[tuple[str, re.Pattern[str], str], ...] = (  # (a substring it needs, pattern, replacement)
    ("shirt", re.compile(r"\bt[\s-]?shirts?\b|\btee[\s-]shirts?\b"), " tshirt "),
    ("sleeve", re.compile(r"\b(short|long)[\s-]?sleeve[sd]?\b"), r" \1sleeved "),
    ("haired", re.compile(r"\b(short|long)[\s-]haired\b"), r" \1 haired "),
    ("length", re.compile(r"\bshoulder[\s-]length\b"), " long "),
    ("sleeveless", re.compile(r"\bsleeveless\b"), " shortsleeved top "),
    ("tank", re.compile(r"\btank[\s-]?tops?\b"), " shortsleeved top "),
    ("bare", re.compile(r"\bbare[\s-]?headed\b"), " no hat "),
    ("handed", re.compile(r"\bempty[\s-]handed\b"), " no handbag "),
    ("trench", re.compile(r"\btrench[\s-]?coats?\b"), " trenchcoat "),
    ("mini", re.compile(r"\bmini[\s-]skirts?\b"), " short skirt "),
    ("n't", re.compile(r"n't\b"), " not "),  # doesn't -> does not (’ is folded to ' first)
    ("cannot", re.compile(r"\bcannot\b"), " can not "),
    ("middle", re.compile(r"\bmiddle[\s-]aged\b"), " adult "),
    # "a red upper garment", "blue lower-body clothing" (the offline baseline's words): which half, no kind
    ("upper", re.compile(r"\bupper[\s-]?(?:body\s+)?(?:garment|clothing|clothes|wear|body)s?\b"), " uppergarment "),
    ("lower", re.compile(r"\blower[\s-]?(?:body\s+)?(?:garment|clothing|clothes|wear|body)s?\b"), " lowergarment "),
    ("top", re.compile(r"\bon\s+(?:the\s+)?top\b"), " above "),  # "on top the person wears ...": not a top
)


EMPTY = Mentions()


# --- text ---------------------------------------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    t = text.lower().replace("’", "'")
    for needle, pattern, repl in _FOLDS:
        if needle in t:  # a substring test is far cheaper than a regex pass: most folds never apply
            t = pattern.sub(repl, t)
    return _TOKEN.findall(t)


def _noun_at(tokens: list[str], i: int) -> tuple[str, str] | None:
    """(part, name) of the clothing/item noun at position i, with "hand bag"-style kinds resolved."""
    word = tokens[i]
    if word in ("bag", "bags") and i > 0 and tokens[i - 1] in _BAG_BEFORE:
        return ("bag", _BAG_BEFORE[tokens[i - 1]])
    if word == "tank":
        return None  # "tank top": the noun is "top"
    if word in ("dress", "polo") and i + 1 < len(tokens) and tokens[i + 1] in _NOUNS:
        return None  # "dress pants", "dress shoes", "polo shirt": a kind of the next noun
    if word == "cap" and i + 1 < len(tokens) and tokens[i + 1] == "sleeves":
        return None
    return _NOUNS.get(word)


def _colour_of(tokens: list[str], i: int) -> str | None:
    word = tokens[i]
    colour = _COLOUR_WORDS.get(word)
    if colour is None:
        return None
    if word == "navy" and i + 1 < len(tokens) and tokens[i + 1] == "blue":
        return None  # "navy blue": the colour is read once, at "blue"
    if word == "denim" and i > 0 and (tokens[i - 1] in _COLOUR_WORDS or tokens[i - 1] in ("dark", "light")):
        return None  # "black denim jacket": denim is the fabric, the colour is black
    if word in ("tan", "wine", "ash", "rose", "camel", "olive", "lime", "peach", "plum", "gold", "cream",
                "chocolate", "coffee", "denim", "indigo"):
        # words with other meanings count as colours only when a noun follows closely
        if not any(_noun_at(tokens, j) for j in range(i + 1, min(len(tokens), i + 3))):
            return None
    return colour


def _noun_after(tokens: list[str], i: int) -> tuple[str, str] | None:
    """The clothing/item noun a colour at i modifies: the next noun within the phrase."""
    for j in range(i + 1, min(len(tokens), i + 1 + _LOOKAHEAD)):
        noun = _noun_at(tokens, j)
        if noun is not None:
            return noun
        word = tokens[j]
        if word in _CLAUSE_END:
            return None
        if word in ("and", "or"):
            nxt = tokens[j + 1] if j + 1 < len(tokens) else ""
            if nxt not in _COLOUR_WORDS and nxt not in _MODIFIERS:
                return None
            continue
        if word in _COLOUR_WORDS or word in _MODIFIERS or word.endswith("sleeved") or word == "tank":
            continue
        return None
    return None


def _noun_before(tokens: list[str], i: int) -> tuple[str, str] | None:
    """The noun a colour stated after it describes ("his trousers are black", "a shirt in blue")."""
    for j in range(i - 1, max(-1, i - 1 - _LOOKBACK), -1):
        noun = _noun_at(tokens, j)
        if noun is not None:
            return noun
        word = tokens[j]
        if word in _CLAUSE_END:
            return None
        if word in _BACK_LINKS or word in _COLOUR_WORDS or word in ("dark", "light", "and", "or"):
            continue
        return None
    return None


def _negated(tokens: list[str], i: int) -> bool:
    """Is the item at i in the scope of a negator ("no", "without", "not carrying a", "nor a")?

    "and" ends the scope ("no hat and a backpack" has a backpack) except right before the item
    ("without a hat and bag").
    """
    for j in range(i - 1, max(-1, i - 1 - _NEGATION_SCOPE), -1):
        word = tokens[j]
        if word in _NEGATORS:
            return True
        if word == "and" and j == i - 1:
            continue
        if word in _CLAUSE_END or word in _NEGATION_BREAKS:
            return False
    return False


# Every word the loop in `mentions` acts on; others are skipped at once.
_KEYWORDS: frozenset[str] = frozenset(
    set(_COLOUR_WORDS) | set(_NOUNS) | _MALE | _FEMALE
    | {"shortsleeved", "longsleeved", "bald", "buzz", "crew", "ponytail", "bun", "braid", "braids", "pigtails",
       "elderly", "senior", "child", "kid", "toddler", "children", "kids", "teenager", "teen", "teenage",
       "teenaged", "adolescent", "adult"}
)


def _one(values: set[str]) -> str | None:
    """A single stated value; contradictory statements within one text state nothing."""
    return next(iter(values)) if len(values) == 1 else None


def _items(found: dict[str, set[bool]]) -> dict[str, bool | None]:
    """Item -> True if stated anywhere, False if only negated, None if never mentioned."""
    return {k: (True if True in v else False) if v else None for k, v in found.items()}


def mentions(text: str | None, default_part: str | None = None) -> Mentions:
    """What `text` states, as canonical values (see the module docstring for the rules).

    `default_part` ("upper" or "lower"): where a colour with no clothing noun goes. Captions leave it
    None ("dressed in black" says nothing about which half); a structured answer's "upper" field sets it.
    """
    if not text:
        return EMPTY
    tokens = _tokens(text)
    upper: set[str] = set()
    lower: set[str] = set()
    garments: set[str] = set()
    items: dict[str, set[bool]] = {"bag": set(), "backpack": set(), "handbag": set(), "hat": set(),
                                   "boots": set()}
    sleeve: set[str] = set()
    hair: set[str] = set()
    lengths: set[str] = set()
    types: set[str] = set()
    ages: set[str] = set()
    tones: set[str] = set()
    male = female = male_nouns = female_nouns = 0

    for i, word in enumerate(tokens):
        if word not in _KEYWORDS:
            continue  # most words ("a", "the", "walking"; Chinese, handled below on the raw text)
        colour = _colour_of(tokens, i)
        if colour is not None:
            noun = _noun_after(tokens, i) or _noun_before(tokens, i)
            part = noun[0] if noun else default_part
            if part in ("upper", "dress"):
                upper.add(colour)
            if part in ("lower", "dress"):
                lower.add(colour)
            if part == "shoes" and colour in _SHOE_TONES:
                tones.add(_SHOE_TONES[colour])
            continue
        noun = _noun_at(tokens, i)
        if noun is not None:
            part, name = noun
            if part in ("upper", "lower", "dress") and not _negated(tokens, i):
                if name:
                    garments.add(name)
                if name == "shorts":
                    lengths.add("short")
                    types.add("pants")
                elif name == "pants":
                    lengths.add("long")
                    types.add("pants")
                elif name in ("skirt", "dress"):
                    types.add("dress")
                    for j in range(i - 1, max(-1, i - 4), -1):  # "a long pink dress"
                        if tokens[j] in ("short", "long"):
                            lengths.add(tokens[j])
                            break
                        if tokens[j] not in _COLOUR_WORDS and tokens[j] not in _MODIFIERS:
                            break
            elif part == "bag":
                items[name].add(not _negated(tokens, i))
            elif part == "hat":
                items["hat"].add(not _negated(tokens, i))
            elif part == "shoes":
                if name == "boots":
                    items["boots"].add(not _negated(tokens, i))
                for j in range(i - 1, max(-1, i - 4), -1):  # "dark shoes", "light-coloured sneakers"
                    if tokens[j] in ("dark", "light"):
                        tones.add(tokens[j])
                        break
                    if tokens[j] not in _MODIFIERS and tokens[j] not in _COLOUR_WORDS:
                        break
            elif part == "hair" and i > 0:
                for j in range(i - 1, max(-1, i - 4), -1):
                    if tokens[j] in ("long", "short"):
                        hair.add(tokens[j])
                        break
                    if tokens[j] not in _COLOUR_WORDS and tokens[j] not in ("dark", "light", "curly",
                                                                            "straight", "wavy", "and"):
                        break
                if word == "ponytail":
                    hair.add("long")
            continue
        if word in ("shortsleeved", "longsleeved"):
            sleeve.add(word[: -len("sleeved")])
        elif word in ("bald", "buzz", "crew"):
            if word == "bald" or (i + 1 < len(tokens) and tokens[i + 1] == "cut"):
                hair.add("short")
        elif word in ("ponytail", "bun", "braid", "braids", "pigtails"):
            hair.add("long")
        elif word in _MALE or word in _FEMALE:
            if word in _MALE:
                male += 1
                male_nouns += word in _MALE_NOUNS
            else:
                female += 1
                female_nouns += word in _FEMALE_NOUNS
            if word in _PERSON_NOUNS and i > 0 and tokens[i - 1] in ("old", "elderly", "older", "senior"):
                ages.add("old")
            elif word in ("boy", "girl") and i > 0 and tokens[i - 1] in ("little", "small", "young"):
                ages.add("young")
        elif word in ("elderly", "senior"):
            ages.add("old")
        elif word in ("child", "kid", "toddler", "children", "kids"):
            ages.add("young")
        elif word in ("teenager", "teen", "teenage", "teenaged", "adolescent"):
            ages.add("teenager")
        elif word == "adult":
            ages.add("adult")

    if male_nouns or female_nouns:
        gender = "male" if male_nouns and not female_nouns else "female" if female_nouns and not male_nouns else None
    else:
        gender = "male" if male > female else "female" if female > male else None

    zh = _zh_mentions(text)
    upper |= zh.upper_colours
    lower |= zh.lower_colours
    garments |= zh.garments
    for name in ("bag", "backpack", "hat"):
        value = getattr(zh, name)
        if value is not None:
            items[name].add(value)
    if zh.gender and gender is None and not (male or female):
        gender = zh.gender
    if zh.hair:
        hair.add(zh.hair)
    if zh.sleeve:
        sleeve.add(zh.sleeve)
    if zh.lower_length:
        lengths.add(zh.lower_length)
    if zh.lower_type:
        types.add(zh.lower_type)

    found = _items(items)
    return Mentions(
        upper_colours=frozenset(upper), lower_colours=frozenset(lower), garments=frozenset(garments),
        bag=found["bag"], backpack=found["backpack"], handbag=found["handbag"], hat=found["hat"],
        boots=found["boots"] or None,  # "no boots" is rarely said; only a stated pair counts
        gender=gender, hair=_one(hair), sleeve=_one(sleeve), lower_length=_one(lengths),
        lower_type=_one(types), age=_one(ages), shoes=_one(tones),
    )


def canonical_colour(word: str | None) -> str | None:
    """"Grey" -> "gray", "navy" -> "blue", "dark blue" -> "blue", "灰" -> "gray"; None for no colour."""
    w = (word or "").strip().lower()
    if not w:
        return None
    if w in _COLOUR_WORDS:
        return _COLOUR_WORDS[w]
    found = [c for c in (_COLOUR_WORDS.get(x) for x in re.findall(r"[a-z]+", w)) if c]
    if found:
        return found[-1]
    return next((_ZH_COLOURS[ch] for ch in w if ch in _ZH_COLOURS), None)


def colours_named(text: str | None) -> frozenset[str]:
    """Every canonical colour `text` names anywhere, whatever it describes (hair, shoes, clothes).

    The report's colour check asks only this ("does the caption name the answer's upper colour?"),
    with the same words and folding as `mentions`.
    """
    if not text:
        return frozenset()
    tokens = _tokens(text)
    found = {c for i, w in enumerate(tokens) if not ("\u4e00" <= w[0] <= "\u9fff")
             for c in (_colour_of(tokens, i),) if c is not None}
    found |= {_ZH_COLOURS[ch] for ch in text if ch in _ZH_COLOURS}
    return frozenset(found)


# --- Chinese (bonus: colour + garment, a few items) ------------------------------------------------------

_ZH_GARMENTS: tuple[tuple[str, str, str], ...] = (  # (word, part, garment), longer words first
    ("连衣裙", "dress", "dress"), ("短裤", "lower", "shorts"), ("短裙", "lower", "skirt"),
    ("牛仔裤", "lower", "pants"), ("长裤", "lower", "pants"), ("裤", "lower", "pants"), ("裙", "lower", "skirt"),
    ("T恤", "upper", "t-shirt"), ("t恤", "upper", "t-shirt"), ("衬衫", "upper", "shirt"),
    ("外套", "upper", "jacket"), ("夹克", "upper", "jacket"), ("大衣", "upper", "coat"),
    ("毛衣", "upper", "sweater"), ("卫衣", "upper", "hoodie"), ("背心", "upper", "top"), ("上衣", "upper", "top"),
    ("短袖", "upper", "t-shirt"), ("长袖", "upper", "shirt"), ("衣", "upper", "top"),
    ("鞋", "shoes", "shoes"), ("靴", "shoes", "boots"), ("双肩包", "bag", "backpack"), ("背包", "bag", "backpack"),
    ("手提包", "bag", "handbag"), ("包", "bag", "bag"), ("帽", "hat", "hat"), ("发", "hair", "hair"),
)
_ZH_GAP = 6  # characters between a colour and its garment word
_ZH_NEGATORS = ("没有", "没", "无", "不")


def _zh_mentions(text: str) -> Mentions:
    if not re.search(r"[\u4e00-\u9fff]", text):
        return EMPTY
    upper: set[str] = set()
    lower: set[str] = set()
    garments: set[str] = set()
    items: dict[str, set[bool]] = {"bag": set(), "backpack": set(), "handbag": set(), "hat": set()}
    found_at: list[tuple[int, int, str, str]] = []  # (start, end, part, garment)
    taken = [False] * len(text)
    for word, part, garment in _ZH_GARMENTS:
        for m in re.finditer(re.escape(word), text):
            if not any(taken[m.start():m.end()]):
                found_at.append((m.start(), m.end(), part, garment))
                for k in range(m.start(), m.end()):
                    taken[k] = True
    found_at.sort()
    for start, _end, part, garment in found_at:
        if part in ("upper", "lower", "dress"):
            garments.add(garment)
        elif part in ("bag", "hat"):
            before = text[max(0, start - 4):start]
            items[garment].add(not any(n in before for n in _ZH_NEGATORS))
    for i, ch in enumerate(text):
        colour = _ZH_COLOURS.get(ch)
        if colour is None:
            continue
        nxt = next(((s, p) for s, _e, p, _g in found_at if i < s <= i + _ZH_GAP), None)
        if nxt is None:
            continue
        part = nxt[1]
        if part in ("upper", "dress"):
            upper.add(colour)
        if part in ("lower", "dress"):
            lower.add(colour)
    sleeve = {"short" for _ in re.finditer("短袖", text)} | {"long" for _ in re.finditer("长袖", text)}
    hair = {"long" for _ in re.finditer("长发", text)} | {"short" for _ in re.finditer("短发", text)}
    lengths = {"short" for g in garments if g == "shorts"} | {"long" for g in garments if g == "pants"}
    types = {"dress" for g in garments if g in ("skirt", "dress")} | {"pants" for g in garments
                                                                        if g in ("pants", "shorts")}
    male, female = "男" in text, "女" in text
    found = _items(items)
    return Mentions(
        upper_colours=frozenset(upper), lower_colours=frozenset(lower), garments=frozenset(garments),
        bag=found["bag"], backpack=found["backpack"], handbag=found["handbag"], hat=found["hat"],
        gender="male" if male and not female else "female" if female and not male else None,
        hair=_one(hair), sleeve=_one(sleeve), lower_length=_one(lengths), lower_type=_one(types),
    )


# --- structured answers ----------------------------------------------------------------------------------

_YES = frozenset({"yes", "true", "1", "y"})
_NO = frozenset({"no", "false", "0", "n"})


def _flag(value: str | None) -> bool | None:
    v = (value or "").strip().lower()
    return True if v in _YES else False if v in _NO else None


def _choice(value: str | None, allowed: tuple[str, ...]) -> str | None:
    v = (value or "").strip().lower()
    return v if v in allowed else None


def _colour_value(value: str | None) -> frozenset[str]:
    colour = canonical_colour(value)
    return frozenset({colour}) if colour else frozenset()


def mentions_from_fields(fields: dict[str, str]) -> Mentions:
    """A structured answer (a row of attributes.csv, the bundled Market or Duke schema) as Mentions.

    The list fields give the colours and the yes/no items exactly; the free-text fields ("upper",
    "lower") add garments, and their colours when the list field is missing or empty (a custom schema).
    Booleans are read as attributes.csv writes them (yes/no) or as JSON would (true/false).
    """
    f = {k: ("" if v is None else str(v)) for k, v in fields.items()}
    up_text = mentions(f.get("upper"), default_part="upper")
    low_text = mentions(f.get("lower"), default_part="lower")
    upper = _colour_value(f.get("upper_color") or f.get("upper_colour")) or up_text.upper_colours
    lower = _colour_value(f.get("lower_color") or f.get("lower_colour")) or low_text.lower_colours
    garments = up_text.garments | low_text.garments
    lower_type = _choice(f.get("lower_type"), ("dress", "pants")) or low_text.lower_type
    lower_length = _choice(f.get("lower_length"), ("short", "long")) or low_text.lower_length
    shoes = _choice(f.get("shoes_color") or f.get("shoes_colour"), ("dark", "light"))
    return Mentions(
        upper_colours=upper, lower_colours=lower, garments=garments,
        bag=_flag(f.get("bag")), backpack=_flag(f.get("backpack")), handbag=_flag(f.get("handbag")),
        hat=_flag(f.get("hat")), boots=_flag(f.get("boots")),
        gender=_choice(f.get("gender"), ("male", "female")),
        hair=_choice(f.get("hair_length") or f.get("hair"), ("short", "long")),
        sleeve=_choice(f.get("sleeve_length") or f.get("sleeve"), ("short", "long")) or up_text.sleeve,
        lower_length=lower_length, lower_type=lower_type,
        age=_choice(f.get("age"), ("young", "teenager", "adult", "old")),
        top_length=_choice(f.get("top_length"), ("short", "long")), shoes=shoes,
    )


# --- comparing --------------------------------------------------------------------------------------------

def describe(value: object) -> str:
    """A value as a short text for a flag's detail: "red/white", "yes", "long"."""
    if isinstance(value, frozenset):
        return "/".join(sorted(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
