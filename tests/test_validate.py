"""The output validator on real broken models: each failure is InvalidOutput (exit 3) and the
save it guards leaves no file behind, neither the output nor its temp folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import Cli, Tiny
from onnx import TensorProto, helper, numpy_helper

from quantcli.graph.io import save_model
from quantcli.validate import InvalidOutput, output_validator

FLOAT = TensorProto.FLOAT
SAMPLES = [{"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}]


def _model(
    nodes: list[onnx.NodeProto],
    inits: Sequence[TensorProto] = (),
    *,
    out_shape: list[int | str] | None = None,
    domains: tuple[str, ...] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", FLOAT, out_shape or ["N", 4])],
        list(inits),
    )
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def unsorted_graph() -> onnx.ModelProto:
    """A node reads a tensor nothing produces: the checker's own structural check fails."""
    return _model([helper.make_node("Relu", ["missing"], ["y"])])


def type_clash() -> onnx.ModelProto:
    """float + int64: only full_check's strict shape inference sees it (InferenceError)."""
    return _model([helper.make_node("Add", ["x", "k"], ["y"])], [_const("k", np.ones(4, np.int64))])


def unknown_custom_op() -> onnx.ModelProto:
    """The checker accepts ops of a custom domain; ONNX Runtime refuses to load the model."""
    return _model(
        [helper.make_node("Foo", ["x"], ["y"], domain="com.example")], domains=("com.example",)
    )


def fails_at_run_time() -> onnx.ModelProto:
    """Reshape [N,4] to [3,5]: valid for the checker (N is symbolic), fails when run."""
    reshape = helper.make_node("Reshape", ["x", "s"], ["y"])
    return _model([reshape], [_const("s", np.array([3, 5], np.int64))], out_shape=["a", "b"])


def divides_by_zero() -> onnx.ModelProto:
    """x / 0: a valid model whose output is +-inf (or NaN) for every finite input."""
    div = helper.make_node("Div", ["x", "z"], ["y"])
    return _model([div], [_const("z", np.zeros(4, np.float32))])


BROKEN = {
    "unsorted_graph": (unsorted_graph, "fails the ONNX checker"),
    "type_clash": (type_clash, "fails the ONNX checker"),
    "unknown_custom_op": (unknown_custom_op, "ONNX Runtime cannot load"),
    "fails_at_run_time": (fails_at_run_time, "fails to run on sample 0"),
    "divides_by_zero": (divides_by_zero, "output 'y' is not finite on sample 0"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_validator_rejects_a_broken_model(case: str, tmp_path: Path) -> None:
    build, message = BROKEN[case]
    path = tmp_path / f"{case}.onnx"
    onnx.save(build(), path)
    with pytest.raises(InvalidOutput, match=message) as caught:
        output_validator(SAMPLES)(path)
    assert caught.value.exit_code == 3


@pytest.mark.parametrize("case", BROKEN)
def test_save_of_a_broken_model_leaves_nothing(case: str, tmp_path: Path) -> None:
    build, message = BROKEN[case]
    model = ir.from_proto(build())
    out = tmp_path / "out.onnx"
    with pytest.raises(InvalidOutput, match=message):
        save_model(model, out, validate=output_validator(SAMPLES))
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder
    out.write_bytes(b"old")
    with pytest.raises(InvalidOutput, match=message):
        save_model(model, out, force=True, validate=output_validator(SAMPLES))
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"old"


def test_a_valid_model_passes(tmp_path: Path) -> None:
    relu = _model([helper.make_node("Relu", ["x"], ["y"])])
    out = save_model(ir.from_proto(relu), tmp_path / "ok.onnx", validate=output_validator(SAMPLES))
    assert [p.name for p in tmp_path.iterdir()] == ["ok.onnx"] and out.stat().st_size > 0


@pytest.mark.parametrize("bits", [["--dynamic"], ["--bits", "4", "--block-size", "16"]])
def test_convert_of_a_model_with_nonfinite_outputs_exits_3(
    bits: list[str], tiny: Tiny, cli: Cli
) -> None:
    """Through the real convert path: the quantized MatMul still divides by zero, so the
    written model's outputs are not finite; convert exits 3 and writes nothing."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Div", ["h", "z"], ["y"], name="div"),
        ],
        "inf",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 16])],
        [
            _const("w", rng.standard_normal((32, 16)).astype(np.float32)),
            _const("z", np.zeros(16, np.float32)),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    path = tiny.path("inf", proto)
    before = sorted(tiny.root.iterdir())
    line = cli.fails("convert", path, *bits, "-o", tiny.root / "q.onnx", code=3)
    assert "output 'y' is not finite" in line
    assert sorted(tiny.root.iterdir()) == before
