"""The gallery page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Every test opens the page from file:// with every request that is not a local file blocked, and checks that
none was attempted. What the page shows is compared with the folder's files (captions_all.csv,
attributes.csv, errors.csv) and, for the loopback server's run, with the caption the server gives each
image. Without Chromium or Playwright these tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from conftest import prepare_index, rows, spawn
from pipeline.review.flags import compute_flags, load_items
from pipeline.review.gallery import build_gallery, gallery_id
from pipeline.testing.loopback import expected_caption
from test_gallery import gallery_data, market_name, write_folder

CHROMIUM = Path(os.environ.get("REID_PROMPT_CHROMIUM", "/usr/bin/chromium"))  # Debian's; another build elsewhere
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LOCAL = ("file:", "blob:", "data:")

CARDS_JS = """() => Array.from(document.querySelectorAll("article.card")).map(c => ({
  id: c.dataset.imageId,
  person: c.closest("section.person").dataset.person,
  camera: c.closest(".camera").dataset.camera,
  caps: Array.from(c.querySelectorAll("li.cap")).map(li => ({
    prompt: li.dataset.prompt, index: Number(li.dataset.index), kind: li.dataset.kind,
    text: li.querySelector(".text") ? li.querySelector(".text").textContent : null,
    fields: li.querySelector("table.fields") ? Object.fromEntries(Array.from(li.querySelectorAll("tr"))
      .map(tr => [tr.cells[0].textContent, tr.cells[1].textContent])) : null,
    flags: Array.from(li.querySelectorAll(".flag")).map(f => f.dataset.flag),
    verdict: li.classList.contains("accepted") ? "accept" : li.classList.contains("rejected") ? "reject" : "",
    current: li.classList.contains("current"),
  })),
  errors: Array.from(c.querySelectorAll("li.error")).map(e => e.dataset.reason),
  placeholder: c.querySelector(".placeholder") !== null,
  note: c.querySelector(".note") ? c.querySelector(".note").textContent : null,
}))"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the gallery's browser tests must run (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} not found (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Opened:
    """A page of the gallery, with every request it made and every one that was blocked."""

    def __init__(self, browser, html: Path, missing_files: bool = False) -> None:
        self.missing_files = missing_files
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1300, "height": 900})
        self.blocked: list[str] = []
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._guard)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # the page's own Content-Security-Policy refuses any network load before routing sees it: a
        # refusal shows as a console error, so none may appear either
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" and not (
            self.missing_files and "ERR_FILE_NOT_FOUND" in m.text) else None)
        self.page.goto(html.as_uri())
        self.ready()

    def _guard(self, route) -> None:
        url = route.request.url
        if url.startswith(LOCAL):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def ready(self) -> None:
        self.page.wait_for_selector("body[data-state=ready]", timeout=15_000)

    def cards(self) -> list[dict]:
        return self.page.evaluate(CARDS_JS)

    def chunks_loaded(self) -> set[str]:
        return {Path(u).name for u in self.requests if "/data/chunk_" in u}

    def close(self) -> None:
        assert self.blocked == [] and all(u.startswith(LOCAL) for u in self.requests), self.requests
        assert self.errors == []
        self.context.close()


@pytest.fixture
def opened(browser):
    pages: list[Opened] = []

    def open_(html: Path, missing_files: bool = False) -> Opened:
        pages.append(Opened(browser, html, missing_files))
        return pages[-1]

    yield open_
    for p in pages:
        p.close()


def run_pipeline(*args: object, base_url: str | None = None) -> tuple[int, str]:
    """`python -m pipeline run ...` in a process of its own: Playwright's sync API keeps an event loop
    running in this thread, where the pipeline's own loop cannot start."""
    proc = spawn("run", *args, "--no-dashboard", base_url=base_url)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def person_of(image_id: str) -> str:
    return str(int(Path(image_id).name.split("_")[0]))


def camera_of(image_id: str) -> str:
    return Path(image_id).name.split("_")[1][1:].split("s")[0]


