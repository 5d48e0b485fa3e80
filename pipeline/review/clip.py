"""`compare --retrieval clip`: text-to-image retrieval of query captions against gallery images with CLIP.

The researchers' own check of a prompt was exactly this (their earlier scripts): encode each query
image's caption with CLIP's text tower, each gallery image with its image tower, rank the gallery by
cosine similarity and score Rank-1/5/10 and mAP under the Market-1501 protocol
(`pipeline.review.retrieval`). A prompt whose captions name what tells people apart ranks the right
person higher, even with an off-the-shelf CLIP that was never trained on ReID captions.

Needs the optional `eval` extra (`pip install ".[eval]"`: transformers + torch, ~1.2 GB); without it
`--retrieval clip` is one `error:` line, exit 2. The model is `openai/clip-vit-base-patch32` unless
`--clip-model` names another (a hub name or a local folder saved with `save_pretrained`); it is loaded
with `CLIPModel` / `CLIPProcessor`, on the CPU unless torch sees a GPU. Gallery images are encoded once,
shared by every prompt, and their features cached for the next run (see `cache_dir`). Importing this
module imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.review.retrieval import QueryResult, RetrievalScores, rank_query, summarise

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
INSTALL_HINT = 'pip install ".[eval]"'
TEXT_BATCH = 128
IMAGE_BATCH = 64
QUERY_CHUNK = 512  # query rows scored at a time: 512 x 19,732 gallery floats is 40 MB


@dataclass(frozen=True)
class Query:
    """One caption as a query: its text and the person and camera of the image it describes."""

    text: str
    pid: int
    camid: int


@dataclass(frozen=True)
class GalleryImage:
    path: Path
    pid: int
    camid: int


def _import_extra() -> tuple[Any, Any]:
    """(torch, transformers), or a ConfigError naming the extra to install."""
    missing = []
    torch = transformers = None
    try:
        import torch  # type: ignore[no-redef]
    except ImportError:
        missing.append("torch")
    try:
        import transformers  # type: ignore[no-redef]
    except ImportError:
        missing.append("transformers")
    if missing:
        raise ConfigError(f"--retrieval clip needs the eval extra (missing: {', '.join(missing)}): {INSTALL_HINT}")
    return torch, transformers


def check_extra() -> None:
    """Fail early, before any folder is read, when the `eval` extra is not installed."""
    _import_extra()


def check_model_name(name: str) -> None:
    """Fail early on a `--clip-model` that names a local folder which is not there. A Hugging Face name is
    `owner/name` (one slash); anything absolute, starting with `.` or `~`, with a backslash or more slashes
    is a path, and the hub's own answer to it ("Repo id must be in the form ...") would only confuse."""
    path = Path(name).expanduser()
    looks_like_path = (path.is_absolute() or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--clip-model {name} is a file: give a model folder (saved with save_pretrained) "
                          f"or a Hugging Face name such as {DEFAULT_CLIP_MODEL}")
    if looks_like_path and not path.exists():
        raise ConfigError(f"--clip-model {name}: no such folder (a Hugging Face name is owner/name, "
                          f"e.g. {DEFAULT_CLIP_MODEL})")


class ClipEncoder:
    """A CLIP model and its processor: unit-length text and image features as numpy arrays."""

    def __init__(self, name: str) -> None:
        torch, transformers = _import_extra()
        self.name = name
        self._torch = torch
        # the hub's retry warnings and the loaders' progress bars are not for our user: a failure is said
        # once, below, as one line
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.model = transformers.CLIPModel.from_pretrained(name).eval()
            self.processor = transformers.CLIPProcessor.from_pretrained(name)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot load the CLIP model {name!r} (--clip-model): {first}") from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))

    @staticmethod
    def _features(output: Any) -> Any:
        """transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor."""
        return output if hasattr(output, "norm") else output.pooler_output

    def _unit(self, feats: Any) -> np.ndarray:
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return feats.detach().float().cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        with self._torch.inference_mode():
            for i in range(0, len(texts), TEXT_BATCH):
                batch = self.processor(text=list(texts[i:i + TEXT_BATCH]), return_tensors="pt", padding=True,
                                       truncation=True, max_length=self.max_length)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out.append(self._unit(self._features(self.model.get_text_features(**batch))))
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def encode_images(self, paths: Sequence[Path], progress: Callable[[int], None] | None = None) -> np.ndarray:
        from PIL import Image

        out = []
        with self._torch.inference_mode():
            for i in range(0, len(paths), IMAGE_BATCH):
                images = []
                for p in paths[i:i + IMAGE_BATCH]:
                    try:
                        with Image.open(p) as im:
                            images.append(im.convert("RGB"))
                    except OSError as exc:
                        raise InputError(f"gallery image {p} cannot be read: {exc}") from None
                batch = self.processor(images=images, return_tensors="pt")
                pixels = batch["pixel_values"].to(self.device)
                out.append(self._unit(self._features(self.model.get_image_features(pixel_values=pixels))))
                if progress is not None:
                    progress(min(i + IMAGE_BATCH, len(paths)))
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def score_queries(text_features: np.ndarray, queries: Sequence[Query], gallery_features: np.ndarray,
                  g_pids: np.ndarray, g_camids: np.ndarray) -> RetrievalScores:
    """Rank-k/mAP of unit-length query features against unit-length gallery features (cosine)."""
    results: list[QueryResult] = []
    for start in range(0, len(queries), QUERY_CHUNK):
        sims = text_features[start:start + QUERY_CHUNK] @ gallery_features.T
        for row, q in zip(sims, queries[start:start + QUERY_CHUNK]):
            r = rank_query(row, q.pid, q.camid, g_pids, g_camids)
            if r is not None:
                results.append(r)
    return summarise(results, len(queries) - len(results), len(g_pids))


