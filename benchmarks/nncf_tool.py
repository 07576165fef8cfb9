"""NNCF's `quantize_with_accuracy_control` on the benchmark models, as its docs show it, under
the budget `quantcli tune` gets (tune_bench.py BUDGETS). Run by tune_bench.py in a child
process with NNCF's own venv (NNCF is a peer, not a dependency):

    python benchmarks/nncf_tool.py MODEL CALIB.npz EVAL.npz OUT.onnx TASK

TASK: imagenet (top-1 agreement with float >= 0.97), embedding (mean cosine to float >=
0.999) or lm (perplexity <= 1.03x float). NNCF's metric must grow with quality, so each is
expressed as one: agreement (absolute drop 0.03), cosine (absolute drop 0.001), 1/perplexity
(relative drop 1 - 1/1.03). The per-sample values let NNCF rank its reverts (metric mode).
Prints one JSON line: validations run, seconds, NNCF's version.
"""

from __future__ import annotations

import json
import sys
import time

import nncf
import numpy as np
import onnx
import onnxruntime as ort
from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

# task -> (drop type, max drop, model type)
BUDGET = {
    "imagenet": (nncf.DropType.ABSOLUTE, 0.03, None),
    "embedding": (nncf.DropType.ABSOLUTE, 0.001, nncf.ModelType.TRANSFORMER),
    "lm": (nncf.DropType.RELATIVE, 1 - 1 / 1.03, nncf.ModelType.TRANSFORMER),
}


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def items(npz: str, names: list[str]) -> list[tuple[int, dict[str, np.ndarray]]]:
    with np.load(npz) as data:  # each data[k] reads the whole array: once per key
        arrays = {k: data[k] for k in names}
    n = len(arrays[names[0]])
    return [(i, {k: a[i : i + 1] for k, a in arrays.items()}) for i in range(n)]


def per_sample(task: str, ref: np.ndarray, got: np.ndarray, ids: np.ndarray) -> float:
    if task == "imagenet":
        return float(ref.argmax(-1)[0] == got.argmax(-1)[0])
    if task == "embedding":
        a, b = ref.ravel().astype(np.float64), got.ravel().astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    # lm: mean negative log-likelihood of the next tokens (combined into 1/perplexity below)
    x = got[0, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-np.take_along_axis(lp, ids[0, 1:, None], -1).mean())


def main() -> None:
    model_path, calib, evaluation, out, task = sys.argv[1:6]
    model = onnx.load(model_path)
    names = [i.name for i in session(model_path).get_inputs()]
    calib_items = items(calib, names)
    eval_items = items(evaluation, names)
    float_session = session(model_path)
    reference = {i: float_session.run(None, feeds)[0] for i, feeds in eval_items}
    calls = {"validations": 0, "samples": 0}

    def validate(candidate: onnx.ModelProto, dataset) -> tuple[float, list[float]]:
        sess = session(candidate)
        calls["validations"] += 1
        values = []
        for i, feeds in dataset:
            got = sess.run(None, feeds)[0]
            values.append(per_sample(task, reference[i], got, feeds.get("input_ids")))
            calls["samples"] += 1
        if task == "lm":  # metric 1/perplexity; per sequence the same
            return float(np.exp(-np.mean(values))), [float(np.exp(-v)) for v in values]
        return float(np.mean(values)), values

    drop_type, max_drop, model_type = BUDGET[task]
    start = time.time()
    quantized = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(calib_items, lambda item: item[1]),
        nncf.Dataset(eval_items),
        validate,
        max_drop=max_drop,
        drop_type=drop_type,
        model_type=model_type,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(),
    )
    seconds = time.time() - start
    onnx.save(quantized, out)
    doc = {"nncf": nncf.__version__, "seconds": round(seconds, 1)} | calls
    doc |= {"max_drop": max_drop, "drop_type": str(drop_type.value)}
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
