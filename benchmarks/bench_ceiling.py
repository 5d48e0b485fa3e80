"""Ceiling: the highest images/s the pipeline reaches on this machine (server latency 0, no limits),
next to a bare openai-SDK client at the same concurrency, with the CPU each spends per request.

Target (from the issue): pipeline >= bare SDK, and >= 1,000 images/s at zero latency.

Clients, at each concurrency (default 64 and 256):
  pipeline           `python -m pipeline run` (its default transport: the SDK's aiohttp client)
  pipeline-httpx     the same with the hidden `--http-client httpx` (the SDK's default transport)
  bare-httpx         `AsyncOpenAI(max_retries=0)` + `chat.completions.create`, SDK default transport
  bare-aiohttp       the same with `http_client=openai.DefaultAioHttpClient()`

Rate = (requests - 1) / (last - first arrival at the server), best of --repeat runs (default 3,
interleaved; the median is printed too). CPU ms per request is the client process's
user + sys time (os.wait4 rusage of that child) divided by requests, whole process including start-up,
and "marginal": minus the CPU of the same client sending one image (start-up, imports, set-up), so it is
the cost per request alone. The server runs on the same 2 cores, so its CPU per request is printed too:
at zero latency client and server compete for the same cores. (Marginal server CPU: minus the CPU of
a server that answered one request.)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CLIENTS = ("pipeline", "pipeline-httpx", "bare-httpx", "bare-aiohttp")


def run_client(client: str, index: Path, out: Path, conc: int, a) -> dict:
    with common.Loopback("--latency", a.latency) as srv:
        if client.startswith("pipeline"):
            extra = ["--fixed-concurrency"] + (["--http-client", "httpx"] if client == "pipeline-httpx" else [])
            run = common.run_pipeline(index, out, srv.url, concurrency=conc, extra=extra, timeout_s=a.run_timeout)
            proc, done = run.proc, int(run.counts.get("captioned_this_run") or 0)
        else:
            bare = common.run_bare(index, srv.url, concurrency=conc, transport=client.split("-")[1],
                                   timeout_s=a.run_timeout)
            proc, done = bare.proc, int(bare.result.get("ok") or 0)
    st = srv.stats
    return {"client": client, "conc": conc, "rate": common.server_rate(st), "requests": st["requests"], "done": done,
            "cpu": proc.cpu_s, "wall": proc.wall_s, "server_cpu": srv.cpu_s}


def main(argv=None) -> int:
    p = common.make_parser("ceiling", __doc__.splitlines()[0], images=3000, quick_images=600, concurrency=64,
                           latency=0.0)
    p.add_argument("--concurrencies", default=None, help="comma-separated (default 64,256; --concurrency C "
                   "alone measures only C)")
    p.add_argument("--clients", default=",".join(CLIENTS), help=f"comma-separated subset of {', '.join(CLIENTS)}")
    p.add_argument("--repeat", type=int, default=None, help="measure each client this many times (interleaved) and "
                   "keep the best: zero-latency runs last seconds and a shared machine is noisy (default 3; "
                   "--quick 1)")
    a = p.parse_args(argv)
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3
    if a.concurrencies:
        concs = [int(c) for c in a.concurrencies.split(",") if c.strip()]
    elif any(x == "--concurrency" or x.startswith("--concurrency=") for x in (argv or sys.argv[1:])):
        concs = [a.concurrency]
    else:
        concs = [64] if a.quick else [64, 256]
    clients = [c.strip() for c in a.clients.split(",") if c.strip()]
    for c in clients:
        if c not in CLIENTS:
            p.error(f"unknown client {c!r}")
    n = common.images_wanted(a)
    paths = common.ensure_images(n)
    results: list[dict] = []
    with common.Workdir("ceiling", a.keep) as work:
        index = common.write_index(paths, work / "full")
        index1 = common.write_index(paths[:1], work / "one")
        startup: dict[str, float | None] = {}
        server_startup: list[float] = []
        for client in clients:  # start-up CPU: the same client sending one image
            r = run_client(client, index1, work / f"out-{client}-one", concs[0], a)
            startup[client] = r["cpu"]
            if r["server_cpu"] is not None:
                server_startup.append(r["server_cpu"])
        srv0 = min(server_startup) if server_startup else None
        best: dict[tuple[str, int], dict] = {}
        rates: dict[tuple[str, int], list[float]] = {}
        for rep in range(max(1, a.repeat)):  # repetitions interleaved, so a busy moment hits every client
            for conc in concs:
                for client in clients:
                    r = run_client(client, index, work / f"out-{client}-{conc}-{rep}", conc, a)
                    if a.repeat > 1:
                        common.detail(f"(run {rep + 1}: c={conc} {client} {r['rate']:.0f} img/s)")
                    key = (client, conc)
                    rates.setdefault(key, []).append(r["rate"])
                    if key not in best or (r["done"], r["rate"]) > (best[key]["done"], best[key]["rate"]):
                        best[key] = r
        for conc in concs:
            for client in clients:
                r = best[(client, conc)]
                req = max(1, r["requests"])
                cpu_ms = 1000.0 * r["cpu"] / req if r["cpu"] is not None else None
                st0 = startup.get(client)
                marg = 1000.0 * (r["cpu"] - st0) / req if r["cpu"] is not None and st0 is not None else None
                srv_ms = (1000.0 * (r["server_cpu"] - srv0) / req
                          if r["server_cpu"] is not None and srv0 is not None else None)
                r.update(cpu_ms=cpu_ms, marginal_ms=marg, server_ms=srv_ms)
                results.append(r)
                common.detail(
                    f"c={conc:<4} {client:<15} {r['rate']:7.0f} img/s  done={r['done']}/{n}  "
                    + (f"cpu={cpu_ms:.2f} ms/req (marginal {marg:.2f}, start-up {st0:.2f} s)  "
                       if cpu_ms is not None and marg is not None and st0 is not None else "cpu=n/a  ")
                    + (f"server cpu={srv_ms:.2f} ms/req (marginal)  " if srv_ms is not None else "")
                    + f"wall={r['wall']:.2f}s"
                    + (f"  (median of {len(rates[(client, conc)])}: {statistics.median(rates[(client, conc)]):.0f})"
                       if len(rates[(client, conc)]) > 1 else "")
                )
    complete = [r for r in results if r["done"] == n]
    if not complete:
        common.say("ceiling: no complete run")
        return 0

    def best_of(prefix: str) -> dict | None:
        rs = [r for r in complete if r["client"] == prefix]
        return max(rs, key=lambda r: r["rate"]) if rs else None

    pipe = best_of("pipeline")
    bare_best = max((r for r in complete if r["client"].startswith("bare")), key=lambda r: r["rate"], default=None)
    parts = []
    for name in clients:
        r = best_of(name)
        if r is None:
            parts.append(f"{name}=FAILED")
            continue
        ms = f" {r['marginal_ms']:.2f}ms/req" if r.get("marginal_ms") is not None else ""
        parts.append(f"{name}={r['rate']:.0f}img/s@c{r['conc']}{ms}")
    tail = ""
    if pipe is not None and bare_best is not None:
        tail = (f" ratio_pipeline/best_bare={pipe['rate'] / bare_best['rate']:.2f}"
                f" ({bare_best['client']}) pipeline/1000={pipe['rate'] / 1000:.2f}")
    common.say(f"ceiling: {' '.join(parts)}{tail} images={n} latency={a.latency:g}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
