"""Shared fixtures: the sample models, tiny models built with onnx.helper, small helpers."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner, Result

# Property tests check results, not speed: no per-example deadline, so that a slow or
# emulated CI machine (.ci/run's qemu pass) cannot fail them.
settings.register_profile("quantcli", deadline=None)
settings.load_profile("quantcli")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SAMPLE_NAMES = ("digits_cnn", "encoder", "mlp")
FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class Sample:
    name: str
    model: Path
    calib: Path
    eval: Path

    def eval_arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.eval) as data:
            return data["input"][:limit], data["labels"][:limit]

    def calib_input(self, limit: int | None = None) -> np.ndarray:
        with np.load(self.calib) as data:
            return data["input"][:limit]


def sample(name: str) -> Sample:
    return Sample(
        name,
        SAMPLES / f"{name}.onnx",
        SAMPLES / f"{name}.calib.npz",
        SAMPLES / f"{name}.eval.npz",
    )


@pytest.fixture(params=SAMPLE_NAMES)
def sample_model(request: pytest.FixtureRequest) -> Sample:
    """Each sample model in turn."""
    return sample(request.param)


@pytest.fixture
def sample_copy(tmp_path: Path) -> Callable[[str], Path]:
    """Copy a sample model into tmp_path (tests that write beside the model use it)."""

    def copy(name: str) -> Path:
        return Path(shutil.copy(SAMPLES / f"{name}.onnx", tmp_path / f"{name}.onnx"))

    return copy


# ------------------------------------------------------------------ helpers


def run_ort(
    model: Path | onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = True
) -> list[np.ndarray]:
    """All outputs of a model on ONNX Runtime (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=_init(name, array), name=f"{name}_node")


def _rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[TensorProto] = (),
    opset: int = 17,
    ir_version: int = 10,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def _io(name: str, *shape: int | str, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def conv_bn_relu() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(W, B as Constant nodes) -> BatchNormalization -> Relu -> y."""
    rng = np.random.default_rng(0)
    nodes = [
        _const("w", _rand(rng, 4, 3, 3, 3)),
        _const("b", _rand(rng, 4, scale=0.1)),
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["conv", "scale", "shift", "mean", "var"],
            ["bn"],
            name="bn",
            epsilon=1e-3,
        ),
        helper.make_node("Relu", ["bn"], ["y"], name="relu"),
    ]
    inits = [
        _init("scale", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        _init("shift", _rand(rng, 4, scale=0.2)),
        _init("mean", _rand(rng, 4, scale=0.2)),
        _init("var", rng.uniform(0.5, 2.0, 4).astype(np.float32)),
    ]
    return _model(nodes, [_io("x", "N", 3, 8, 8)], [_io("y", "N", 4, 8, 8)], inits)


def matmul_transpose() -> onnx.ModelProto:
    """x[N,8] -> MatMul(x, Transpose(W[16,8] Constant)) -> y[N,16]."""
    rng = np.random.default_rng(1)
    nodes = [
        _const("w", _rand(rng, 16, 8)),
        helper.make_node("Transpose", ["w"], ["wt"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="matmul"),
    ]
    return _model(nodes, [_io("x", "N", 8)], [_io("y", "N", 16)])


def tied_embedding() -> onnx.ModelProto:
    """ids -> Gather(E) -> emb -> MatMul(emb, Transpose(E)) -> logits (E[128,32], tied)."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="gather"),
        helper.make_node("Transpose", ["E"], ["Et"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["emb", "Et"], ["logits"], name="lm_head"),
    ]
    return _model(
        nodes,
        [_io("ids", "N", 4, dtype=TensorProto.INT64)],
        [_io("logits", "N", 4, 128)],
        [_init("E", _rand(rng, 128, 32))],
    )


def gemm_mlp() -> onnx.ModelProto:
    """x[N,16] -> Gemm(transB=1, W1[32,16]) -> Relu -> Gemm(W2[32,8]) -> y[N,8]."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2"),
    ]
    inits = [
        _init("w1", _rand(rng, 32, 16)),
        _init("b1", _rand(rng, 32, scale=0.1)),
        _init("w2", _rand(rng, 32, 8)),
        _init("b2", _rand(rng, 8, scale=0.1)),
    ]
    return _model(nodes, [_io("x", "N", 16)], [_io("y", "N", 8)], inits)


def opset11_model() -> onnx.ModelProto:
    """Opset 11: Conv -> Relu -> Unsqueeze(axes attribute) -> Squeeze(axes attribute) -> Gemm."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Unsqueeze", ["r"], ["u"], name="unsqueeze", axes=[1]),
        helper.make_node("Squeeze", ["u"], ["s"], name="squeeze", axes=[1]),
        helper.make_node("Flatten", ["s"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    inits = [
        _init("w", _rand(rng, 4, 3, 3, 3)),
        _init("b", _rand(rng, 4, scale=0.1)),
        _init("fw", _rand(rng, 5, 4 * 6 * 6, scale=0.1)),
        _init("fb", _rand(rng, 5, scale=0.1)),
    ]
    return _model(
        nodes, [_io("x", "N", 3, 6, 6)], [_io("y", "N", 5)], inits, opset=11, ir_version=6
    )


def if_model() -> onnx.ModelProto:
    """x[N,8] -> MatMul(W0) -> h; If(sum(h) > 0) then MatMul(h, W1) else MatMul(h, W2)."""
    rng = np.random.default_rng(5)

    def branch(name: str, w: np.ndarray) -> onnx.GraphProto:
        node = helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")
        return helper.make_graph(
            [node], name, [], [_io(f"{name}_y", "N", 4)], [_init(f"{name}_w", w)]
        )

    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
        helper.make_node("ReduceSum", ["h"], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="greater"),
        helper.make_node(
            "If",
            ["cond"],
            ["y"],
            name="if",
            then_branch=branch("then", _rand(rng, 8, 4)),
            else_branch=branch("else", _rand(rng, 8, 4)),
        ),
    ]
    inits = [_init("w0", _rand(rng, 8, 8)), _init("zero", np.array(0.0, np.float32))]
    return _model(nodes, [_io("x", "N", 8)], [_io("y", "N", 4)], inits)


def float16_model() -> onnx.ModelProto:
    """x[N,16] float16 -> MatMul -> Relu -> MatMul -> y float16."""
    rng = np.random.default_rng(6)
    f16 = TensorProto.FLOAT16
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2"),
    ]
    inits = [
        _init("w1", _rand(rng, 16, 32).astype(np.float16)),
        _init("w2", _rand(rng, 32, 8).astype(np.float16)),
    ]
    return _model(nodes, [_io("x", "N", 16, dtype=f16)], [_io("y", "N", 8, dtype=f16)], inits)