def check_grouping(cards: list[dict]) -> None:
    """Cards sit under their own person and camera; each person is one block on the page."""
    blocks = []
    for c in cards:
        assert (c["person"], c["camera"]) == (person_of(c["id"]), camera_of(c["id"])), c["id"]
        if not blocks or blocks[-1] != c["person"]:
            blocks.append(c["person"])
    assert len(blocks) == len(set(blocks))
    order = [int(p) for p in blocks]
    assert order == sorted(order, key=lambda n: (n <= 0, abs(n)))


# --- what the page shows ----------------------------------------------------------------------------------

def test_offline_run_right_captions_under_right_images(cli, market, tmp_path, opened):
    index = prepare_index(cli, market, tmp_path / "index.json")
    out = tmp_path / "out"
    code, err = run_pipeline("--index", index, "--out", out, "--prompt-file", "base", "--prompt-file", "base_zh",
                             "--backend", "offline")
    assert code == 0, err
    assert cli("gallery", "--out", out).code == 0
    view = opened(out / "gallery" / "index.html")
    cards = view.cards()
    table = rows(out / "captions_all.csv")
    assert sorted(c["id"] for c in cards) == sorted({r["image_id"] for r in table})  # 22 images, one page
    want = {(r["image_id"], r["prompt_name"], int(r["caption_index"])): r["caption"] for r in table}
    shown = {(c["id"], k["prompt"], k["index"]): k["text"] for c in cards for k in c["caps"]}
    assert shown == want
    check_grouping(cards)
    assert not any(c["placeholder"] for c in cards)
    links = view.page.eval_on_selector_all("article.card .id a", "as => as.map(a => [a.closest('article').dataset.imageId, a.href])")
    assert len(links) == len(cards) and all(href == (market / i).resolve().as_uri() for i, href in links)
    view.page.wait_for_function(  # the thumbnails in view are loaded (the others load lazily, on scrolling)
        "() => Array.from(document.images).filter(i => i.getBoundingClientRect().bottom < innerHeight)"
        ".every(i => i.complete && i.naturalWidth === 64) && document.images[0].naturalWidth === 64", timeout=10_000)
    assert cards[0]["caps"][0]["current"]  # the keyboard cursor starts on the first caption
    summary = view.page.inner_text("#summary")
    assert summary.startswith(f"{len(cards)} images") and f"{len(table)} captions" in summary


def test_loopback_run_captions_attributes_and_errors(cli, server, market, tmp_path, opened):
    index = prepare_index(cli, market, tmp_path / "index.json")
    data = json.loads(index.read_text(encoding="utf-8"))
    missing = "bounding_box_test/0999_c1s1_000001_01.jpg"
    data["images"].append({"image_id": missing, "path": missing, "pid": 999, "camid": 1, "split": "gallery"})
    index.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out"
    code, err = run_pipeline("--index", index, "--out", out, "--prompt-file", "base", "--prompt-file", "attributes",
                             base_url=server.base_url)
    assert code == 1, err  # the missing image failed
    assert cli("gallery", "--out", out).code == 0
    view = opened(out / "gallery" / "index.html")
    cards = {c["id"]: c for c in view.cards()}
    root = Path(data["root"])
    captions = rows(out / "captions_all.csv")
    assert captions
    for r in captions:  # the caption the server gives that very image, under that image
        (cap,) = [k for k in cards[r["image_id"]]["caps"] if k["prompt"] == "base"]
        assert cap["text"] == expected_caption((root / r["image_id"]).read_bytes())
    answers = rows(out / "attributes.csv")
    assert answers
    for a in answers:
        (shown,) = [k for k in cards[a["image_id"]]["caps"] if k["kind"] == "attributes"]
        assert shown["prompt"] == "attributes" and shown["fields"]
        assert shown["fields"] == {name: a[name] for name in shown["fields"]}
    gone = cards[missing]
    assert gone["placeholder"] and gone["errors"] and set(gone["errors"]) == {"missing"}
    assert gone["caps"] == [] and gone["note"].startswith("image not found")
    check_grouping(list(cards.values()))


