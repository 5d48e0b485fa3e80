"""`compare --retrieval clip` end to end with a tiny CLIP built offline (random weights, fixed seed).

Nothing is downloaded: the model is a `CLIPConfig` with a 1-layer, 32-wide text and vision tower saved
with `save_pretrained`, and its tokenizer a byte-pair `CLIPTokenizer` made from a vocabulary of single
letters (no merges) written in this file. Its scores mean nothing; the tests check the plumbing: the
query captions and gallery images the protocol picks, that the scores are what the same model and
`pipeline.review.retrieval.evaluate` give when called by hand, and the error lines.

Needs torch and transformers (the `eval` extra; the `realserver` extra CI installs has both). Without
them the module is skipped, except in CI (`CI` set), where that is an error so a broken install shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, prepare_index
from pipeline.testing import synth


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


MISSING = [m for m in ("torch", "transformers") if not _installed(m)]
if MISSING:
    if os.environ.get("CI"):
        pytest.fail(f"torch/transformers missing in CI ({', '.join(MISSING)}): pip install -e \".[test,realserver]\"",
                    pytrace=False)
    pytest.skip(f'needs the eval extra (pip install -e ".[eval]"; missing: {", ".join(MISSING)})',
                allow_module_level=True)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP model, tokenizer and image processor from class defaults, saved in `folder` (offline)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [*letters, *(c + "</w>" for c in letters), *".,!?'", *(p + "</w>" for p in ".,!?'")]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Gallery features are cached per test, never in the developer's ~/.cache; no hub is asked."""
    from pipeline.review.clip import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "clip-cache"))
    for k, v in OFFLINE_ENV.items():  # a local model folder needs no hub; never ask one
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def captioned(cli, tmp_path):
    """A small Market tree (4 test ids x (1 query + 2 gallery), junk, distractor) captioned offline."""
    root = tmp_path / "Market-1501-v15.09.15"
    synth.make_market_tree(root, n_ids=4, per_split=2)
    index = prepare_index(cli, root, tmp_path / "index.json")
    out = tmp_path / "cap"
    res = cli("run", "--index", index, "--out", out, "--prompt-file", "base", "--backend", "offline",
              "--no-dashboard")
    assert res.code == 0, res.err
    return out, index


