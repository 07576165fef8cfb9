"""Join a model saved with external data into one `.onnx` file, streaming the weights.

`ir.save` to a single file builds the whole protobuf in memory and then its serialized
bytes: two copies of every weight beside the model's own (on SmolLM2 INT8, 0.5 GB over
the model). Saved with external data, the weights stream to a data file instead; this
writes the single file from that pair: the graph's own fields, then each external
initializer as a TensorProto whose `raw_data` is copied from the data file in chunks.
Protobuf allows fields in any order and concatenates repeated ones, so the result parses
as the same model.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from quantcli.graph.mapped import _GRAPH_INITIALIZER as _INITIALIZER
from quantcli.graph.mapped import _LEN, _encode_varint
from quantcli.graph.mapped import _MODEL_GRAPH as _GRAPH
from quantcli.graph.mapped import _TENSOR_RAW_DATA as _RAW_DATA

_CHUNK = 16 << 20


def join_external(model_path: Path, data_name: str, out: Path) -> bool:
    """Write `out` as the single-file form of `model_path` + its data file `data_name`.
    Returns False (nothing written) when the data file is referenced outside the main
    graph's initializers, where this layout does not apply."""
    proto = onnx.load(str(model_path), format="protobuf", load_external_data=False)
    moved = [t for t in proto.graph.initializer if _location(t) == data_name]
    if _references(proto, data_name) != len(moved):
        return False
    kept = [t for t in proto.graph.initializer if _location(t) != data_name]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    heads = []
    for tensor in moved:
        info = {e.key: e.value for e in tensor.external_data}
        head = onnx.TensorProto()
        head.CopyFrom(tensor)
        del head.external_data[:]
        head.ClearField("data_location")
        length = int(info["length"])
        body = head.SerializeToString() + _tag(_RAW_DATA) + _encode_varint(length)
        heads.append((body, int(info.get("offset", 0)), length))
    graph = proto.graph.SerializeToString()
    entries = sum(len(_tag(_INITIALIZER)) + _size(len(b) + n) for b, _, n in heads)
    graph_len = len(graph) + entries
    proto.ClearField("graph")
    data = model_path.parent / data_name
    with open(out, "wb") as f, open(data, "rb") as src:
        f.write(proto.SerializeToString())
        f.write(_tag(_GRAPH) + _encode_varint(graph_len) + graph)
        for body, offset, length in heads:
            f.write(_tag(_INITIALIZER) + _encode_varint(len(body) + length) + body)
            src.seek(offset)
            left = length
            while left:
                chunk = src.read(min(left, _CHUNK))
                if not chunk:
                    raise OSError(f"{data} ends before the weights it should hold")
                f.write(chunk)
                left -= len(chunk)
    return True


def _tag(number: int) -> bytes:
    return _encode_varint(number << 3 | _LEN)


def _size(payload: int) -> int:
    """Bytes of a length prefix and its payload."""
    return len(_encode_varint(payload)) + payload


def _location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def _references(proto: onnx.ModelProto, data_name: str) -> int:
    """External tensors anywhere in the model (subgraphs, attributes) that use the file."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(1 for t in _get_all_tensors(proto) if _location(t) == data_name)
