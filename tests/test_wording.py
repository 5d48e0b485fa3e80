"""What captions state: colours to the right garment, negations, synonyms, structured answers."""

from __future__ import annotations

import pytest

from pipeline.review.wording import Mentions, colours_named, compare, mentions, mentions_from_fields


def test_a_full_realistic_caption() -> None:
    m = mentions("A young woman with long black hair wears a red short-sleeved T-shirt, blue jeans and "
                 "carries a black backpack.")
    assert m.upper_colours == {"red"} and m.lower_colours == {"blue"}  # black is the hair's and the bag's
    assert m.garments == {"t-shirt", "pants"}
    assert (m.gender, m.hair, m.sleeve, m.lower_length, m.lower_type) == ("female", "long", "short", "long", "pants")
    assert m.backpack is True and m.bag is None and m.handbag is None and m.hat is None
    assert m.age is None  # "young" is not Market's "young" (a child)


def test_layers_synonyms_and_shoes() -> None:
    m = mentions("The man is wearing a dark blue jacket over a grey hoodie, black trousers and white sneakers. "
                 "He has no bag.")
    assert m.upper_colours == {"blue", "gray"}
    assert m.lower_colours == {"black"}  # white belongs to the sneakers
    assert m.garments == {"jacket", "hoodie", "pants"}
    assert m.gender == "male" and m.bag is False and m.backpack is None


@pytest.mark.parametrize("text, upper, lower", [
    ("A man in a grey shirt and gray pants.", {"gray"}, {"gray"}),
    ("A woman in a navy blue coat and khaki trousers.", {"blue"}, {"brown"}),
    ("A person wearing a light-blue sweater and dark green shorts.", {"blue"}, {"green"}),
    ("He wears a black and white striped shirt with beige pants.", {"black", "white"}, {"brown"}),
    ("His trousers are black and his shirt is navy.", {"blue"}, {"black"}),
    ("A girl in a maroon cardigan and a denim skirt.", {"red"}, {"blue"}),  # plain denim is blue
    ("A man in a black denim jacket and grey jeans.", {"black"}, {"gray"}),  # ... but here black
    ("A man dressed in black.", set(), set()),  # which half is not said
    ("He wears a white long-sleeved shirt tucked into black dress pants.", {"white"}, {"black"}),
    ("A man in a navy polo shirt and khaki cargo shorts.", {"blue"}, {"brown"}),
    ("A woman in a long pink dress.", {"pink"}, {"pink"}),  # a dress is both
    ("A person wearing a red upper garment and a matching red lower garment.", {"red"}, {"red"}),  # offline
    ("On top the man wears a green hoodie; below, grey sweatpants.", {"green"}, {"gray"}),
    ("A woman in white upper-body clothing and black lower-body clothing.", {"white"}, {"black"}),
    ("一个穿着红色短袖T恤和蓝色牛仔裤的女人，背着黑色背包。", {"red"}, {"blue"}),
    ("穿灰色上衣和黑色裤子的人。", {"gray"}, {"black"}),
])
def test_colours_go_to_their_garment(text: str, upper: set[str], lower: set[str]) -> None:
    m = mentions(text)
    assert m.upper_colours == upper and m.lower_colours == lower


@pytest.mark.parametrize("text, expected", [
    ("A man with no bag.", {"bag": False}),
    ("She is not carrying a backpack.", {"backpack": False}),
    ("He doesn't carry a backpack.", {"backpack": False}),
    ("A man without a hat or bag.", {"hat": False, "bag": False}),
    ("He carries neither a backpack nor a handbag.", {"backpack": False, "handbag": False}),
    ("He has no bag and carries a black backpack.", {"bag": False, "backpack": True}),
    ("A man without a hat and bag.", {"hat": False, "bag": False}),
    ("A man with no hat and a grey backpack.", {"hat": False, "backpack": True}),
    ("A man with a backpack and no hat.", {"hat": False, "backpack": True}),
    ("She is not wearing a hat but carries a bag.", {"hat": False, "bag": True}),
    ("An empty-handed man.", {"handbag": False}),
    ("A bare-headed man holding a plastic bag.", {"hat": False, "handbag": True}),
    ("A woman with a shoulder bag and a white cap.", {"bag": True, "hat": True}),
    ("A woman with a hand bag.", {"handbag": True, "bag": None}),
    ("一个没有背包的男人。", {"backpack": False}),
])
def test_carried_items_and_negations(text: str, expected: dict[str, bool | None]) -> None:
    m = mentions(text)
    for name, value in expected.items():
        assert getattr(m, name) is value, name