def test_filters_paging_and_person_search(tmp_path, opened):
    names = [market_name(p, c, k) for p in range(1, 13) for c in (1, 2, 3) for k in range(2)]  # 72 images
    captions = {}
    for n in names:
        captions[(n, "base", 0)] = "A man wearing a red jacket and black trousers, carrying a black bag."
        captions[(n, "zh", 0)] = "一个穿红色夹克和黑色裤子的男人,背着黑色的包。"
    captions[(names[5], "base", 0)] = "I'm sorry, but I can't help with that."
    captions[(names[40], "base", 0)] = "I'm sorry, I can't assist with that request."
    captions[(names[60], "zh", 0)] = "男人。"
    out = write_folder(tmp_path, [(n, int(person_of(n)), int(camera_of(n))) for n in names], captions,
                       with_files=False)
    page = build_gallery(out, chunk_images=10).path
    _, images = gallery_data(page)
    order = [im["id"] for im in images]
    flags = compute_flags(load_items(out)[0])
    refusals = [i for i in order if any(f.name == "refusal" for f in flags.get((i, "base", 0), ()))]
    assert refusals == [names[5], names[40]]

    view = opened(page)
    p = view.page
    assert [c["id"] for c in view.cards()] == order[:50]  # 50 a page by default
    assert view.chunks_loaded() == {f"chunk_{k:05d}.js" for k in range(5)}  # only the visible page's data
    check_grouping(view.cards())
    p.keyboard.press("ArrowRight")
    view.ready()
    assert [c["id"] for c in view.cards()] == order[50:]
    assert view.chunks_loaded() == {f"chunk_{k:05d}.js" for k in range(8)}
    assert "page 2 of 2" in p.inner_text("#pageinfo")
    p.select_option("#pagesize", "20")
    view.ready()
    assert [c["id"] for c in view.cards()] == order[40:60] and "page 3 of 4" in p.inner_text("#pageinfo")
    p.click("#prev")
    view.ready()
    assert [c["id"] for c in view.cards()] == order[20:40]

    p.check("input[data-flag=refusal]")
    view.ready()
    cards = view.cards()
    assert [c["id"] for c in cards] == refusals
    assert all("refusal" in k["flags"] for c in cards for k in c["caps"] if k["prompt"] == "base")
    p.keyboard.press("j")  # the keys still review with the focus on the ticked box
    assert [k["current"] for c in view.cards() for k in c["caps"]] == [False, True, False, False]
    p.select_option("#prompt", label="zh")  # refusals are in base only
    view.ready()
    assert view.cards() == [] and p.inner_text("#pageinfo") == "no image matches the filters"
    p.uncheck("input[data-flag=refusal]")
    p.check("input[data-flag=length_outlier]")
    view.ready()
    assert [c["id"] for c in view.cards()] == [names[60]]
    p.uncheck("input[data-flag=length_outlier]")
    view.ready()
    cards = view.cards()
    assert len(cards) == 20 and {k["prompt"] for c in cards for k in c["caps"]} == {"zh"}
    assert all(len(c["caps"]) == 1 for c in cards)

    p.select_option("#prompt", label="all prompts")
    p.fill("#person", "0003")
    p.press("#person", "Enter")
    view.ready()
    cards = view.cards()
    assert [c["id"] for c in cards] == [i for i in order if person_of(i) == "3"] and len(cards) == 6
    assert {c["camera"] for c in cards} == {"1", "2", "3"}
    p.fill("#person", "3, 11")
    p.press("#person", "Enter")
    view.ready()
    assert {c["person"] for c in view.cards()} == {"3", "11"}


