"""The benchmark models: names, tasks, where their files live, what an exported file holds."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path("~/.cache/quantcli-bench").expanduser()


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    task: str  # "imagenet" | "mnist" | "embedding" | "lm" | "magika"
    transformer: bool  # dynamic INT8 (weights only) instead of static QDQ
    int4: bool  # also gets the weight-only INT4 contenders
    calib_bench: bool  # calibration time/memory scaling at 32/128/512 samples
    head: str = ""  # an LM's output-head MatMul (ORT's INT4 leaves it float: compare alike)


SPECS = {
    s.name: s
    for s in [
        Spec("mnist", "MNIST digit CNN (digit-recognizer-py)", "mnist", False, False, False),
        Spec("digits_sample", "sample_models/digits_cnn.onnx", "mnist", False, False, False),
        Spec("efficientnet", "EfficientNet-Lite0 (ImageNet)", "imagenet", False, False, True),
        Spec("minilm", "all-MiniLM-L6-v2 (sentence embeddings)", "embedding", True, True, True),
        Spec(
            "smollm2",
            "SmolLM2-135M-Instruct (causal LM)",
            "lm",
            True,
            True,
            False,
            head="node_linear_210",
        ),
        Spec("magika", "Magika file-type classifier (CNN + dense)", "magika", False, True, False),
    ]
}
FULL = ["mnist", "digits_sample", "efficientnet", "minilm", "smollm2"]
QUICK = ["mnist", "digits_sample"]


@dataclass(frozen=True)
class Files:
    model: Path
    calib: Path
    eval: Path
    info: Path

    def ready(self) -> bool:
        return self.model.exists() and self.calib.exists() and self.eval.exists()


def files(cache: Path, name: str) -> Files:
    if name == "digits_sample":
        base = REPO / "sample_models"
        return Files(
            base / "digits_cnn.onnx",
            base / "digits_cnn.calib.npz",
            base / "digits_cnn.eval.npz",
            base / "digits_cnn.info.json",
        )
    d = cache / name
    return Files(d / "model.onnx", d / "calib.npz", d / "eval.npz", d / "info.json")


def summarize(path: Path) -> dict[str, Any]:
    """What the exported file looks like: opset, op histogram, where the weights are."""
    import numpy as np
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    params = sum(int(np.prod(t.dims)) for t in g.initializer)
    const_params = sum(
        int(np.prod(a.t.dims))
        for n in g.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    )
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
    return {
        "file_bytes": size,
        "opsets": {d.domain or "ai.onnx": d.version for d in m.opset_import},
        "ir_version": m.ir_version,
        "ops": dict(Counter(n.op_type for n in g.node).most_common()),
        "initializers": len(g.initializer),
        "initializer_params": params,
        "constant_node_params": const_params,
        "value_info": len(g.value_info),
        "inputs": {
            i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in g.input
        },
        "outputs": [o.name for o in g.output],
    }
