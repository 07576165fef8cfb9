"""`quantcli inspect MODEL`: a model's signature, ops, parameters and quantization plan."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from quantcli.cli.common import (
    JsonOpt,
    ModelArg,
    count_rows,
    handle_errors,
    out,
    print_json,
    print_table,
)


@handle_errors
def inspect(model: ModelArg, json_: JsonOpt = False) -> None:
    """Show IR version, opsets, inputs/outputs, op types, parameters and what gets quantized."""
    from quantcli.graph.io import load_model
    from quantcli.inspect import inspect_model

    info = inspect_model(load_model(model))
    if json_:
        print_json({"schema": "quantcli.inspect/1", **info})
    else:
        render(info)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _io_table(title: str, specs: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("name", "dtype", "shape"):
        table.add_column(col)
    for s in specs:
        shape = "?" if s["shape"] is None else "[" + ", ".join(str(d) for d in s["shape"]) + "]"
        table.add_row(escape(s["name"]), s["dtype"], escape(shape))  # "[batch, 3]" is no markup
    return table


def _saturation(check: dict[str, Any]) -> str:
    """Can the int8 weights overflow the int16 pair sums of AVX2 kernels, and where."""
    if check["safe"]:
        n = check["checked_weights"]
        return f"safe: no int16 pair can saturate ({n} int8 weights checked)" if n else "-"
    parts = []
    for risk in check["nodes_at_risk"][:5]:
        shown = ", ".join(map(str, risk["unsafe_channels"][:8]))
        more = "..." if len(risk["unsafe_channels"]) > 8 else ""
        parts.append(
            f"{risk['node']} ({risk['op_type']}): {len(risk['unsafe_channels'])} of "
            f"{risk['channels']} channels [{shown}{more}], worst pair {risk['worst_pair']}"
        )
    if check["unchecked_nodes"]:
        parts.append(f"weights computed at run time: {', '.join(check['unchecked_nodes'][:5])}")
    total = len(check["nodes_at_risk"])
    head = f"CAN SATURATE int16 pairs: {total} nodes, {check['unsafe_channels']} channels"
    rest = f" (+{total - 5} more nodes)" if total > 5 else ""
    return head + "; " + "; ".join(parts) + rest


def render(info: dict[str, Any]) -> None:
    title = f"Model {escape(info['path'])}"
    summary = Table(title=title, title_justify="left", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    opsets = ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
    params = info["parameters"]
    by_dtype = ", ".join(
        f"{k}: {v['count']:,} ({_mb(v['bytes'])})" for k, v in params["by_dtype"].items()
    )
    rows = [
        ("IR version", str(info["ir_version"])),
        ("opsets", opsets),
        ("producer", info["producer"] or "-"),
        ("file size", _mb(info["size_bytes"])),
        ("nodes", str(info["nodes"])),
        ("parameters", f"{params['count']:,} ({_mb(params['bytes'])}); {by_dtype}"),
        ("already quantized", ", ".join(info["quantized"]) or "no"),
        ("x86 without VNNI", _saturation(info["x86_saturation"])),
    ]
    for key, value in rows:
        summary.add_row(key, value)
    out.print(summary)
    out.print(_io_table("Inputs", info["inputs"]))
    out.print(_io_table("Outputs", info["outputs"]))
    print_table("Op types", ["op", "count"], count_rows(info["op_types"]))
    if info.get("weight_bits"):
        rows = [
            [
                r["node"],
                f"int{r['bits']}-b{r['block_size']}",
                f"{r['parameters']:,}" if r["parameters"] else f"shares {r.get('shares', '')}",
                f"{r['bits_per_weight']:.2f}" if r["parameters"] else "-",
            ]
            for r in info["weight_bits"]
        ]
        print_table("Bits per layer", ["node", "format", "weights", "bits/weight"], rows)
    int8 = info["int8"]
    print_table("INT8 plan (defaults)", ["quantized op", "nodes"], count_rows(int8["by_op_type"]))
    for entry in int8["float"]:
        line = f"  left float: {entry['name']} ({entry['op_type']}): {entry['reason']}"
        out.print(escape(line))
    int4 = info["int4"]
    out.print(
        f"INT4 (weight-only): {len(int4['nodes'])} MatMul/Gemm weights, "
        f"{int4['parameters']:,} parameters"
    )
