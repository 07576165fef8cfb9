"""Joining a model saved with external data into one file, weights streamed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from conftest import run_ort, sample

from quantcli.graph.io import save_model
from quantcli.graph.mapped import file_size
from quantcli.graph.single_file import join_external


def _pair(tmp_path: Path, proto: onnx.ModelProto) -> Path:
    staged = tmp_path / "staged" / "m.onnx"
    staged.parent.mkdir()
    ir.save(ir.from_proto(proto), staged, external_data="m.onnx.data", size_threshold_bytes=0)
    return staged


def test_joined_file_is_the_same_model(tmp_path: Path) -> None:
    proto = onnx.load(str(sample("digits_cnn").model))
    staged = _pair(tmp_path, proto)
    out = tmp_path / "joined.onnx"
    assert join_external(staged, "m.onnx.data", out)
    joined = onnx.load(str(out))
    onnx.checker.check_model(joined, full_check=True)
    want = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in joined.graph.initializer}
    assert want.keys() == got.keys()
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array)
        assert got[name].dtype == array.dtype
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in joined.graph.initializer)
    x = {"input": np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(out, x)[0], run_ort(sample("digits_cnn").model, x)[0])


def test_refuses_weights_outside_the_main_graph_initializers(tmp_path: Path) -> None:
    """A Constant node's tensor in the data file cannot be joined this way: say so."""
    staged = _pair(tmp_path, onnx.load(str(sample("mlp").model)))
    proto = onnx.load(str(staged), load_external_data=False)
    moved = proto.graph.initializer[0]
    const = onnx.helper.make_node("Constant", [], [moved.name], value=moved)
    proto.graph.node.insert(0, const)
    del proto.graph.initializer[0]
    onnx.save(proto, str(staged))
    out = tmp_path / "joined.onnx"
    assert not join_external(staged, "m.onnx.data", out)
    assert not out.exists()


def test_save_model_writes_one_file_and_is_deterministic(tmp_path: Path) -> None:
    path = sample("encoder").model
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (first, second):
        save_model(ir.load(path), out, inputs=[path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]
    assert first.read_bytes() == second.read_bytes()
    onnx.checker.check_model(onnx.load(str(first)), full_check=True)
    released = ir.load(path)
    seen: list[int] = []
    save_model(
        released,
        tmp_path / "c.onnx",
        inputs=[path],
        validate=lambda staged: seen.append(len(released.graph.initializers)),
        release=True,
    )
    assert (tmp_path / "c.onnx").read_bytes() == first.read_bytes()
    assert seen and all(v.const_value is None for v in released.graph.initializers.values())


def test_subgraph_weights_are_joined_by_the_fallback(tmp_path: Path) -> None:
    """An If branch's large initializer lands in the staged data file, which the streaming
    join does not rewrite: the fallback reads everything in and writes one file."""
    w = np.arange(4096, dtype=np.float32).reshape(64, 64)
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y_then"])],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("y_then", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("y_else", onnx.TensorProto.FLOAT, [1, 64])],
    )
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    out = tmp_path / "if.onnx"
    save_model(ir.from_proto(model), out, release=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["if.onnx"]
    x = np.ones((1, 64), np.float32)
    got = run_ort(out, {"c": np.array(True), "x": x})[0]
    np.testing.assert_array_equal(got, x @ w)


def test_file_size_of_one_file_reads_no_weights(tmp_path: Path) -> None:
    """Inline weights above the mapping threshold are references into the file itself while
    file_size reads the structure: they are counted once, not as an external file."""
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)  # 16 KB > MIN_MAPPED
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "one.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert file_size(path) == path.stat().st_size
    staged = _pair(tmp_path, onnx.load(str(path)))
    data = staged.with_name("m.onnx.data")
    assert file_size(staged) == staged.stat().st_size + data.stat().st_size
