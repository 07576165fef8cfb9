from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.errors import DataError, InputError, ModelError
from quantcli.evaluate import SCHEMA, CompareConfig, GateSpec, compare
from quantcli.evaluate.gates import check_gates_possible, evaluate_gates
from quantcli.evaluate.model_file import inspect_model

ort_quant = pytest.importorskip("onnxruntime.quantization")
N, FEATURES, CLASSES = 12, 8, 4


def mlp(path, input_name="x", output_name="logits", external=False):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(FEATURES, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, CLASSES)).astype(np.float32) * 0.3, "w2")
    nodes = [
        helper.make_node("MatMul", [input_name, "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("MatMul", ["h_relu", "w2"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", CLASSES])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


class Batch(NamedTuple):
    indices: np.ndarray
    feeds: dict[str, np.ndarray]


class StubData:
    description = "stub: 12 random vectors"
    synthetic = False

    def __init__(self, labels=None, num_samples=N, name="x", x=None, offset=0, step=1):
        self.num_samples = num_samples
        self.offset, self.step = offset, step  # dataset positions, as sharding spaces them
        self.labels = labels
        self.name = name
        self.x = np.random.default_rng(5).normal(size=(N, FEATURES)).astype(np.float32)
        if x is not None:
            self.x = x
        self.calls = 0

    def batches(self, batch_size):
        self.calls += 1
        for lo in range(0, len(self.x), batch_size):
            idx = np.arange(lo, min(lo + batch_size, len(self.x)))
            yield Batch(self.offset + self.step * idx, {self.name: self.x[idx]})


class Reader(ort_quant.CalibrationDataReader):
    def __init__(self):
        x = StubData().x
        self.items = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    mlp(d / "f.onnx")
    logging.getLogger().setLevel(logging.ERROR)
    ort_quant.quantize_static(str(d / "f.onnx"), str(d / "q.onnx"), Reader())
    return str(d / "f.onnx"), str(d / "q.onnx")


def float_predictions(path):
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": StubData().x})[0].argmax(axis=1)


def reference_outputs(pair, x, batch_size):
    """Both models' logits (float64) computed directly with ORT, batch by batch."""
    sessions = [onnxruntime.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in pair]
    outs = [
        np.concatenate(
            [s.run(None, {"x": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
        ).astype(np.float64)
        for s in sessions
    ]
    return outs[0], outs[1]


FAST = CompareConfig(batch_size=5, runs=4, warmup=1, per_layer=True)


def test_end_to_end(pair):
    labels = float_predictions(pair[0])
    progress: list[tuple[int, int]] = []
    data = StubData(labels=labels)
    result = compare(*pair, data, FAST, progress=lambda d, t: progress.append((d, t)))
    assert data.calls == 2  # scoring pass + per-layer pass
    out = result.outputs[0]
    assert out.name == "logits" and out.error.samples == N
    want, got = reference_outputs(pair, data.x, FAST.batch_size)
    cosines = (want * got).sum(1) / np.sqrt((want * want).sum(1) * (got * got).sum(1))
    assert out.error.cosine_mean == pytest.approx(cosines.mean(), rel=1e-7)
    sqnr = 10 * np.log10((want * want).sum() / ((want - got) ** 2).sum())
    assert out.error.sqnr_db == pytest.approx(sqnr, rel=1e-7)
    assert out.error.max_abs_error == pytest.approx(np.abs(want - got).max(), rel=1e-7)
    # ORT's quantizer on this MLP: cosine 0.9995, 39.6 dB (23.5 dB with AVX2 kernels)
    assert out.error.cosine_mean > 0.998 and out.error.sqnr_db > 15
    cls = out.classifier
    assert cls is not None and cls.classes == CLASSES and cls.accuracy_float == 1.0
    assert result.latency is not None and result.latency.float_stats.runs == 4
    assert result.latency.float_stats.batch_size == 5
    assert result.layers and {x.name for x in result.layers} >= {"x", "h_relu", "logits"}
    assert progress[-1] == (N + N + 1 + 4, N + N + 1 + 4)
    assert result.passed and result.gates == []
    sizes = [os.path.getsize(p) for p in pair]  # a model this small grows when quantized
    assert result.float_model.size_bytes == sizes[0]
    assert result.size_ratio == pytest.approx(sizes[1] / sizes[0])


def test_labels_follow_batch_order_not_dataset_positions(pair):
    labels = float_predictions(pair[0])
    data = StubData(labels=labels, offset=100, step=3)
    cfg = CompareConfig(batch_size=5, runs=0, max_samples=9)
    cls = compare(*pair, data, cfg).outputs[0].classifier
    assert cls is not None and cls.accuracy_float == 1.0


def test_to_dict_schema(pair):
    result = compare(*pair, StubData(labels=float_predictions(pair[0])), FAST)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["schema"] == SCHEMA == "quantcli.compare/1"
    top = {"schema", "quantcli_version", "onnxruntime_version", "passed", "models", "data"}
    top |= {"settings", "summary", "outputs", "latency", "layers", "custom_metrics", "gates"}
    top |= {"host", "x86_saturation", "warnings"}
    assert set(d) == top
    host = {"cpu", "machine", "int8_isa", "int16_saturation", "onnxruntime", "provider"}
    assert set(d["host"]) == host and d["host"]["provider"] == "cpu"
    check = {"safe", "pair_limit", "checked_weights", "nodes_at_risk", "unsafe_channels"}
    assert set(d["x86_saturation"]) == check | {"unchecked_nodes"}
    assert set(d["models"]) == {"float", "quant", "size_ratio"}
    assert set(d["models"]["float"]) == {"path", "size_bytes", "external_data", "inputs", "outputs"}
    assert set(d["summary"]) == {
        "cosine_min",
        "sqnr_db_min",
        "top1_agreement",
        "accuracy_float",
        "accuracy_quant",
        "accuracy_drop_points",
        "speedup",
        "size_ratio",
    }
    assert d["data"] == {
        "description": StubData.description,
        "num_samples": N,
        "available_samples": N,
        "synthetic": False,
        "labels": True,
    }
    assert d["settings"]["batch_size"] == 5 and "gates" not in d["settings"]
    output = d["outputs"][0]
    assert {"name", "cosine_mean", "cosine_global", "sqnr_db", "identical"} <= set(output)
    assert {"max_abs_error", "mean_abs_error", "quant_nonfinite", "classifier"} <= set(output)
    assert {"top1_agreement", "top1_in_top5", "kl_divergence_mean"} <= set(output["classifier"])
    assert {"float", "quant", "speedup", "speedup_q1", "speedup_q3"} <= set(d["latency"])


def test_gates_in_result(pair):
    gates = GateSpec(max_drop=100, min_cosine=0.5, min_speedup=1e-9, max_size_ratio=1e-6)
    cfg = CompareConfig(runs=2, warmup=0, gates=gates)
    result = compare(*pair, StubData(labels=float_predictions(pair[0])), cfg)
    by_name = {g.name: g for g in result.gates}
    assert list(by_name) == ["max-drop", "min-cosine", "min-speedup", "max-size-ratio"]
    assert by_name["max-drop"].passed and by_name["min-cosine"].passed
    assert not by_name["max-size-ratio"].passed
    assert not result.passed and result.to_dict()["passed"] is False


def test_identical_models_and_user_metric(pair, tmp_path):
    metric = tmp_path / "m.py"
    metric.write_text("def n(f, q, labels):\n    return {'rows': len(f['logits'])}\n")
    cfg = CompareConfig(runs=0, metric=f"{metric}:n", max_samples=7, batch_size=3)
    result = compare(pair[0], pair[0], StubData(), cfg)
    assert result.outputs[0].error.identical and result.outputs[0].error.samples == 7
    assert result.custom_metrics == {"rows": 7.0}
    assert result.latency is None and result.layers is None
    d = result.to_dict()
    assert d["outputs"][0]["sqnr_db"] is None and d["summary"]["sqnr_db_min"] is None


def test_external_data_size(tmp_path):
    path = mlp(tmp_path / "ext.onnx", external=True)
    info = inspect_model(str(path))
    assert info.external_data == ("weights.bin",)
    assert info.size_bytes == path.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelError, match=r"weights\.bin"):
        inspect_model(str(path))


def test_gate_evaluation():
    summary = {"accuracy_drop_points": 0.8, "cosine_min": 0.99, "speedup": 1.5, "size_ratio": 0.3}
    gates = GateSpec(max_drop=1.0, min_cosine=0.995, min_speedup=1.5, max_size_ratio=0.25)
    results = evaluate_gates(gates, summary)
    assert [(g.name, g.value, g.passed) for g in results] == [
        ("max-drop", 0.8, True),
        ("min-cosine", 0.99, False),
        ("min-speedup", 1.5, True),
        ("max-size-ratio", 0.3, False),
    ]
    assert results[0].to_dict() == {
        "name": "max-drop",
        "threshold": 1.0,
        "value": 0.8,
        "passed": True,
    }
    assert not evaluate_gates(GateSpec(max_drop=1), {"accuracy_drop_points": None})[0].passed
    assert not evaluate_gates(GateSpec(min_cosine=0.9), {"cosine_min": float("nan")})[0].passed


@pytest.mark.parametrize(
    ("gates", "labels", "runs", "match"),
    [
        (GateSpec(max_drop=1), False, 5, "needs labels"),
        (GateSpec(min_speedup=1), True, 0, "runs is 0"),
        (GateSpec(min_cosine=2), True, 5, r"\[-1, 1\]"),
        (GateSpec(max_size_ratio=0), True, 5, "positive"),
        (GateSpec(min_cosine=float("nan")), True, 5, "finite"),
    ],
)
def test_impossible_gates(gates, labels, runs, match):
    with pytest.raises(InputError, match=match):
        check_gates_possible(gates, has_labels=labels, latency_runs=runs)


def test_max_drop_without_labels_fails_before_running(pair):
    data = StubData()
    with pytest.raises(InputError, match="needs labels"):
        compare(*pair, data, CompareConfig(gates=GateSpec(max_drop=1)))
    assert data.calls == 0


def test_input_mismatch(pair, tmp_path):
    other = str(mlp(tmp_path / "renamed.onnx", input_name="input"))
    with pytest.raises(InputError, match=r"inputs do not match.*names differ: input, x"):
        compare(pair[0], other, StubData(), FAST)


def test_output_mismatch(pair, tmp_path):
    other = str(mlp(tmp_path / "renamed.onnx", output_name="probs"))
    with pytest.raises(InputError, match="outputs do not match"):
        compare(pair[0], other, StubData(), FAST)


def test_labels_of_wrong_length(pair):
    with pytest.raises(InputError, match="5 labels for 12 samples"):
        compare(*pair, StubData(labels=np.zeros(5, np.int64)), FAST)


def test_unavailable_provider(pair, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(InputError, match="'cuda' is not available"):
        compare(*pair, StubData(), CompareConfig(provider="cuda"))


def test_bad_settings_and_files(pair, tmp_path):
    with pytest.raises(InputError, match="batch-size"):
        compare(*pair, StubData(), CompareConfig(batch_size=0))
    with pytest.raises(ModelError, match="not found"):
        compare(str(tmp_path / "nope.onnx"), pair[1], StubData(), FAST)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(ModelError):
        compare(str(junk), pair[1], StubData(), FAST)


def test_nan_in_float_output(pair):
    x = StubData().x.copy()
    x[7, 0] = np.nan
    with pytest.raises(DataError, match="has NaN/Inf on sample 114"):
        compare(*pair, StubData(x=x, offset=100, step=2), FAST)


def test_data_not_matching_model(pair):
    with pytest.raises(DataError, match=r"float model failed on samples 0\.\.4"):
        compare(*pair, StubData(name="wrong"), FAST)