def test_keyboard_marks_reach_the_downloaded_review_csv(tmp_path, opened):
    odd = 'odd, "quoted" folder/0005_c1s1_000100_01.jpg'
    names = [odd, market_name(5, 2, 0), market_name(6, 1, 0)]
    prompts = ["base", 'say "hi", ok']
    captions = {(n, pr, 0): f"A person in a grey coat ({pr})." for n in names for pr in prompts}
    captions[(names[1], "base", 1)] = "A second caption,\nwith a newline."
    out = write_folder(tmp_path, [(n, int(person_of(n)), int(camera_of(n))) for n in names], captions,
                       with_files=False)
    html = build_gallery(out).path
    view = opened(html)
    p = view.page
    caps = [(c["id"], k["prompt"], k["index"]) for c in view.cards() for k in c["caps"]]
    assert len(caps) == 7 and caps[0] == (odd, "base", 0)
    for key in ("a", "r", "j", "r", "k", "k", "a", "ArrowDown", "ArrowDown", "ArrowDown", "r", "j", "a"):
        p.keyboard.press(key)
    # a: accept 0, moves to 1; r: reject 1 -> 2; j -> 3; r: reject 3 -> 4; k k -> 2; a: accept 2 -> 3;
    # three down -> 6 (the last); r: reject 6, stays (last page); j: stays; a: accept 6
    want = {caps[0]: "accept", caps[1]: "reject", caps[2]: "accept", caps[3]: "reject", caps[6]: "accept"}
    shown = {(c["id"], k["prompt"], k["index"]): k["verdict"] for c in view.cards() for k in c["caps"]}
    assert {k: v for k, v in shown.items() if v} == want
    assert p.inner_text("#marks") == "3 accepted · 2 rejected"

    with p.expect_download() as info:
        p.click("#download")
    download = info.value
    assert download.suggested_filename == "review.csv"
    raw = Path(download.path()).read_bytes()
    assert raw.startswith(b"image_id,prompt_name,caption_index,verdict\r\n")
    got = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    assert got[0] == ["image_id", "prompt_name", "caption_index", "verdict"]
    assert sorted(tuple(r) for r in got[1:]) == sorted((i, pr, str(k), v) for (i, pr, k), v in want.items())

    # A mark the browser kept from an earlier build, of an id with a newline (no run writes one; the
    # quoting must hold anyway): it survives a reload and reaches the CSV quoted.
    stored = f"reid-prompt-gallery:{gallery_id(out)}:marks"
    p.evaluate("""([key, mark]) => { const m = JSON.parse(localStorage.getItem(key));
                  m[JSON.stringify(mark)] = "reject"; localStorage.setItem(key, JSON.stringify(m)); }""",
               [stored, ["two\nlines, \"x\".jpg", "base", 0]])
    p.reload()  # the marks are kept by the browser
    view.ready()
    shown = {(c["id"], k["prompt"], k["index"]): k["verdict"] for c in view.cards() for k in c["caps"]}
    assert {k: v for k, v in shown.items() if v} == want
    assert p.inner_text("#marks") == "3 accepted · 3 rejected"
    p.keyboard.press("u")  # unmark the current (first) caption
    assert p.inner_text("#marks") == "2 accepted · 3 rejected"
    with p.expect_download() as info:
        p.click("#download")
    raw = Path(info.value.path()).read_bytes()
    assert b'"two\nlines, ""x"".jpg",base,0,reject\r\n' in raw
    got = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    del want[caps[0]]
    want[("two\nlines, \"x\".jpg", "base", 0)] = "reject"
    assert sorted(tuple(r) for r in got[1:]) == sorted((i, pr, str(k), v) for (i, pr, k), v in want.items())


