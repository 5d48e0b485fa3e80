"""The offline backend: a colour baseline from the pixels, no key, no network."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
from PIL import Image

from conftest import REPO, prepare_index, rows
from pipeline.providers.offline import describe
from pipeline.testing import synth


@pytest.mark.parametrize("upper,lower", list(itertools.permutations(synth.PALETTE, 2))[::7])
def test_describe_names_upper_and_lower_colours(tmp_path, upper, lower):
    path = synth.make_crop(tmp_path / "0001_c1s1_000001_01.jpg", upper=synth.PALETTE[upper],
                           lower=synth.PALETTE[lower], seed=3)
    text = describe(Image.open(path).convert("RGB"))
    assert f"{upper} upper garment" in text and f"{lower} lower garment" in text


def test_offline_run_on_bundled_sample_needs_no_key(cli, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # would fail if anything were sent
    sample = tmp_path / "sample"
    shutil.copytree(REPO / "samples" / "Market-1501-sample", sample)
    index = prepare_index(cli, sample, tmp_path / "index.json")
    out = tmp_path / "out"
    args = ["run", "--index", index, "--out", out, "--prompt-file", "base",
            "--backend", "offline", "--no-dashboard", "--batch-size", 10]
    res = cli(*args)
    assert res.code == 0, res.err
    n = len(json.loads(index.read_text(encoding="utf-8"))["images"])
    table = rows(out / "captions_all.csv")
    assert len(table) == n and all("garment" in r["caption"] for r in table)
    assert {r["model"] for r in table} == {"offline-colour-baseline"}
    again = cli(*args)
    assert again.code == 0 and f"skipped {n}" in again.out
