"""The table `python -m pipeline probe` prints: what the server does, and what `run` will do about it."""

from __future__ import annotations

from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# What each finding means for a run, said where it changes the cost or the output.
_CONSEQUENCE = {
    ("n", "ignored"): "run asks one caption per request (--captions-per-image costs the image each time)",
    ("n", "rejected"): "run asks one caption per request (--captions-per-image costs the image each time)",
    ("json_schema", "ignored"): "structured prompts: answers are validated; the schema is not enforced",
    ("json_schema", "rejected"): "structured prompts need another fallback (json_object or the prompt)",
    ("rate_limit_headers", False): "no limits to learn: --concurrency is the only brake",
    ("usage", False): "token counts and costs are estimates, not the server's",
}


def _yes_no(value: Any) -> str:
    return {True: "yes", False: "no", None: "unknown"}.get(value, str(value))


def _style(value: Any) -> str:
    if value in (True, "honoured", "enforced", "accepted", "both"):
        return "green"
    if value in (False, "ignored", "rejected", "neither"):
        return "yellow"
    return ""


def render_probe(report: Mapping[str, Any], console: Console) -> None:
    """Print the probe's findings (`ProbeReport.to_dict()`): one row per question, then the latencies."""
    t = Table(title=f"reid-prompt probe: {report['model']} at {report['base_url']}", box=box.SIMPLE_HEAVY,
              show_header=False, title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    said = report.get("server_said") or {}

    def row(label: str, key: str, value: Any, text: str | None = None) -> None:
        cell = Text(text if text is not None else _yes_no(value), style=_style(value))
        extra = _CONSEQUENCE.get((key, value))
        if key in said:
            cell.append(f"  ({said[key]})", style="dim")
        if extra:
            cell.append(f"  -> {extra}", style="")
        t.add_row(label, cell)

    images = report.get("images") or {}
    image_text = Text()
    for i, (fmt, ok) in enumerate(images.items()):
        image_text.append(("" if i == 0 else ", ") + f"{fmt} {_yes_no(ok)}", style=_style(ok))
    t.add_row("base64 images", image_text)
    row("n (several choices)", "n", report.get("n"), report.get("n"))
    row("json_schema", "json_schema", report.get("json_schema"), report.get("json_schema"))
    row("json_object", "json_object", report.get("json_object"), report.get("json_object"))
    changes = report.get("detail_changes_tokens")
    detail = str(report.get("detail"))
    if changes is not None:
        detail += ", changes the prompt tokens" if changes else ", no effect on the prompt tokens"
    row("detail", "detail", report.get("detail"), detail)
    row("usage in answers", "usage", report.get("usage"))
    row("rate-limit headers", "rate_limit_headers", report.get("rate_limit_headers"))
    row("length parameter", "max_tokens_param", report.get("max_tokens_param"), report.get("max_tokens_param"))
    for concurrency, lv in (report.get("latency") or {}).items():
        p50 = "-" if lv.get("p50_s") is None else f"{lv['p50_s']:.3f} s"
        errors = f", {lv['errors']} failed" if lv.get("errors") else ""
        t.add_row(f"latency x{concurrency}", f"p50 {p50}, {lv.get('throughput_rps', 0):.2f} requests/s "
                                             f"({lv.get('requests', 0)} requests{errors})")
    rec = report.get("recommended_concurrency")
    measured = [int(c) for c in (report.get("latency") or {})]
    why = ("the highest level measured: throughput kept up with latency up to it" if measured and rec == max(measured)
           else "beyond it latency grows faster than throughput")
    t.add_row("recommended concurrency",
              Text(f"{rec}", style="bold").append(f"  ({why}; run --concurrency {rec})", style=""))
    t.add_row("requests sent", f"{report.get('requests_sent')} in {report.get('elapsed_s', 0):.1f} s")
    for note in report.get("notes") or []:
        t.add_row("note", Text(str(note)))
    console.print(t)
