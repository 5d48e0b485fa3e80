"""`run --redo review.csv`: rejected captions asked again, the old rows kept in captions_replaced.csv.

Through the CLI with the offline backend (fast, free) and against the loopback server over the real SDK
(requests counted, costs billed). Kill points are injected at the file layer (`appendfile.write_new_file`,
`appendfile.append_bytes`, `outputs.write_csv_atomic`: the calls the move is made of), then the folder is
run again and must hold every row once, nothing lost, nothing doubled, nothing brought back.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import prepare_index, rows
from pipeline.data.prompts import BUNDLED_PROMPTS_DIR
from pipeline.errors import InputError
from pipeline.ledger import appendfile, outputs
from pipeline.ledger.outputs import CAPTION_COLUMNS, REPLACED_COLUMNS
from pipeline.ledger.pending import HeldFile, save_pending
from pipeline.ledger.redo import (
    JOURNAL,
    Move,
    Review,
    apply_redo,
    check_review,
    parse_review,
    plan_redo,
    replaced_record,
)

REVIEW_HEADER = ["image_id", "prompt_name", "caption_index", "verdict"]
MINI_IN, MINI_OUT = 0.15, 0.60  # gpt-4o-mini, USD per 1M tokens (bundled pricing.toml)


# --- helpers ---------------------------------------------------------------------------------------------

def write_review(path: Path, marks: list[tuple[str, str, int, str]], *, bom: bool = True) -> Path:
    """A review.csv as the gallery saves it (a BOM, as Excel-friendly downloads have)."""
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(REVIEW_HEADER)
        w.writerows(marks)
    return path


def offline(cli, index: Path, out: Path, *extra: object):
    return cli("run", "--index", index, "--out", out, "--backend", "offline", "--prompt-file", "base",
               "--no-dashboard", "--batch-size", 5, *extra)


def by_key(table: list[dict[str, str]]) -> dict[tuple[str, str, int], dict[str, str]]:
    return {(r["image_id"], r["prompt_name"], int(r["caption_index"])): r for r in table}


def keys_of(table: list[dict[str, str]]) -> Counter:
    return Counter((r["image_id"], r["prompt_name"], int(r["caption_index"])) for r in table)


def parts_rows(out: Path) -> list[dict[str, str]]:
    return [r for p in sorted(out.glob("captions_part_*.csv")) for r in rows(p)]


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".reid")}


def check_moved(out: Path, before: dict, rejected: list) -> None:
    """The end state of a redo: every key once in captions_all.csv and once in the parts, the rejected
    ones with a new row, their old rows once each in captions_replaced.csv, the others untouched."""
    now = rows(out / "captions_all.csv")
    assert set(keys_of(now)) == set(before) and max(keys_of(now).values()) == 1
    parts = parts_rows(out)
    assert keys_of(parts) == keys_of(now)
    replaced = rows(out / "captions_replaced.csv")
    assert keys_of(replaced) == Counter(rejected)  # each old row once, no other
    new = by_key(now)
    for r in replaced:
        key = (r["image_id"], r["prompt_name"], int(r["caption_index"]))
        assert {c: r[c] for c in CAPTION_COLUMNS} == {c: before[key][c] for c in CAPTION_COLUMNS}
    for key, row in before.items():
        if key not in rejected:
            assert new[key] == row
    assert by_key(parts) == new
    assert not (out / JOURNAL).exists()


@pytest.fixture
def index(cli, market, tmp_path) -> Path:
    return prepare_index(cli, market, tmp_path / "index.json")


@pytest.fixture
def done(cli, index, tmp_path):
    """A finished offline run (22 images, parts of 5) and its rows by key."""
    out = tmp_path / "out"
    res = offline(cli, index, out)
    assert res.code == 0, res.err
    return out, by_key(rows(out / "captions_all.csv"))


def three_rejected(out: Path) -> list[tuple[str, str, int]]:
    """Three rejected keys in three parts (0, 1 and 3), the second row of each."""
    return [list(by_key(rows(out / f"captions_part_{k:04d}.csv")))[1] for k in (0, 1, 3)]


# --- the review and the plan (pure) ----------------------------------------------------------------------

def test_parse_review_bom_extra_columns_last_mark_wins() -> None:
    text = ("\ufeffnote,image_id,prompt_name,caption_index,verdict\r\n"
            "x,a.jpg,base,0,reject\r\n"
            "x,b.jpg,base,1, Accept \r\n"
            "\r\n"
            'x,"c,1.jpg",base,0,REJECT\r\n'
            "x,a.jpg,base,0,accept\r\n"
            "x,a.jpg,base,0,reject\r\n")
    review = parse_review(text.encode("utf-8"), "review.csv")
    assert review.rejected == (("c,1.jpg", "base", 0), ("a.jpg", "base", 0))
    assert review.accepted == 1 and len(review.sha256) == 64


@pytest.mark.parametrize("text, says", [
    ("image_id,prompt_name,verdict\r\na,base,reject\r\n", "no column caption_index"),
    ("", "empty"),
    ("image_id,prompt_name,caption_index,verdict\r\na,base,0,maybe\r\n", "line 2: verdict 'maybe'"),
    ("image_id,prompt_name,caption_index,verdict\r\na,base,x,reject\r\n", "caption_index 'x'"),
    ("image_id,prompt_name,caption_index,verdict\r\na,base,-1,reject\r\n", "caption_index '-1'"),
    ("image_id,prompt_name,caption_index,verdict\r\n,base,0,reject\r\n", "must not be empty"),
    ("image_id,prompt_name,caption_index,verdict\r\na,base,0\r\n", "3 fields"),
])
def test_parse_review_refuses_bad_input_in_one_line(text: str, says: str) -> None:
    with pytest.raises(InputError) as err:
        parse_review(text.encode("utf-8"), "r.csv")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_parse_review_refuses_other_encodings() -> None:
    with pytest.raises(InputError, match="not UTF-8"):
        parse_review("image_id,prompt_name,caption_index,verdict\na,b,0,reject\n".encode("utf-16"), "r.csv")


def test_check_review_prompts_and_slots() -> None:
    review = Review("r.csv", "h", (("a", "base", 1),))
    check_review(review, {"base": 2})
    with pytest.raises(InputError, match="prompt 'base', which this run does not ask"):
        check_review(review, {"base_zh": 1})
    with pytest.raises(InputError, match="--captions-per-image 2"):
        check_review(review, {"base": 1})


def test_plan_moves_missing_and_already() -> None:
    caps = [{"image_id": "a", "prompt_name": "base", "caption_index": "0", "caption": "x"},
            {"image_id": "a", "prompt_name": "base", "caption_index": "0", "caption": "twice"},
            {"image_id": "b", "prompt_name": "base", "caption_index": "0", "caption": "y"}]
    attrs = [{"image_id": "a", "prompt_name": "attributes", "caption_index": "0", "gender": "female"}]
    replaced = [{"image_id": "b", "prompt_name": "base", "caption_index": "0", "review_sha256": "h"}]
    review = Review("r.csv", "h", (("a", "base", 0), ("b", "base", 0), ("a", "attributes", 0), ("z", "base", 0)))
    plan = plan_redo(review, caps, attrs, replaced)
    assert [m.row.get("caption", m.row.get("gender")) for m in plan.moves] == ["x", "twice", "female"]
    assert plan.already == [("b", "base", 0)] and plan.missing == [("z", "base", 0)]
    other = plan_redo(Review("r2.csv", "other", review.rejected), caps, attrs, replaced)
    assert ("b", "base", 0) in other.keys  # another review may reject the new answer


def test_a_structured_answer_is_replaced_with_its_fields_as_json() -> None:
    row = {"image_id": "a", "prompt_name": "attributes", "timestamp": "t", "model": "m", "prompt_tokens": "3",
           "completion_tokens": "4", "cost_usd": "0.1", "caption_index": "0", "prompt_hash": "p",
           "gender": "female", "upper_color": "红"}
    rec = dict(zip(REPLACED_COLUMNS, replaced_record(Move("attributes.csv", row), "when", "r.csv", "h")))
    assert json.loads(rec["caption"]) == {"gender": "female", "upper_color": "红"}
    assert (rec["cost_usd"], rec["prompt"], rec["replaced_at"], rec["review_sha256"]) == ("0.1", "", "when", "h")


# --- through the CLI, offline ------------------------------------------------------------------------------

def test_rejected_captions_are_asked_again_and_the_old_rows_kept(cli, index, done, tmp_path) -> None:
    out, before = done
    rejected = three_rejected(out)
    accepted = next(k for k in before if k not in rejected)
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in rejected] + [(*accepted, "accept")])
    res = offline(cli, index, out, "--redo", review)
    assert res.code == 0, res.err
    assert "3 rejected captions moved to captions_replaced.csv" in res.err
    assert "captioned 3, skipped 19" in res.out
    check_moved(out, before, rejected)
    replaced = rows(out / "captions_replaced.csv")
    assert {r["review_file"] for r in replaced} == {str(review)}
    # the same review again: nothing moves, nothing is asked (the rows now there are new answers)
    again = offline(cli, index, out, "--redo", review)
    assert again.code == 0 and "captioned 0" in again.out and "already moved" in again.err
    check_moved(out, before, rejected)
    # export reads captions_all.csv only: the replaced captions never reach the training data
    res = cli("export", "--out", out, "--format", "jsonl", "--to", tmp_path / "x.jsonl")
    assert res.code == 0, res.err
    assert len((tmp_path / "x.jsonl").read_text(encoding="utf-8").splitlines()) == len(before)


def test_dry_run_counts_them_and_changes_nothing(cli, index, done, tmp_path) -> None:
    out, before = done
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in three_rejected(out)])
    files = folder_bytes(out)
    res = offline(cli, index, out, "--redo", review, "--dry-run")
    assert res.code == 0, res.err
    assert "3 rejected captions would be asked again (dry run: nothing is moved)" in res.err
    assert "19 done, 3 left" in res.out.replace("\n", " ")
    assert folder_bytes(out) == files


def test_a_review_rejecting_nothing_is_a_plain_resume(cli, index, done, tmp_path) -> None:
    out, before = done
    review = write_review(tmp_path / "review.csv", [(*k, "accept") for k in list(before)[:2]])
    res = offline(cli, index, out, "--redo", review)
    assert res.code == 0 and "rejects nothing (2 captions accepted): a plain resume" in res.err
    assert "captioned 0" in res.out and not (out / "captions_replaced.csv").exists()


def test_keys_not_in_the_folder_are_skipped_with_a_note(cli, index, done, tmp_path) -> None:
    out, before = done
    key = list(before)[2]
    review = write_review(tmp_path / "review.csv", [(*key, "reject"), ("nope.jpg", "base", 0, "reject")])
    res = offline(cli, index, out, "--redo", review)
    assert res.code == 0, res.err
    assert "1 rejected caption not in" in res.err and "nope.jpg / base / 0" in res.err
    check_moved(out, before, [key])


@pytest.mark.parametrize("case", ["missing", "columns", "verdict", "prompt", "slot", "other_folder"])
def test_bad_reviews_exit_2_in_one_line_and_change_nothing(cli, index, done, tmp_path, case: str) -> None:
    out, before = done
    key = list(before)[0]
    review = tmp_path / "review.csv"
    if case == "columns":
        review.write_text("image_id,prompt,caption_index,verdict\na,base,0,reject\n", encoding="utf-8")
    elif case == "verdict":
        write_review(review, [(*key, "bad")])
    elif case == "prompt":
        write_review(review, [(key[0], "base_zh", 0, "reject")])
    elif case == "slot":
        write_review(review, [(key[0], "base", 1, "reject")])
    elif case == "other_folder":
        write_review(review, [("x.jpg", "base", 0, "reject"), ("y.jpg", "base", 0, "reject")])
    files = folder_bytes(out)
    res = offline(cli, index, out, "--redo", review)
    assert res.code == 2, (res.out, res.err)
    errors = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.err, res.err
    assert {"missing": "no such file", "columns": "no column prompt_name", "verdict": "verdict 'bad'",
            "prompt": "which this run does not ask", "slot": "--captions-per-image 2",
            "other_folder": "none of its 2 rejected captions is in"}[case] in errors[0]
    assert folder_bytes(out) == files


# --- kill points, injected at the file layer ---------------------------------------------------------------

class Killed(SystemExit):
    """A kill -9 at this point: nothing after it runs (the CLI edge lets SystemExit through)."""


class KillAt:
    """Count the file operations of the move (journal, captions_replaced.csv, each part, captions_all.csv)
    and stop the process before or after operation `n`, or half-way through an append (`torn`)."""

    NAMES = (JOURNAL, "captions_replaced.csv", "captions_all.csv", "attributes.csv")

    def __init__(self, monkeypatch, n: int, when: str) -> None:
        self.n, self.when, self.seen = n, when, 0
        for module, name in ((appendfile, "write_new_file"), (appendfile, "append_bytes"),
                             (outputs, "write_csv_atomic")):
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name)))

    def ours(self, path) -> bool:
        name = Path(path).name
        return name in self.NAMES or name.startswith("captions_part_")

    def wrap(self, real):
        def op(path, *args, **kwargs):
            if not self.ours(path):
                return real(path, *args, **kwargs)
            self.seen += 1
            if self.seen == self.n and self.when == "before":
                raise Killed(137)
            if self.seen == self.n and self.when == "torn":  # half the bytes reach the disk, then the kill
                data = args[0]
                with open(path, "ab") as fh:
                    fh.write((args[1] if len(args) > 1 and Path(path).stat().st_size == 0 else b"") + data[:len(data) // 2])
                raise Killed(137)
            result = real(path, *args, **kwargs)
            if self.seen == self.n and self.when == "after":
                raise Killed(137)
            return result
        return op


# ops of a move of 3 rows from 3 parts: 1 journal, 2 captions_replaced.csv, 3-5 the parts, 6 captions_all.csv
# (op, when, the next run given --redo again or not): a journalled move is finished by any run
KILLS = [(1, "before", True), (1, "after", False), (2, "torn", True), (2, "after", False), (3, "after", True),
         (4, "after", False), (6, "before", True), (6, "after", False)]


@pytest.mark.parametrize("n, when, rerun_with_redo", KILLS)
def test_a_kill_at_any_point_of_the_move_loses_and_doubles_nothing(
    cli, index, done, tmp_path, monkeypatch, n: int, when: str, rerun_with_redo: bool
) -> None:
    out, before = done
    rejected = three_rejected(out)
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in rejected])
    with monkeypatch.context() as m:
        kill = KillAt(m, n, when)
        res = offline(cli, index, out, "--redo", review)
        assert res.code == 137 and kill.seen == n, (res.code, kill.seen, res.err)
    if not (out / JOURNAL).exists():  # killed before the journal was whole: nothing moved, nothing to finish
        assert keys_of(rows(out / "captions_all.csv")) == Counter(set(before))
        assert not (out / "captions_replaced.csv").exists()
        rerun_with_redo = True
    res = offline(cli, index, out, *(["--redo", review] if rerun_with_redo else []))
    assert res.code == 0, res.err
    assert "captioned 3, skipped 19" in res.out
    check_moved(out, before, rejected)
    if n > 1 or when == "after":
        assert "finished moving 3 rejected rows" in res.err


def test_a_file_that_cannot_be_written_stops_the_move_in_one_line_and_the_next_run_finishes_it(
    cli, index, done, tmp_path, monkeypatch
) -> None:
    out, before = done
    rejected = three_rejected(out)
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in rejected])
    real = outputs.write_csv_atomic

    def denied(path, *args, **kwargs):
        if Path(path).name == "captions_all.csv":  # Excel holds it open, say
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(outputs, "write_csv_atomic", denied)
        res = offline(cli, index, out, "--redo", review)
    assert res.code == 2, (res.out, res.err)
    assert res.err.strip().splitlines()[-1].startswith("error: cannot move rejected captions to "
                                                        "captions_replaced.csv: captions_all.csv: Permission denied")
    assert (out / JOURNAL).exists()
    res = offline(cli, index, out)
    assert res.code == 0 and "captioned 3, skipped 19" in res.out, res.err
    check_moved(out, before, rejected)


# --- recovery never brings a replaced row back -----------------------------------------------------------

@pytest.mark.parametrize("damage", ["none", "captions_all_deleted", "parts_deleted"])
def test_recovery_never_resurrects_a_replaced_row(cli, index, done, tmp_path, damage: str) -> None:
    out, before = done
    rejected = three_rejected(out)
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in rejected])
    notes: list[str] = []
    apply_redo(out, review, {"base": 1}, say=notes.append)  # the move alone, as prepare() calls it
    assert not set(rejected) & set(keys_of(rows(out / "captions_all.csv")))
    assert not set(rejected) & set(keys_of(parts_rows(out)))
    if damage == "captions_all_deleted":  # recovery rebuilds captions_all.csv from the parts
        (out / "captions_all.csv").unlink()
    elif damage == "parts_deleted":  # recovery rebuilds the parts from captions_all.csv
        for part in out.glob("captions_part_*.csv"):
            part.unlink()
    res = offline(cli, index, out)  # a plain run: recovery, then the done set
    assert res.code == 0, res.err
    assert "captioned 3, skipped 19" in res.out  # had a row come back, its key would count as done
    check_moved(out, before, rejected)


def test_a_caption_edited_by_hand_is_moved_and_its_old_copy_in_the_part_never_comes_back(
    cli, index, done, tmp_path
) -> None:
    out, before = done
    rejected = three_rejected(out)
    table = rows(out / "captions_all.csv")
    for r in table:
        if (r["image_id"], r["prompt_name"], int(r["caption_index"])) == rejected[0]:
            r["caption"] = "fixed by hand, \"quoted\", 红色"
    outputs.write_csv_atomic(out / "captions_all.csv", CAPTION_COLUMNS, ([r[c] for c in CAPTION_COLUMNS] for r in table))
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in rejected])
    res = offline(cli, index, out, "--redo", review)
    assert res.code == 0, res.err
    assert "captioned 3, skipped 19" in res.out
    replaced = by_key(rows(out / "captions_replaced.csv"))
    assert replaced[rejected[0]]["caption"] == "fixed by hand, \"quoted\", 红色"
    assert keys_of(parts_rows(out)) == keys_of(rows(out / "captions_all.csv")) == Counter(set(before))
    assert by_key(parts_rows(out)) == by_key(rows(out / "captions_all.csv"))  # the part: the new row only
    (out / "captions_all.csv").unlink()  # rebuilt from the parts
    res = offline(cli, index, out)
    assert res.code == 0 and "captioned 0" in res.out, res.err
    assert keys_of(rows(out / "captions_all.csv")) == Counter(set(before))


def test_held_answers_are_merged_before_the_move_so_they_cannot_bring_it_back(cli, index, done, tmp_path) -> None:
    """A merge of held answers killed before its pending file was deleted leaves rows that are both in
    captions_all.csv and in the pending file; the move must not let the next merge put them back."""
    out, before = done
    rejected = three_rejected(out)
    held = [[before[k][c] for c in CAPTION_COLUMNS] for k in rejected]
    save_pending(out, [HeldFile("captions_all.csv", CAPTION_COLUMNS, held)])
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in rejected])
    res = offline(cli, index, out, "--redo", review)
    assert res.code == 0, res.err
    assert "captioned 3, skipped 19" in res.out
    check_moved(out, before, rejected)
    assert not list(out.glob("pending-*.jsonl"))


# --- against the loopback server: requests, structured answers, money -------------------------------------

def loop(cli, server, index: Path, out: Path, *extra: object):
    return cli("run", "--index", index, "--out", out, "--base-url", server.base_url, "--no-dashboard",
               "--batch-size", 5, *extra)


def billed(server) -> float:
    return (server.stats.prompt_tokens * MINI_IN + server.stats.completion_tokens * MINI_OUT) / 1_000_000


def status_cost(cli, out: Path) -> float:
    res = cli("status", "--out", out, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out)["cost_usd"]


def test_over_the_sdk_one_request_per_rejected_caption_and_the_money_stays_counted(
    cli, server, api_env, index, tmp_path
) -> None:
    out = tmp_path / "out"
    prompt = ("--prompt-file", "base")
    assert loop(cli, server, index, out, *prompt).code == 0
    before = by_key(rows(out / "captions_all.csv"))
    first_run = billed(server)
    server.stats.reset()
    rejected = three_rejected(out)
    accepted = next(k for k in before if k not in rejected)
    review = write_review(tmp_path / "review.csv", [(*k, "reject") for k in rejected] + [(*accepted, "accept")])
    res = loop(cli, server, index, out, *prompt, "--redo", review)
    assert res.code == 0, res.err
    assert server.stats.requests == 3, (res.out, res.err)  # one request per rejected caption, none for the others
    check_moved(out, before, rejected)
    total = first_run + billed(server)
    # every paid row is on the books: captions_all.csv + captions_replaced.csv = what the server billed
    assert status_cost(cli, out) == pytest.approx(total, rel=1e-6)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["cost_usd_total"] == pytest.approx(total, rel=1e-6)
    # --max-cost counts the replaced rows: a budget of exactly what was paid leaves nothing for another redo
    server.stats.reset()
    again = write_review(tmp_path / "again.csv", [(*next(k for k in before if k not in rejected), "reject")])
    res = loop(cli, server, index, out, *prompt, "--redo", again, "--max-cost", status_cost(cli, out))
    assert res.code == 4, (res.out, res.err)
    assert server.stats.requests == 0


def test_a_structured_answer_moves_out_of_attributes_csv(cli, server, api_env, index, tmp_path) -> None:
    out = tmp_path / "out"
    prompt = ("--prompt-file", BUNDLED_PROMPTS_DIR / "attributes.json")
    assert loop(cli, server, index, out, *prompt).code == 0
    before = by_key(rows(out / "attributes.csv"))
    key = list(before)[5]
    server.stats.reset()
    review = write_review(tmp_path / "review.csv", [(*key, "reject")])
    res = loop(cli, server, index, out, *prompt, "--redo", review)
    assert res.code == 0, res.err
    assert server.stats.requests == 1
    now = rows(out / "attributes.csv")
    assert keys_of(now) == Counter(set(before))
    assert by_key(now)[key]["timestamp"] >= before[key]["timestamp"]
    (old,) = rows(out / "captions_replaced.csv")
    fields = json.loads(old["caption"])
    assert fields and all(before[key][f] == v for f, v in fields.items())
    assert (old["cost_usd"], old["timestamp"]) == (before[key]["cost_usd"], before[key]["timestamp"])
    for k, row in before.items():
        if k != key:
            assert by_key(now)[k] == row
