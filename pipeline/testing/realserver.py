"""A real OpenAI-compatible server for tests and benchmarks: `transformers serve` with a tiny VLM built offline.

The loopback server is ours; this one is not. Hugging Face's `transformers serve` answers chat
completions with images the way a local vLLM/Ollama user's server does (ignores `n`, `response_format`
and `detail`, sends no rate-limit headers, handles one request at a time, 400 with `{"detail": ...}`
for a wrong model), so the end-to-end tests run the CLI against it.

Nothing is downloaded: `build_tiny_vlm` makes a LLaVA model (a 1-layer CLIP vision tower on 28x28
images, a 2-layer Llama of width 64, ~120k parameters) with random weights from a fixed seed, a
word-level tokenizer over a few dozen clothing words (so every answer is letters, never empty:
special tokens are suppressed in its generation config) and a processor, all from class defaults, and
saves them in a folder. The server is pinned to that folder (`transformers serve FOLDER`): the model
name a request must send is the folder path, exactly as given; any other name gets 400.

Needs the `realserver` extra (`pip install -e ".[test,realserver]"`: transformers[serving], torch).
One answer of 8 tokens takes ~20 ms on one CPU core; the server starts in ~5 s.

By hand (benchmarks, rehearsals)::

    python -m pipeline.testing.realserver --port 0
    # prints "LISTENING http://127.0.0.1:PORT/v1 MODEL <folder>", builds the model in that temp folder,
    # serves (GET /health answers once it is up) until Ctrl-C.

In tests: `RealServer.start(folder)` launches `python -m pipeline.testing.realserver --folder F --port P`
as a subprocess, waits for `/health`, and `stop()` ends it (terminate, then kill after a bound).
Importing this module imports neither torch nor transformers; only the subprocess does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SEED = 0
# Word-level vocabulary: whatever the random weights pick is a word, so captions are gibberish made of
# letters (the pipeline's `empty` check is exercised by the loopback server, not here).
WORDS = (
    "a person man woman wearing red blue black white green grey yellow brown pink purple shirt jacket "
    "coat trousers shorts skirt dress shoes bag backpack hat short long hair walking standing with and "
    "the in of dark light carrying young adult sleeve striped jeans boots"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant", ":"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ENV_OFFLINE = {
    "HF_HUB_OFFLINE": "1",            # never reach a hub: the model is a local folder
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",           # a 64-wide model gains nothing from threads; CI has 2 shared cores
}
HEALTH_TIMEOUT_S = 180.0  # torch import + model load; ~5 s on an idle machine, far more on a busy one
STOP_TIMEOUT_S = 10.0


def build_tiny_vlm(folder: Path, seed: int = SEED) -> Path:
    """Write a tiny LLaVA model, its tokenizer and processor into `folder` (offline, deterministic)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + ROLES)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=["<image>", "<|im_start|>", "</s>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # The PIL image processor needs no torchvision; 28x28 with 14-px patches = 4 image tokens.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, chat_template=CHAT_TEMPLATE,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["<|im_end|>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    # Greedy (deterministic for a given request) and never a special token: answers run to max_tokens.
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"],
        suppress_tokens=[vocab[s] for s in SPECIAL], max_new_tokens=16,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later; a clash fails loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(base: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:  # noqa: S310 (loopback URL)
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class RealServer:
    """`transformers serve` in a subprocess, pinned to a tiny model folder, on 127.0.0.1."""

    folder: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    _log: object = field(repr=False, default=None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        """The one model name this server accepts: the folder path it was started with."""
        return str(self.folder)

    @classmethod
    def start(cls, folder: Path, port: int | None = None, timeout: float = HEALTH_TIMEOUT_S) -> "RealServer":
        """Build the model in `folder` if it is not there, start the server, wait until `/health` answers."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        log_path = folder.parent / f"{folder.name}.serve.log"
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop())
        env = {**os.environ, **ENV_OFFLINE}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.testing.realserver", "--folder", str(folder), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        server = cls(folder=folder, port=port, proc=proc, log_path=log_path, _log=log)
        deadline = time.monotonic() + timeout
        root = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                server.stop()
                raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{server.log_tail()}")
            if _healthy(root):
                return server
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"transformers serve did not answer /health within {timeout:.0f} s:\n{server.log_tail()}")

    def requests_seen(self) -> int:
        """Chat completions the server has answered so far, from its access log (uvicorn's INFO lines)."""
        self._flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return text.count('"POST /v1/chat/completions HTTP/1.1"')

    def log_tail(self, n: int = 30) -> str:
        self._flush()
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _flush(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.flush()

    def stop(self) -> None:
        """End the server: terminate, wait a bounded time, then kill. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None and not self._log.closed:
            self._log.close()

    def __enter__(self) -> "RealServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(folder: Path, port: int, host: str = "127.0.0.1") -> None:
    """In this process: build the model if missing, then run `transformers serve` pinned to it."""
    for k, v in ENV_OFFLINE.items():
        os.environ.setdefault(k, v)
    if not (folder / "config.json").exists():
        build_tiny_vlm(folder)
    from transformers.cli.transformers import main as transformers_main

    # --log-level info: uvicorn's access lines let tests count the requests that reached the server.
    sys.argv = ["transformers", "serve", str(folder), "--host", host, "--port", str(port), "--device", "cpu",
                "--log-level", "info"]
    transformers_main()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.testing.realserver", description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=None, help="model folder (built there if missing; default: a temp folder)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    a = p.parse_args(argv)
    folder = a.folder or Path(tempfile.mkdtemp(prefix="reid-prompt-tinyvlm-")) / "tiny-vlm"
    port = a.port or free_port()
    if a.folder is None:
        print(f"LISTENING http://127.0.0.1:{port}/v1 MODEL {folder}", flush=True)
    try:
        _serve(folder, port)
    except KeyboardInterrupt:
        pass
    finally:
        if a.folder is None:  # the temp folder was ours
            shutil.rmtree(folder.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
