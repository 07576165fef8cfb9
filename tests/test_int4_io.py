"""INT4 I/O: single-file models memory-mapped from the file, the opset upgrade of --format qdq
without the weights, and what inspect counts in a MatMulNBits model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import SAMPLE_NAMES, Cli, run_ort, sample
from int4_models import tiny_lm

from quantcli.convert import convert_int4_file
from quantcli.graph import mapped
from quantcli.graph.mapped import load_model_mapped
from quantcli.quantize.int4.config import Int4Config


def _arrays(model: ir.Model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}


@pytest.mark.parametrize("name", [*SAMPLE_NAMES, "tiny_lm"])
def test_mapped_load_equals_onnx_load(name: str, tmp_path: Path) -> None:
    if name == "tiny_lm":
        path = tmp_path / "lm.onnx"
        onnx.save(tiny_lm(), path)
    else:
        path = sample(name).model
    loaded = load_model_mapped(path)
    want = ir.from_proto(onnx.load(path))
    got = _arrays(loaded.model)
    assert got.keys() == _arrays(want).keys()
    for key, array in _arrays(want).items():
        assert got[key].dtype == array.dtype and np.array_equal(got[key], array), key
    external = [
        v
        for v in loaded.model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]
    assert external and all(v.const_value.nbytes >= mapped.MIN_MAPPED for v in external)
    assert loaded.size_bytes == path.stat().st_size and not loaded.external_data


def test_mapped_load_falls_back_for_hard_links_and_external_data(tmp_path: Path) -> None:
    path = tmp_path / "lm.onnx"
    onnx.save(tiny_lm(), path)
    os.link(path, tmp_path / "again.onnx")
    loaded = load_model_mapped(path)
    assert not any(
        isinstance(v.const_value, ir.ExternalTensor)
        for v in loaded.model.graph.initializers.values()
    )
    ext = tmp_path / "ext.onnx"
    onnx.save(tiny_lm(), ext, save_as_external_data=True, location="ext.data", size_threshold=0)
    loaded = load_model_mapped(ext)
    assert loaded.external_data


def test_mapped_weights_are_released_after_quantization(tmp_path: Path) -> None:
    """Each replaced weight is unmapped: no tensor of the input file stays mapped."""
    path, out = tmp_path / "lm.onnx", tmp_path / "q.onnx"
    onnx.save(tiny_lm(), path)
    released = []
    original = ir.ExternalTensor.release

    def spy(self: ir.ExternalTensor) -> None:
        released.append(self.name)
        original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ir.ExternalTensor, "release", spy)
        convert_int4_file(path, out, Int4Config(block_size=16))
    assert {
        f"l{i}.{w}" for i in range(3) for w in ("q", "k", "v", "o", "gate", "up", "down")
    } <= set(released)


def test_qdq_upgrade_keeps_the_weights_out_of_the_converter(tmp_path: Path) -> None:
    """ONNX's version converter sees no weight bytes (it held copies of them all)."""
    from onnx import version_converter

    path, out = tmp_path / "lm.onnx", tmp_path / "q.onnx"
    onnx.save(tiny_lm(), path)
    seen = []
    original = version_converter.convert_version

    def spy(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
        seen.append(max(len(t.raw_data) for t in proto.graph.initializer))
        return original(proto, target)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(version_converter, "convert_version", spy)
        convert_int4_file(path, out, Int4Config(block_size=16, format="qdq"))
    assert seen and seen[0] <= 1024
    proto = onnx.load(out)
    assert proto.opset_import[0].version == 21
    nbits = tmp_path / "nbits.onnx"  # the same weights in the MatMulNBits form
    convert_int4_file(path, nbits, Int4Config(block_size=16, accuracy_level=0))
    ids = {"ids": np.random.default_rng(0).integers(0, 96, (4, 8)).astype(np.int64)}
    (want,), (got,) = run_ort(nbits, ids, optimize=False), run_ort(out, ids, optimize=False)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_inspect_counts_packed_weights_as_parameters(tmp_path: Path, cli: Cli) -> None:
    path, out = tmp_path / "lm.onnx", tmp_path / "q.onnx"
    onnx.save(tiny_lm(layers=2), path)
    cli.ok("convert", path, "-o", out, "--bits", "4", "--mix", "k-quant")
    before = json.loads(cli.ok("inspect", path, "--json").stdout)
    doc = json.loads(cli.ok("inspect", out, "--json").stdout)
    weights = 96 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64)
    by_dtype = doc["parameters"]["by_dtype"]
    assert by_dtype["int4"]["count"] + by_dtype["int8"]["count"] == weights
    assert before["parameters"]["count"] == weights + 2  # the two attention scales
    rows = {r["node"]: r for r in doc["weight_bits"]}
    assert rows["lm_head_MatMulNBits"]["bits"] == 8
    assert rows["embed_GatherBlockQuantized"]["shares"] == "lm_head.B_int8"
    # b32, K=32: 4 bits + a float32 scale and a zero-point byte per 32 weights
    assert rows["l0_o_proj_MatMulNBits"]["bits_per_weight"] == pytest.approx(5.25)
    text = cli.ok("inspect", out).stdout
    assert "Bits per layer" in text and "shares lm_head.B_int8" in text


def test_inspect_counts_an_untied_int4_table(tmp_path: Path, cli: Cli) -> None:
    """A lookup table of its own (BERT's) is stored as uint4 [V, D]: inspect counts its
    values and bytes (it used to list it as sharing another node's weights)."""
    rng = np.random.default_rng(0)
    nodes = [
        onnx.helper.make_node("Gather", ["T", "ids"], ["h"], name="lookup"),
        onnx.helper.make_node("MatMul", ["h", "W"], ["y"], name="proj"),
    ]
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((200, 64)).astype(np.float32), "T"),
        onnx.numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "W"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
        inits,
    )
    path, out = tmp_path / "table.onnx", tmp_path / "q4.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    cli.ok("convert", path, "-o", out, "--bits", "4")
    rows = json.loads(cli.ok("inspect", out, "--json").stdout)["weight_bits"]
    (table,) = [r for r in rows if r["op_type"] == "GatherBlockQuantized"]
    assert "shares" not in table and table["parameters"] == 200 * 64
    # 4 bits, a float32 scale and a 4-bit zero point per block of 32
    assert table["bits_per_weight"] == pytest.approx(4 + 32 / 32 + 4 / 32)
