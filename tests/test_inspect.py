"""`quantcli inspect`: values checked against counts made with onnx directly."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import Cli, Sample, Tiny
from onnx import numpy_helper


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def _expected(path: Path) -> dict:
    proto = onnx.load(path)
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        for n in _nodes(proto.graph)
    )
    tensors = [t for g in _graphs(proto.graph) for t in g.initializer]
    tensors += [n.attribute[0].t for n in _nodes(proto.graph) if n.op_type == "Constant"]
    return {
        "opsets": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        "op_types": dict(ops),
        "count": sum(int(np.prod(t.dims)) for t in tensors),
        "bytes": sum(numpy_helper.to_array(t).nbytes for t in tensors),
        "inputs": [i.name for i in proto.graph.input],
    }


def _inspect(cli: Cli, path: Path) -> dict:
    doc = json.loads(cli.ok("inspect", path, "--json").stdout)
    assert doc["schema"] == "quantcli.inspect/1"
    return doc


def test_inspect_json_values(sample_model: Sample, cli: Cli) -> None:
    doc, want = _inspect(cli, sample_model.model), _expected(sample_model.model)
    assert doc["opsets"] == want["opsets"]
    assert doc["op_types"] == want["op_types"]
    assert doc["nodes"] == sum(want["op_types"].values())
    assert doc["parameters"]["count"] == want["count"]
    assert doc["parameters"]["bytes"] == want["bytes"]
    assert doc["size_bytes"] == sample_model.model.stat().st_size
    (spec,) = doc["inputs"]
    calib = sample_model.calib_input(1)
    assert spec["name"] == "input" and spec["dtype"] == "float32"
    assert spec["shape"] == ["batch", *calib.shape[1:]]
    assert [o["name"] for o in doc["outputs"]] == ["logits"]
    assert doc["outputs"][0]["shape"] == ["batch", 10]
    assert doc["quantized"] == []
    assert doc["int8"]["nodes"] and doc["int4"]["nodes"]


def test_inspect_human_output(sample_model: Sample, cli: Cli) -> None:
    text = cli.ok("inspect", sample_model.model).stdout
    want = _expected(sample_model.model)
    for domain, version in want["opsets"].items():
        assert f"{domain} {version}" in text
    shape = ", ".join(str(d) for d in sample_model.calib_input(1).shape[1:])
    assert f"[batch, {shape}]" in text  # not swallowed as rich markup
    for op, count in want["op_types"].items():
        assert re.search(rf"\b{re.escape(op)}\b\s*│\s*{count}\s*│", text), op
    assert f"{want['count']:,}" in text
    assert re.search(r"already quantized\s*│\s*no", text)


def test_inspect_subgraph_parameters(tiny: Tiny, cli: Cli) -> None:
    path = tiny.path("if")
    doc, want = _inspect(cli, path), _expected(path)
    assert doc["op_types"] == want["op_types"] and doc["op_types"]["MatMul"] == 3
    assert doc["parameters"]["count"] == want["count"] == 8 * 8 + 1 + 2 * 8 * 4


@pytest.fixture
def int8_model(tiny: Tiny, cli: Cli) -> Path:
    path, out = tiny.path("gemm_mlp"), tiny.root / "q8.onnx"
    cli.ok("convert", path, "-o", out, "--data", tiny.data(path))
    return out


def test_inspect_detects_qdq(int8_model: Path, cli: Cli) -> None:
    doc, want = _inspect(cli, int8_model), _expected(int8_model)
    assert doc["quantized"] == ["QDQ"]
    assert doc["op_types"] == want["op_types"]
    assert doc["parameters"]["count"] == want["count"]
    assert "int8" in doc["parameters"]["by_dtype"] and "int32" in doc["parameters"]["by_dtype"]
    assert re.search(r"already quantized\s*│\s*QDQ", cli.ok("inspect", int8_model).stdout)


def test_inspect_detects_matmulnbits(tiny: Tiny, cli: Cli) -> None:
    path, out = tiny.path("gemm_mlp"), tiny.root / "q4.onnx"
    cli.ok("convert", path, "-o", out, "--bits", "4", "--block-size", "16")
    doc = _inspect(cli, out)
    assert doc["quantized"] == ["MatMulNBits"]
    assert doc["op_types"]["com.microsoft.MatMulNBits"] == 2
    assert doc["opsets"]["com.microsoft"] == 1
    assert doc["int4"]["nodes"] == []  # nothing left to quantize


def test_inspect_does_not_touch_the_file(sample_model: Sample, cli: Cli) -> None:
    before = sample_model.model.read_bytes()
    _inspect(cli, sample_model.model)
    assert sample_model.model.read_bytes() == before
