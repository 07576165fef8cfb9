"""`convert --bits 4`: block-quantized INT4 weights for MatMul/Gemm, activations stay float.

Two output forms: ONNX Runtime's `com.microsoft.MatMulNBits` (fast kernels), or the
standard opset-21 `DequantizeLinear(int4, block_size) -> MatMul`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from quantcli.data import DataSource
from quantcli.errors import InputError
from quantcli.graph.build import MS_DOMAIN, Namer, add_initializer, const_array
from quantcli.graph.passes import prepare_model
from quantcli.graph.passes.opset import default_opset
from quantcli.quantize.gptq import gptq_quantize, hessian_update
from quantcli.quantize.int4_math import (
    BlockQuantized,
    pack_matmulnbits,
    quantize_rtn,
    to_dequantize_linear_int4,
)
from quantcli.quantize.int4_plan import Int4Candidate, gather_candidates, int4_candidates

BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("rtn", "gptq")
FORMATS = ("matmulnbits", "qdq")


@dataclass(frozen=True)
class Int4Config:
    block_size: int = 32
    # Asymmetric by default: measured better on SmolLM2 and MiniLM (docs/int4.md).
    symmetric: bool = False
    algorithm: str = "rtn"
    format: str = "matmulnbits"
    # 4: MatMulNBits quantizes activations to int8 per block at run time. Measured on
    # SmolLM2-135M: 1.4-1.6x faster than level 0 at +0.4% perplexity (docs/int4.md).
    accuracy_level: int = 4
    exclude: tuple[str, ...] = ()
    embeddings: bool = False  # also Gather tables (GatherBlockQuantized / DQ -> Gather)

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise InputError(
                f"--block-size {self.block_size} is not supported",
                hint=f"use one of {', '.join(map(str, BLOCK_SIZES))}",
            )
        if self.algorithm not in ALGORITHMS:
            raise InputError(
                f"--algorithm '{self.algorithm}' is not supported",
                hint=f"use {' or '.join(ALGORITHMS)}",
            )
        if self.format not in FORMATS:
            raise InputError(
                f"--format '{self.format}' is not an INT4 format",
                hint=f"use {' or '.join(FORMATS)}",
            )
        if not 0 <= self.accuracy_level <= 4:
            raise InputError("--accuracy-level must be 0..4")


@dataclass
class Int4Result:
    model: ir.Model
    quantized: list[Int4Candidate]
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)


Progress = Callable[[int, int], None]


def quantize_int4(
    model: ir.Model,
    config: Int4Config,
    data: DataSource | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> Int4Result:
    if config.algorithm == "gptq" and data is None:
        raise InputError("--algorithm gptq needs calibration data", hint="pass --data SAMPLES")
    min_opset = 21 if config.format == "qdq" and default_opset(model) < 21 else None
    model = prepare_model(model, min_opset=min_opset)
    candidates = int4_candidates(model, config.exclude)
    gathers = gather_candidates(model, config.exclude) if config.embeddings else []
    if not candidates and not gathers:
        raise InputError(
            "no MatMul/Gemm with a constant 2-D float weight to quantize to INT4",
            hint="run quantcli inspect to see the model's ops",
        )
    hessians = _hessians(model, candidates, data, batch_size, progress) if data else {}
    nodes = {n.name: n for n in model.graph}
    namer = Namer(model.graph)
    done, skipped = [], []
    opts = {"block_size": config.block_size, "symmetric": config.symmetric}
    for cand in candidates:
        node = nodes[cand.node]
        if node.op_type == "Gemm" and not _plain_gemm(node):
            skipped.append((cand.node, "Gemm", "Gemm with alpha/beta != 1 kept float"))
            continue
        weight = node.inputs[1]
        w = const_array(weight).astype(np.float32)
        w = w.T if cand.transposed else w
        if config.algorithm == "gptq":
            h = hessians[node.inputs[0].name]
            bq = _by_columns(w, partial(gptq_quantize, hessian=h, act_order=True, **opts))
        else:
            bq = _by_columns(w, partial(quantize_rtn, **opts))
        del w
        _rewrite(model.graph, node, bq, config, namer)
        _release(weight)
        done.append(cand)
    for cand in gathers:
        node = nodes[cand.node]
        table = node.inputs[0]
        transposed = np.ascontiguousarray(const_array(table).astype(np.float32).T)
        bq = _by_columns(transposed, partial(quantize_rtn, **opts))
        _rewrite_gather(model.graph, node, bq, config, namer)
        _release(table)
        done.append(cand)
    RemoveUnusedNodesPass()(model)
    if config.format == "matmulnbits" and MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    return Int4Result(model, done, skipped)


# Columns quantize independently (blocks run along K), so large weights go in slices of
# this many columns: the float64 temporaries of the range search stay small.
COLUMN_CHUNK = 2048


def _by_columns(w: np.ndarray, quantize: Callable[[np.ndarray], BlockQuantized]) -> BlockQuantized:
    if w.shape[1] <= COLUMN_CHUNK:
        return quantize(w)
    parts = [
        quantize(np.ascontiguousarray(w[:, i : i + COLUMN_CHUNK]))
        for i in range(0, w.shape[1], COLUMN_CHUNK)
    ]
    zeros = (
        None
        if parts[0].zero_points is None
        else np.concatenate([p.zero_points for p in parts], axis=1)
    )
    return BlockQuantized(
        q=np.concatenate([p.q for p in parts], axis=1),
        scales=np.concatenate([p.scales for p in parts], axis=1),
        zero_points=zeros,
        block_size=parts[0].block_size,
        k=parts[0].k,
        symmetric=parts[0].symmetric,
    )


def _release(value: ir.Value) -> None:
    """Unmap an external weight nobody reads any more, so its pages leave our RSS."""
    tensor = value.const_value
    if not value.uses() and isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def _plain_gemm(node: ir.Node) -> bool:
    return (
        node.attributes.get_float("alpha", 1.0) == 1.0
        and node.attributes.get_float("beta", 1.0) == 1.0
    )


def _hessians(
    model: ir.Model,
    cands: list[Int4Candidate],
    data: DataSource,
    batch_size: int,
    progress: Progress | None,
) -> dict[str, np.ndarray]:
    """x^T x of each quantized MatMul's input, streamed over the calibration data."""
    from quantcli.calibrate.runner import run_exposed

    nodes = {n.name: n for n in model.graph}
    inputs = sorted({nodes[c.node].inputs[0].name for c in cands})
    hessians: dict[str, np.ndarray] = {}

    def update(values: dict[str, np.ndarray], indices: range) -> None:
        for name, x in values.items():
            hessians[name] = hessian_update(hessians.get(name), x)

    run_exposed(model, inputs, data, update, batch_size, progress)
    return hessians


