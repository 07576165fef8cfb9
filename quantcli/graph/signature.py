"""The inputs and outputs a model expects, as plain data (no onnx-ir objects leak out)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

Dim = int | str | None  # fixed size, symbolic name, or unknown


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape of one graph input or output."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None  # None: rank unknown

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """True when a concrete shape fits: same rank, equal fixed dims."""
        if self.shape is None:
            return True
        if len(shape) != len(self.shape):
            return False
        return all(not isinstance(d, int) or d == s for d, s in zip(self.shape, shape, strict=True))


def _dim(d: object) -> Dim:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if isinstance(value, (int, str)) else None


def spec_of(value: ir.Value) -> TensorSpec:
    dtype = value.dtype
    np_dtype = np.dtype(dtype.numpy()) if dtype is not None else np.dtype(np.float32)
    shape = None if value.shape is None else tuple(_dim(d) for d in value.shape)
    return TensorSpec(name=value.name or "", dtype=np_dtype, shape=shape)


def input_specs(model: ir.Model) -> list[TensorSpec]:
    """Graph inputs that are not initializers (old exporters list weights as inputs)."""
    initializers = model.graph.initializers
    return [spec_of(v) for v in model.graph.inputs if v.name not in initializers]


def output_specs(model: ir.Model) -> list[TensorSpec]:
    return [spec_of(v) for v in model.graph.outputs]
