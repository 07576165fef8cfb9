"""INT8 QDQ end to end: the sample models, their variants, and inputs it must refuse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_NAMES, Cli, Sample, Tiny, run_ort, sample
from onnx import numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator

from quantcli.calibrate.config import CalibrationConfig
from quantcli.convert import convert_int8_file
from quantcli.errors import InputError
from quantcli.quantize.int8.config import Int8Config

EVAL = 256  # evaluation samples per model
QDQ = Int8Config(format="qdq")  # every planned node as Q/DQ (MatMuls too)


def _convert(s: Sample, out: Path, config: Int8Config, limit: int | None = None) -> Path:
    convert_int8_file(
        s.model, out, config, data_spec=str(s.calib), calibration=CalibrationConfig(limit=limit)
    )
    return out


Converted = Callable[[str], Path]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """Each sample model converted once with the defaults and its full calibration set."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("q8") / f"{name}.onnx"
            cache[name] = _convert(sample(name), out, QDQ)
        return cache[name]

    return get


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_model_stays_close_to_float(name: str, converted: Converted) -> None:
    s = sample(name)
    x, labels = s.eval_arrays(EVAL)
    (want,), (got,) = run_ort(s.model, {"input": x}), run_ort(converted(name), {"input": x})
    assert _cosines(want, got).mean() >= 0.99
    float_acc, quant_acc = (want.argmax(1) == labels).mean(), (got.argmax(1) == labels).mean()
    assert float_acc > 0.9
    assert abs(float_acc - quant_acc) <= 0.015


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_qdq_numerics_match_the_reference_evaluator(name: str, converted: Converted) -> None:
    proto = onnx.load(converted(name))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    x = sample(name).eval_arrays(8)[0]
    (got,) = run_ort(converted(name), {"input": x}, optimize=False)
    # onnx's reference DequantizeLinear starts at opset 19.
    if proto.opset_import[0].version < 19:
        proto = version_converter.convert_version(proto, 19)
    (want,) = ReferenceEvaluator(proto).run(None, {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["digits_cnn", "encoder"])
def test_conversion_is_deterministic(name: str, tmp_path: Path) -> None:
    s = sample(name)
    first = _convert(s, tmp_path / "a.onnx", QDQ, limit=16)
    second = _convert(s, tmp_path / "b.onnx", QDQ, limit=16)
    assert first.read_bytes() == second.read_bytes()


def _weight_dqs(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("variant", ["per-tensor", "tensorrt"])
def test_variants(name: str, variant: str, tmp_path: Path) -> None:
    s = sample(name)
    config = (
        Int8Config(format="qdq", per_channel=False)
        if variant == "per-tensor"
        else Int8Config.for_target("tensorrt")
    )
    out = _convert(s, tmp_path / "q.onnx", config, limit=64)
    proto = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    if variant == "per-tensor":
        for dq in _weight_dqs(proto):
            if inits[dq.input[0]].dtype == np.int8:  # weights; biases follow their weights
                assert inits[dq.input[1]].size == 1
    else:
        zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
        assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    x = s.eval_arrays(64)[0]
    # TensorRT files carry full 8-bit weights for GPU kernels; ORT runs them op by op here
    # (the QDQ arithmetic TensorRT implements), not fused into its CPU int8 kernels, whose
    # int16 pairs saturate on x86 without VNNI (docs/int8.md).
    fused = variant != "tensorrt"
    (want,), (got,) = run_ort(s.model, {"input": x}), run_ort(out, {"input": x}, optimize=fused)
    assert _cosines(want, got).mean() >= 0.99


def test_opset11_model_is_upgraded_for_per_channel(tiny: Tiny) -> None:
    path = tiny.path("opset11")
    out = tiny.root / "q.onnx"
    convert_int8_file(path, out, QDQ, data_spec=str(tiny.data(path)))
    proto = onnx.load(out)
    assert proto.opset_import[0].version == 13
    assert proto.ir_version >= 7  # what opset 13 needs
    axes = [next((a.i for a in n.attribute if a.name == "axis"), None) for n in _weight_dqs(proto)]
    assert 0 in axes  # per-channel weights
    feeds = tiny.feeds(path)
    (want,), (got,) = run_ort(path, feeds), run_ort(out, feeds)
    assert _cosines(want, got).min() > 0.99


def test_float16_model_converts(tiny: Tiny) -> None:
    """float16 models convert (opset raised to 19 for float16 scales), they don't fail."""
    path = tiny.path("float16")
    out = tiny.root / "q.onnx"
    convert_int8_file(path, out, QDQ, data_spec=str(tiny.data(path)))
    proto = onnx.load(out)
    assert proto.opset_import[0].version >= 19
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    feeds = tiny.feeds(path)
    (want,), (got,) = run_ort(path, feeds), run_ort(out, feeds)
    assert got.dtype == np.float16
    assert _cosines(want.astype(np.float32), got.astype(np.float32)).min() > 0.99


def test_if_subgraph_model_converts(tiny: Tiny) -> None:
    """Top-level MatMuls are quantized; the If branches stay float (they are not planned)."""
    path = tiny.path("if")
    out = tiny.root / "q.onnx"
    summary = convert_int8_file(path, out, QDQ, data_spec=str(tiny.data(path)))
    assert summary.quantized_by_type == {"MatMul": 1}
    proto = onnx.load(out)
    if_node = next(n for n in proto.graph.node if n.op_type == "If")
    for attr in if_node.attribute:
        assert [n.op_type for n in attr.g.node] == ["MatMul"]
    feeds = tiny.feeds(path)
    (want,), (got,) = run_ort(path, feeds), run_ort(out, feeds)
    assert _cosines(want, got).min() > 0.99


def test_already_quantized_model_is_refused(tiny: Tiny, converted: Converted, cli: Cli) -> None:
    out = tiny.root / "again.onnx"
    with pytest.raises(InputError, match="already quantized"):
        convert_int8_file(converted("mlp"), out, QDQ, data_spec=str(sample("mlp").calib))
    line = cli.fails("convert", converted("mlp"), "-o", out, "--data", sample("mlp").calib)
    assert "already quantized" in line and not out.exists()


def test_table_of_another_model_is_refused(tiny: Tiny, cli: Cli) -> None:
    table = tiny.root / "encoder.json"
    enc = sample("encoder")
    cli.ok("calibrate", enc.model, "--data", enc.calib, "-o", table, "--limit", "4")
    out = tiny.root / "out.onnx"
    with pytest.raises(InputError, match=r"made for another model \(encoder\.onnx\)"):
        convert_int8_file(sample("mlp").model, out, QDQ, table_path=table)
    line = cli.fails("convert", sample("mlp").model, "-o", out, "--calibration", table)
    assert "another model" in line and not out.exists()


def test_unknown_op_types_is_a_usage_error(tiny: Tiny, cli: Cli) -> None:
    s, out = sample("mlp"), tiny.root / "out.onnx"
    line = cli.fails("convert", s.model, "-o", out, "--data", s.calib, "--op-types", "Gemm,Foo")
    assert "'Foo' is not an op type" in line and not out.exists()
