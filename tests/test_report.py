"""Quality report: numbers on hand-made rows, rendering, saving."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from pipeline.records import CaptionRow
from pipeline.review.report import build_report, count_summary, length_summary, percentile, render_report, save_report


def cap(image_id: str, text: str, prompt: str = "base", index: int = 0) -> CaptionRow:
    return CaptionRow(image_id=image_id, prompt="p", caption=text, timestamp="t", prompt_name=prompt, caption_index=index)


ROWS = [
    # a.jpg: two different base captions, one templated
    cap("a.jpg", "A man in a red shirt and blue jeans.", index=0),  # 9 words, 36 chars
    cap("a.jpg", "A man wearing a red shirt.", index=1),  # 6 words
    cap("a.jpg", "The man wears a grey coat.", prompt="templated"),  # 6 words
    # b.jpg: two identical base captions, also used for c.jpg
    cap("b.jpg", "A woman in white.", index=0),  # 4 words
    cap("b.jpg", "A woman in white.", index=1),
    # c.jpg: one caption, the same text as b's; plus a refusal slot
    cap("c.jpg", "A woman in white."),
    cap("c.jpg", "I'm sorry, I can't help with that.", prompt="templated"),
    # d.jpg: only an empty answer
    cap("d.jpg", "  "),
    # e.jpg: a structured answer only (not a caption)
    cap("e.jpg", '{"gender": "male"}', prompt="attributes"),
]

ATTRIBUTES = [
    {"image_id": "a.jpg", "prompt_name": "attributes", "upper_color": "red", "lower_color": "blue"},
    {"image_id": "b.jpg", "prompt_name": "attributes", "upper_color": "white", "lower_color": "gray"},
    {"image_id": "c.jpg", "prompt_name": "attributes", "upper_color": "", "lower_color": "black"},  # incomplete
]


def test_counts_and_distributions() -> None:
    r = build_report(ROWS)
    assert r["images"] == 4  # e.jpg has a structured answer only
    assert r["captions"] == 6 and r["structured_answers"] == 1
    # a:3, b:2, c:1, d:0
    assert r["captions_per_image"] == {"min": 0, "mean": 1.5, "max": 3, "histogram": {"0": 1, "1": 1, "2": 1, "3": 1}}
    assert set(r["prompts"]) == {"base", "templated"}
    base = r["prompts"]["base"]
    assert base["captions"] == 5 and base["images"] == 4  # a, b, c, d
    assert base["per_image"]["histogram"] == {"0": 1, "1": 1, "2": 2}
    templated = r["prompts"]["templated"]
    assert templated["images"] == 2 and templated["captions"] == 1
    assert templated["per_image"] == {"min": 0, "mean": 0.5, "max": 1, "histogram": {"0": 1, "1": 1}}


def test_lengths_and_vocabulary() -> None:
    r = build_report(ROWS)
    # words: 9, 6, 6, 4, 4, 4 -> sorted 4 4 4 6 6 9
    assert r["length_words"] == {"min": 4, "p50": 5.0, "mean": 5.5, "p95": 8.25, "max": 9}
    assert r["length_chars"]["min"] == len("A woman in white.") and r["length_chars"]["max"] == 36
    vocab = {"a", "man", "in", "red", "shirt", "and", "blue", "jeans", "wearing", "the", "wears", "grey",
             "coat", "woman", "white"}
    assert r["vocabulary"] == len(vocab)


def test_duplicates_and_identical() -> None:
    r = build_report(ROWS)
    # the three "A woman in white." captions appear for b and c
    assert r["duplicate_caption_share"] == 0.5
    # images with >=2 captions under one prompt: a (different), b (identical)
    assert r["identical_within_prompt_share"] == 0.5 and r["identical_within_prompt_images"] == 1


def test_refusals_listed() -> None:
    r = build_report(ROWS)
    assert r["unusable_image_ids"] == ["c.jpg", "d.jpg"]
    assert r["unusable_captions"] == 2
    # a later good row for the same slot means the slot is fine
    r2 = build_report([cap("x.jpg", "I'm sorry."), cap("x.jpg", "A man in black.")])
    assert r2["unusable_image_ids"] == [] and r2["captions"] == 1


def test_colour_agreement() -> None:
    r = build_report(ROWS, ATTRIBUTES)
    c = r["colour_agreement"]
    # a: 3 captions; red+blue / red only / neither.  b: 2 captions, white but not gray. c: incomplete row.
    assert c == {"images": 2, "captions": 5, "upper": 0.8, "lower": 0.2, "both": 0.2}
    assert build_report(ROWS)["colour_agreement"] is None
    grey = build_report(
        [cap("g.jpg", "A person in a grey top and black trousers."), cap("g.jpg", "穿灰色上衣和黑色裤子的人。", index=1)],
        [{"image_id": "g.jpg", "upper_color": "gray", "lower_color": "black"}],
    )["colour_agreement"]
    assert grey["both"] == 1.0


def test_helpers() -> None:
    assert percentile([], 0.5) is None
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([10], 0.95) == 10
    assert length_summary([])["mean"] is None
    assert count_summary([]) == {"min": None, "mean": None, "max": None, "histogram": {}}


def test_empty_report_renders() -> None:
    r = build_report([])
    assert r["images"] == 0 and r["duplicate_caption_share"] is None
    console = Console(record=True, width=120)
    render_report(r, console)
    assert "Captions" in console.export_text()


def test_render_shows_the_numbers() -> None:
    console = Console(record=True, width=120)
    render_report(build_report(ROWS, ATTRIBUTES), console)
    text = console.export_text()
    assert "Captions per image" in text and "Caption length" in text
    assert "duplicate captions (across images)" in text and "50.0%" in text
    assert "templated" in text and "0:1  1:1" in text
    assert "80.0%" in text and "20.0%" in text
    assert "Images with empty or refusal answers (2): c.jpg, d.jpg" in text


def test_render_does_not_read_ids_as_markup() -> None:
    console = Console(record=True, width=120)
    render_report(build_report([cap("[bold]x[/bold].jpg", "")]), console)
    assert "[bold]x[/bold].jpg" in console.export_text()


def test_save_report_round_trips(tmp_path: Path) -> None:
    report = build_report(ROWS + [cap("zh.jpg", "一个穿白色上衣的女人。")], ATTRIBUTES)
    path = tmp_path / "sub" / "report.json"
    save_report(report, path)
    raw = path.read_text(encoding="utf-8")
    assert json.loads(raw) == report
    assert not raw.startswith("\ufeff")
