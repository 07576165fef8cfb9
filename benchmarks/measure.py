"""Task metrics and interleaved latency over ONNX Runtime sessions sharing one SessionOptions."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

Arrays = dict[str, np.ndarray]
BATCH = {"imagenet": 25, "mnist": 500, "embedding": 50, "lm": 4, "magika": 200}


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return opts


def open_session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def _lm_reduce(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Logits are 49k wide: keep [argmax, log-prob of the actual next token] per position."""
    lp = _log_softmax(logits[:, :-1].astype(np.float64))
    nxt = np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    nxt = np.concatenate([nxt, np.full((len(ids), 1), np.nan)], 1)
    return np.stack([logits.argmax(-1).astype(np.float64), nxt], -1)


def outputs(sess: ort.InferenceSession, data: Arrays, task: str) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    n, b = len(data[names[0]]), BATCH[task]
    parts = []
    for s in range(0, n, b):
        out = sess.run(None, {k: data[k][s : s + b] for k in names})[0]
        parts.append(_lm_reduce(out, data["input_ids"][s : s + b]) if task == "lm" else out)
    return np.concatenate(parts)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def imagenet(ref: np.ndarray, got: np.ndarray, data: Arrays) -> dict[str, float]:
    top5 = np.argsort(-got, -1)[:, :5]
    ref1 = ref.argmax(-1)
    p, lq = _softmax(ref), _log_softmax(got)
    kl = (p * (np.log(np.clip(p, 1e-30, None)) - lq)).sum(-1)
    return {
        "top1_agreement": float((got.argmax(-1) == ref1).mean()),
        "float_top1_in_top5": float((top5 == ref1[:, None]).any(-1).mean()),
        "kl": float(np.maximum(kl, 0).mean()),
    }


def mnist(ref: np.ndarray, got: np.ndarray, data: Arrays) -> dict[str, float]:
    return {
        "accuracy": float((got.argmax(-1) == data["labels"]).mean()),
        "agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def _nearest(emb: np.ndarray) -> np.ndarray:
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)


def embedding(ref: np.ndarray, got: np.ndarray, data: Arrays) -> dict[str, float]:
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "nn_agreement": float((_nearest(ref) == _nearest(got)).mean()),
    }


def lm(ref: np.ndarray, got: np.ndarray, data: Arrays) -> dict[str, float]:
    """Perplexity of the eval windows; next-token argmax agreement with float."""
    return {
        "perplexity": float(np.exp(-np.nanmean(got[..., 1]))),
        "top1_agreement": float((got[..., 0] == ref[..., 0]).mean()),
    }


def magika(ref: np.ndarray, got: np.ndarray, data: Arrays) -> dict[str, float]:
    """File-type accuracy against the files' extensions, top-1 agreement with float, and
    agreement where float is confident (probability >= 0.5, Magika's medium threshold:
    below it Magika answers a generic type, and a near-tie flips on any change)."""
    sure = ref.max(-1) >= 0.5
    same = got.argmax(-1) == ref.argmax(-1)
    return {
        "accuracy": float((got.argmax(-1) == data["labels"]).mean()),
        "top1_agreement": float(same.mean()),
        "confident_agreement": float(same[sure].mean()),
        "confident_share": float(sure.mean()),
    }


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, Arrays], dict[str, float]]] = {
    "imagenet": imagenet,
    "mnist": mnist,
    "embedding": embedding,
    "lm": lm,
    "magika": magika,
}


def workloads(task: str, data: Arrays, names: list[str]) -> dict[str, Arrays]:
    """What one latency call runs: batch 1; the LM gets a 1-token and a 128-token call."""
    one = {k: data[k][:1] for k in names}
    if task != "lm":
        return {"batch1": one}
    return {"prompt128": one, "step1": {k: v[:, :1] for k, v in one.items()}}


def latency(
    sessions: dict[str, ort.InferenceSession],
    feeds: dict[str, Arrays],
    rounds: int,
    budget_s: float = 0.25,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per workload: warm up, then `rounds` rounds; each round visits the sessions in a fresh
    random order and times a burst of calls (about budget_s for the float model). Returns
    median ms per call and the ratio to `float`."""
    rng = random.Random(seed)
    result: dict[str, dict[str, Any]] = {}
    for wname, feed in feeds.items():
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feed)
        t = time.perf_counter()
        sessions["float"].run(None, feed)
        reps = max(1, min(5000, int(budget_s / max(time.perf_counter() - t, 1e-6))))
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(rounds):
            order = list(sessions)
            rng.shuffle(order)
            for name in order:
                t = time.perf_counter()
                for _ in range(reps):
                    sessions[name].run(None, feed)
                times[name].append((time.perf_counter() - t) / reps * 1e3)
        base = statistics.median(times["float"])
        for name, ts in times.items():
            med = statistics.median(ts)
            result.setdefault(name, {})[wname] = {
                "median_ms": round(med, 3),
                "ratio_to_float": round(med / base, 3),
                "iqr_ms": round(float(np.subtract(*np.percentile(ts, [75, 25]))), 3),
            }
        result["_reps"] = result.get("_reps", {}) | {wname: reps}
    return result


def file_bytes(model: Path) -> int:
    """The model file plus the external-data files its initializers point to."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    places = {
        e.value
        for t in proto.graph.initializer
        if t.data_location == 1
        for e in t.external_data
        if e.key == "location"
    }
    return model.stat().st_size + sum((model.parent / p).stat().st_size for p in places)
