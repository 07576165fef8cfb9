"""Markdown report of a `compare` result (the dict of CompareResult.to_dict())."""

from __future__ import annotations

from typing import Any

MAX_LAYERS = 20  # per-layer rows shown; the JSON report keeps them all


def num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def sqnr(x: float | None, identical: bool = False) -> str:
    if x is None:
        return "∞" if identical else "n/a"
    return f"{x:.1f}"


def rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def verdict(d: dict[str, Any]) -> str:
    gates = d["gates"]
    if not gates:
        return "no gates set"
    failed = [g["name"] for g in gates if not g["passed"]]
    return f"FAILED: {', '.join(failed)}" if failed else f"PASSED ({len(gates)} gates)"


def output_rows(d: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-output table, shared with the HTML report."""
    head = ["Output", "Cosine (mean)", "Cosine (global)", "SQNR dB", "Max abs err"]
    head += ["Mean abs err", "Top-1 agree", "Top-1 in top-5", "KL", "Acc float", "Acc quant"]
    head += ["Drop (pts)"]
    rows = []
    for o in d["outputs"]:
        c = o["classifier"] or {}
        rows.append(
            [
                o["name"],
                num(o["cosine_mean"], 6),
                num(o["cosine_global"], 6),
                sqnr(o["sqnr_db"], o["identical"]),
                num(o["max_abs_error"]),
                num(o["mean_abs_error"]),
                pct(c.get("top1_agreement")),
                pct(c.get("top1_in_top5")),
                num(c.get("kl_divergence_mean")),
                pct(c.get("accuracy_float")),
                pct(c.get("accuracy_quant")),
                num(c.get("accuracy_drop_points"), 3),
            ]
        )
    return head, rows


def model_rows(d: dict[str, Any]) -> list[list[str]]:
    f, q, lat = d["models"]["float"], d["models"]["quant"], d["latency"]
    ratio = num(d["models"]["size_ratio"], 3)
    rows = [
        ["Model", f["path"], q["path"]],
        ["Size", size(f["size_bytes"]), f"{size(q['size_bytes'])} (×{ratio})"],
    ]
    if lat:
        fl, ql = lat["float"], lat["quant"]
        rows.append(["Median latency", f"{num(fl['median_ms'])} ms", f"{num(ql['median_ms'])} ms"])
        rows.append(["Throughput", f"{rate(fl['throughput'])}/s", f"{rate(ql['throughput'])}/s"])
    return rows


def latency_rows(lat: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["Model", "Median ms", "p90 ms", "p99 ms", "Mean ms", "Throughput (samples/s)"]
    rows = [
        [
            label,
            *(num(s[k]) for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms")),
            rate(s["throughput"]),
        ]
        for label, s in (("float", lat["float"]), ("quant", lat["quant"]))
    ]
    return head, rows


def latency_note(lat: dict[str, Any]) -> str:
    return (
        f"Speedup ×{num(lat['speedup'], 3)} (per-run IQR ×{num(lat['speedup_q1'], 3)}"
        f"–×{num(lat['speedup_q3'], 3)}), {lat['runs']} interleaved runs after "
        f"{lat['warmup']} warm-up, batch {lat['batch_size']}, threads {lat['threads'] or 'auto'}."
    )


def gate_rows(d: dict[str, Any]) -> list[list[str]]:
    return [
        [g["name"], num(g["threshold"]), num(g["value"]), "pass" if g["passed"] else "FAIL"]
        for g in d["gates"]
    ]


def layer_rows(layers: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [str(i), x["name"], x["op_type"], sqnr(x["sqnr_db"], x["identical"]), num(x["cosine"], 6)]
        for i, x in enumerate(layers[:MAX_LAYERS], 1)
    ]


def data_line(d: dict[str, Any]) -> str:
    data = d["data"]
    extra = ", synthetic" if data["synthetic"] else ""
    extra += ", labelled" if data["labels"] else ""
    return f"{data['description']}: {data['num_samples']} samples{extra}"


def host_line(d: dict[str, Any]) -> str:
    """The host the figures come from, and whether the model is safe on x86 without VNNI."""
    host, check = d.get("host"), d.get("x86_saturation")
    text = "unknown"
    if host:
        kernels = {True: "int16 pair saturation", False: "int32 accumulation", None: "unknown"}
        text = (
            f"{host['cpu']} ({host['machine']}, int8: {host['int8_isa']}, u8s8 kernels: "
            f"{kernels[host['int16_saturation']]}); ONNX Runtime {host['onnxruntime']}, "
            f"{host['provider']}"
        )
    if check:
        safe = check["safe"]
        text += (
            "; quantized model: saturation-free on every x86 CPU"
            if safe
            else f"; quantized model: {len(check['nodes_at_risk']) + len(check['unchecked_nodes'])}"
            " nodes can saturate int16 pairs on x86 without VNNI"
        )
    return text


def _table(head: list[str], rows: list[list[str]]) -> str:
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |"

    return "\n".join([cells(head), "|" + "---|" * len(head), *map(cells, rows)])


def render_markdown(d: dict[str, Any]) -> str:
    parts = [
        "# quantcli compare",
        f"**Result: {verdict(d)}**",
        _table(["", "Float", "Quantized"], model_rows(d)),
        f"Data: {data_line(d)}.",
        f"Host: {host_line(d)}.",
        *(f"Warning: {w}" for w in d.get("warnings", [])),
        "## Outputs",
        _table(*output_rows(d)),
    ]
    if d["latency"]:
        parts += ["## Latency", _table(*latency_rows(d["latency"])), latency_note(d["latency"])]
    if d["gates"]:
        parts += ["## Gates", _table(["Gate", "Threshold", "Value", "Result"], gate_rows(d))]
    if d["layers"]:
        shown = min(len(d["layers"]), MAX_LAYERS)
        parts += [f"## Per-layer error (worst {shown} of {len(d['layers'])})"]
        parts += [_table(["#", "Tensor", "Op", "SQNR dB", "Cosine"], layer_rows(d["layers"]))]
    if d["custom_metrics"]:
        rows = [[k, num(v, 6)] for k, v in d["custom_metrics"].items()]
        parts += ["## Custom metrics", _table(["Metric", "Value"], rows)]
    return "\n\n".join(parts) + "\n"