def test_files_gone_from_the_gallery_folder_are_said_not_crashed(tmp_path, opened):
    """A thumbnail deleted after the build shows the placeholder; a data file deleted shows one message
    on the page that needs it, and the other pages still work."""
    names = [market_name(p, 1, k) for p in range(1, 7) for k in range(10)]  # 60 images
    out = write_folder(tmp_path, [(n, int(person_of(n)), 1) for n in names],
                       {(n, "base", 0): f"A person, {n}." for n in names})
    page = build_gallery(out, chunk_images=10).path
    _, images = gallery_data(page)
    (page.parent / images[0]["thumb"]).unlink()
    (page.parent / "data" / "chunk_00005.js").unlink()  # images 51-60: the second page
    view = opened(page, missing_files=True)
    p = view.page
    p.wait_for_selector("article.card:first-child .placeholder")
    assert p.eval_on_selector_all("article.card img", "imgs => imgs.length") == 49
    assert p.is_hidden("#message")
    p.keyboard.press("ArrowRight")
    p.wait_for_selector("body[data-state=error]")
    message = p.inner_text("#message")
    assert "data is missing (cannot load data/chunk_00005.js)" in message and "python -m pipeline gallery" in message
    assert view.cards() == [] and "page 2 of 2" in p.inner_text("#pageinfo")
    p.keyboard.press("ArrowLeft")
    view.ready()
    assert [c["id"] for c in view.cards()] == [im["id"] for im in images[:50]] and p.is_hidden("#message")


def test_marks_filter_junk_apart_and_continued_only_across_pages(tmp_path, opened):
    """The Marks filter keeps the images with a rejected (accepted) caption, or with none marked, of the
    prompt shown; junk and distractors head their own groups as not a person; "(continued)" says a person
    began on the previous page, never that a filter hid some of its images."""
    names = [market_name(p, c, 0) for p in (1, 2) for c in (1, 2, 3)]
    names += ["bounding_box_test/0000_c1s1_000551_01.jpg", "bounding_box_test/-1_c2s1_000401_03.jpg"]
    captions = {(n, pr, 0): f"A man in a red coat ({pr})." for n in names for pr in ("base", "zh")}
    captions[(names[4], "base", 0)] = "I'm sorry, but I can't help with that."
    out = write_folder(tmp_path, [(n, int(Path(n).name.split("_")[0]), int(camera_of(n))) for n in names], captions)
    view = opened(build_gallery(out).path)
    p = view.page
    assert not any(u.endswith("/data/ids.js") for u in view.requests)
    heads = p.eval_on_selector_all("section.person h2", "hs => hs.map(h => h.firstChild.textContent)")
    assert heads == ["person 1", "person 2", "distractors (id 0): not a person", "junk (id -1): not a person"]
    assert "8 images · 2 persons" in p.inner_text("#summary")
    assert p.is_disabled("input[data-flag=labels_disagree]")  # built without --attributes: not looked for
    assert "labels disagree (needs --attributes)" in p.inner_text("#flags")

    p.check("input[data-flag=refusal]")  # person 2's second image only: not "(continued)"
    view.ready()
    assert [c["id"] for c in view.cards()] == [names[4]]
    assert "continued" not in p.inner_text("section.person h2")
    p.uncheck("input[data-flag=refusal]")
    view.ready()
    p.select_option("#pagesize", "20")
    view.ready()

    caps = [(c["id"], k["prompt"]) for c in view.cards() for k in c["caps"]]
    for key in ("r", "a", "j", "j", "j", "r"):  # reject (1 base), accept (1 zh), reject (2's first zh)
        p.keyboard.press(key)
    assert caps[0] == (names[0], "base") and caps[5] == (names[2], "zh")
    p.select_option("#review", "reject")
    view.ready()
    assert [c["id"] for c in view.cards()] == [names[0], names[2]]
    assert any(u.endswith("/data/ids.js") for u in view.requests)  # loaded for this filter only
    p.select_option("#prompt", label="base")
    view.ready()
    assert [c["id"] for c in view.cards()] == [names[0]]
    p.select_option("#review", "unmarked")
    view.ready()
    assert [c["id"] for c in view.cards()] == names[1:]
    p.select_option("#prompt", label="all prompts")
    p.select_option("#review", "accept")
    view.ready()
    assert [c["id"] for c in view.cards()] == [names[0]]
    p.select_option("#review", "")
    view.ready()
    assert len(view.cards()) == len(names)
