"""Which weights INT4 conversion quantizes: constant 2-D weights of MatMul and Gemm."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import onnx_ir as ir

from quantcli.graph.build import const_array


@dataclass(frozen=True)
class Int4Candidate:
    node: str
    op_type: str
    weight: str  # initializer name
    shape: tuple[int, int]  # [K, N] as the MatMul reads it
    transposed: bool  # Gemm with transB=1 stores [N, K]


def int4_candidates(
    model: ir.Model, exclude: tuple[str, ...] = (), include_gather: bool = False
) -> list[Int4Candidate]:
    """Nodes of a prepared model (Transposes of constants already folded) INT4 can take."""
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            continue
        name = node.name or ""
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        array = const_array(weight)
        if array is None or array.ndim != 2 or array.dtype.kind != "f":
            continue
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            continue
        k, n = (array.shape[1], array.shape[0]) if transposed else array.shape
        found.append(Int4Candidate(name, node.op_type, weight.name or "", (k, n), transposed))
    return found


def gather_candidates(model: ir.Model, exclude: tuple[str, ...] = ()) -> list[Int4Candidate]:
    """Embedding lookups: Gather on axis 0 of a constant 2-D float table [V, D]."""
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type != "Gather":
            continue
        name = node.name or ""
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        table = const_array(node.inputs[0])
        if table is None or table.ndim != 2 or table.dtype.kind != "f":
            continue
        if node.attributes.get_int("axis", 0) != 0:
            continue
        # Blocks run along D (shape[1]): stored like a [D, V] weight.
        shape = (int(table.shape[1]), int(table.shape[0]))
        found.append(Int4Candidate(name, "Gather", node.inputs[0].name or "", shape, True))
    return found
