"""`quantcli inspect`: what a model is, and what INT8 and INT4 conversion would do to it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir

from quantcli.graph.io import LoadedModel
from quantcli.graph.signature import TensorSpec, input_specs, output_specs
from quantcli.quantize.detect import quantization_state
from quantcli.quantize.int4.plan import int4_candidates
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.prepare import prepare_for_int8
from quantcli.quantize.int8.saturation_check import check_saturation


def _spec_dict(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "dtype": str(spec.dtype),
        "shape": list(spec.shape or []) if spec.shape is not None else None,
    }


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


# Inputs of blocked-quantization ops that hold packed sub-byte values, by op type:
# (index of the packed weights, index of the packed zero points).
_PACKED = {"MatMulNBits": (1, 3), "GatherBlockQuantized": (0, 3)}


def _packed_counts(model: ir.Model) -> dict[str, tuple[str, int]]:
    """Initializers holding packed 4-/8-bit values: name -> (dtype label, element count).

    MatMulNBits stores B as uint8 [N, blocks, block_size * bits / 8] (padded to whole blocks)
    and its zero points as packed uint8: the bytes are not the parameter count.
    """
    found: dict[str, tuple[str, int]] = {}
    for node in _all_nodes(model):
        if node.op_type not in _PACKED or node.domain != "com.microsoft":
            continue
        bits = node.attributes.get_int("bits", 4)
        data, zeros = _PACKED[node.op_type]
        inputs = list(node.inputs)
        if node.op_type == "MatMulNBits":
            k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
            block = node.attributes.get_int("block_size")
            weights = (k * n, -(-k // block) * n)
        else:
            value = inputs[data]
            table = value.const_value if value is not None else None
            if table is None and value is not None and value.producer() is not None:
                table = None  # a Reshape of a MatMulNBits weight: counted there
            if table is None or table.dtype != ir.DataType.UINT8:
                continue
            rows = int(table.shape[0])
            cols = int(table.shape[-1]) * 8 // bits
            block = node.attributes.get_int("block_size", 128)
            weights = (rows * cols, rows * -(-cols // block))
        for index, count in zip((data, zeros), weights, strict=True):
            value = inputs[index] if index < len(inputs) else None
            tensor = value.const_value if value is not None else None
            if tensor is not None and tensor.dtype == ir.DataType.UINT8 and value.name:
                found[value.name] = (f"int{bits}" if index == data else f"uint{bits}", count)
    return found


def _parameters(model: ir.Model) -> dict[str, dict[str, int]]:
    """Parameter count and bytes by dtype, from initializers and Constant nodes. Packed
    MatMulNBits/GatherBlockQuantized weights count their values, not their bytes."""
    by_dtype: dict[str, dict[str, int]] = {}
    graphs = (model.graph, *model.graph.subgraphs())  # If/Loop bodies hold weights too
    packed = _packed_counts(model)
    tensors = [
        (name, v.const_value)
        for g in graphs
        for name, v in g.initializers.items()
        if v.const_value is not None
    ]
    for node in _all_nodes(model):
        if node.op_type == "Constant" and (attr := node.attributes.get("value")) is not None:
            tensors.append(("", attr.as_tensor()))
    for name, tensor in tensors:
        label, count = packed.get(name, (tensor.dtype.name.lower(), tensor.size))
        entry = by_dtype.setdefault(label, {"count": 0, "bytes": 0})
        entry["count"] += count
        entry["bytes"] += tensor.nbytes
    return dict(sorted(by_dtype.items()))


def weight_bits(model: ir.Model) -> list[dict[str, Any]]:
    """Bits per weight of every blocked-quantized MatMul and embedding (scales and zero
    points included), as `convert --bits 4` wrote them."""
    sizes = {
        name: v.const_value.nbytes
        for name, v in model.graph.initializers.items()
        if v.const_value is not None
    }
    packed = _packed_counts(model)
    rows = []
    for node in model.graph:
        if node.op_type not in _PACKED or node.domain != "com.microsoft":
            continue
        data = _PACKED[node.op_type][0]
        weights = node.inputs[data]
        name = weights.name if weights is not None else ""
        table = weights.const_value if weights is not None else None
        if name in packed:
            count = packed[name][1]
        elif table is not None:  # an int4/uint4 table: its type counts values already
            count = table.size
        else:
            producer = weights.producer() if weights is not None else None
            shared = producer.inputs[0].name if producer is not None else ""
            rows.append(
                {
                    "node": node.name,
                    "op_type": node.op_type,
                    "bits": node.attributes.get_int("bits", 4),
                    "block_size": node.attributes.get_int("block_size", 0),
                    "parameters": 0,
                    "bits_per_weight": 0.0,
                    "shares": shared,
                }
            )
            continue
        skip = 1 if node.op_type == "GatherBlockQuantized" else -1  # the indices are no weight
        stored = sum(
            _stored_bytes(v, sizes)
            for i, v in enumerate(node.inputs)
            if i >= data and i != skip and v is not None
        )
        rows.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "bits": node.attributes.get_int("bits", 4),
                "block_size": node.attributes.get_int("block_size", 0),
                "parameters": count,
                "bits_per_weight": round(8 * stored / count, 3) if count else 0.0,
            }
        )
    return rows


def _stored_bytes(value: ir.Value, sizes: dict[str, int]) -> int:
    """Bytes behind an input: its initializer, or the constants that a Cast/Mul widens into
    it (compact float16 scales)."""
    if value.name in sizes:
        return sizes[value.name]
    producer = value.producer()
    if producer is None or producer.op_type not in ("Cast", "Mul"):
        return 0
    return sum(_stored_bytes(v, sizes) for v in producer.inputs if v is not None)


def inspect_model(loaded: LoadedModel) -> dict[str, Any]:
    model = loaded.model
    nodes = _all_nodes(model)
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in nodes
    )
    params = _parameters(model)
    bits = weight_bits(model)  # before planning prepares (and folds) the graph
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
        "weight_bits": bits,
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
