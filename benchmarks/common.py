"""Shared pieces of the benchmarks: cached synthetic images, the loopback server as a subprocess,
the pipeline as a subprocess (timed, with its own CPU time and peak RSS), and the bare-SDK client.

Everything talks to 127.0.0.1 only. Every subprocess is bounded by a timeout and stopped by its id.

Run as a script (`python benchmarks/common.py bare ...`) this file is the bare-SDK client that the
overhead and ceiling benchmarks compare the pipeline with; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
PROMPT_FILE = REPO / "pipeline" / "bundled" / "prompts" / "base.txt"  # the bundled base prompt (package data)
CACHE = Path(tempfile.gettempdir()) / "reid-prompt-bench"
IMAGES_PER_ID = {"train": 5, "query": 1, "gallery": 4}  # 10 images per identity pair
MODEL = "gpt-4o-mini"
DEFAULT_KEY = "sk-loopback-test"


# --------------------------------------------------------------------------------------------- output

def say(line: str) -> None:
    print(line, flush=True)


def detail(line: str) -> None:
    """An optional detail line (indented, so the one result line stands out)."""
    print("  " + line, flush=True)


def pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


# --------------------------------------------------------------------------------------------- images

def _lock(path: Path):
    """An exclusive lock on `path` (POSIX flock; a no-op elsewhere) so parallel runs share one cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_EX)
    except ImportError:  # pragma: no cover - Windows
        pass
    return fh


def ensure_images(n: int) -> list[Path]:
    """The first `n` images (sorted by file name) of a cached synthetic Market-1501 tree.

    The tree lives under the system temp dir and only grows: `make_market_tree` is deterministic and a
    tree with more identities is a superset of one with fewer, so the first `n` by name never change.
    Every image is distinct (its own seed), so the loopback server sees `n` different digests.
    """
    from pipeline.testing.synth import make_market_tree

    n_ids = -(-n // sum(IMAGES_PER_ID.values()))
    root = CACHE / "market"
    marker = CACHE / "market.ids"
    with _lock(CACHE / "market.lock"):
        have = int(marker.read_text().strip() or 0) if marker.exists() else 0
        if have < n_ids:
            t0 = time.perf_counter()
            print(f"  (generating {n_ids * 10:,} synthetic images into {root} once ...)", file=sys.stderr, flush=True)
            make_market_tree(root, n_ids, per_split=dict(IMAGES_PER_ID), with_junk=False)
            marker.write_text(str(n_ids))
            print(f"  (done in {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            have = n_ids
        listing = CACHE / f"market.list.{have}"
        if listing.exists():
            names = listing.read_text().splitlines()
        else:
            names = sorted(
                (str(p.relative_to(root)) for p in root.glob("*/*.jpg")),
                key=lambda s: (s.rpartition("/")[2], s),
            )
            listing.write_text("\n".join(names) + "\n")
    if len(names) < n:
        raise RuntimeError(f"image cache {root} has {len(names)} images, {n} needed")
    return [root / s for s in names[:n]]


def write_index(paths: Sequence[Path], folder: Path) -> Path:
    """A text index (one absolute path a line) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "index.txt"
    index.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    return index


# --------------------------------------------------------------------------------------------- CLI

def make_parser(name: str, description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The options every benchmark takes; `defaults` sets images, concurrency, latency, timeout."""
    p = argparse.ArgumentParser(prog=f"benchmarks/bench_{name}.py", description=description)
    p.add_argument("--images", type=int, default=None, help=f"images to caption (default {defaults.get('images')}; "
                   f"--quick {defaults.get('quick_images')})")
    p.add_argument("--concurrency", type=int, default=defaults.get("concurrency", 64),
                   help=f"requests in flight (default {defaults.get('concurrency', 64)})")
    p.add_argument("--latency", type=float, default=defaults.get("latency", 0.2),
                   help=f"server latency in seconds (default {defaults.get('latency', 0.2)})")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (fewer images)")
    p.add_argument("--keep", action="store_true", help="keep the temporary output folders")
    p.add_argument("--run-timeout", type=float, default=defaults.get("timeout", 600.0),
                   help="seconds any one pipeline or client run may take before it is stopped")
    p.set_defaults(_default_images=defaults.get("images"), _quick_images=defaults.get("quick_images"))
    return p


def images_wanted(a: argparse.Namespace) -> int:
    if a.images is not None:
        return a.images
    return a._quick_images if a.quick else a._default_images


class Workdir:
    """A temporary folder for indexes and output folders, removed at the end unless `keep`."""

    def __init__(self, name: str, keep: bool = False) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"reid-bench-{name}-"))
        self.keep = keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if self.keep:
            detail(f"kept {self.path}")
            return
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------- processes