@pytest.mark.parametrize("text, field, value", [
    ("A man with short hair.", "hair", "short"),
    ("A long-haired woman.", "hair", "long"),
    ("A woman with her hair in a ponytail.", "hair", "long"),
    ("A man in a long-sleeved shirt.", "sleeve", "long"),
    ("A woman in a sleeveless top.", "sleeve", "short"),
    ("A man in black shorts.", "lower_length", "short"),
    ("A girl in a short skirt.", "lower_length", "short"),
    ("A girl in a skirt.", "lower_type", "dress"),
    ("An elderly man in a gray coat.", "age", "old"),
    ("A little boy in a red shirt.", "age", "young"),
    ("A teenager with a backpack.", "age", "teenager"),
    ("A person walking.", "gender", None),
    ("She walks; her bag is red.", "gender", "female"),
    ("一个长发女人。", "hair", "long"),
    ("A man in white sneakers.", "shoes", "light"),
    ("A man in black leather boots.", "shoes", "dark"),
    ("A man in dark shoes.", "shoes", "dark"),
    ("A man in red shoes.", "shoes", None),  # neither dark nor light without doubt
    ("A man in black boots.", "boots", True),
])
def test_single_attributes(text: str, field: str, value: str | None) -> None:
    assert getattr(mentions(text), field) == value


def test_nothing_stated() -> None:
    assert mentions("") == Mentions() and mentions(None) == Mentions()
    assert mentions("A blurry photo.").stated() == {}


def test_colours_named_anywhere() -> None:
    assert colours_named("A woman in white.") == {"white"}
    assert colours_named("A grey coat, navy jeans and 黑色鞋子") == {"gray", "blue", "black"}
    assert colours_named("A man with a tan.") == set()  # "tan" is a colour only before a noun


def test_structured_answer() -> None:
    m = mentions_from_fields({
        "gender": "female", "age": "adult", "hair_length": "long", "sleeve_length": "short",
        "lower_length": "long", "lower_type": "pants", "hat": "no", "backpack": "yes", "bag": "no",
        "handbag": "no", "upper_color": "red", "lower_color": "blue", "upper": "red short-sleeved t-shirt",
        "lower": "blue jeans", "shoes": "white sneakers", "accessories": "",
    })
    assert m.upper_colours == {"red"} and m.lower_colours == {"blue"} and m.garments == {"t-shirt", "pants"}
    assert (m.gender, m.age, m.hair, m.sleeve, m.lower_length, m.lower_type) == (
        "female", "adult", "long", "short", "long", "pants")
    assert (m.hat, m.backpack, m.bag, m.handbag) == (False, True, False, False)
    # JSON booleans, a Duke answer, and colours from the free text when the list field is empty
    duke = mentions_from_fields({"top_length": "long", "boots": "true", "shoes_color": "dark",
                                 "upper_color": "", "upper": "grey coat", "lower": "black"})
    assert duke.top_length == "long" and duke.boots is True and duke.shoes == "dark"
    assert duke.upper_colours == {"gray"} and duke.lower_colours == {"black"}


def test_compare_agrees_on_shared_colours_only() -> None:
    caption = mentions("A man in a black and white shirt, blue jeans and a backpack.")
    answer = mentions_from_fields({"upper_color": "white", "lower_color": "black", "backpack": "yes",
                                   "gender": "male", "hat": "no"})
    assert compare(caption, answer) == {"upper_colour": True, "lower_colour": False, "gender": True,
                                        "backpack": True}
