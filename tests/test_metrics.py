from __future__ import annotations

import math

import numpy as np
import pytest

from quantcli.errors import DataError, InputError
from quantcli.evaluate.metrics import (
    ClassifierAccumulator,
    ErrorAccumulator,
    OutputAccumulator,
    json_number,
    looks_like_probabilities,
    sqnr_db,
)
from quantcli.evaluate.plugin import load_metric


def error_of(ref, q, rows=None):
    acc = ErrorAccumulator()
    acc.update(np.asarray(ref, np.float32), np.asarray(q, np.float32), rows)
    return acc.result()


def test_cosine_per_sample_and_global():
    e = error_of([[1, 0], [0, 1]], [[1, 0], [1, 1]])
    assert e.cosine_mean == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert e.cosine_global == pytest.approx(2 / math.sqrt(6))  # dot 2, |r|² 2, |q|² 3
    assert e.samples == 2


def test_cosine_flattens_each_sample():
    e = error_of([[[1, 0], [0, 0]]], [[[0, 0], [0, 1]]])
    assert e.cosine_mean == 0.0 and e.samples == 1


def test_cosine_of_zero_vectors():
    assert error_of([[0, 0]], [[0, 0]]).cosine_mean == 1.0
    assert error_of([[0, 0]], [[1, 0]]).cosine_mean == 0.0


def test_sqnr_in_db():
    e = error_of([[3, 4]], [[3, 3]])  # signal 25, noise 1
    assert e.sqnr_db == pytest.approx(10 * math.log10(25))
    assert not e.identical
    same = error_of([[3, 4]], [[3, 4]])
    assert same.sqnr_db == math.inf and same.identical
    assert sqnr_db(0.0, 1.0) == -math.inf


def test_abs_errors():
    e = error_of([[1, 2], [3, 4]], [[1, 2.5], [2, 4]])
    assert e.max_abs_error == 1.0
    assert e.mean_abs_error == pytest.approx(0.375)


def test_streaming_matches_one_shot():
    rng = np.random.default_rng(0)
    ref, q = rng.normal(size=(10, 3, 4)), rng.normal(size=(10, 3, 4))
    whole = error_of(ref, q)
    acc = ErrorAccumulator()
    for lo, hi in ((0, 3), (3, 4), (4, 10)):
        acc.update(ref[lo:hi], q[lo:hi], hi - lo)
    parts = acc.result()
    for field in ("cosine_mean", "cosine_global", "sqnr_db", "max_abs_error", "mean_abs_error"):
        assert getattr(parts, field) == pytest.approx(getattr(whole, field))


def test_no_batch_axis_is_one_sample():
    e = error_of([1, 0, 0], [1, 0, 0], rows=4)
    assert e.samples == 1


def test_quant_nonfinite_counted():
    e = error_of([[1, 2, 3]], [[1, np.nan, np.inf]])
    assert e.nonfinite == 2
    d = e.to_dict()
    assert d["sqnr_db"] is d["max_abs_error"] is d["mean_abs_error"] is d["cosine_mean"] is None
    assert d["quant_nonfinite"] == 2 and not d["identical"]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        error_of([[1, 2]], [[1, 2, 3]])


def test_top1_top5_and_kl_from_logits():
    ref = np.array([[0.0, math.log(3)]])  # softmax: [1/4, 3/4]
    q = np.array([[0.0, 0.0]])  # softmax: [1/2, 1/2], argmax 0
    acc = ClassifierAccumulator(2, probabilities=False)
    acc.update(ref, q, None)
    m = acc.result()
    assert m.top1_agreement == 0.0
    assert m.top1_in_top5 == 1.0  # only 2 classes: top-5 is everything
    assert m.kl_divergence_mean == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert m.accuracy_float is None and m.accuracy_drop_points is None


