"""Loading and saving models: one clear ModelError per bad file, atomic and safe writes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import SAMPLES, Cli, Tiny, run_ort

import quantcli.graph.io as gio
from quantcli.convert import convert_int4_file, convert_int8_file
from quantcli.errors import ModelError, OutputError
from quantcli.graph.io import check_output_path, load_model, save_model
from quantcli.graph.mapped import file_size
from quantcli.quantize.int4.config import Int4Config
from quantcli.quantize.int8.config import Int8Config


def _external(tiny: Tiny, name: str = "gemm_mlp") -> Path:
    path = tiny.root / "ext" / f"{name}.onnx"
    path.parent.mkdir()
    onnx.save_model(
        tiny.proto(name),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    return path


def _missing(tiny: Tiny) -> Path:
    return tiny.root / "nope.onnx"


def _directory(tiny: Tiny) -> Path:
    (tiny.root / "dir.onnx").mkdir()
    return tiny.root / "dir.onnx"


def _empty(tiny: Tiny) -> Path:
    (tiny.root / "empty.onnx").write_bytes(b"")
    return tiny.root / "empty.onnx"


def _truncated(tiny: Tiny) -> Path:
    data = (SAMPLES / "digits_cnn.onnx").read_bytes()
    (tiny.root / "half.onnx").write_bytes(data[: len(data) // 2])
    return tiny.root / "half.onnx"


def _text(tiny: Tiny) -> Path:
    (tiny.root / "notes.onnx").write_text("name,value\nlayer1,0.5\n")
    return tiny.root / "notes.onnx"


def _checker(tiny: Tiny) -> Path:
    proto = tiny.proto("gemm_mlp")
    proto.graph.node[1].op_type = "Relux"  # no such op
    return tiny.path("bad_op", proto)


def _missing_data(tiny: Tiny) -> Path:
    path = _external(tiny)
    (path.parent / "w.bin").unlink()
    return path


def _custom(tiny: Tiny) -> Path:
    proto = tiny.proto("gemm_mlp")
    proto.graph.node[1].domain = "my.ops"
    proto.opset_import.append(onnx.helper.make_opsetid("my.ops", 1))
    return tiny.path("custom", proto)


def _custom_in_subgraph(tiny: Tiny) -> Path:
    proto = tiny.proto("if")
    branch = next(a.g for a in proto.graph.node[-1].attribute if a.name == "then_branch")
    branch.node[0].domain, branch.node[0].op_type = "my.ops", "FancyMatMul"
    proto.opset_import.append(onnx.helper.make_opsetid("my.ops", 1))
    return tiny.path("custom_sub", proto)


BAD_FILES: dict[str, tuple[Callable[[Tiny], Path], str]] = {
    "missing": (_missing, r"nope\.onnx does not exist"),
    "directory": (_directory, r"is a directory"),
    "empty": (_empty, r"empty\.onnx is empty"),
    "truncated": (_truncated, r"half\.onnx is not a readable ONNX model \(truncated"),
    "text": (_text, r"notes\.onnx is not a readable ONNX model"),
    "checker": (_checker, r"fails the ONNX checker: .*Relux"),
    "missing_external_data": (_missing_data, r"external data file 'w\.bin' .* is missing"),
    "custom_domain": (_custom, r"op 'Relu' from the custom domain 'my\.ops'"),
    "custom_domain_in_if": (_custom_in_subgraph, r"op 'FancyMatMul' from the custom domain"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_model_file_is_a_model_error(case: str, tiny: Tiny, cli: Cli) -> None:
    make, message = BAD_FILES[case]
    path = make(tiny)
    with pytest.raises(ModelError, match=message):
        load_model(path)
    line = cli.fails("convert", path, "-o", tiny.root / "out.onnx", "--bits", "4")
    assert re.search(message, line)
    assert not (tiny.root / "out.onnx").exists()


def test_external_data_loads_with_its_size(tiny: Tiny) -> None:
    path = _external(tiny)
    loaded = load_model(path)
    assert loaded.size_bytes == path.stat().st_size + (path.parent / "w.bin").stat().st_size
    assert sorted(loaded.model.graph.initializers) == ["b1", "b2", "w1", "w2"]


def test_external_data_model_converts_to_int4_elsewhere(tiny: Tiny) -> None:
    """External data in gives external data out, beside the output: never the input's w.bin."""
    path = _external(tiny)
    out = tiny.root / "out" / "q4.onnx"
    out.parent.mkdir()
    convert_int4_file(path, out, Int4Config(block_size=16))
    assert sorted(p.name for p in out.parent.iterdir()) == ["q4.onnx", "q4.onnx.data"]
    proto = onnx.load(out, load_external_data=False)
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations <= {"q4.onnx.data"}  # small tensors may stay inline
    inline = tiny.root / "inline_q4.onnx"  # the same model with its weights in the file
    convert_int4_file(tiny.path("gemm_mlp"), inline, Int4Config(block_size=16))
    feeds = tiny.feeds(path)
    (want,), (got,), (same,) = run_ort(path, feeds), run_ort(out, feeds), run_ort(inline, feeds)
    np.testing.assert_array_equal(got, same)  # the external weights were read, and right
    assert np.abs(got - want).max() < 0.15 * np.abs(want).max()  # 0.098 measured


