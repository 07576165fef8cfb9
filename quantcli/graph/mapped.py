"""Load a single-file model with its weights memory-mapped from the file itself.

`onnx.load` reads the whole file into memory and parses it into a second copy (twice the
model at once); the ONNX checker on a path loads a third. Here only the protobuf's
structure is read: the file is memory-mapped, the wire format walked down to each
initializer's `raw_data`, and every large one becomes an external-data reference into the
`.onnx` file itself (location = the file, offset = where the bytes are). onnx-ir then maps
those bytes on demand, and a weight that has been replaced can be unmapped.

Anything unusual (a hard-linked file, tensors in typed fields, a parse problem) falls back
to `graph.io.load_model`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from quantcli.errors import ModelError
from quantcli.graph.io import (
    LoadedModel,
    _check_domains,
    _external_files,
    check_model_path,
    load_model,
)

MIN_MAPPED = 4096  # bytes: smaller tensors stay inline
# INT8 maps a model only above this: ONNX Runtime gets a mapped model through a temporary
# file, and a small model is cheaper handed over as bytes.
MAP_ABOVE = 64_000_000
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_LEN = 2


def load_model_mapped(path: str | os.PathLike, above: int = 0) -> LoadedModel:
    """Like `load_model`, with a single-file model's large weights left in the file (when
    the file is over ``above`` bytes: a small model is cheaper to hold than to map)."""
    path = Path(path)
    check_model_path(path)
    # onnx-ir refuses to map hard-linked data files
    if path.stat().st_nlink > 1 or path.stat().st_size <= above:
        return load_model(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stripped, mapped = _strip(buf, path.name)
    except (ValueError, IndexError):
        return load_model(path)
    if not mapped:  # nothing large inline (external data already, or a tiny model)
        return load_model(path)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(stripped)
    except Exception:
        return load_model(path)
    del stripped
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelError(f"{path} is not an ONNX model (no graph found)", hint="pass an .onnx file")
    _check_domains(proto)
    try:
        onnx.checker.check_model(_for_checker(proto))
    except onnx.checker.ValidationError as exc:
        raise ModelError(
            f"{path} fails the ONNX checker: {str(exc).strip().splitlines()[0][:160]}",
            hint="re-export the model or fix it with onnx tools",
        ) from exc
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return LoadedModel(model=model, path=path, size_bytes=path.stat().st_size)


def model_structure(path: Path) -> onnx.ModelProto:
    """The model's protobuf without reading its large inline weights (they become references
    to the file itself; external data entries are kept as written)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stripped, _ = _strip(buf, path.name)
    except (ValueError, IndexError):  # an empty or unusual file: the plain reader decides
        return onnx.load(str(path), format="protobuf", load_external_data=False)
    proto = onnx.ModelProto()
    proto.ParseFromString(stripped)
    return proto


def file_size(path: Path) -> int:
    """Bytes of a model file plus its external data files (the protobuf is read without its
    inline weights: a 250 MB single file is not parsed into memory to learn its size)."""
    path = Path(path)
    files = _external_files(model_structure(path), path.parent)
    own = path.resolve()
    return path.stat().st_size + sum(f.stat().st_size for f in files if f.resolve() != own)


def _for_checker(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose mapped tensors are empty: the checker looks for external files relative
    to the working directory; their bytes were already checked in place."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in copy.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            rank = len(tensor.dims)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.dims[:]
            tensor.dims.extend([0] * rank)
    return copy


def _varint(buf: mmap.mmap, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _fields(buf: mmap.mmap, start: int, end: int):
    """(field number, wire type, field start, payload start, payload end) of a message."""
    pos = start
    while pos < end:
        head = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            body, (_, stop) = pos, _varint(buf, pos)
        elif wire == 1:
            body, stop = pos, pos + 8
        elif wire == _LEN:
            length, body = _varint(buf, pos)
            stop = body + length
        elif wire == 5:
            body, stop = pos, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if stop > end:
            raise ValueError("truncated message")
        yield number, wire, head, body, stop
        pos = stop


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _strip(buf: mmap.mmap, location: str) -> tuple[bytes, int]:
    """The model's bytes with large raw_data replaced by references into the file."""
    out, mapped = [], 0
    for number, wire, head, body, end in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire == _LEN:
            graph, count = _strip_graph(buf, body, end, location)
            out.append(_len_field(number, graph))
            mapped += count
        else:
            out.append(buf[head:end])
    return b"".join(out), mapped


def _strip_graph(buf: mmap.mmap, start: int, end: int, location: str) -> tuple[bytes, int]:
    out, mapped = [], 0
    for number, wire, head, body, stop in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == _LEN:
            tensor = _strip_tensor(buf, body, stop, location)
            if tensor is not None:
                out.append(_len_field(number, tensor))
                mapped += 1
                continue
        out.append(buf[head:stop])
    return b"".join(out), mapped


def _strip_tensor(buf: mmap.mmap, start: int, end: int, location: str) -> bytes | None:
    raw = None
    rest = []
    for number, wire, head, body, stop in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == _LEN and stop - body >= MIN_MAPPED:
            raw = (body, stop - body)
        else:
            rest.append(buf[head:stop])
    if raw is None:
        return None
    tensor = onnx.TensorProto()
    tensor.ParseFromString(b"".join(rest))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1]))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor.SerializeToString()


def release(value: ir.Value) -> None:
    """Unmap an external weight (mapped again on next use), so its pages leave our RSS."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of it is still alive: kept mapped
            tensor.release()


def release_external(model: ir.Model) -> None:
    """Unmap every memory-mapped initializer: pages a segment touched leave our RSS."""
    for value in model.graph.initializers.values():
        release(value)
