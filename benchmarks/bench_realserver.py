"""Adaptive concurrency against a real server nobody here wrote: `transformers serve` with a tiny VLM.

Needs the `realserver` extra (`pip install -e ".[realserver]"`). The tiny model is built offline
(`pipeline.testing.realserver`); the server computes one request at a time and keeps computing a request
the client abandoned, as the issue describes. Two figures, as ratios:

  (a) images/s of the pipeline at its adaptive concurrency (`--concurrency 16` as the ceiling) / the best
      fixed concurrency of a sweep over 1, 2, 4, 8, 16 (hidden `--fixed-concurrency`): goal >= 0.9;
  (b) requests sent (the pipeline's attempts) / images captioned, with `--timeout` below the latency a request sees
      at concurrency 16 (16 x the single-request latency; default --timeout = 8 x it): goal <= 1.1,
      next to the same run with a fixed pool of 16 (the cascade the issue reported).

Images/s = images captioned / (wall time - start-up), where start-up is a run of the same command on a
finished folder (it sends nothing).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

FIXED = (1, 2, 4, 8, 16)


def main(argv=None) -> int:
    p = common.make_parser("realserver", __doc__.splitlines()[0], images=150, quick_images=40, concurrency=16,
                           latency=0.0)
    p.add_argument("--max-tokens", type=int, default=8, help="answer length (default 8)")
    p.add_argument("--timeout", type=float, default=None, help="--timeout of part (b) (default 8 x latency)")
    a = p.parse_args(argv)
    try:
        from pipeline.testing.realserver import RealServer, build_tiny_vlm
    except ImportError:
        common.say("realserver: skipped (the realserver extra is not installed)")
        return 0
    n = common.images_wanted(a)
    paths = common.ensure_images(n)
    with common.Workdir("realserver", a.keep) as work:
        model_dir = build_tiny_vlm(Path(tempfile.mkdtemp(prefix="tiny-vlm-", dir=work)))
        index = common.write_index(paths, work)
        with RealServer.start(model_dir) as srv:
            base = ["--model", srv.model, "--provider", "vllm", "--max-tokens", str(a.max_tokens)]

            def run(tag: str, concurrency: int, extra: list[str], out: Path | None = None) -> dict:
                before = srv.requests_seen()
                r = common.run_pipeline(index, out or work / f"out-{tag}", srv.base_url, concurrency=concurrency,
                                        extra=base + extra, timeout_s=a.run_timeout)
                time.sleep(0.3)  # let the access log catch up
                captioned = r.counts.get("captioned_this_run") or 0
                # requests sent, as the pipeline counts its attempts: the server's access log only has the
                # ones it answered (a request abandoned by the client is computed but not logged)
                return {"tag": tag, "wall": r.proc.wall_s, "captioned": captioned, "rc": r.proc.rc,
                        "requests": r.counts.get("requests") or 0, "answered": srv.requests_seen() - before,
                        "limit": r.manifest.get("concurrency_limit"), "out": r.out}

            first = run("fixed-1", 1, ["--fixed-concurrency", "--timeout", "60"])
            startup = [run("startup", 1, ["--fixed-concurrency"], out=first["out"])["wall"] for _ in range(2)]
            start_s = statistics.median(startup)
            latency = max(0.005, (first["wall"] - start_s) / max(1, first["captioned"]))
            common.detail(f"start-up {start_s:.2f} s; single-request latency ~{latency * 1000:.0f} ms")

            def rate(r: dict) -> float:
                return r["captioned"] / max(1e-3, r["wall"] - start_s)

            sweep = {1: rate(first)}
            for c in FIXED[1:]:
                r = run(f"fixed-{c}", c, ["--fixed-concurrency", "--timeout", "60"])
                sweep[c] = rate(r)
            adaptive = run("adaptive", a.concurrency, ["--timeout", "60"])
            for c, v in sweep.items():
                common.detail(f"fixed {c:>2}: {v:.1f} img/s")
            common.detail(f"adaptive (ceiling {a.concurrency}): {rate(adaptive):.1f} img/s, limit {adaptive['limit']}")
            best_c = max(sweep, key=sweep.get)
            ratio_a = rate(adaptive) / sweep[best_c]

            timeout = a.timeout if a.timeout is not None else round(8 * latency, 3)
            tight = run("adaptive-timeout", a.concurrency, ["--timeout", str(timeout), "--max-attempts", "6"])
            fixed_tight = run("fixed16-timeout", a.concurrency,
                              ["--fixed-concurrency", "--timeout", str(timeout), "--max-attempts", "6"])
            ratio_b = tight["requests"] / max(1, tight["captioned"])
            ratio_f = fixed_tight["requests"] / max(1, fixed_tight["captioned"])
            common.detail(f"--timeout {timeout}s: adaptive {tight['requests']} requests / {tight['captioned']} "
                          f"captioned (server answered {tight['answered']}); fixed 16: {fixed_tight['requests']} / "
                          f"{fixed_tight['captioned']} (server answered {fixed_tight['answered']})")
        common.say(
            f"realserver: (a) adaptive/best-fixed={ratio_a:.2f} (adaptive {rate(adaptive):.1f} img/s vs fixed "
            f"c={best_c} {sweep[best_c]:.1f}) | (b) --timeout {timeout}s: requests/captioned adaptive="
            f"{ratio_b:.2f} ({tight['captioned']}/{n} captioned), fixed-16={ratio_f:.2f} "
            f"({fixed_tight['captioned']}/{n} captioned) | {n} images, max_tokens {a.max_tokens}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
