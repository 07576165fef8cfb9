"""`quantcli inspect`: what a model is, and what INT8 and INT4 conversion would do to it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir

from quantcli.graph.io import LoadedModel
from quantcli.graph.signature import TensorSpec, input_specs, output_specs
from quantcli.quantize.config import Int8Config
from quantcli.quantize.detect import quantization_state
from quantcli.quantize.int4_plan import int4_candidates
from quantcli.quantize.prepare import prepare_for_int8
from quantcli.quantize.saturation_check import check_saturation


def _spec_dict(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "dtype": str(spec.dtype),
        "shape": list(spec.shape or []) if spec.shape is not None else None,
    }


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


def _parameters(model: ir.Model) -> dict[str, dict[str, int]]:
    """Parameter count and bytes by dtype, from initializers and Constant nodes."""
    by_dtype: dict[str, dict[str, int]] = {}
    graphs = (model.graph, *model.graph.subgraphs())  # If/Loop bodies hold weights too
    tensors = [v.const_value for g in graphs for v in g.initializers.values() if v.const_value]
    for node in _all_nodes(model):
        if node.op_type == "Constant" and (attr := node.attributes.get("value")) is not None:
            tensors.append(attr.as_tensor())
    for tensor in tensors:
        entry = by_dtype.setdefault(tensor.dtype.name.lower(), {"count": 0, "bytes": 0})
        entry["count"] += tensor.size
        entry["bytes"] += tensor.nbytes
    return dict(sorted(by_dtype.items()))


def inspect_model(loaded: LoadedModel) -> dict[str, Any]:
    model = loaded.model
    nodes = _all_nodes(model)
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in nodes
    )
    params = _parameters(model)
    info: dict[str, Any] = {
        "path": str(loaded.path),
        "size_bytes": loaded.size_bytes,
        "ir_version": model.ir_version,
        "opsets": {k or "ai.onnx": v for k, v in sorted(model.opset_imports.items())},
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "inputs": [_spec_dict(s) for s in input_specs(model)],
        "outputs": [_spec_dict(s) for s in output_specs(model)],
        "nodes": len(nodes),
        "op_types": dict(ops.most_common()),
        "parameters": {
            "count": sum(p["count"] for p in params.values()),
            "bytes": sum(p["bytes"] for p in params.values()),
            "by_dtype": params,
        },
        "quantized": quantization_state({n.op_type for n in nodes}),
        "x86_saturation": check_saturation(model).to_dict(),
    }
    # Planning prepares the graph in place (BN folding...), so it comes after the counts.
    prepared, plan = prepare_for_int8(model, Int8Config())
    info["int8"] = {
        "nodes": [{"name": n.node, "op_type": n.op_type} for n in plan.nodes],
        "by_op_type": dict(sorted(Counter(n.op_type for n in plan.nodes).items())),
        "activations": len(plan.activations),
        "float": [{"name": n, "op_type": o, "reason": r} for n, o, r in plan.skipped],
    }
    int4 = int4_candidates(prepared)
    info["int4"] = {
        "nodes": [
            {"name": c.node, "op_type": c.op_type, "weight": c.weight, "shape": list(c.shape)}
            for c in int4
        ],
        "parameters": sum(c.shape[0] * c.shape[1] for c in int4),
    }
    return info