def test_kl_uses_probabilities_directly():
    ref, q = np.array([[0.25, 0.75]]), np.array([[0.5, 0.5]])
    assert looks_like_probabilities(ref)
    assert not looks_like_probabilities(np.array([[2.0, -1.0]]))
    acc = OutputAccumulator("probs")
    acc.update(ref, q, np.array([0]), None)
    m = acc.result().classifier
    assert m is not None and m.probabilities
    assert m.kl_divergence_mean == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))


def test_top5_agreement():
    ref = np.array([[9, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 9.0]])
    q = np.array([[3, 6, 5, 4, 2, 1, 0], [7, 6, 5, 4, 3, 2, 1.0]])
    acc = ClassifierAccumulator(7, probabilities=False)
    acc.update(ref, q, None)
    m = acc.result()
    assert m.top1_in_top5 == 0.5  # class 0 ranks 4th in row 1, class 6 last in row 2
    assert m.top1_agreement == 0.0


def test_accuracy_and_drop_with_labels():
    ref = np.eye(3)[[0, 1, 2, 0]] * 5
    q = np.eye(3)[[0, 1, 0, 1]] * 5
    acc = OutputAccumulator("logits")
    acc.update(ref[:2], q[:2], np.array([0, 1]), np.array([0, 1]))
    acc.update(ref[2:], q[2:], np.array([2, 3]), np.array([2, 0]))
    m = acc.result().classifier
    assert m is not None
    assert m.accuracy_float == 1.0 and m.accuracy_quant == 0.5
    assert m.accuracy_drop_points == pytest.approx(50.0)
    assert m.top1_agreement == 0.5


def test_not_a_classifier():
    acc = OutputAccumulator("feat")
    acc.update(np.ones((2, 3, 4)), np.ones((2, 3, 4)), np.array([0, 1]), None)
    assert acc.result().classifier is None


def test_nonfinite_float_output_names_sample():
    acc = OutputAccumulator("logits")
    ref = np.array([[1.0, 2.0], [np.nan, 0.0]])
    with pytest.raises(DataError, match=r"float model output 'logits' has NaN/Inf on sample 11"):
        acc.update(ref, ref, np.array([10, 11]), None)


def test_json_number():
    assert json_number(1.5) == 1.5
    assert json_number(math.inf) is None and json_number(math.nan) is None
    assert json_number(None) is None


PLUGIN = """
import numpy as np

def mse(f, q, labels):
    return {"mse": float(np.mean((f["y"] - q["y"]) ** 2)), "n": len(f["y"])}

class Count:
    def __init__(self):
        self.n = 0
    def update(self, f, q, labels):
        self.n += len(f["y"])
    def result(self):
        return {"count": self.n}

def bad(f, q, labels):
    return [1]
"""


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_metric.py"
    path.write_text(PLUGIN)
    return path


def feed(plugin, batches):
    for f, q in batches:
        plugin.update({"y": np.asarray(f, float)}, {"y": np.asarray(q, float)}, None)
    return plugin.result()


def test_function_metric_sees_all_samples(plugin_file):
    out = feed(load_metric(f"{plugin_file}:mse"), [([0, 1], [0, 2]), ([2], [4])])
    assert out == {"mse": pytest.approx(5 / 3), "n": 3.0}


def test_class_metric_streams(plugin_file):
    assert feed(load_metric(f"{plugin_file}:Count"), [([0, 1], [0, 1]), ([2], [2])]) == {
        "count": 3.0
    }


def test_metric_from_module():
    plugin = load_metric("math:hypot")  # a callable; its result is checked when called
    with pytest.raises(InputError, match="failed"):
        feed(plugin, [([1], [1])])


@pytest.mark.parametrize(
    "spec", ["nocolon", "no_such_module_xyz:f", "math:no_such_name", "missing/file.py:f"]
)
def test_bad_metric_spec(spec):
    with pytest.raises(InputError):
        load_metric(spec)


def test_metric_with_bad_result(plugin_file):
    with pytest.raises(InputError, match="dict of str to float"):
        feed(load_metric(f"{plugin_file}:bad"), [([1], [1])])
