"""`python -m pipeline gallery`: the files it writes, read back in Python (the page itself is driven in a real
Chromium in tests/test_gallery_browser.py).

The data files are JavaScript calls (`galleryCatalog({...});`, `galleryChunk(k, {...});`) so the page can load
them from file://; here they are read back by stripping the call and parsing the JSON.
"""

from __future__ import annotations

import csv
import json
import os
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image

from conftest import prepare_index, rows
from pipeline.ledger.outputs import CAPTION_COLUMNS, ERROR_COLUMNS
from pipeline.review.flags import FLAG_NAMES, CaptionItem, ErrorItem, Flag, compute_flags, load_items
from pipeline.review.gallery import (
    Place,
    build_gallery,
    catalog_record,
    chunk_record,
    group_images,
    js_call,
    label_of,
    source_links,
    thumb_rel,
)
from pipeline.testing import synth

SECRET = "sk-gallery-must-never-show-this-0123456789"


# --- a synthetic output folder, written as a run writes it ------------------------------------------------

def write_folder(base: Path, images: list[tuple[str, int | None, int | None]],
                 captions: dict[tuple[str, str, int], str], *, errors: list[dict[str, str]] | None = None,
                 with_files: bool = True) -> Path:
    """An output folder `base/out` whose index (`base/index.json`, images under `base/root`) lists
    `images` (image_id, pid, camid), with captions_all.csv holding `captions` and errors.csv `errors`.

    The CSVs go through the csv module with the pipeline's columns, as a run writes them: the gallery
    reads them as it reads any folder.
    """
    root = base / "root"
    entries = []
    for k, (image_id, pid, camid) in enumerate(images):
        if with_files:
            upper, lower = synth.identity_colours(pid if pid and pid > 0 else 1)
            synth.make_crop(root / image_id, upper=synth.PALETTE[upper], lower=synth.PALETTE[lower], seed=k)
        entries.append({"image_id": image_id, "path": image_id, "pid": pid, "camid": camid, "split": "gallery"})
    index = base / "index.json"
    index.write_text(json.dumps({"root": str(root), "dataset": "market1501", "images": entries}), encoding="utf-8")
    out = base / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"index": str(index), "root": str(root), "state": "finished"}),
                                       encoding="utf-8")
    with open(out / "captions_all.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CAPTION_COLUMNS)
        for (image_id, prompt_name, index_), text in captions.items():
            w.writerow([image_id, f"prompt {prompt_name}", text, "2027-01-01T00:00:00+00:00", "test-model", 100, 20,
                        "0.0001", prompt_name, index_, 1, "0.5", "abcd1234abcd1234"])
    if errors:
        with open(out / "errors.csv", "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, ERROR_COLUMNS, restval="")
            w.writeheader()
            w.writerows(errors)
    return out


def market_name(pid: int, cam: int, k: int) -> str:
    return f"bounding_box_test/{pid:04d}_c{cam}s1_{100 * pid + k:06d}_{k + 1:02d}.jpg"


def read_js(path: Path) -> list:
    """The arguments of the one call a data file makes."""
    text = path.read_text(encoding="utf-8")
    start = text.index("(")
    assert text.rstrip().endswith(");")
    return json.loads("[" + text[start + 1:text.rstrip().rindex(")")] + "]")


def gallery_data(page: Path) -> tuple[dict, list[dict]]:
    """(catalog, every image record in order) of a written gallery."""
    (catalog,) = read_js(page.parent / "data" / "catalog.js")
    images = []
    for k in range(catalog["n_chunks"]):
        number, chunk = read_js(page.parent / "data" / f"chunk_{k:05d}.js")
        assert number == k and chunk["start"] == len(images)
        images.extend(chunk["images"])
    assert len(images) == catalog["n_images"]
    return catalog, images


# --- pure builders ----------------------------------------------------------------------------------------

def item(image_id: str, prompt: str = "base", index: int = 0, text: str = "A person in a red coat.",
         person: str | None = None, camera: str | None = None, kind: str = "caption",
         fields: dict[str, str] | None = None) -> CaptionItem:
    return CaptionItem(image_id, prompt, index, "m", kind, text, fields, person, camera)


def test_labels_drop_padding_and_keep_names():
    assert [label_of(v) for v in ("0002", 2, -1, "0", " cam-a ", "", None)] == ["2", "2", "-1", "0", "cam-a", None, None]


def test_images_grouped_by_person_then_camera_index_first():
    items = [
        item("x/0010_c2.jpg", person="0010", camera="2"),
        item("x/0002_c3.jpg", person="0002", camera="3"),
        item("x/0002_c1.jpg", person="0002", camera="1"),
        item("x/0002_c1b.jpg", person="0002", camera="1"),
        item("x/junk.jpg"),  # no person: last
        item("x/named.jpg", person="alice", camera="1"),
        item("x/distractor.jpg", person=None),
        item("x/0002_c1.jpg", prompt="a_prompt"),  # a second prompt of an image: sorted within the image
    ]
    places = {"x/distractor.jpg": Place("0", "4", "/d.jpg"),  # the index's person wins
              "x/0010_c2.jpg": Place("10", None, "/ten.jpg")}  # the index has no camera: parsed one
    errors = [ErrorItem("x/0099_c1.jpg", "base", 0, "missing", "no such file")]
    images = group_images(items, errors, places)
    assert [(im.image_id, im.person, im.camera) for im in images] == [
        ("x/0002_c1.jpg", "2", "1"), ("x/0002_c1b.jpg", "2", "1"), ("x/0002_c3.jpg", "2", "3"),
        ("x/0010_c2.jpg", "10", "2"), ("x/distractor.jpg", "0", "4"), ("x/named.jpg", "alice", "1"),
        ("x/0099_c1.jpg", None, None), ("x/junk.jpg", None, None),
    ]
    assert [it.prompt_name for it in images[0].items] == ["a_prompt", "base"]
    assert images[3].source == "/ten.jpg" and images[0].source is None
    assert images[6].errors[0].reason == "missing"


def test_catalog_lists_flags_errors_and_prompts_sparsely():
    items = [item("a.jpg", person="1"), item("a.jpg", "zh", person="1"),
             item("b.jpg", person="1", text="Sorry."), item("c.jpg", person="2")]
    errors = [ErrorItem("c.jpg", "zh", 0, "refusal", "I can't"), ErrorItem("d.jpg", "", 0, "missing", "gone")]
    images = group_images(items, errors, {})
    flags = {("b.jpg", "base", 0): [Flag("refusal", "apology"), Flag("length_outlier", "1 word")],
             ("a.jpg", "zh", 0): [Flag("length_outlier", "x")]}
    cat = catalog_record(images, ["base", "zh"], flags, title="t", gallery_key="k", chunk_images=2)
    assert [im.image_id for im in images] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert cat["n_images"] == 4 and cat["n_chunks"] == 2 and cat["chunk_images"] == 2
    assert cat["persons"] == [["1", 0, 2, 1], ["2", 2, 1, 1], [None, 3, 1, 1]]
    assert cat["flagged"] == {"refusal": {"0": [1]}, "length_outlier": {"0": [1], "1": [0]}}
    assert {f["name"]: f["count"] for f in cat["flags"]} == {**dict.fromkeys(FLAG_NAMES, 0), "refusal": 1,
                                                            "length_outlier": 2}
    assert cat["errored"] == {"1": [2], "*": [3]}
    assert cat["prompt_images"] == {"1": [0, 2, 3]}  # d.jpg's error names no prompt: it failed every one
    assert cat["counts"] == {"captions": 4, "attributes": 0, "errors": 2}


def test_chunk_record_carries_texts_fields_flags_and_errors():
    fields = {"upper_color": "red", "bag": "yes"}
    items = [item("a.jpg", text='Line one,\n"two"'), item("a.jpg", "attrs", kind="attributes", text="{}", fields=fields)]
    images = group_images(items, [ErrorItem("a.jpg", "zh", 1, "timeout", "60 s")], {})
    flags = {("a.jpg", "base", 0): [Flag("identity_conflict", "red here, blue elsewhere")]}
    rec = chunk_record(images, 0, ["attrs", "base", "zh"], flags, {}, {})
    (im,) = rec["images"]
    assert im["id"] == "a.jpg" and im["thumb"] is None and im["note"] == "no thumbnail"
    assert im["items"] == [
        {"p": 0, "i": 0, "k": "attributes", "t": "{}", "m": "m", "f": fields},
        {"p": 1, "i": 0, "k": "caption", "t": 'Line one,\n"two"', "m": "m",
         "fl": [[FLAG_NAMES.index("identity_conflict"), "red here, blue elsewhere"]]},
    ]
    assert im["errors"] == [{"p": 2, "i": 1, "r": "timeout", "d": "60 s"}]


def test_js_call_is_json_a_script_can_carry():
    text = js_call("galleryChunk", 3, {"t": "a\u2028b\u2029c </script> 黑色 \"q\""})
    assert "\u2028" not in text and "\u2029" not in text and text.endswith(");\n")
    assert json.loads("[" + text[len("galleryChunk("):-3] + "]") == [3, {"t": "a\u2028b\u2029c </script> 黑色 \"q\""}]


def test_links_to_the_originals_are_relative_and_quoted(tmp_path):
    gallery = tmp_path / "out" / "gallery"
    sources = [("a", str(tmp_path / "data" / "q" / "1 #2%.jpg")), ("b", str(tmp_path / "data" / "q" / "x.jpg")),
               ("c", str(gallery / "here.jpg")), ("d", str(tmp_path / "其他.jpg"))]
    assert source_links(sources, gallery) == {"a": "../../data/q/1%20%232%25.jpg", "b": "../../data/q/x.jpg",
                                              "c": "here.jpg", "d": "../../%E5%85%B6%E4%BB%96.jpg"}


def test_thumbnail_names_are_stable_and_spread():
    assert thumb_rel("a/b.jpg") == thumb_rel("a/b.jpg") != thumb_rel("a/c.jpg")
    assert thumb_rel("a/b.jpg").startswith("thumbs/") and thumb_rel("a/b.jpg").count("/") == 2


def test_bundled_assets_are_package_data():
    folder = resources.files("pipeline.review").joinpath("page")
    assert sorted(p.name for p in folder.iterdir()) == ["gallery.css", "gallery.js", "index.html"]
    page = folder.joinpath("index.html").read_text(encoding="utf-8")
    assert "assets/gallery.js" in page and "http://" not in page and "https://" not in page


# --- the command ------------------------------------------------------------------------------------------

def gallery_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_gallery_of_an_offline_run(cli, market, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("REID_GALLERY_PROBE", "environment-value-not-for-pages")
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    res = cli("run", "--index", index, "--out", out, "--prompt-file", "base", "--prompt-file", "base_zh",
              "--backend", "offline", "--no-dashboard")
    assert res.code == 0, res.err
    res = cli("gallery", "--out", out)
    assert res.code == 0, res.err
    page = out / "gallery" / "index.html"
    table = rows(out / "captions_all.csv")
    n_images = len({r["image_id"] for r in table})
    assert res.out.splitlines()[-1] == f"open {page}"
    assert f"gallery: {n_images} images" in res.out and f"{len(table)} captions" in res.out
    assert f"thumbnails: {n_images} made, 0 reused, 0 placeholders" in res.out

    catalog, images = gallery_data(page)
    assert catalog["prompts"] == ["base", "base_zh"] and catalog["counts"]["captions"] == len(table)
    want = {(r["image_id"], r["prompt_name"], int(r["caption_index"])): r["caption"] for r in table}
    got = {(im["id"], catalog["prompts"][it["p"]], it["i"]): it["t"] for im in images for it in im["items"]}
    assert got == want
    persons = [im["person"] for im in images]
    assert persons == sorted(persons, key=lambda p: (int(p) <= 0, abs(int(p))))  # 1, 2, ..., then 0, -1
    real = {p for p in persons if int(p) > 0}  # Market's 0 and -1 are shown apart, not counted as persons
    assert catalog["not_persons"] == [p for p in ("0", "-1") if p in persons] != []
    assert catalog["n_persons"] == len(real) and f"images of {len(real)} persons" in res.out
    for im in images:  # the index's person and camera, the thumbnail that exists
        name = Path(im["id"]).name
        assert label_of(name.split("_")[0]) == im["person"] and name.split("_")[1][1] == im["camera"]
        assert (page.parent / im["thumb"]).is_file() and (page.parent / im["src"]).resolve() == (market / im["id"]).resolve()
    for path in gallery_files(page.parent):  # nothing from the environment in any file of the page
        data = path.read_bytes()
        assert SECRET.encode() not in data and b"environment-value-not-for-pages" not in data, path

    stamps = {p: p.stat().st_mtime_ns for p in (page.parent / "thumbs").rglob("*.jpg")}
    again = cli("gallery", "--out", out)
    assert again.code == 0 and f"thumbnails: 0 made, {n_images} reused" in again.out
    assert {p: p.stat().st_mtime_ns for p in (page.parent / "thumbs").rglob("*.jpg")} == stamps


def test_unreadable_and_missing_images_get_a_placeholder_and_a_note(tmp_path, cli):
    names = [market_name(1, 1, 0), market_name(1, 2, 1), market_name(2, 1, 0), market_name(2, 2, 0),
             market_name(3, 1, 0)]
    out = write_folder(tmp_path, [(n, int(n.split("/")[1][:4]), int(n.split("_c")[1][0])) for n in names],
                       {(n, "base", 0): f"A person, image {k}." for k, n in enumerate(names)})
    root = tmp_path / "root"
    synth.make_corrupt(root / names[1])
    synth.make_not_image(root / names[2])
    synth.make_truncated(root / names[3])
    (root / names[4]).unlink()
    res = cli("gallery", "--out", out)
    assert res.code == 0, res.err
    assert "thumbnails: 1 made, 0 reused, 4 placeholders" in res.out
    _, images = gallery_data(out / "gallery" / "index.html")
    notes = {im["id"]: im["note"] for im in images}
    assert [notes[n] for n in names[:3]] == [None] + ["image not readable: not an image format Pillow knows"] * 2
    assert notes[names[3]].startswith("image not readable: OSError: ") and "truncated" in notes[names[3]]
    assert notes[names[4]].startswith(f"image not found: {root / names[4]} (")  # the OS's words follow
    assert [bool(im["thumb"]) for im in images] == [n == names[0] for n in (im["id"] for im in images)]
    assert not list((out / "gallery" / "thumbs").rglob("*.tmp"))


def test_an_index_that_cannot_be_read_is_a_warning(tmp_path, cli):
    name = market_name(4, 2, 0)
    out = write_folder(tmp_path, [(name, 4, 2)], {(name, "base", 0): "A person in blue."})
    (tmp_path / "index.json").unlink()
    res = cli("gallery", "--out", out)
    assert res.code == 0, res.err
    assert res.err.startswith("warning: index not readable (") and "placeholders" in res.err
    _, (im,) = gallery_data(out / "gallery" / "index.html")
    assert (im["person"], im["camera"], im["thumb"], im["src"]) == ("4", "2", None, None)  # parsed from the name


def test_to_prompt_and_chunks(tmp_path, cli):
    names = [market_name(p, c, 0) for p in range(1, 8) for c in (1, 2)]
    captions = {(n, pr, 0): f"{pr} caption of {n}" for n in names for pr in ("base", "zh")}
    out = write_folder(tmp_path, [(n, int(n.split("/")[1][:4]), int(n.split("_c")[1][0])) for n in names],
                       captions, with_files=False)
    target = tmp_path / "elsewhere" / "review.html"
    res = cli("gallery", "--out", out, "--to", target, "--prompt", "zh")
    assert res.code == 0, res.err
    assert res.out.splitlines()[-1] == f"open {target}" and target.is_file()
    catalog, images = gallery_data(target)
    assert catalog["prompts"] == ["zh"] and {it["t"].split()[0] for im in images for it in im["items"]} == {"zh"}

    both = tmp_path / "both"
    assert cli("gallery", "--out", out, "--to", both, "--prompt", "zh", "--prompt", "base").code == 0
    assert gallery_data(both / "index.html")[0]["prompts"] == ["zh", "base"]  # as asked, in that order

    folder = tmp_path / "folder-target"
    assert build_gallery(out, folder, chunk_images=3).chunks == 5
    assert len(list((folder / "data").glob("chunk_*.js"))) == 5
    assert build_gallery(out, folder, chunk_images=10).chunks == 2  # a rebuild leaves no stale chunk behind
    assert sorted(p.name for p in (folder / "data").glob("chunk_*.js")) == ["chunk_00000.js", "chunk_00001.js"]
    catalog, images = gallery_data(folder / "index.html")
    assert [im["id"] for im in images] == names


@pytest.mark.parametrize("args, message", [
    (["--prompt", "nope"], "error: no answers for prompt 'nope' in "),
    ([], "error: nothing to show: no captions, attributes or errors in "),
])
def test_bad_input_is_one_line_exit_2(tmp_path, cli, args, message):
    out = write_folder(tmp_path, [], {})
    res = cli("gallery", "--out", out, *args)
    assert res.code == 2 and res.err.startswith(message) and len(res.err.strip().splitlines()) == 1
    assert not (out / "gallery").exists()


def test_missing_folder_is_exit_2(tmp_path, cli):
    res = cli("gallery", "--out", tmp_path / "nope")
    assert res.code == 2 and res.err.strip() == f"error: output folder {tmp_path / 'nope'} does not exist"


def test_flags_in_the_data_are_compute_flags(tmp_path):
    """The page shows the flags of pipeline.review.flags, the ones `compare` counts, and no others."""
    names = [market_name(p, c, k) for p in (1, 2) for c in (1, 2, 3) for k in range(2)]
    captions = {(n, "base", 0): "A man wearing a red jacket and black trousers, carrying a bag." for n in names}
    captions[(names[0], "base", 0)] = "I'm sorry, I can't help with that."
    captions[(names[1], "base", 0)] = "Red."
    captions[(names[2], "base", 0)] = "A man wearing a blue jacket and white trousers, carrying a bag."
    out = write_folder(tmp_path, [(n, int(n.split("/")[1][:4]), int(n.split("_c")[1][0])) for n in names], captions,
                       with_files=False)
    page = build_gallery(out).path
    items, _ = load_items(out)
    truth = compute_flags(items)
    assert {f.name for fl in truth.values() for f in fl} >= {"refusal", "length_outlier", "identity_conflict"}
    catalog, images = gallery_data(page)
    shown = {(im["id"], catalog["prompts"][it["p"]], it["i"]): [(FLAG_NAMES[k], d) for k, d in it["fl"]]
             for im in images for it in im["items"] if it.get("fl")}
    assert shown == {k: [(f.name, f.detail) for f in v] for k, v in truth.items()}
    # counted per caption, as `compare` counts them, not per finding (one caption may conflict twice)
    assert {f["name"]: f["count"] for f in catalog["flags"]} == {
        name: sum(1 for fl in truth.values() if any(f.name == name for f in fl)) for name in FLAG_NAMES}
    for name, by_prompt in catalog["flagged"].items():
        assert [images[pos]["id"] for pos in by_prompt["0"]] == sorted(
            {k[0] for k, v in truth.items() if any(f.name == name for f in v)}, key=[im["id"] for im in images].index)


def test_a_prompt_shown_alone_keeps_the_flags_compare_counts(tmp_path):
    """`--prompt base`: the caption still disagrees with the structured answer of the prompt not shown."""
    names = [market_name(1, 1, 0), market_name(1, 2, 0)]
    captions = {(n, "base", 0): "A man in a red jacket and black trousers." for n in names}
    captions[(names[0], "attrs", 0)] = json.dumps({"upper_color": "blue", "lower_color": "black"})
    out = write_folder(tmp_path, [(n, 1, k + 1) for k, n in enumerate(names)], captions, with_files=False)
    truth = compute_flags(load_items(out)[0])
    assert [f.name for f in truth[(names[0], "base", 0)]] == ["attributes_disagree"]
    catalog, images = gallery_data(build_gallery(out, prompts=["base"]).path)
    assert catalog["prompts"] == ["base"]
    shown = {(im["id"], it["i"]): [FLAG_NAMES[k] for k, _ in it.get("fl", [])] for im in images for it in im["items"]}
    assert shown == {(names[0], 0): ["attributes_disagree"], (names[1], 0): []}


def test_thumbnails_made_by_threads_and_remade_when_the_image_changes(tmp_path, monkeypatch):
    """Many thumbnails are made by several threads; a large image is scaled down, a small JPEG crop kept."""
    import pipeline.review.gallery as gallery

    monkeypatch.setattr(gallery, "PARALLEL_THUMBS", 4)
    names = [market_name(p, 1, k) for p in range(1, 4) for k in range(3)]
    out = write_folder(tmp_path, [(n, int(n.split("/")[1][:4]), 1) for n in names],
                       {(n, "base", 0): "A person." for n in names})
    big = tmp_path / "root" / names[1]
    synth.make_crop(big, upper=synth.PALETTE["red"], lower=synth.PALETTE["blue"], size=(300, 600), fmt="PNG")
    res = build_gallery(out, workers=2)
    assert (res.thumbs_made, res.unreadable) == (9, 0)
    for name in names:
        with Image.open(out / "gallery" / thumb_rel(name)) as thumb:
            assert thumb.format == "JPEG" and thumb.size == ((128, 256) if name == names[1] else (64, 128))
    assert (out / "gallery" / thumb_rel(names[0])).read_bytes() == (tmp_path / "root" / names[0]).read_bytes()
    later = (out / "gallery" / thumb_rel(names[0])).stat().st_mtime + 10
    os.utime(tmp_path / "root" / names[0], (later, later))  # an image newer than its thumbnail: made again
    again = build_gallery(out, workers=2)
    assert (again.thumbs_made, again.thumbs_reused) == (1, 8)


def test_attribute_labels_flag_what_disagrees_with_them(tmp_path, cli):
    """Person 2 of Market-1501's labels wears red above and blue below (tests/data/market_attribute.mat)."""
    labels = Path(__file__).parent / "data" / "market_attribute.mat"
    names = [market_name(2, 1, 0), market_name(2, 3, 1)]
    out = write_folder(tmp_path, [(n, 2, int(n.split("_c")[1][0])) for n in names],
                       {(names[0], "base", 0): "A man in a red T-shirt and blue shorts.",
                        (names[1], "base", 0): "A man in a green T-shirt and blue shorts."}, with_files=False)
    res = cli("gallery", "--out", out, "--attributes", labels)
    assert res.code == 0, res.err
    assert "labels_disagree 1" in res.out
    catalog, images = gallery_data(out / "gallery" / "index.html")
    flagged = {im["id"]: [FLAG_NAMES[k] for k, _ in it.get("fl", [])] for im in images for it in im["items"]}
    assert "labels_disagree" not in flagged[names[0]] and "labels_disagree" in flagged[names[1]]
    assert catalog["flagged"]["labels_disagree"] == {"0": [1]}
    assert all(f["computed"] for f in catalog["flags"])
    assert cli("gallery", "--out", out).code == 0  # without labels: not looked for, which is not "0 found"
    catalog, _ = gallery_data(out / "gallery" / "index.html")
    assert [f["name"] for f in catalog["flags"] if not f["computed"]] == ["labels_disagree"]

    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file")
    res = cli("gallery", "--out", out, "--attributes", bad)
    assert res.code == 2 and res.err.startswith("error: ") and len(res.err.strip().splitlines()) == 1


def test_junk_and_distractors_are_no_person_for_the_gallery_as_for_the_flags(tmp_path):
    """Market's -1 and 0000 crops: shown apart (searchable by their label), not counted as persons, and
    never in an identity conflict, whether or not the index marks them junk (a hand-made one may not)."""
    names = [market_name(3, 1, 0), market_name(3, 2, 0), "bounding_box_test/-1_c1s1_000401_03.jpg",
             "bounding_box_test/-1_c2s1_000402_03.jpg", "bounding_box_test/0000_c3s1_000551_01.jpg",
             "bounding_box_test/0000_c4s1_000552_01.jpg"]
    colours = ["red", "red", "red", "blue", "green", "black"]
    out = write_folder(tmp_path, [(n, int(Path(n).name.split("_")[0]), k + 1) for k, n in enumerate(names)],
                       {(n, "base", 0): f"A man in a {c} jacket and black trousers." for n, c in zip(names, colours)})
    items, _ = load_items(out)
    assert {i.image_id: i.person_id for i in items}[names[2]] is None
    assert not any(f.name == "identity_conflict" for fl in compute_flags(items).values() for f in fl)
    res = build_gallery(out)
    catalog, images = gallery_data(res.path)
    assert [im["person"] for im in images] == ["3", "3", "0", "0", "-1", "-1"]
    assert catalog["not_persons"] == ["0", "-1"] and catalog["n_persons"] == 1 and res.persons == 1
