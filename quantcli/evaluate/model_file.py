"""What compare needs to know of a model file without loading its weights: I/O and size."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from quantcli.errors import InputError, ModelError

IO = tuple[tuple[str, str], ...]  # (name, element type) in graph order


@dataclass(frozen=True)
class ModelInfo:
    path: str
    size_bytes: int  # the .onnx file plus every external data file it references
    external_data: tuple[str, ...]  # external data file names, relative to the model
    inputs: IO
    outputs: IO

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "external_data": list(self.external_data),
            "inputs": [{"name": n, "dtype": t} for n, t in self.inputs],
            "outputs": [{"name": n, "dtype": t} for n, t in self.outputs],
        }


def inspect_model(path: str) -> ModelInfo:
    if not os.path.isfile(path):
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"cannot read {path} as an ONNX model: {exc}") from None
    files = sorted(_external_locations(model.graph))
    base = Path(path).parent
    size = os.path.getsize(path)
    for name in files:
        data = base / name
        if not data.is_file():
            raise ModelError(
                f"external data file '{name}' of {path} is missing",
                hint="keep the model's data file next to it, under the same name",
            )
        size += data.stat().st_size
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = tuple((v.name, _elem_type(v)) for v in graph.input if v.name not in weights)
    outputs = tuple((v.name, _elem_type(v)) for v in graph.output)
    return ModelInfo(path, size, tuple(files), inputs, outputs)


def _elem_type(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    return onnx.TensorProto.DataType.Name(elem).lower() if elem else "unknown"


def _external_locations(graph: onnx.GraphProto) -> set[str]:
    """`location` of every tensor stored outside the file, subgraphs included."""
    tensors = list(graph.initializer)
    tensors += [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    found: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            tensors += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found |= _external_locations(sub)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found |= {e.value for e in t.external_data if e.key == "location"}
    return found


def check_signatures(float_model: ModelInfo, quant_model: ModelInfo) -> None:
    """Both models must take the same inputs and give the same outputs."""
    for kind in ("inputs", "outputs"):
        f, q = dict(getattr(float_model, kind)), dict(getattr(quant_model, kind))
        if f == q:
            continue
        names = sorted(set(f) ^ set(q))
        detail = (
            f"names differ: {', '.join(names)}"
            if names
            else "dtypes differ: " + ", ".join(f"{n} {f[n]} vs {q[n]}" for n in f if f[n] != q[n])
        )
        raise InputError(
            f"the models' {kind} do not match ({detail})",
            hint=f"{quant_model.path} must be a quantization of {float_model.path}",
        )