def test_clip_scores_are_what_the_model_and_the_metric_give_by_hand(cli, captioned, tiny_clip, tmp_path):
    out, index = captioned
    save = tmp_path / "board.json"
    res = cli("compare", "--out", out, "--retrieval", "clip", "--clip-model", tiny_clip, "--save", save)
    assert res.code == 0, res.err
    board = json.loads(save.read_text(encoding="utf-8"))
    (row,) = board["rows"]
    got = row["retrieval"]
    assert board["retrieval"]["model"] == str(tiny_clip)
    assert "R1" in res.out and "mAP" in res.out

    # by hand: the query split's captions against the gallery split's images, the same model
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from pipeline.ledger.outputs import read_captions
    from pipeline.review.retrieval import evaluate

    images = json.loads(index.read_text(encoding="utf-8"))
    root = Path(images["root"])
    entries = images["images"]
    queries = [e for e in entries if e["split"] == "query"]
    gallery = [e for e in entries if e["split"] == "gallery"]
    captions = {r.image_id: r.caption for r in read_captions(out)}
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip)
    from PIL import Image

    def unit(x):
        x = x if hasattr(x, "norm") else x.pooler_output
        return (x / x.norm(dim=-1, keepdim=True)).numpy()

    with torch.inference_mode():
        t = unit(model.get_text_features(**proc(text=[captions[q["image_id"]] for q in queries],
                                                   return_tensors="pt", padding=True, truncation=True,
                                                   max_length=64)))
        ims = [Image.open(root / g["path"]).convert("RGB") for g in gallery]
        v = unit(model.get_image_features(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"]))
    want = evaluate(t @ v.T, [q["pid"] for q in queries], [q["camid"] for q in queries],
                    [g["pid"] for g in gallery], [g["camid"] for g in gallery])
    assert got["queries"] == want.queries == len(queries)
    assert got["gallery"] == len(gallery)
    assert got["mAP"] == pytest.approx(want.mAP, abs=1e-6)
    for k in (1, 5, 10):
        assert got[f"rank{k}"] == pytest.approx(want.ranks[k], abs=1e-6)


def test_a_folder_without_split_uses_one_query_per_person_camera(cli, tiny_clip, tmp_path):
    # a plain folder of Market-style names: no split in the index
    root = tmp_path / "crops"
    root.mkdir()
    for pid, cam, n in [(1, 1, 2), (1, 2, 1), (2, 1, 1), (2, 3, 2)]:
        upper, lower = synth.identity_colours(pid)
        for i in range(n):
            synth.make_crop(root / f"{pid:04d}_c{cam}s1_{i:06d}_01.jpg", upper=synth.PALETTE[upper],
                            lower=synth.PALETTE[lower], seed=i)
    index = prepare_index(cli, root, tmp_path / "index.json", "--dataset", "folder")
    out = tmp_path / "cap"
    assert cli("run", "--index", index, "--out", out, "--backend", "offline", "--no-dashboard").code == 0
    save = tmp_path / "b.json"
    res = cli("compare", "--out", out, "--retrieval", "clip", "--clip-model", tiny_clip, "--save", save)
    assert res.code == 0, res.err
    board = json.loads(save.read_text(encoding="utf-8"))
    assert "no query/gallery split" in board["retrieval"]["rule"]
    assert board["retrieval"]["query_images"] == 4      # one per (person, camera)
    assert board["retrieval"]["gallery"] == 6
    assert board["rows"][0]["retrieval"]["queries"] == 4  # every person has another camera


def test_gallery_features_are_cached_until_an_image_changes(cli, captioned, tiny_clip, tmp_path):
    out, index = captioned
    save = tmp_path / "b.json"
    args = ("compare", "--out", out, "--retrieval", "clip", "--clip-model", tiny_clip, "--save", save)
    first = cli(*args)
    assert first.code == 0 and "encoding" in first.err
    scores = json.loads(save.read_text(encoding="utf-8"))["rows"][0]["retrieval"]
    assert len(list((tmp_path / "clip-cache").glob("gallery-*.npy"))) == 1
    second = cli(*args)
    assert second.code == 0 and "from the cache" in second.err and "encoding" not in second.err
    assert json.loads(save.read_text(encoding="utf-8"))["rows"][0]["retrieval"] == scores
    # a gallery image rewritten (other pixels, other size) is a new gallery: encoded again
    entries = json.loads(index.read_text(encoding="utf-8"))
    g = next(e for e in entries["images"] if e["split"] == "gallery")
    synth.make_crop(Path(entries["root"]) / g["path"], upper=(250, 250, 0), lower=(0, 0, 250), size=(48, 96))
    third = cli(*args)
    assert third.code == 0 and "encoding" in third.err


def test_a_folder_of_query_captions_finds_the_gallery_in_the_dataset(cli, tiny_clip, tmp_path):
    """The usual way: only the query split is captioned; the gallery comes from the dataset root."""
    root = tmp_path / "Market-1501-v15.09.15"
    synth.make_market_tree(root, n_ids=4, per_split=2)
    full = json.loads(prepare_index(cli, root, tmp_path / "all.json").read_text(encoding="utf-8"))
    index = prepare_index(cli, root, tmp_path / "query.json", "--splits", "query")
    out = tmp_path / "cap"
    assert cli("run", "--index", index, "--out", out, "--backend", "offline", "--no-dashboard").code == 0
    save = tmp_path / "b.json"
    res = cli("compare", "--out", out, "--retrieval", "clip", "--clip-model", tiny_clip, "--save", save)
    assert res.code == 0, res.err
    board = json.loads(save.read_text(encoding="utf-8"))
    assert board["retrieval"]["gallery"] == sum(1 for e in full["images"] if e["split"] == "gallery")
    assert board["rows"][0]["retrieval"]["queries"] == 4


def test_an_unknown_clip_model_is_one_line(cli, captioned, tmp_path):
    """A missing folder is said before any folder is read (the hub's "Repo id must be ..." never shows);
    a folder without a model, when the model is loaded."""
    out, _ = captioned
    res = cli("compare", "--out", out, "--retrieval", "clip", "--clip-model", tmp_path / "no-such-model")
    assert res.code == 2 and res.out == ""
    assert res.err == (f"error: --clip-model {tmp_path / 'no-such-model'}: no such folder (a Hugging Face name "
                       f"is owner/name, e.g. openai/clip-vit-base-patch32)\n")
    (tmp_path / "empty").mkdir()
    res = cli("compare", "--out", out, "--retrieval", "clip", "--clip-model", tmp_path / "empty")
    assert res.code == 2
    assert res.err.startswith("error: cannot load the CLIP model") and res.err.count("\n") == 1
    assert "Traceback" not in res.err and "Repo id" not in res.err


def test_missing_extra_is_one_line_exit_2(captioned):
    """torch made unimportable (sys.modules[name] = None: the import fails as if it were not installed)."""
    out, _ = captioned
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from pipeline.cli import main\n"
            f"sys.exit(main(['compare', '--out', {str(out)!r}, '--retrieval', 'clip']))")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ('error: --retrieval clip needs the eval extra (missing: torch, transformers): '
                                'pip install ".[eval]"')
    assert p.stdout == ""


def test_clip_model_without_retrieval_is_refused(cli, captioned):
    out, _ = captioned
    res = cli("compare", "--out", out, "--clip-model", "x")
    assert res.code == 2 and res.err.startswith("error: --clip-model needs --retrieval clip")


def test_random_features_score_between_0_and_1():
    from pipeline.review.clip import Query, score_queries

    rng = np.random.default_rng(0)
    t = rng.normal(size=(3, 8))
    g = rng.normal(size=(5, 8))
    qs = [Query("a", 1, 1), Query("b", 2, 1), Query("c", 3, 1)]
    s = score_queries(t, qs, g, np.array([1, 1, 2, 2, 3]), np.array([2, 3, 2, 3, 2]))
    assert s.queries == 3 and 0 <= s.mAP <= 1
