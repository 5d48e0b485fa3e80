"""Overhead: the pipeline's images/s divided by a bare openai-SDK client's, same server, same requests.

Server latency 0.2 s, concurrency 64, 2,000 images: at most concurrency / latency = 320 requests/s can be
in the air, so a ratio near 1.0 means the pipeline (image checks, limiter, retries, CSV writer, manifest)
costs nothing a plain `asyncio.gather` over `client.chat.completions.create(...)` would not.

Bare SDK = `openai.AsyncOpenAI(base_url, max_retries=0)` on the SDK's default transport, 64 workers, each
sending the prompt text + the image as a base64 data URL (detail low, max_tokens 300).

Rates are taken between the first and the last request arrival as the server saw them (start-up excluded);
wall time including interpreter start-up is printed too. Each side gets its own fresh server.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv=None) -> int:
    p = common.make_parser("overhead", __doc__.splitlines()[0], images=2000, quick_images=400, concurrency=64,
                           latency=0.2)
    p.add_argument("--repeat", type=int, default=1, help="measure each side this many times, alternating, and "
                   "keep each side's best (default 1)")
    a = p.parse_args(argv)
    n = common.images_wanted(a)
    paths = common.ensure_images(n)
    best: dict[str, dict] = {}
    with common.Workdir("overhead", a.keep) as work:
        index = common.write_index(paths, work)
        for rep in range(max(1, a.repeat)):
            with common.Loopback("--latency", a.latency) as srv:
                run = common.run_pipeline(index, work / f"out-{rep}", srv.url, concurrency=a.concurrency,
                                          extra=["--fixed-concurrency"], timeout_s=a.run_timeout)
            done = int(run.counts.get("captioned_this_run") or 0)
            pipe = {"rate": common.server_rate(srv.stats), "wall": run.proc.wall_s, "done": done,
                    "requests": srv.stats["requests"], "cpu": run.proc.cpu_s}
            with common.Loopback("--latency", a.latency) as srv:
                bare = common.run_bare(index, srv.url, concurrency=a.concurrency, timeout_s=a.run_timeout)
            bare_d = {"rate": common.server_rate(srv.stats), "wall": bare.proc.wall_s,
                      "done": int(bare.result.get("ok") or 0), "requests": srv.stats["requests"],
                      "cpu": bare.proc.cpu_s}
            for name, d in (("pipeline", pipe), ("bare_sdk", bare_d)):
                common.detail(
                    f"run {rep + 1} {name}: {d['rate']:.1f} img/s (server first->last arrival), "
                    f"{d['done'] / d['wall']:.1f} img/s wall incl. start-up ({d['wall']:.2f} s), "
                    f"done={d['done']}/{n} requests={d['requests']}"
                    + (f" cpu={d['cpu']:.2f}s" if d["cpu"] is not None else "")
                )
                if d["done"] == n and (name not in best or d["rate"] > best[name]["rate"]):
                    best[name] = d
    ideal = a.concurrency / a.latency if a.latency > 0 else float("inf")
    if "pipeline" not in best or "bare_sdk" not in best:
        common.say(f"overhead: incomplete run (pipeline={'ok' if 'pipeline' in best else 'FAILED'} "
                   f"bare_sdk={'ok' if 'bare_sdk' in best else 'FAILED'})")
        return 0
    pp, bb = best["pipeline"], best["bare_sdk"]
    common.detail(f"ideal (concurrency / latency) = {ideal:.0f} img/s: pipeline at {pp['rate'] / ideal:.2f}, "
                  f"bare SDK at {bb['rate'] / ideal:.2f} of it")
    wall_ratio = (n / pp["wall"]) / (n / bb["wall"])
    common.say(f"overhead: pipeline={pp['rate']:.1f} img/s bare_sdk={bb['rate']:.1f} img/s "
               f"ratio={pp['rate'] / bb['rate']:.2f} (wall incl. start-up: pipeline={pp['wall']:.2f}s "
               f"bare_sdk={bb['wall']:.2f}s ratio={wall_ratio:.2f}) images={n} concurrency={a.concurrency} "
               f"latency={a.latency:g}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