# --------------------------------------------------------------------------------------------- gallery cache
# Market-1501's 19,732 gallery images take about an hour through ViT-B/32 on a laptop CPU; every
# `compare` of new prompts against the same gallery would pay it again. The features are kept in a cache
# folder under a key made of the model and each image's path, size and modification time, so a changed
# image or model is never served stale features.

CACHE_ENV = "REID_PROMPT_CACHE_DIR"


def cache_dir() -> Path:
    """$REID_PROMPT_CACHE_DIR, else the platform's user cache folder + reid-prompt/clip."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given)
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "reid-prompt" / "cache" / "clip"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reid-prompt" / "clip"


def gallery_key(model_name: str, paths: Sequence[Path]) -> str | None:
    """A digest of the model and the images (path, size, mtime); None when a file cannot be looked at."""
    h = hashlib.sha256(f"clip-gallery-v1\0{model_name}".encode("utf-8"))
    model_dir = Path(model_name)
    try:
        if model_dir.is_dir():  # a local model: its files' sizes and times, so a re-saved model is new
            for f in sorted(model_dir.iterdir()):
                st = f.stat()
                h.update(f"\0m{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8"))
        for p in paths:
            st = Path(p).stat()
            h.update(f"\0{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8"))
    except OSError:
        return None
    return h.hexdigest()[:32]


def load_cached(key: str | None, n: int) -> np.ndarray | None:
    if key is None:
        return None
    try:
        feats = np.load(cache_dir() / f"gallery-{key}.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return feats if feats.ndim == 2 and feats.shape[0] == n else None


def save_cached(key: str | None, feats: np.ndarray) -> None:
    """Best effort: a cache that cannot be written costs time next run, never this run's result."""
    if key is None:
        return
    folder = cache_dir()
    tmp = folder / f"gallery-{key}.{os.getpid()}.tmp.npy"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(tmp, feats, allow_pickle=False)
        os.replace(tmp, folder / f"gallery-{key}.npy")
    except OSError:
        tmp.unlink(missing_ok=True)


def clip_retrieval(encoder: ClipEncoder, queries: dict[str, list[Query]], gallery: Sequence[GalleryImage],
                   progress: Callable[[str], None] | None = None) -> dict[str, RetrievalScores]:
    """Scores per row label: each row's query captions against the one gallery (encoded once, cached)."""
    say = progress or (lambda _line: None)
    paths = [g.path for g in gallery]
    key = gallery_key(encoder.name, paths)
    g_feats = load_cached(key, len(gallery))
    if g_feats is not None:
        say(f"CLIP {encoder.name}: {len(gallery):,} gallery images' features from the cache ({cache_dir()})")
    else:
        say(f"CLIP {encoder.name}: encoding {len(gallery):,} gallery images ...")
        last = [time.monotonic()]

        def every_10s(n: int) -> None:
            if time.monotonic() - last[0] >= 10.0 or n == len(gallery):
                last[0] = time.monotonic()
                say(f"  {n:,} of {len(gallery):,} gallery images")

        g_feats = encoder.encode_images(paths, progress=every_10s)
        save_cached(key, g_feats)
    g_pids = np.array([g.pid for g in gallery], dtype=np.int64)
    g_cams = np.array([g.camid for g in gallery], dtype=np.int64)
    scores: dict[str, RetrievalScores] = {}
    for label, qs in queries.items():
        if not qs or not len(gallery):
            scores[label] = summarise([], len(qs), len(gallery))
            continue
        say(f"CLIP: {len(qs):,} captions of {label}")
        scores[label] = score_queries(encoder.encode_texts([q.text for q in qs]), qs, g_feats, g_pids, g_cams)
    return scores