@dataclass
class ProcResult:
    rc: int
    wall_s: float
    cpu_s: float | None  # user + sys of that process (and its waited-for children), from wait4
    maxrss_kb: float | None  # peak resident set, KiB
    timed_out: bool = False


def _maxrss_kb(ru) -> float:
    # Linux reports KiB, macOS bytes.
    return ru.ru_maxrss / 1024.0 if sys.platform == "darwin" else float(ru.ru_maxrss)


def run_measured(cmd: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None,
                 stdout=None, stderr=None, cwd: Path = REPO) -> ProcResult:
    """Run `cmd`, wait for it with os.wait4 so its own CPU time and peak RSS are known.

    os.wait4 reports exactly that child's rusage (RUSAGE_CHILDREN would also hold any other child this
    process has reaped, e.g. an earlier loopback server, whose peak RSS would mask the pipeline's).
    On timeout the child gets SIGTERM, then SIGKILL.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), env=env, stdout=stdout, stderr=stderr, cwd=str(cwd),
                            stdin=subprocess.DEVNULL)
    deadline = t0 + timeout_s
    timed_out = False
    if hasattr(os, "wait4"):
        sent_term = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                wall = time.monotonic() - t0
                proc.returncode = os.waitstatus_to_exitcode(status)
                return ProcResult(proc.returncode, wall, ru.ru_utime + ru.ru_stime, _maxrss_kb(ru), timed_out)
            now = time.monotonic()
            if now > deadline and not sent_term:
                timed_out = sent_term = True
                proc.send_signal(signal.SIGTERM)
                deadline = now + 20
            elif now > deadline:
                proc.kill()
                deadline = now + 3600
            time.sleep(0.02)
    try:  # pragma: no cover - platforms without wait4
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.terminate()
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return ProcResult(rc, time.monotonic() - t0, None, None, timed_out)


def _reap(proc: subprocess.Popen, timeout_s: float) -> float | None:
    """Wait for `proc` (SIGKILL after `timeout_s`); its CPU seconds where os.wait4 exists."""
    if not hasattr(os, "wait4"):  # pragma: no cover
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + 3600
        time.sleep(0.02)


class Loopback:
    """The loopback server in its own process: `python -m pipeline.testing.loopback --port 0 ...`.

    Its stdin is a pipe we hold open: if this process dies, the server sees EOF and stops by itself.
    `stop()` sends SIGTERM and parses the `STATS {json}` line.
    """

    def __init__(self, *args: str, any_key: bool = False) -> None:
        self.args = [str(a) for a in args]
        self.key = DEFAULT_KEY
        if any_key:
            self.args.append("--any-key")
        self.url = ""
        self.stats: dict[str, Any] = {}
        self.cpu_s: float | None = None  # the server's own CPU seconds (user + sys), after stop()
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._err = tempfile.TemporaryFile()

    def start(self, timeout_s: float = 30.0) -> "Loopback":
        cmd = [sys.executable, "-m", "pipeline.testing.loopback", "--host", "127.0.0.1", "--port", "0", *self.args]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                      cwd=str(REPO), text=True)

        def pump() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                self._lines.put(line.rstrip("\n"))
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self._abort()
                raise RuntimeError("loopback server did not start in time") from None
            if line is None:
                raise RuntimeError(f"loopback server exited: {self._stderr_tail()}")
            if line.startswith("LISTENING "):
                self.url = line.split(None, 1)[1].strip()
                if not self.url.startswith("http://127.0.0.1:"):
                    self._abort()
                    raise RuntimeError(f"loopback server is not on 127.0.0.1: {self.url}")
                return self

    def _abort(self) -> None:
        try:
            self.stop(timeout_s=10)
        except RuntimeError:
            pass

    def _stderr_tail(self) -> str:
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")[-2000:]

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        proc = self._proc
        if proc is None:
            return self.stats
        self._proc = None
        proc.send_signal(signal.SIGTERM)
        self.cpu_s = _reap(proc, timeout_s)
        deadline = time.monotonic() + 5
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("STATS "):
                self.stats = json.loads(line[6:])
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        self._err.close()
        if not self.stats:
            raise RuntimeError("loopback server printed no STATS line")
        return self.stats

    def __enter__(self) -> "Loopback":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            try:
                self.stop()
            except RuntimeError:
                if exc[0] is None:
                    raise


def server_span(stats: dict[str, Any]) -> float:
    """Seconds from the first to the last request arrival as the server saw them."""
    first, last = stats.get("first_arrival"), stats.get("last_arrival")
    if first is None or last is None:
        return 0.0
    return max(0.0, float(last) - float(first))


def server_rate(stats: dict[str, Any], count: int | None = None) -> float:
    """Requests per second between the first and the last arrival: (count - 1) / span.

    (count - 1) because the span runs from the first arrival to the last: n arrivals, n - 1 intervals.
    """
    n = int(stats.get("requests", 0) if count is None else count)
    span = server_span(stats)
    return (n - 1) / span if span > 0 and n > 1 else 0.0


# --------------------------------------------------------------------------------------------- pipeline

@dataclass
class PipelineRun:
    proc: ProcResult
    out: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""

    @property
    def counts(self) -> dict[str, Any]:
        return self.manifest.get("counts", {})


def run_pipeline(index: Path, out: Path, base_url: str, *, key: str = DEFAULT_KEY, concurrency: int = 64,
                 extra: Sequence[str] = (), timeout_s: float = 600.0) -> PipelineRun:
    """`python -m pipeline run ...` against the loopback server, timed; reads its manifest.json."""
    cmd = [
        sys.executable, "-m", "pipeline", "run", "--index", str(index), "--out", str(out),
        "--prompt-file", str(PROMPT_FILE), "--no-dashboard", "--base-url", base_url,
        "--concurrency", str(concurrency), "--model", MODEL, *[str(a) for a in extra],
    ]
    env = dict(os.environ)
    env["OPENAI_API_KEY"] = key
    env.pop("OPENAI_BASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / (out.name + ".log")
    with open(log, "wb") as fh:
        proc = run_measured(cmd, timeout_s=timeout_s, env=env, stdout=fh, stderr=subprocess.STDOUT)
    manifest: dict[str, Any] = {}
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    tail = log.read_text(encoding="utf-8", errors="replace")[-1500:] if log.exists() else ""
    run = PipelineRun(proc, out, manifest, tail)
    if proc.rc != 0 or proc.timed_out:
        detail(f"WARNING pipeline exit code {proc.rc}{' (timed out)' if proc.timed_out else ''}; log tail:")
        for line in tail.splitlines()[-8:]:
            detail("    " + line)
    return run


def outcome_check(out: Path, index_paths: Sequence[Path]) -> dict[str, int]:
    """Every image once in captions_all.csv or errors.csv, never both, never twice."""
    from collections import Counter

    from pipeline.ledger.outputs import CAPTION_COLUMNS, CAPTIONS_ALL, ERROR_COLUMNS, ERRORS, read_table

    from pipeline.ledger.costs import is_failure

    caps = read_table(out / CAPTIONS_ALL, expect_columns=CAPTION_COLUMNS)
    errs = read_table(out / ERRORS, expect_columns=ERROR_COLUMNS)
    c_ids = Counter(r["image_id"] for r in caps.rows)
    # errors.csv also holds the bills of answers that were no caption and got another try
    # (`refused_retried`): those are not failures of the item
    e_ids = Counter(r["image_id"] for r in errs.rows if is_failure(r.get("reason", "")))
    ids = set(c_ids) | set(e_ids)
    return {
        "images": len(index_paths),
        "captioned": len(c_ids),
        "errors": len(e_ids),
        "accounted": len(ids),
        "missing": max(0, len(index_paths) - len(ids)),
        "duplicates": sum(v - 1 for v in c_ids.values() if v > 1) + sum(v - 1 for v in e_ids.values() if v > 1),
        "both": len(set(c_ids) & set(e_ids)),
        "torn_or_bad": caps.cut_bytes + errs.cut_bytes + caps.bad_rows + errs.bad_rows,
    }


# --------------------------------------------------------------------------------------------- bare SDK

@dataclass
class BareRun:
    proc: ProcResult
    result: dict[str, Any]


def run_bare(index: Path, base_url: str, *, key: str = DEFAULT_KEY, concurrency: int = 64,
             transport: str = "httpx", timeout_s: float = 600.0) -> BareRun:
    """The bare-SDK client (this file as a script) in its own process, timed like the pipeline."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "bare", "--index", str(index), "--base-url", base_url,
           "--concurrency", str(concurrency), "--transport", transport]
    env = dict(os.environ)
    env["OPENAI_API_KEY"] = key
    with tempfile.TemporaryFile() as fh, tempfile.TemporaryFile() as eh:
        proc = run_measured(cmd, timeout_s=timeout_s, env=env, stdout=fh, stderr=eh)
        fh.seek(0)
        text = fh.read().decode("utf-8", "replace")
        eh.seek(0)
        err = eh.read().decode("utf-8", "replace")
    result: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("BARE "):
            result = json.loads(line[5:])
    if proc.rc != 0 or not result:
        detail(f"WARNING bare SDK exit code {proc.rc}: {err[-800:]}")
    return BareRun(proc, result)


