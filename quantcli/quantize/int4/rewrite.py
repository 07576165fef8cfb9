"""Writing one unit of weights into the graph in its chosen format: MatMulNBits,
DequantizeLinear(int4) -> MatMul, or GatherBlockQuantized for embedding tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir

from quantcli.graph.build import MS_DOMAIN, Namer, add_initializer, const_array
from quantcli.graph.mapped import release
from quantcli.quantize.int4.config import Int4Config
from quantcli.quantize.int4.formats import (
    Choice,
    Int8Blocks,
    compact_scales,
    quantize_int8_blocks,
)
from quantcli.quantize.int4.plan import Int4Candidate, Int4Unit
from quantcli.quantize.math.gptq import gptq_factor, gptq_quantize
from quantcli.quantize.math.int4 import (
    BlockQuantized,
    float16_scaled,
    pack_matmulnbits,
    quantize_rtn,
    to_dequantize_linear_int4,
)


@dataclass
class Context:
    model: ir.Model
    config: Int4Config
    algorithm: str
    accuracy_level: int
    namer: Namer
    compacted: int = 0  # scales tensors stored as float16 (--compact-scales)

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def node(self, name: str) -> ir.Node:
        for node in self.model.graph:
            if node.name == name:
                return node
        raise KeyError(name)


def unit_weight(ctx: Context, cand: Int4Candidate) -> tuple[ir.Value, np.ndarray]:
    """The stored weight value and its float32 [K, N] array."""
    node = ctx.node(cand.node)
    value = node.inputs[0] if cand.op_type == "Gather" else node.inputs[1]
    w = const_array(value).astype(np.float32, copy=False)
    return value, (w.T if cand.transposed else w)


def quantize_unit(ctx: Context, unit: Int4Unit, choice: Choice, hessian: np.ndarray | None) -> None:
    if choice.is_float:
        restore_tied_float(ctx, unit)
        return
    config = ctx.config
    tables = [ctx.node(t.node).inputs[0] for t in unit.tables] if unit.tied else []
    factors: dict[int, object] = {}
    for cand in unit.weights():
        value, w = unit_weight(ctx, cand)
        if cand.op_type == "Gather":
            q = _quantize_array(w, choice, config, None)
            _rewrite_gather(ctx, ctx.node(cand.node), q, config)
        else:
            h = hessian if ctx.algorithm == "gptq" else None
            q = _quantize_array(w, choice, config, h, factors)
            readers = [
                m
                for m in unit.members
                if (m.weight, m.transposed) == (cand.weight, cand.transposed)
            ]
            shared = _rewrite_matmuls(ctx, [ctx.node(m.node) for m in readers], q, value)
            if unit.tied:
                for table in unit.tables:
                    _rewrite_tied_gather(ctx, ctx.node(table.node), q, shared)
        del w
        release(value)
    for table in tables:  # no longer read: the lookup reads the head's quantized data
        release(table)


def restore_tied_float(ctx: Context, unit: Int4Unit) -> None:
    """A float head tied to a table: read Transpose(table) again rather than store both."""
    if not unit.tables:
        return
    table = ctx.node(unit.tables[0].node).inputs[0]
    for cand in unit.members:
        node = ctx.node(cand.node)
        if cand.op_type != "MatMul" or node.inputs[1] is table:
            continue
        t = ir.Node(
            "",
            "Transpose",
            [table],
            [ir.AttrInt64s("perm", [1, 0])],
            name=ctx.namer(f"{cand.node}_tied_transpose"),
        )
        t.outputs[0].name = ctx.namer(f"{table.name}_transposed")
        ctx.graph.insert_before(node, t)
        node.replace_input_with(1, t.outputs[0])


def _quantize_array(
    w: np.ndarray,
    choice: Choice,
    config: Int4Config,
    hessian: np.ndarray | None,
    factors: dict[int, object] | None = None,
) -> BlockQuantized | Int8Blocks:
    if choice.bits == 8:
        return _by_columns(w, partial(quantize_int8_blocks, block_size=choice.block_size))
    opts = {"block_size": choice.block_size, "symmetric": config.symmetric}
    if hessian is not None:
        factors = {} if factors is None else factors  # siblings share one factor
        if choice.block_size not in factors:
            factors[choice.block_size] = gptq_factor(hessian, choice.block_size, act_order=True)
        factor = factors[choice.block_size]
        return _by_columns(w, partial(gptq_quantize, hessian=None, factor=factor, **opts))
    return _by_columns(w, partial(quantize_rtn, **opts))


# Columns quantize independently (blocks run along K), so large weights go in slices of
# this many columns: the float64 temporaries of the range search stay small.
COLUMN_CHUNK = 2048


def _by_columns(w: np.ndarray, quantize: Callable[[np.ndarray], object]) -> object:
    if w.shape[1] <= COLUMN_CHUNK:
        return quantize(np.ascontiguousarray(w))
    parts = [
        quantize(np.ascontiguousarray(w[:, i : i + COLUMN_CHUNK]))
        for i in range(0, w.shape[1], COLUMN_CHUNK)
    ]
    first = parts[0]
    if isinstance(first, Int8Blocks):
        return Int8Blocks(
            q=np.concatenate([p.q for p in parts], axis=1),
            scales=np.concatenate([p.scales for p in parts], axis=1),
            block_size=first.block_size,
            k=first.k,
        )
    zeros = (
        None
        if first.zero_points is None
        else np.concatenate([p.zero_points for p in parts], axis=1)
    )
    return BlockQuantized(
        q=np.concatenate([p.q for p in parts], axis=1),
        scales=np.concatenate([p.scales for p in parts], axis=1),
        zero_points=zeros,
        block_size=first.block_size,
        k=first.k,
        symmetric=first.symmetric,
    )


def _float_dtype(value: ir.Value) -> np.dtype:
    """The float type the node computes in (scales must match it)."""
    return value.const_value.dtype.numpy()


def _scales(ctx: Context, name: str, scales: np.ndarray, dtype: np.dtype) -> ir.Value:
    """Block scales in the node's float type. Compact (a float32 model): float16 times a
    power of two, widened by Cast -> Mul at the start of the graph; ONNX Runtime folds the
    pair into a float32 initializer when it loads the model, so the kernels (and their
    prepacking) see what they would see with float32 scales stored."""
    graph, namer = ctx.graph, ctx.namer
    wanted = ctx.config.compact_scales and np.dtype(dtype) == np.float32
    if not (wanted and compact_scales(scales.size)):
        return add_initializer(graph, namer(name), np.ascontiguousarray(scales.astype(dtype)))
    half, factor = float16_scaled(scales)
    ctx.compacted += 1
    stored = add_initializer(graph, namer(f"{name}_float16"), np.ascontiguousarray(half))
    power = add_initializer(graph, namer(f"{name}_factor"), np.array(factor, np.float32))
    cast = ir.Node(
        "", "Cast", [stored], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=namer(f"{name}_widen")
    )
    mul = ir.Node("", "Mul", [cast.outputs[0], power], name=namer(f"{name}_rescale"))
    for value, label in ((cast.outputs[0], f"{name}_widened"), (mul.outputs[0], name)):
        value.name, value.dtype, value.shape = namer(label), ir.DataType.FLOAT, stored.shape
    graph.insert_before(next(iter(graph)), [cast, mul])  # before every reader
    return mul.outputs[0]


def _nbits_inputs(
    ctx: Context, base: str, q: BlockQuantized | Int8Blocks, dtype: np.dtype
) -> list[ir.Value | None]:
    graph, namer = ctx.graph, ctx.namer
    if isinstance(q, Int8Blocks):
        n = q.q.shape[1]
        b = (q.q.astype(np.int16) + 128).astype(np.uint8).T.reshape(n, -1, q.block_size)
        return [
            add_initializer(graph, namer(f"{base}.B_int8"), np.ascontiguousarray(b)),
            _scales(ctx, f"{base}.scales", q.scales.T, dtype),
        ]
    b, scales, zeros = pack_matmulnbits(q)
    inputs = [
        add_initializer(graph, namer(f"{base}.B_int4"), b),
        _scales(ctx, f"{base}.scales", scales, dtype),
    ]
    if zeros is not None:
        inputs.append(add_initializer(graph, namer(f"{base}.zero_points"), zeros))
    return inputs


def _dq_inputs(
    ctx: Context, base: str, q: BlockQuantized | Int8Blocks, dtype: np.dtype
) -> list[ir.Value]:
    graph, namer = ctx.graph, ctx.namer
    if isinstance(q, Int8Blocks):
        return [
            add_initializer(graph, namer(f"{base}.weight_int8"), q.q[: q.k]),
            add_initializer(graph, namer(f"{base}.weight_scale"), q.scales.astype(dtype)),
        ]
    x, scale, zero = to_dequantize_linear_int4(q)
    inputs = [
        add_initializer(graph, namer(f"{base}.weight_int4"), x),
        add_initializer(graph, namer(f"{base}.weight_scale"), scale.astype(dtype)),
    ]
    if zero is not None:
        inputs.append(add_initializer(graph, namer(f"{base}.weight_zero_point"), zero))
    return inputs


def _rewrite_matmuls(
    ctx: Context,
    nodes: list[ir.Node],
    q: BlockQuantized | Int8Blocks,
    weight: ir.Value,
) -> list[ir.Value]:
    """Replace every node reading one weight; the quantized tensors are stored once."""
    config = ctx.config
    dtype = _float_dtype(weight)
    base = nodes[0].name or "matmul"
    bits = 8 if isinstance(q, Int8Blocks) else 4
    k, n = q.k, q.q.shape[1]
    if config.format == "matmulnbits":
        shared = _nbits_inputs(ctx, base, q, dtype)
    else:
        shared = _dq_inputs(ctx, base, q, dtype)
        dq = ir.Node(
            "",
            "DequantizeLinear",
            shared,
            [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", q.block_size)],
            name=ctx.namer(f"{base}_DequantizeLinear"),
        )
        dq.outputs[0].name = ctx.namer(f"{base}.weight_dequantized")
        ctx.graph.insert_before(nodes[0], dq)
    for node in nodes:
        name = node.name or "matmul"
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        x, out = node.inputs[0], node.outputs[0]
        if config.format == "matmulnbits":
            attrs = [
                ir.AttrInt64("K", k),
                ir.AttrInt64("N", n),
                ir.AttrInt64("bits", bits),
                ir.AttrInt64("block_size", q.block_size),
                ir.AttrInt64("accuracy_level", ctx.accuracy_level),
            ]
            new = [
                ir.Node(
                    MS_DOMAIN,
                    "MatMulNBits",
                    [x, *shared],
                    attrs,
                    name=ctx.namer(f"{name}_MatMulNBits"),
                )
            ]
        else:
            new = [ir.Node("", "MatMul", [x, dq.outputs[0]], name=ctx.namer(f"{name}_MatMul"))]
        if bias is not None:  # Gemm's C, added in float after the product
            new.append(
                ir.Node("", "Add", [new[-1].outputs[0], bias], name=ctx.namer(f"{name}_bias"))
            )
        result = new[-1].outputs[0]
        result.name, result.dtype, result.shape = out.name, out.dtype, out.shape
        ctx.graph.insert_before(node, new)
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        ctx.graph.remove(node, safe=True)
    return shared


def _rewrite_tied_gather(
    ctx: Context, node: ir.Node, q: BlockQuantized | Int8Blocks, shared: list[ir.Value]
) -> None:
    """Gather(table) -> GatherBlockQuantized(Reshape(B of the head's MatMulNBits), ...)."""
    bits = 8 if isinstance(q, Int8Blocks) else 4
    v, d = q.q.shape[1], q.k
    base = node.name or "gather"
    shape = add_initializer(
        ctx.graph, ctx.namer(f"{base}.table_shape"), np.array([v, d * bits // 8], np.int64)
    )
    reshape = ir.Node("", "Reshape", [shared[0], shape], name=ctx.namer(f"{base}_shared_table"))
    reshape.outputs[0].name = ctx.namer(f"{base}.shared_table")
    attrs = [
        ir.AttrInt64("gather_axis", 0),
        ir.AttrInt64("quantize_axis", 1),
        ir.AttrInt64("block_size", q.block_size),
        ir.AttrInt64("bits", bits),
    ]
    gbq = ir.Node(
        MS_DOMAIN,
        "GatherBlockQuantized",
        [reshape.outputs[0], node.inputs[1], *shared[1:]],
        attrs,
        name=ctx.namer(f"{base}_GatherBlockQuantized"),
    )
    _replace(ctx.graph, node, [reshape, gbq])


def _rewrite_gather(
    ctx: Context, node: ir.Node, q: BlockQuantized | Int8Blocks, config: Int4Config
) -> None:
    """Gather(table) -> GatherBlockQuantized, or DequantizeLinear(axis=1) -> Gather."""
    graph, namer = ctx.graph, ctx.namer
    base = node.name or "gather"
    dtype = _float_dtype(node.inputs[0])
    bits = 8 if isinstance(q, Int8Blocks) else 4
    if isinstance(q, Int8Blocks):  # [D, V] layout: transpose to [V, D]
        table = q.q[: q.k].T
        if config.format == "matmulnbits":
            table = (table.astype(np.int16) + 128).astype(np.uint8)
        scale, zero = q.scales.T, None
    else:
        table, scale, zero = (a.T if a is not None else None for a in to_dequantize_linear_int4(q))
    inputs = [
        add_initializer(graph, namer(f"{base}.table_int{bits}"), np.ascontiguousarray(table)),
        node.inputs[1],
        _scales(ctx, f"{base}.table_scale", scale, dtype),
    ]
    if zero is not None:
        inputs.append(
            add_initializer(graph, namer(f"{base}.table_zero_point"), np.ascontiguousarray(zero))
        )
    if config.format == "matmulnbits":
        attrs = [
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", q.block_size),
            ir.AttrInt64("bits", bits),
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
            [ir.AttrInt64("axis", 1), ir.AttrInt64("block_size", q.block_size)],
            name=namer(f"{base}_DequantizeLinear"),
        )
        dq.outputs[0].name = namer(f"{base}.table_dequantized")
        new = [dq, ir.Node("", "Gather", [dq.outputs[0], inputs[1]], name=namer(f"{base}_Gather"))]
    _replace(graph, node, new)


def _replace(graph: ir.Graph, node: ir.Node, new: list[ir.Node]) -> None:
    out = node.outputs[0]
    result = new[-1].outputs[0]
    result.name, result.dtype, result.shape = out.name, out.dtype, out.shape
    graph.insert_before(node, new)
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
