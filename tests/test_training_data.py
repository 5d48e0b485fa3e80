"""Several prompts and captions per image, structured attributes, exports and the report, end to end."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import prepare_index, rows
from pipeline.data.prompts import BUNDLED_PROMPTS_DIR
from pipeline.ledger.costs import is_failure
from pipeline.testing.loopback import expected_json


@pytest.fixture
def indexed(cli, market, tmp_path):
    return prepare_index(cli, market, tmp_path / "index.json")


def run(cli, server, index: Path, out: Path, *extra: object):
    return cli("run", "--index", index, "--out", out, "--base-url", server.base_url, "--no-dashboard", *extra)


def n_images(index: Path) -> int:
    return len(json.loads(index.read_text(encoding="utf-8"))["images"])


def test_several_prompt_files_and_captions_keyed_and_resumed(cli, server, api_env, indexed, tmp_path):
    out = tmp_path / "out"
    base, zh = BUNDLED_PROMPTS_DIR / "base.txt", BUNDLED_PROMPTS_DIR / "base_zh.txt"
    res = run(cli, server, indexed, out, "--prompt-file", base, "--prompt-file", zh, "--captions-per-image", 2)
    assert res.code == 0, res.err
    table = rows(out / "captions_all.csv")
    n = n_images(indexed)
    assert len(table) == n * 2 * 2
    keys = Counter((r["image_id"], r["prompt_name"], r["caption_index"]) for r in table)
    assert set(keys.values()) == {1}
    assert {r["prompt_name"] for r in table} == {"base", "base_zh"}
    assert any("中" in r["prompt"] or "请" in r["prompt"] for r in table if r["prompt_name"] == "base_zh")
    # remove one caption slot of one image: the rerun asks only for that one
    kept = [r for r in table if not (r["image_id"] == table[0]["image_id"] and r["prompt_name"] == "base_zh"
                                     and r["caption_index"] == "1")]
    from pipeline.ledger.outputs import CAPTION_COLUMNS, write_csv_atomic

    write_csv_atomic(out / "captions_all.csv", CAPTION_COLUMNS, ([r[c] for c in CAPTION_COLUMNS] for r in kept))
    # ... and from its part, which would otherwise give the paid row back to captions_all.csv
    slots = {(r["image_id"], r["prompt_name"], r["caption_index"]) for r in kept}
    for part in out.glob("captions_part_*.csv"):
        part_rows = [r for r in rows(part) if (r["image_id"], r["prompt_name"], r["caption_index"]) in slots]
        write_csv_atomic(part, CAPTION_COLUMNS, ([r[c] for c in CAPTION_COLUMNS] for r in part_rows))
    sent = server.stats.requests
    res = run(cli, server, indexed, out, "--prompt-file", base, "--prompt-file", zh, "--captions-per-image", 2)
    assert res.code == 0, res.err
    assert server.stats.requests == sent + 1
    assert len(rows(out / "captions_all.csv")) == n * 4


def test_templated_prompt_gives_each_caption_its_own_shape(cli, server, api_env, indexed, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("templated.txt", "templated.templates.txt"):
        shutil.copy(BUNDLED_PROMPTS_DIR / name, prompts / name)
    res = run(cli, server, indexed, out, "--prompts", prompts, "--captions-per-image", 3)
    assert res.code == 0, res.err
    table = rows(out / "captions_all.csv")
    assert len(table) == 3 * n_images(indexed)
    by_image: dict[str, set[str]] = {}
    for r in table:
        assert "{template}" not in r["prompt"]
        by_image.setdefault(r["image_id"], set()).add(r["prompt"])
    assert all(len(p) == 3 for p in by_image.values())  # three different sentence shapes per image
    assert len({p for ps in by_image.values() for p in ps}) > 10
    # stable: a fresh folder renders exactly the same prompts
    again = tmp_path / "again"
    assert run(cli, server, indexed, again, "--prompts", prompts, "--captions-per-image", 3).code == 0
    assert sorted((r["image_id"], r["caption_index"], r["prompt"]) for r in rows(again / "captions_all.csv")) == \
        sorted((r["image_id"], r["caption_index"], r["prompt"]) for r in table)


def test_structured_attributes_to_attributes_csv(cli, server, api_env, market, indexed, tmp_path):
    out = tmp_path / "out"
    schema_file = BUNDLED_PROMPTS_DIR / "attributes.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))["schema"]
    server.configure(p_invalid_json=0.3, seed=5)
    res = run(cli, server, indexed, out, "--prompt-file", schema_file, "--max-attempts", 6)
    attrs = rows(out / "attributes.csv")
    # errors.csv also holds the bills of invalid answers that got one more try (`invalid_retried`)
    errs = [e for e in rows(out / "errors.csv") if is_failure(e["reason"])]
    assert res.code == (1 if errs else 0), res.err
    n = n_images(indexed)
    assert len(attrs) + len(errs) == n and len(attrs) >= n // 2
    assert not (out / "captions_all.csv").exists() or rows(out / "captions_all.csv") == []
    for e in errs:
        assert e["reason"] == "invalid"
        assert e["attempts"] == "2"
    root = market
    for r in attrs:
        want = expected_json((root / r["image_id"]).read_bytes(), schema)
        assert r["gender"] == want["gender"] and r["upper_color"] == want["upper_color"]
        assert r["hat"] in ("yes", "no")
        assert r["prompt_name"] == "attributes"
    # rerun: only the invalid ones are asked again
    server.configure(p_invalid_json=0.0)
    sent = server.stats.requests
    assert run(cli, server, indexed, out, "--prompt-file", schema_file).code == 0
    assert server.stats.requests == sent + len(errs)
    assert len(rows(out / "attributes.csv")) == n


def _irra_cuhk(path: Path) -> list[tuple[int, str, str]]:
    """IRRA's CUHK-PEDES reader, from its published field names: train pid = id - 1, contiguous."""
    annos = json.loads(path.read_text(encoding="utf-8"))
    train = [a for a in annos if a["split"] == "train"]
    out = []
    for a in train:
        pid = int(a["id"]) - 1
        for c in a["captions"]:
            out.append((pid, a["file_path"], c))
        assert len(a["processed_tokens"]) == len(a["captions"])
    pids = sorted({p for p, _, _ in out})
    assert pids == list(range(len(pids)))
    return out


