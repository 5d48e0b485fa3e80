"""Adaptive concurrency against a single-stream backend: throughput against the best fixed pool, and no cascade.

Targets (from the issue), against the loopback server computing one request at a time (`--serve-slots 1`,
`--latency` seconds each, no rate-limit headers, an abandoned request keeps computing, as `transformers
serve` does):
  (a) images/s of the pipeline at its adaptive concurrency (`--concurrency 16` as the ceiling) / the best
      fixed concurrency found by sweeping 1, 2, 4, 8, 16 (hidden `--fixed-concurrency`): >= 0.9;
  (b) requests sent / images captioned with `--timeout` below the server's latency at concurrency 16
      (16 x latency; default --timeout 10 x latency): <= 1.1.
For contrast, (b) also runs the fixed pool of 16 on fewer images: the cascade the issue reported.

Images/s are taken as the server saw them: answers / (last answer - first arrival), so interpreter start-up
is left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FIXED = (1, 2, 4, 8, 16)


def one_run(tag: str, index: Path, work: Path, a, concurrency: int, extra: list[str]) -> dict:
    with common.Loopback("--latency", a.latency, "--serve-slots", a.serve_slots) as srv:
        run = common.run_pipeline(index, work / f"out-{tag}", srv.url, concurrency=concurrency, extra=extra,
                                  timeout_s=a.run_timeout)
    st = srv.stats
    answers = st.get("ok_answers", 0)
    first, last = st.get("first_arrival"), st.get("last_answer")
    span = (last - first) if first is not None and last is not None else 0.0
    rate = answers / span if span > 0 else 0.0
    c = run.counts
    captioned = c.get("captioned_this_run") or 0
    limit = run.manifest.get("concurrency_limit") or {}
    common.detail(
        f"{tag}: concurrency={concurrency}{' fixed' if '--fixed-concurrency' in extra else ' adaptive'} "
        f"captioned={captioned} failed={c.get('failed_this_run')} requests={st['requests']} "
        f"timeouts/abandoned={st['outcomes'].get('cancelled', 0)} img/s={rate:.2f} span={span:.1f}s "
        f"limit final={limit.get('final')} max={limit.get('max')} wall={run.proc.wall_s:.1f}s rc={run.proc.rc}"
    )
    return {"rate": rate, "requests": st["requests"], "captioned": captioned, "rc": run.proc.rc}


def main(argv=None) -> int:
    p = common.make_parser("adaptive", __doc__.splitlines()[0], images=100, quick_images=40, concurrency=16,
                           latency=0.1)
    p.add_argument("--timeout", type=float, default=None,
                   help="--timeout of part (b) (default 10 x latency: below the 16 x latency a request waits "
                        "at concurrency 16)")
    p.add_argument("--serve-slots", type=int, default=1,
                   help="requests the server computes at once (default 1: single-stream)")
    p.add_argument("--contrast-images", type=int, default=None,
                   help="images of the fixed-16 contrast run in (b) (default 40; 0: skip)")
    a = p.parse_args(argv)
    n = common.images_wanted(a)
    timeout = a.timeout if a.timeout is not None else 10 * a.latency
    contrast = min(n, a.contrast_images if a.contrast_images is not None else 40)
    paths = common.ensure_images(n)
    with common.Workdir("adaptive", a.keep) as work:
        index = common.write_index(paths, work)
        fixed = {c: one_run(f"fixed-{c}", index, work, a, c, ["--fixed-concurrency"]) for c in FIXED}
        adaptive = one_run("adaptive", index, work, a, a.concurrency, [])
        best_c = max(fixed, key=lambda c: fixed[c]["rate"])
        ratio_a = adaptive["rate"] / fixed[best_c]["rate"] if fixed[best_c]["rate"] > 0 else 0.0
        b = one_run("timeout-adaptive", index, work, a, a.concurrency, ["--timeout", timeout])
        ratio_b = b["requests"] / b["captioned"] if b["captioned"] else float("inf")
        tail = ""
        if contrast > 0:
            small = common.write_index(paths[:contrast], work / "contrast")
            f = one_run("timeout-fixed-16", small, work, a, a.concurrency, ["--timeout", timeout, "--fixed-concurrency"])
            tail = (f" | before (fixed {a.concurrency}, {contrast} images): {f['captioned']} captioned, "
                    f"requests/captioned={f['requests'] / f['captioned'] if f['captioned'] else float('inf'):.2f}")
    common.say(
        f"adaptive: server slots={a.serve_slots} latency={a.latency:g}s {n} images | (a) adaptive/best fixed (c={best_c}) "
        f"img/s = {adaptive['rate']:.2f}/{fixed[best_c]['rate']:.2f} = {ratio_a:.2f} [target >=0.9: "
        f"{'met' if ratio_a >= 0.9 else 'MISSED'}] | (b) --timeout {timeout:g}: requests/captioned = "
        f"{b['requests']}/{b['captioned']} = {ratio_b:.2f} [target <=1.1: {'met' if ratio_b <= 1.1 else 'MISSED'}]"
        + tail
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
