"""`python -m pipeline compare`: the scoreboard, through the CLI, on folders written by hand (figures
worked out below) and on folders captioned by the offline backend; the JSON, the PNG and the error lines.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, prepare_index
from pipeline.ledger.outputs import ATTRIBUTE_ROW_COLUMNS, CAPTION_COLUMNS, ERROR_COLUMNS
from pipeline.review.compare import shape_of, text_figures
from pipeline.review.flags import FLAG_NAMES
from pipeline.testing import synth

LABELS = REPO / "tests" / "data" / "market_attribute.mat"
# Market-1501 labels (tests/data/market_attribute.mat): person 2 red upper, blue lower, male;
# person 3 black upper, brown lower, female.
P2C1, P2C2 = "bounding_box_train/0002_c1s1_000001_01.jpg", "bounding_box_train/0002_c2s1_000002_01.jpg"
P3C1, P3C3 = "bounding_box_train/0003_c1s1_000003_01.jpg", "bounding_box_train/0003_c3s1_000004_01.jpg"
P4C1 = "bounding_box_train/0004_c1s1_000005_01.jpg"


def write_folder(out: Path, captions=(), errors=(), attributes=(), attribute_fields=(), bom=False) -> Path:
    """An output folder as `run` leaves it (captions_all.csv, errors.csv, attributes.csv), by hand."""
    out.mkdir(parents=True, exist_ok=True)
    enc = "utf-8-sig" if bom else "utf-8"

    def write(name: str, header: list[str], rows: list[dict]) -> None:
        with open(out / name, "w", encoding=enc, newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header)
            w.writeheader()
            for r in rows:
                w.writerow(r)

    caps = [{"image_id": i, "prompt": "the prompt", "caption": text, "timestamp": "2026-01-01T00:00:00+00:00",
             "model": model, "prompt_tokens": 100, "completion_tokens": 20, "cost_usd": cost, "prompt_name": prompt,
             "caption_index": 0, "attempts": 1, "latency_s": 0.5, "prompt_hash": "h"}
            for i, prompt, model, text, cost in captions]
    write("captions_all.csv", CAPTION_COLUMNS, caps)
    if errors:
        write("errors.csv", ERROR_COLUMNS,
              [{"image_id": i, "reason": reason, "detail": "d", "attempts": 1, "timestamp": "t", "prompt_name": prompt,
                "caption_index": 0, "model": "", "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": cost,
                "run_id": "r"} for i, prompt, reason, cost in errors])
    if attributes:
        write("attributes.csv", ATTRIBUTE_ROW_COLUMNS + list(attribute_fields),
              [{"image_id": i, "prompt_name": prompt, "timestamp": "t", "model": model, "prompt_tokens": 90,
                "completion_tokens": 30, "cost_usd": cost, "caption_index": 0, "prompt_hash": "h", **fields}
               for i, prompt, model, fields, cost in attributes])
    return out


@pytest.fixture
def hand_folders(tmp_path):
    a = write_folder(tmp_path / "a", captions=[
        (P2C1, "p1", "m1", "A man wearing a red shirt and blue shorts.", "0.002"),
        (P2C2, "p1", "m1", "A man wearing a green shirt and blue shorts.", "0.002"),
        (P3C1, "p1", "m1", "A woman in a black jacket and brown trousers.", "0.002"),
    ], errors=[(P3C3, "p1", "refused", "0.001")])
    b = write_folder(tmp_path / "b", captions=[
        (P2C1, "p2", "m2", "A man in a red shirt and blue shorts.", "0.001"),
        (P2C2, "p2", "m2", "A man in a red shirt and blue shorts.", "0.001"),
        (P3C1, "p2", "m2", "A woman in a black coat and brown trousers.", "0.001"),
        (P3C3, "p2", "m2", "A woman in a black coat and brown trousers.", "0.001"),
        (P4C1, "p2", "m2", "Only in this folder: not shared.", "0.5"),
    ], bom=True)
    fields = ("gender", "upper_color", "lower_color", "bag")
    c = write_folder(tmp_path / "c", attributes=[
        (P2C1, "attr", "m3", {"gender": "male", "upper_color": "red", "lower_color": "blue", "bag": "no"}, "0.003"),
        (P2C2, "attr", "m3", {"gender": "male", "upper_color": "red", "lower_color": "black", "bag": "no"}, "0.003"),
        (P3C1, "attr", "m3", {"gender": "female", "upper_color": "black", "lower_color": "brown", "bag": "yes"}, "0.003"),
        (P3C3, "attr", "m3", {"gender": "female", "upper_color": "black", "lower_color": "brown", "bag": "no"}, "0.003"),
    ], attribute_fields=fields)
    return a, b, c


def rows_by_prompt(board: dict) -> dict[str, dict]:
    return {r["prompt"]: r for r in board["rows"]}


def test_scoreboard_by_hand(cli, hand_folders, tmp_path):
    a, b, c = hand_folders
    save = tmp_path / "board.json"
    res = cli("compare", "--out", a, "--out", b, "--out", c, "--attributes", LABELS, "--save", save)
    assert res.code == 0, res.err
    board = json.loads(save.read_text(encoding="utf-8"))
    assert board["shared_images"] == 4 and board["scope"] == "shared"
    assert board["folders"] == ["a", "b", "c"]
    r = rows_by_prompt(board)
    p1, p2, attr = r["p1"], r["p2"], r["attr"]
    assert (p1["model"], p2["model"], attr["model"]) == ("m1", "m2", "m3")
    assert attr["kind"] == "attributes" and p1["kind"] == "caption"

    # cost over the 4 shared images: a = 3 captions x 0.002 + a refused answer billed 0.001
    assert p1["cost_usd"] == pytest.approx(0.007)
    assert p1["cost_per_image"] == pytest.approx(0.00175)
    assert p1["cost_per_1000"] == pytest.approx(1.75)
    assert p2["cost_per_1000"] == pytest.approx(1.0)       # the unshared 0.5 is left out
    assert p2["images"] == 4 and p2["answers"] == 4
    assert p1["prompt_tokens_per_image"] == pytest.approx(300 / 4)

    # refusals: 1 of a's 4 slots
    assert p1["refusal_rate"] == pytest.approx(0.25) and p1["failed_rate"] == 0
    assert p2["refusal_rate"] == 0

    # text of b: 4 captions of 9 words; 13 distinct of 36 words, 15 distinct of 32 bigrams; one shape
    assert p2["words_mean"] == 9 and p2["vocabulary"] == 13
    assert p2["distinct_1"] == pytest.approx(13 / 36)
    assert p2["distinct_2"] == pytest.approx(15 / 32)
    assert p2["same_shape"] == 1.0
    assert p1["same_shape"] == pytest.approx(2 / 3)        # "wearing" twice, "in" once
    assert attr["words_mean"] is None                      # structured answers have no text figures

    # labels: a states upper colour right for 2 of 3 answers, lower colour 3 of 3
    up, low = p1["labels"]["upper_colour"], p1["labels"]["lower_colour"]
    assert (up["agree"], up["n"]) == (pytest.approx(2 / 3), 3)
    assert (low["agree"], low["n"]) == (1.0, 3)
    assert p2["labels"]["upper_colour"]["agree"] == 1.0 and p2["labels"]["upper_colour"]["n"] == 4
    # structured: field by field; lower colour black for person 2 on camera 2 is wrong; bag yes/no per label
    assert attr["labels"]["lower_colour"]["agree"] == pytest.approx(3 / 4)
    assert attr["labels"]["gender"]["agree"] == 1.0 and attr["labels"]["gender"]["n"] == 4
    assert attr["labels"]["bag"]["n"] == 4
    assert attr["labels"]["bag"]["agree"] == pytest.approx(3 / 4)   # person 3 is labelled with a bag

    # cross-camera: b says the same of each person everywhere; a contradicts itself on person 2's shirt
    assert p2["consistency"] == 1.0 and p2["consistency_pairs"] == 2
    assert p1["consistency_pairs"] == 1 and 0 < p1["consistency"] < 1
    assert set(p1["flags"]) == set(FLAG_NAMES)
    assert p1["flags"]["labels_disagree"] > 0              # the green shirt, against the label red

    # best first: by label agreement when there is no retrieval
    order = [row["prompt"] for row in board["rows"]]
    assert order[0] == "p2" and order[-1] in ("p1", "attr")

    # the terminal: legend and tables
    assert "#1  p2 · m2" in res.out and "Agreement with market_attribute.mat" in res.out
    assert f"saved {save}" in res.out


def test_offline_folders_compare_with_json_and_plot(cli, tmp_path):
    root = tmp_path / "Market-1501-v15.09.15"
    synth.make_market_tree(root, n_ids=3, per_split=2)
    index = prepare_index(cli, root, tmp_path / "index.json")
    outs = []
    for prompt in ("base", "templated"):
        out = tmp_path / f"cap_{prompt}"
        res = cli("run", "--index", index, "--out", out, "--prompt-file", prompt, "--backend", "offline",
                  "--no-dashboard")
        assert res.code == 0, res.err
        outs.append(out)
    save, plot = tmp_path / "s" / "board.json", tmp_path / "p" / "board.png"
    res = cli("compare", "--out", outs[0], "--out", outs[1], "--attributes", LABELS, "--save", save, "--plot", plot)
    assert res.code == 0, res.err
    board = json.loads(save.read_text(encoding="utf-8"))
    n_images = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    assert board["shared_images"] == n_images
    assert {r["prompt"] for r in board["rows"]} == {"base", "templated"}
    for r in board["rows"]:
        assert r["model"] == "offline-colour-baseline"
        assert r["cost_per_1000"] == 0 and r["refusal_rate"] == 0
        assert r["same_shape"] > 0.9          # the colour baseline writes one sentence shape
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert f"saved {plot}" in res.out


def test_plot_draws_a_panel_per_quality_figure(hand_folders, tmp_path):
    from pipeline.data.labels import load_attribute_labels
    from pipeline.review.compare import build_scoreboard, load_groups
    from pipeline.review.compare_plot import panels, plot_scoreboard

    labels = load_attribute_labels(LABELS)
    groups, _ = load_groups(list(hand_folders), labels)
    board = build_scoreboard(groups, labels)
    titles = [t for t, _ in panels(board)]
    assert titles == ["agreement with attribute labels", "cross-camera consistency"]
    (title, points), _ = panels(board)
    assert sorted(number for number, _, _ in points) == [1, 2, 3]
    assert plot_scoreboard(board, tmp_path / "x.png") == titles


def test_same_model_and_prompt_in_two_folders_are_two_rows(cli, tmp_path):
    caps = [(P2C1, "base", "m", "A man in a red shirt.", "0"), (P2C2, "base", "m", "A man in a red shirt.", "0")]
    a = write_folder(tmp_path / "x" / "run", captions=caps)
    b = write_folder(tmp_path / "y" / "run", captions=caps)
    save = tmp_path / "b.json"
    res = cli("compare", "--out", a, "--out", b, "--save", save)
    assert res.code == 0, res.err
    labels = sorted(r["label"] for r in json.loads(save.read_text(encoding="utf-8"))["rows"])
    assert labels == [f"base · m [{b}]", "base · m [run]"]


def test_rows_sharing_no_image_are_scored_on_their_own(cli, tmp_path):
    a = write_folder(tmp_path / "a", captions=[(P2C1, "p", "m1", "A man in a red shirt.", "0.001")])
    b = write_folder(tmp_path / "b", captions=[(P3C1, "q", "m2", "A woman in a black coat.", "0.002")])
    save = tmp_path / "b.json"
    res = cli("compare", "--out", a, "--out", b, "--save", save)
    assert res.code == 0, res.err
    board = json.loads(save.read_text(encoding="utf-8"))
    assert board["scope"] == "own" and board["shared_images"] == 0
    assert all(r["images"] == 1 for r in board["rows"])
    assert "share no image" in res.out


def test_chinese_captions_and_quoted_csv_cells(cli, tmp_path):
    text = '一名男子穿着红色上衣和蓝色短裤,\n背着"黑色"背包。'
    a = write_folder(tmp_path / "zh", captions=[(P2C1, "base_zh", "m", text, "0.001"),
                                                (P2C2, "base_zh", "m", text, "0.001")], bom=True)
    save = tmp_path / "b.json"
    res = cli("compare", "--out", a, "--attributes", LABELS, "--save", save)
    assert res.code == 0, res.err
    (row,) = json.loads(save.read_text(encoding="utf-8"))["rows"]
    assert row["words_mean"] > 15                     # one token per CJK character
    assert row["labels"]["upper_colour"]["agree"] == 1.0   # 红 = red, person 2's label


@pytest.mark.parametrize("args, message", [
    (("--out", "{tmp}/missing"), "error: output folder"),
    (("--out", "{empty}"), "error: nothing to compare"),
    (("--out", "{a}", "--attributes", "{tmp}/nope.mat"), "error: attribute file"),
    (("--out", "{a}", "--plot", "{tmp}/x.jpg"), "error: --plot writes a PNG"),
    (("--out", "{a}", "--out", "{a}/../{aname}"), "error: --out {a}/../{aname} is given twice (as {a})"),
    (("--out", "{a}", "--save", "{a}/captions_all.csv/s.json"), "error: --save {a}/captions_all.csv/s.json: cannot make"),
    (("--out", "{a}", "--plot", "{tmp}"), "error: --plot writes a PNG"),
    (("--out", "{a}", "--save", "{tmp}"), "error: --save {tmp} is a folder"),
])
def test_bad_input_is_one_line_exit_2(cli, hand_folders, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    a = hand_folders[0]
    res = cli("compare", *[s.format(tmp=tmp_path, empty=empty, a=a, aname=a.name) for s in args])
    assert res.code == 2, (res.out, res.err)
    assert res.out == ""  # said before any work
    assert res.err.startswith(message.format(tmp=tmp_path, a=a, aname=a.name)) and res.err.count("\n") == 1
    assert "Traceback" not in res.err


def test_a_damaged_attribute_file_is_one_line(cli, hand_folders, tmp_path):
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file at all" * 10)
    res = cli("compare", "--out", hand_folders[0], "--attributes", bad)
    assert res.code == 2 and res.err.startswith("error: ") and res.err.count("\n") == 1


def test_shapes_and_text_figures():
    assert shape_of("A man wearing a red shirt. He carries a bag.") == ("a", "P", "wearing", "a", "C", "G")
    assert shape_of("A woman wearing a blue jacket and more") != shape_of("A woman in a blue jacket")
    assert shape_of("") == ()
    f = text_figures(["a b a", "a c"])
    assert f["vocabulary"] == 3 and f["distinct_1"] == pytest.approx(3 / 5)
    assert f["distinct_2"] == pytest.approx(3 / 3) and f["words_median"] == 2.5
    assert text_figures([])["words_mean"] is None


def test_an_unknown_price_is_unknown_cost_not_zero(cli, tmp_path):
    a = write_folder(tmp_path / "a", captions=[(P2C1, "p", "m1", "A man in a red shirt.", ""),
                                               (P2C2, "p", "m1", "A man in a red shirt.", "0.001")])
    save, plot = tmp_path / "b.json", tmp_path / "b.png"
    res = cli("compare", "--out", a, "--save", save, "--plot", plot)
    assert res.code == 0, res.err
    (row,) = json.loads(save.read_text(encoding="utf-8"))["rows"]
    assert row["cost_usd"] is None and row["cost_per_1000"] is None
    assert "?" in res.out and plot.exists()     # the plot has no place for it, and says so


def test_labels_of_near_points_are_one_label():
    """Points closer than 4 % of the cost axis and 4 percentage points share a label ("#2, #3")."""
    from pipeline.review.compare_plot import label_spots

    points = [(1, 0.50, 0.40), (2, 0.46, 0.33), (3, 0.457, 0.325), (4, 0.0, 0.14), (5, 0.0, 0.14), (6, 0.3, 0.9)]
    got = sorted((numbers, round(cost, 3), round(value, 1)) for cost, value, numbers in label_spots(points, 0.6))
    assert got == [([1], 0.5, 40.0), ([2, 3], 0.46, 33.0), ([4, 5], 0.0, 14.0), ([6], 0.3, 90.0)]