def test_exports_load_with_reid_loaders_and_report(cli, server, api_env, market, indexed, tmp_path):
    out = tmp_path / "out"
    res = run(cli, server, indexed, out, "--prompt-file", BUNDLED_PROMPTS_DIR / "cuhk_pedes.txt",
              "--captions-per-image", 2)
    assert res.code == 0, res.err
    images = json.loads(indexed.read_text(encoding="utf-8"))["images"]
    id_images = [im for im in images if im["pid"] not in (-1, 0)]
    train_pids = {im["pid"] for im in id_images if im["split"] == "train"}

    res = cli("export", "--out", out, "--format", "cuhk-pedes", "--to", tmp_path / "reid_raw.json")
    assert res.code == 0, res.err
    tuples = _irra_cuhk(tmp_path / "reid_raw.json")
    assert len({p for p, _, _ in tuples}) == len(train_pids)
    assert len(tuples) == 2 * sum(1 for im in id_images if im["split"] == "train")
    cuhk = json.loads((tmp_path / "reid_raw.json").read_text(encoding="utf-8"))
    assert {a["split"] for a in cuhk} == {"train", "test"}
    assert all(not a["file_path"].startswith("bounding_box_test/-1") for a in cuhk)  # junk left out

    res = cli("export", "--out", out, "--format", "icfg-pedes", "--to", tmp_path / "icfg.json")
    assert res.code == 0, res.err
    icfg = json.loads((tmp_path / "icfg.json").read_text(encoding="utf-8"))
    assert {a["split"] for a in icfg} <= {"train", "test"} and min(a["id"] for a in icfg) == 0

    res = cli("export", "--out", out, "--format", "rstpreid", "--to", tmp_path / "data_captions.json",
              "--val-from-train", "0.5")
    assert res.code == 0, res.err
    rst = json.loads((tmp_path / "data_captions.json").read_text(encoding="utf-8"))
    assert set(rst[0]) == {"id", "img_path", "captions", "split"}
    train_ids = {a["id"] for a in rst if a["split"] == "train"}
    val_ids = {a["id"] for a in rst if a["split"] == "val"}
    assert train_ids and val_ids and not train_ids & val_ids
    assert all(len(a["captions"]) == 2 for a in rst)

    res = cli("export", "--out", out, "--format", "jsonl")
    assert res.code == 0, res.err
    lines = (out / "export_jsonl.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == len(images)
    assert all({"image_id", "pid", "camid", "split", "captions"} <= set(r) for r in recs)

    bad = cli("export", "--out", out, "--format", "coco")
    assert bad.code != 0 and bad.err.startswith("error:") and "cuhk-pedes" in bad.err

    rep = cli("report", "--out", out)
    assert rep.code == 0, rep.err
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved and "vocabulary" in json.dumps(saved)
