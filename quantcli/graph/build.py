"""Small helpers for building graph pieces with onnx-ir: constants and unique names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data as numpy, or None when it is computed at run time."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


class Namer:
    """Unique value names for one graph (names of existing values are taken)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken: set[str] = set(graph.initializers)
        self.taken.update(v.name for v in graph.inputs if v.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.update(v.name for v in node.outputs if v.name)
            if node.name:
                self.taken.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    # np.ascontiguousarray would turn a scalar into shape [1]: per-axis in ONNX's eyes.
    tensor = ir.tensor(np.require(array, requirements="C"), name=name)
    value = ir.Value(
        name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype)
    )
    graph.register_initializer(value)
    return value