def test_external_data_model_converts_to_int8(tiny: Tiny) -> None:
    path = _external(tiny)
    out = tiny.root / "q8.onnx"
    data = str(tiny.data(path))
    convert_int8_file(path, out, Int8Config(), data_spec=data)
    inline = tiny.root / "inline_q8.onnx"
    convert_int8_file(tiny.path("gemm_mlp"), inline, Int8Config(), data_spec=data)
    feeds = tiny.feeds(path)
    (want,), (got,), (same,) = run_ort(path, feeds), run_ort(out, feeds), run_ort(inline, feeds)
    np.testing.assert_array_equal(got, same)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


Saved = tuple[Path, ir.Model]


@pytest.fixture
def model(tiny: Tiny) -> Saved:
    path = tiny.path("gemm_mlp")
    return path, load_model(path).model


def test_save_refuses_existing_output_without_force(model: Saved, tmp_path: Path) -> None:
    path, m = model
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        save_model(m, out, inputs=[path])
    assert out.read_bytes() == b"keep me"
    save_model(m, out, inputs=[path], force=True)
    assert onnx.load(out).graph.node[0].op_type == "Gemm"


def test_save_never_writes_onto_its_input(
    model: Saved, tmp_path: Path, cli: Cli, sample_copy: Callable[[str], Path]
) -> None:
    path, m = model
    before = path.read_bytes()
    mlp = sample_copy("mlp")
    original = mlp.read_bytes()
    line = cli.fails("convert", mlp, "-o", mlp, "--force", "--data", SAMPLES / "mlp.calib.npz")
    assert "never overwrites" in line and mlp.read_bytes() == original
    (tmp_path / "link.onnx").symlink_to(path)
    for target in (path, tmp_path / "link.onnx", tmp_path / "." / path.name):
        with pytest.raises(OutputError, match="never overwrites"):
            save_model(m, target, inputs=[path], force=True)
    line = cli.fails("convert", path, "-o", path, "--force", "--bits", "4", "--block-size", "16")
    assert "never overwrites" in line
    assert path.read_bytes() == before


def test_failed_validation_leaves_nothing(model: Saved, tmp_path: Path) -> None:
    path, m = model

    def reject(staged: Path) -> None:
        assert staged.is_file() and staged.parent != tmp_path  # written in a temp folder
        raise RuntimeError("invalid")

    before = sorted(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="invalid"):
        save_model(m, tmp_path / "out.onnx", inputs=[path], validate=reject)
    assert sorted(tmp_path.iterdir()) == before
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        save_model(m, existing, force=True, validate=reject)
    assert existing.read_bytes() == b"old"
    assert sorted(tmp_path.iterdir()) == [*before, existing]


def test_output_checks(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "no" / "out.onnx", inputs=[], force=False)
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path, inputs=[], force=True)


def test_external_data_above_threshold(
    model: Saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, m = model
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", 0)
    out = save_model(m, tmp_path / "big.onnx", inputs=[path])
    data = tmp_path / "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, out.name, data.name])
    assert data.stat().st_size >= 4 * (32 * 16 + 32 * 8)
    assert file_size(out) == out.stat().st_size + data.stat().st_size
    feeds = Tiny(tmp_path).feeds(path)
    np.testing.assert_array_equal(run_ort(out, feeds)[0], run_ort(path, feeds)[0])


def test_saves_protobuf_whatever_the_suffix(model: Saved, tmp_path: Path) -> None:
    path, m = model
    for name in ("out.json", "out.txt"):
        out = save_model(m, tmp_path / name, inputs=[path])
        assert onnx.load_model(out, format="protobuf").graph.node[0].op_type == "Gemm"
        assert load_model(out).model.graph.node(0).op_type == "Gemm"