def _rewrite(
    graph: ir.Graph, node: ir.Node, bq: BlockQuantized, config: Int4Config, namer: Namer
) -> None:
    base = node.name or "matmul"
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    x, out = node.inputs[0], node.outputs[0]
    k, n = bq.k, bq.n
    if config.format == "matmulnbits":
        b, scales, zeros = pack_matmulnbits(bq)
        inputs = [
            x,
            add_initializer(graph, namer(f"{base}.B_int4"), b),
            add_initializer(graph, namer(f"{base}.scales"), scales.astype(np.float32)),
        ]
        inputs.append(
            add_initializer(graph, namer(f"{base}.zero_points"), zeros)
            if zeros is not None
            else None
        )
        attrs = [
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", 4),
            ir.AttrInt64("block_size", config.block_size),
            ir.AttrInt64("accuracy_level", config.accuracy_level),
        ]
        while inputs and inputs[-1] is None:
            inputs.pop()
        new = [ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attrs, name=namer(f"{base}_MatMulNBits"))]
    else:
        q, scale, zero = to_dequantize_linear_int4(bq)
        dq_inputs = [
            add_initializer(graph, namer(f"{base}.weight_int4"), q),
            add_initializer(graph, namer(f"{base}.weight_scale"), scale),
        ]
        if zero is not None:
            dq_inputs.append(add_initializer(graph, namer(f"{base}.weight_zero_point"), zero))
        dq = ir.Node(
            "",
            "DequantizeLinear",
            dq_inputs,
            [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", config.block_size)],
            name=namer(f"{base}_DequantizeLinear"),
        )
        dq.outputs[0].name = namer(f"{base}.weight_dequantized")
        mm = ir.Node("", "MatMul", [x, dq.outputs[0]], name=namer(f"{base}_MatMul"))
        new = [dq, mm]
    if bias is not None:  # Gemm's C, added in float after the product
        new.append(ir.Node("", "Add", [new[-1].outputs[0], bias], name=namer(f"{base}_bias")))
    result = new[-1].outputs[0]
    result.name, result.dtype, result.shape = out.name, out.dtype, out.shape
    graph.insert_before(node, new)
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _rewrite_gather(
    graph: ir.Graph, node: ir.Node, bq: BlockQuantized, config: Int4Config, namer: Namer
) -> None:
    """Gather(table) -> GatherBlockQuantized, or DequantizeLinear(int4, axis=1) -> Gather."""
    base = node.name or "gather"
    q, scale, zero = to_dequantize_linear_int4(bq)  # [D, V] layout: transpose to [V, D]
    inputs = [
        add_initializer(graph, namer(f"{base}.table_int4"), np.ascontiguousarray(q.T)),
        node.inputs[1],
        add_initializer(graph, namer(f"{base}.table_scale"), np.ascontiguousarray(scale.T)),
    ]
    if zero is not None:
        inputs.append(
            add_initializer(graph, namer(f"{base}.table_zero_point"), np.ascontiguousarray(zero.T))
        )
    if config.format == "matmulnbits":
        attrs = [
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", config.block_size),
            ir.AttrInt64("bits", 4),
        ]
        new = [
            ir.Node(
                MS_DOMAIN,
                "GatherBlockQuantized",
                inputs,
                attrs,
                name=namer(f"{base}_GatherBlockQuantized"),
            )
        ]
    else:
        dq = ir.Node(
            "",
            "DequantizeLinear",
            [inputs[0], *inputs[2:]],
            [ir.AttrInt64("axis", 1), ir.AttrInt64("block_size", config.block_size)],
            name=namer(f"{base}_DequantizeLinear"),
        )
        dq.outputs[0].name = namer(f"{base}.table_dequantized")
        new = [dq, ir.Node("", "Gather", [dq.outputs[0], inputs[1]], name=namer(f"{base}_Gather"))]
    out = node.outputs[0]
    result = new[-1].outputs[0]
    result.name, result.dtype, result.shape = out.name, out.dtype, out.shape
    graph.insert_before(node, new)
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