async def _bare_main(a: argparse.Namespace) -> dict[str, Any]:
    import base64

    import openai

    paths = [Path(line.strip()) for line in Path(a.index).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompt = PROMPT_FILE.read_text(encoding="utf-8").strip()
    kwargs: dict[str, Any] = {"base_url": a.base_url, "max_retries": 0, "timeout": 60.0}
    if a.transport == "aiohttp":
        kwargs["http_client"] = openai.DefaultAioHttpClient()
    client = openai.AsyncOpenAI(**kwargs)
    it = iter(paths)
    ok = 0
    errors: dict[str, int] = {}

    async def worker() -> None:
        nonlocal ok
        for path in it:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            try:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}", "detail": "low"}},
                    ]}],
                    max_tokens=300,
                )
                ok += 1
            except openai.OpenAIError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    import asyncio

    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    cpu1, t1 = time.process_time(), time.monotonic()
    await client.close()
    return {"images": len(paths), "ok": ok, "errors": errors, "loop_wall_s": t1 - t0, "loop_cpu_s": cpu1 - cpu0,
            "transport": a.transport, "openai": openai.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/common.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bare", help="bare AsyncOpenAI client: chat.completions.create with N workers")
    b.add_argument("--index", required=True)
    b.add_argument("--base-url", required=True)
    b.add_argument("--concurrency", type=int, default=64)
    b.add_argument("--transport", choices=["httpx", "aiohttp"], default="httpx")
    sub.add_parser("images", help="make sure the image cache holds N images").add_argument("n", type=int)
    a = p.parse_args(argv)
    if a.cmd == "bare":
        if not a.base_url.startswith("http://127.0.0.1:"):
            p.error("the bare client only talks to 127.0.0.1")
        import asyncio

        print("BARE " + json.dumps(asyncio.run(_bare_main(a))), flush=True)
        return 0
    print(len(ensure_images(a.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
