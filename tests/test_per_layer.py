from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_ort
from onnx import TensorProto, helper, numpy_helper

from quantcli.evaluate.per_layer import match_layers, per_layer_errors

ort_quant = pytest.importorskip("onnxruntime.quantization")


def conv_model(path):
    """x[N,3,8,8] -> Conv -> Relu -> MaxPool -> Reshape -> MatMul -> Add -> logits[N,5]."""
    rng = np.random.default_rng(0)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"]),
        helper.make_node(
            "MaxPool", ["relu_out"], ["pool_out"], kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Reshape", ["pool_out", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm_out"]),
        helper.make_node("Add", ["mm_out", "fc_b"], ["logits"]),
    ]
    inits = [init("w", (4, 3, 3, 3)), init("b", (4,), 0.1), init("fc_w", (64, 5), 0.2)]
    inits += [init("fc_b", (5,), 0.1), numpy_helper.from_array(np.array([0, -1]), "shape")]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


class Reader(ort_quant.CalibrationDataReader):
    def __init__(self, name, shape):
        rng = np.random.default_rng(1)
        self.items = iter([{name: rng.normal(size=shape).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.items, None)


def quantize(src, dst, fmt, name="x", shape=(1, 3, 8, 8)):
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about preprocessing
    ort_quant.quantize_static(str(src), str(dst), Reader(name, shape), quant_format=fmt)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("per_layer")
    conv_model(d / "f.onnx")
    quantize(d / "f.onnx", d / "qdq.onnx", ort_quant.QuantFormat.QDQ)
    quantize(d / "f.onnx", d / "qop.onnx", ort_quant.QuantFormat.QOperator)
    return d


def batches(n=3, size=4):
    rng = np.random.default_rng(2)
    for i in range(n):
        x = rng.normal(size=(size, 3, 8, 8)).astype(np.float32)
        yield np.arange(i * size, (i + 1) * size), {"x": x}


def matches(models, quant):
    found = match_layers(ir.load(models / "f.onnx"), ir.load(models / quant))
    return {m.float_name: m for m in found}


def test_match_qdq(models):
    found = matches(models, "qdq.onnx")
    assert set(found) == {"x", "relu_out", "pool_out", "flat", "mm_out", "logits"}
    assert found["relu_out"].quant_name == "relu_out_DequantizeLinear_Output"
    assert found["x"].op_type == "(input)" and found["mm_out"].op_type == "MatMul"
    assert found["logits"].quant_name == "logits"
    assert all(m.qparams is None for m in found.values())


def test_match_qoperator(models):
    found = matches(models, "qop.onnx")
    assert set(found) == {"x", "relu_out", "pool_out", "flat", "mm_out", "logits"}
    # QLinearConv absorbed the Relu: its output approximates relu_out, not conv_out
    assert found["relu_out"].quant_name == "conv_out_quantized"
    assert found["relu_out"].qparams == ("conv_out_scale", "conv_out_zero_point")
    # MaxPool on int8 keeps the conv's scale
    assert found["pool_out"].qparams == ("conv_out_scale", "conv_out_zero_point")
    assert found["x"].quant_name == "x_quantized"
    assert found["logits"].qparams is None


def with_outputs(path, names):
    """The model at path with `names` exposed as graph outputs (ORT infers their types)."""
    model = onnx.load(path)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_empty_tensor_value_info(n) for n in names if n not in known
    )
    return model


def run_named(model, feeds):
    names = [o.name for o in model.graph.output]
    return dict(zip(names, run_ort(model, feeds), strict=True))


def reference_sqnr(models, quant, found):
    """SQNR in dB per float tensor, computed plainly: run both models with the matched
    tensors exposed, dequantize integer ones with their scale and zero point, and sum."""
    qmodel = onnx.load(models / quant)
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    names = sorted(found)
    qnames = [found[n].quant_name for n in names]
    fmodel = with_outputs(models / "f.onnx", [n for n in names if n != "x"])
    qmodel = with_outputs(models / quant, qnames)
    signal, noise = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for _, feeds in batches():
        fout, qout = run_named(fmodel, feeds), run_named(qmodel, feeds)
        for name in names:
            ref = (feeds if name == "x" else fout)[name].astype(np.float64)
            m = found[name]
            q = qout[m.quant_name]
            if m.qparams is not None:
                scale, zero = (inits[p] for p in m.qparams)
                q = (q.astype(np.float32) - zero.astype(np.float32)) * scale
            signal[name] += float((ref**2).sum())
            noise[name] += float(((ref - q.astype(np.float64)) ** 2).sum())
    return {n: 10 * math.log10(signal[n] / noise[n]) for n in names}


@pytest.mark.parametrize("quant", ["qdq.onnx", "qop.onnx"])
def test_errors_worst_first(models, quant):
    layers = per_layer_errors(str(models / "f.onnx"), str(models / quant), batches())
    assert {x.name for x in layers} == {"x", "relu_out", "pool_out", "flat", "mm_out", "logits"}
    sqnrs = [x.error.sqnr_db for x in layers]
    assert sqnrs == sorted(sqnrs)
    expected = reference_sqnr(models, quant, matches(models, quant))
    assert {x.name: x.error.sqnr_db for x in layers} == pytest.approx(expected, rel=1e-6)
    # A sane 8-bit quantization (measured 20.5 to 42.5 dB), not a mismatch (~0 dB or less)
    assert all(15 < s < 50 for s in sqnrs)
    assert all(x.error.samples == 12 and x.error.cosine_mean > 0.99 for x in layers)
    d = layers[0].to_dict()
    assert set(d) >= {"name", "quant_name", "op_type", "sqnr_db", "cosine"}


def test_same_model_is_identical(models):
    path = str(models / "f.onnx")
    ticks: list[int] = []
    layers = per_layer_errors(path, path, batches(2), tick=ticks.append)
    assert layers and all(x.error.sqnr_db == math.inf for x in layers)
    assert sum(ticks) == 8
