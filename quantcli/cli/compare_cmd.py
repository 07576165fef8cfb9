"""`quantcli compare FLOAT QUANT --data DATA`: accuracy, latency, size, per-layer error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from quantcli.cli.calibrate_cmd import _Bar
from quantcli.cli.cluster_opts import ClusterBar, RayOpt, RayShardsOpt, cluster_config
from quantcli.cli.common import (
    BatchOpt,
    DataOpt,
    JsonOpt,
    LabelsOpt,
    LimitOpt,
    MaxDropOpt,
    MetricGateOpt,
    MetricOpt,
    MinCosineOpt,
    MinTop1Opt,
    PreprocessOpt,
    handle_errors,
    out,
    parse_preprocess,
    print_json,
    print_table,
    warn,
)

FloatArg = Annotated[Path, typer.Argument(help="The float original (.onnx).")]
QuantArg = Annotated[Path, typer.Argument(help="The quantized model (.onnx).")]


@handle_errors
def compare(
    float_model: FloatArg,
    quant_model: QuantArg,
    data: DataOpt,
    labels: LabelsOpt = None,
    provider: Annotated[
        str, typer.Option("--provider", help="Execution provider: cpu, cuda or tensorrt.")
    ] = "cpu",
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Intra-op threads for both models.")
    ] = None,
    runs: Annotated[
        int, typer.Option("--runs", min=0, help="Timed runs per model (0: skip latency).")
    ] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 10,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="SQNR of every quantized tensor, worst first.")
    ] = False,
    metric: MetricOpt = None,
    max_drop: MaxDropOpt = None,
    min_cosine: MinCosineOpt = None,
    min_speedup: Annotated[
        float | None, typer.Option("--min-speedup", help="Gate: min float/quant latency ratio.")
    ] = None,
    max_size_ratio: Annotated[
        float | None, typer.Option("--max-size-ratio", help="Gate: max quant/float file size.")
    ] = None,
    min_top1: MinTop1Opt = None,
    metric_gate: MetricGateOpt = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write a report: .json, .md or .html.")
    ] = None,
    batch_size: BatchOpt = 1,
    limit: LimitOpt = None,
    preprocess: PreprocessOpt = None,
    ray: RayOpt = None,
    ray_shards: RayShardsOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Compare QUANT with FLOAT on --data: accuracy, latency, size; exit 1 if a gate fails."""
    from quantcli.data import WithLabels, open_data, read_labels_file
    from quantcli.errors import GateFailed
    from quantcli.evaluate import CompareConfig, GateSpec, compare
    from quantcli.evaluate.gates import parse_metric_gate
    from quantcli.graph.io import load_model
    from quantcli.graph.signature import input_specs

    gates = GateSpec(
        max_drop,
        min_cosine,
        min_speedup,
        max_size_ratio,
        min_top1,
        tuple(parse_metric_gate(g) for g in metric_gate or ()),
    )
    config = CompareConfig(
        provider=provider,
        threads=threads,
        batch_size=batch_size,
        runs=runs,
        warmup=warmup,
        per_layer=per_layer,
        metric=metric,
        gates=gates,
    )
    cluster = cluster_config(ray, ray_shards)
    specs = input_specs(load_model(float_model, check=False).model)
    images = parse_preprocess(preprocess)
    source = open_data(data, specs, images=images, limit=limit)
    if labels is not None:
        source = WithLabels(source, read_labels_file(labels))
    if source.synthetic:
        warn("random data: accuracy figures are meaningless; use it for latency only")
    if cluster is None:
        result = compare(float_model, quant_model, source, config, progress=_Bar())
    else:
        from quantcli.cluster.compare import compare_on_cluster

        bar = ClusterBar("comparing on Ray")
        try:
            result = compare_on_cluster(
                float_model,
                quant_model,
                data,
                source,
                config,
                cluster,
                images=images,
                limit=limit,
                progress=bar,
            )
        finally:
            bar.close()
    doc = result.to_dict()
    for message in doc["warnings"]:
        warn(message)
    if report is not None:
        from quantcli.report import write_report

        write_report(doc, report)
    if json_:
        print_json(doc)
    else:
        render(doc)
    if not result.passed:
        failed = ", ".join(
            f"{g['name']} ({g['value']:.4g} vs {g['threshold']:.4g})"
            for g in doc["gates"]
            if not g["passed"]
        )
        raise GateFailed(f"quality gate failed: {failed}")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _accuracy_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per metric: float, quantized, delta (coloured by how much was lost)."""
    rows = []
    for o in doc["outputs"]:
        name = o["name"]
        sqnr = "inf" if o["identical"] else _fmt(o["sqnr_db"], 3)
        rows.append([f"{name}: cosine (mean)", "1", _fmt(o["cosine_mean"], 6), ""])
        rows.append([f"{name}: SQNR dB", "", sqnr, ""])
        rows.append([f"{name}: max abs error", "", _fmt(o["max_abs_error"]), ""])
        cls = o.get("classifier")
        if cls:
            rows.append([f"{name}: top-1 agreement", "", _fmt(cls["top1_agreement"]), ""])
            rows.append([f"{name}: float top-1 in top-5", "", _fmt(cls["top1_in_top5"]), ""])
            rows.append([f"{name}: KL divergence", "", _fmt(cls["kl_divergence_mean"]), ""])
            if cls.get("accuracy_float") is not None:
                drop = cls["accuracy_drop_points"]
                colour = "green" if drop <= 0.5 else ("yellow" if drop <= 2 else "red")
                rows.append(
                    [
                        f"{name}: accuracy %",
                        _fmt(100 * cls["accuracy_float"]),
                        _fmt(100 * cls["accuracy_quant"]),
                        f"[{colour}]{-drop:+.2f} pt[/{colour}]",
                    ]
                )
    return rows


def render(doc: dict[str, Any]) -> None:
    from quantcli.report.markdown import gate_rows, host_line, layer_rows

    print_table("Accuracy", ["metric", "float", "quantized", "delta"], _accuracy_rows(doc))
    size, lat = doc["models"], doc.get("latency")
    rows = [
        [
            "file size MB",
            _fmt(size["float"]["size_bytes"] / 1e6),
            _fmt(size["quant"]["size_bytes"] / 1e6),
            f"{size['size_ratio']:.2f}x",
        ]
    ]
    if lat:
        speed = lat["speedup"]
        verdict = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
        colour = "green" if speed >= 1 else "red"
        rows.append(
            [
                "latency median ms",
                _fmt(lat["float"]["median_ms"]),
                _fmt(lat["quant"]["median_ms"]),
                f"[{colour}]{verdict}[/{colour}]",
            ]
        )
        rows.append(
            ["latency p90 ms", _fmt(lat["float"]["p90_ms"]), _fmt(lat["quant"]["p90_ms"]), ""]
        )
    print_table("Size and speed", ["measure", "float", "quantized", "ratio"], rows)
    if lat:
        out.print(
            f"speedup interquartile {lat['speedup_q1']:.2f}-{lat['speedup_q3']:.2f} over "
            f"{lat['float']['runs']} interleaved runs each"
        )
    if doc.get("layers"):
        print_table(
            "Per-layer SQNR (worst first)",
            ["#", "tensor", "op", "SQNR dB", "cosine"],
            layer_rows(doc["layers"]),
        )
    out.print(escape(f"Host: {host_line(doc)}"))
    if doc.get("cluster"):
        c = doc["cluster"]
        where = f"; latency timed on {c['latency_node']} alone" if c["latency_node"] else ""
        nodes = f"{c['nodes']} node{'s' * (c['nodes'] != 1)}"
        out.print(escape(f"Ray: {c['parts']} parts scored on {nodes}{where}"))
    if doc["gates"]:
        colored = [
            [*r[:3], "[green]pass[/green]" if r[3] == "pass" else "[red]FAIL[/red]"]
            for r in gate_rows(doc)
        ]
        print_table("Gates", ["gate", "threshold", "value", "verdict"], colored)
