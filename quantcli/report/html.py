"""Self-contained HTML report: inline CSS and hand-drawn inline SVG, nothing fetched."""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np

from quantcli.report import markdown as md

MAX_BARS = 30
_W, _LABEL, _ROW = 760, 220, 18  # chart width, label column, bar row height (px)
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}.pass{color:#17803d}
.fail{color:#b3261e;font-weight:bold}svg text{font:11px sans-serif;fill:#333}
.verdict{font-size:1.2em}code{background:#f5f5f5;padding:0 3px}
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _color(sqnr: float | None, identical: bool) -> str:
    if identical or (sqnr is not None and sqnr >= 30):
        return "#4caf50"
    return "#f0a030" if sqnr is not None and sqnr >= 20 else "#d9483b"


def sqnr_chart(layers: list[dict[str, Any]]) -> str:
    """Horizontal bars of per-layer SQNR, worst first; colour bands at 20 and 30 dB."""
    shown = layers[:MAX_BARS]
    finite = [x["sqnr_db"] for x in shown if x["sqnr_db"] is not None]
    top = max([40.0, *finite])  # a common scale; identical layers get a full bar
    span = _W - _LABEL - 60
    rows = []
    for i, x in enumerate(shown):
        value, same = x["sqnr_db"], x["identical"]
        length = span if same else max(0.0, min(value or 0.0, top)) / top * span
        y = i * _ROW
        label = x["name"] if len(x["name"]) <= 32 else "…" + x["name"][-31:]
        text = md.sqnr(value, same)
        rows.append(
            f"<g><title>{escape(x['name'])} ({escape(x['op_type'])}): {text} dB</title>"
            f'<text x="{_LABEL - 6}" y="{y + 13}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{_LABEL}" y="{y + 3}" width="{length:.1f}" height="{_ROW - 5}" '
            f'fill="{_color(value, same)}"/>'
            f'<text x="{_LABEL + length + 4:.1f}" y="{y + 13}">{text}</text></g>'
        )
    height = len(shown) * _ROW + 22
    for db in range(0, int(top) + 1, 10):  # gridlines, drawn first so they sit behind
        gx = _LABEL + db / top * span
        rows.insert(
            0,
            f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="0" y2="{height - 16}" stroke="#ddd"/>'
            f'<text x="{gx:.1f}" y="{height - 4}" text-anchor="middle">{db} dB</text>',
        )
    return (
        f'<svg class="chart sqnr" width="{_W}" height="{height}" '
        f'viewBox="0 0 {_W} {height}" role="img">{"".join(rows)}</svg>'
    )


def _box_stats(samples: list[float]) -> tuple[np.ndarray, list[float]]:
    """Samples, and q1, median, q3 and the whisker ends (furthest within 1.5·IQR)."""
    s = np.asarray(samples or [0.0], dtype=np.float64)
    q1, med, q3 = np.percentile(s, [25, 50, 75])
    reach = 1.5 * (q3 - q1)
    inside = s[(s >= q1 - reach) & (s <= q3 + reach)]
    return s, [q1, med, q3, float(inside.min()), float(inside.max())]


def latency_chart(lat: dict[str, Any]) -> str:
    """Box plots of both models' run times on one axis: IQR box, median, 1.5·IQR whiskers.

    The axis spans the whiskers and 95% of the runs, so a few stalls do not squash the
    boxes; slower runs beyond it are counted at the edge.
    """
    series = [(k, *_box_stats(lat[k]["samples_ms"])) for k in ("float", "quant")]
    lo = min(st[3] for _, _, st in series)
    hi = max(max(st[4], float(np.percentile(s, 95))) for _, s, st in series)
    pad = (hi - lo) * 0.08 or max(hi * 0.05, 1e-3)
    lo, hi = max(0.0, lo - pad), hi + pad
    left, span = 70, _W - 150

    def x(t: float) -> float:
        return left + (min(max(t, lo), hi) - lo) / (hi - lo) * span

    parts = [_box(label, s, st, 10 + row * 50, x, hi) for row, (label, s, st) in enumerate(series)]
    for t in np.linspace(lo, hi, 6):
        parts.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="110" y2="115" stroke="#666"/>'
            f'<text x="{x(t):.1f}" y="128" text-anchor="middle">{t:.3g}</text>'
        )
    parts.append(f'<text x="{left + span / 2}" y="146" text-anchor="middle">ms per run</text>')
    return (
        f'<svg class="chart latency" width="{_W}" height="152" '
        f'viewBox="0 0 {_W} 152" role="img">{"".join(parts)}</svg>'
    )


def _box(label: str, s: np.ndarray, st: list[float], y: int, x: Any, hi: float) -> str:
    q1, med, q3, w_lo, w_hi = st
    mid = y + 18
    shown = s[((s < w_lo) | (s > w_hi)) & (s <= hi)]
    dots = "".join(
        f'<circle cx="{x(t):.1f}" cy="{mid}" r="2" fill="none" stroke="#555"/>' for t in shown
    )
    beyond = int((s > hi).sum())
    if beyond:
        dots += f'<text x="{x(hi) + 4:.1f}" y="{mid + 4}">+{beyond} slower</text>'
    color = "#5b8def" if label == "float" else "#f08a24"
    return (
        f"<g><title>{label}: median {med:.4g} ms, IQR {q1:.4g}–{q3:.4g} ms</title>"
        f'<text x="60" y="{mid + 4}" text-anchor="end">{label}</text>'
        f'<line x1="{x(w_lo):.1f}" x2="{x(w_hi):.1f}" y1="{mid}" y2="{mid}" stroke="#555"/>'
        f'<rect x="{x(q1):.1f}" y="{y + 6}" width="{max(x(q3) - x(q1), 1):.1f}" height="24" '
        f'fill="{color}" fill-opacity=".35" stroke="{color}"/>'
        f'<line x1="{x(med):.1f}" x2="{x(med):.1f}" y1="{y + 6}" y2="{y + 30}" '
        f'stroke="#222" stroke-width="2"/>{dots}</g>'
    )


def _verdict(d: dict[str, Any]) -> str:
    text = md.verdict(d)
    css = "fail" if text.startswith("FAILED") else "pass" if d["gates"] else ""
    return f'<p class="verdict {css}">Result: {escape(text)}</p>'


def render_html(d: dict[str, Any]) -> str:
    body = [
        "<h1>quantcli compare</h1>",
        _verdict(d),
        _table(["", "Float", "Quantized"], md.model_rows(d)),
        f"<p>Data: {escape(md.data_line(d))}.</p>",
        f"<p>Host: {escape(md.host_line(d))}.</p>",
        *(f"<p><strong>Warning:</strong> {escape(w)}</p>" for w in d.get("warnings", [])),
        "<h2>Outputs</h2>",
        _table(*md.output_rows(d)),
    ]
    if d["latency"]:
        lat = d["latency"]
        body += ["<h2>Latency</h2>", _table(*md.latency_rows(lat))]
        body += [f"<p>{escape(md.latency_note(lat))}</p>", latency_chart(lat)]
    if d["gates"]:
        head = ["Gate", "Threshold", "Value", "Result"]
        body += ["<h2>Gates</h2>", _table(head, md.gate_rows(d))]
    if d["layers"]:
        layers = d["layers"]
        shown = min(len(layers), MAX_BARS)
        body += [f"<h2>Per-layer SQNR (worst {shown} of {len(layers)})</h2>", sqnr_chart(layers)]
        body += [_table(["#", "Tensor", "Op", "SQNR dB", "Cosine"], md.layer_rows(layers))]
    if d["custom_metrics"]:
        rows = [[k, md.num(v, 6)] for k, v in d["custom_metrics"].items()]
        body += ["<h2>Custom metrics</h2>", _table(["Metric", "Value"], rows)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>quantcli compare</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