def conv_net(*, depthwise: bool = False, clip: bool = False) -> onnx.ModelProto:
    """x[N,4,8,8] -> Conv -> Relu|Clip(0,6) -> [depthwise Conv -> Relu] -> MaxPool -> Reshape
    -> MatMul -> y[N,5]."""
    rng = np.random.default_rng(7)
    act = (
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="clip")
        if clip
        else helper.make_node("Relu", ["c1"], ["a1"], name="relu")
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        act,
    ]
    inits = [
        _init("w1", _rand(rng, 8, 4, 3, 3)),
        _init("b1", _rand(rng, 8, scale=0.1)),
        _init("lo", np.array(0.0, np.float32)),
        _init("hi", np.array(6.0, np.float32)),
        _init("shape", np.array([0, -1], np.int64)),
        _init("fw", _rand(rng, 8 * 4 * 4, 5, scale=0.1)),
    ]
    last = "a1"
    if depthwise:
        nodes += [
            helper.make_node(
                "Conv", ["a1", "wd", "bd"], ["c2"], name="dwconv", group=8, pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        ]
        inits += [_init("wd", _rand(rng, 8, 1, 3, 3)), _init("bd", _rand(rng, 8, scale=0.1))]
        last = "a2"
    nodes += [
        helper.make_node(
            "MaxPool", [last], ["p"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Reshape", ["p", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "fw"], ["y"], name="fc"),
    ]
    return _model(nodes, [_io("x", "N", 4, 8, 8)], [_io("y", "N", 5)], inits)


def attention_like() -> onnx.ModelProto:
    """q = x @ Wq, k = x @ Wk (one shared weight W), scores = q @ k^T (activation x activation)."""
    rng = np.random.default_rng(8)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["x", "w"], ["k"], name="mm_k"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["y"], name="scores"),
    ]
    return _model(
        nodes, [_io("x", "N", 6, 16)], [_io("y", "N", 6, 6)], [_init("w", _rand(rng, 16, 16))]
    )


def conv_only() -> onnx.ModelProto:
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    return _model(
        nodes,
        [_io("x", "N", 2, 5, 5)],
        [_io("y", "N", 3, 3, 3)],
        [_init("w", _rand(rng, 3, 2, 3, 3))],
    )


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_relu": conv_bn_relu,
    "matmul_transpose": matmul_transpose,
    "tied_embedding": tied_embedding,
    "gemm_mlp": gemm_mlp,
    "opset11": opset11_model,
    "if": if_model,
    "float16": float16_model,
    "conv_net": conv_net,
    "conv_net_depthwise": lambda: conv_net(depthwise=True),
    "conv_net_clip": lambda: conv_net(clip=True),
    "attention_like": attention_like,
    "conv_only": conv_only,
}


class Tiny:
    """Writes tiny models and matching random .npz data into one test's tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def proto(self, name: str) -> onnx.ModelProto:
        return BUILDERS[name]()

    def path(self, name: str, proto: onnx.ModelProto | None = None) -> Path:
        path = self.root / f"{name}.onnx"
        onnx.save(proto if proto is not None else BUILDERS[name](), path)
        return path

    def feeds(
        self, model: Path | onnx.ModelProto, n: int = 4, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Random feeds for every graph input (symbolic dims become n, ints index 0..9)."""
        proto = onnx.load(str(model)) if isinstance(model, Path) else model
        rng = np.random.default_rng(seed)
        feeds = {}
        for value in proto.graph.input:
            tt = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else n for d in tt.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.integer):
                feeds[value.name] = rng.integers(0, 10, shape).astype(dtype)
            else:
                feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        return feeds

    def data(self, model: Path, n: int = 16, seed: int = 0) -> Path:
        """An .npz of n random samples for the model's inputs, beside it."""
        path = model.with_suffix(".npz")
        np.savez(path, **self.feeds(model, n, seed))
        return path


@pytest.fixture
def tiny(tmp_path: Path) -> Tiny:
    return Tiny(tmp_path)


class Cli:
    """Runs `quantcli` in-process and checks the CLI's error contract."""

    def __init__(self) -> None:
        from quantcli.cli.app import app

        self.app, self.runner = app, CliRunner()

    def __call__(self, *args: object) -> Result:
        return self.runner.invoke(self.app, [str(a) for a in args])

    def ok(self, *args: object) -> Result:
        result = self(*args)
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
        return result

    def fails(self, *args: object, code: int = 2) -> str:
        """Asserts exit `code` with exactly one `error:` line on stderr; returns that line."""
        result = self(*args)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert result.stdout == ""
        return lines[0]


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()
