"""Ready-made `--metric` plugin for embedding models (retrieval, sentence similarity).

    quantcli tune MODEL --data calib.npz --eval eval.npz \\
        --metric quantcli.evaluate.embedding_metrics:NeighbourAgreement \\
        --metric-gate "nn_agreement>=0.98" -o OUT.onnx

The model's first output is one embedding per sample ([batch, dim], or [batch, tokens, dim]
mean-pooled over the tokens whose attention_mask is 1). Retrieval cares whether each
sample's nearest neighbour (by cosine, among the evaluated samples) stays the same, which a
mean cosine to float does not say. The embeddings are kept until the end (samples x dim
floats, both models): meant for evaluation sets, not for millions of samples.
"""

from __future__ import annotations

import numpy as np


def _pooled(out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = np.asarray(out, np.float64)
    if x.ndim == 2:
        return x
    if x.ndim != 3:
        raise ValueError(f"expected embeddings [batch, dim] or [batch, tokens, dim], got {x.shape}")
    w = np.ones(x.shape[:2]) if mask is None else np.asarray(mask, np.float64)
    return (x * w[..., None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1.0)


def _nearest(emb: np.ndarray) -> np.ndarray:
    unit = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-30)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)


class NeighbourAgreement:
    """How often each sample's nearest neighbour under the quantized model is the one under
    float (`nn_agreement`), and the mean and least cosine between the two embeddings."""

    def __init__(self) -> None:
        self.float: list[np.ndarray] = []
        self.quant: list[np.ndarray] = []

    def update(self, float_out, quant_out, labels, inputs) -> None:
        mask = inputs.get("attention_mask")
        self.float.append(_pooled(next(iter(float_out.values())), mask))
        self.quant.append(_pooled(next(iter(quant_out.values())), mask))

    def result(self) -> dict[str, float]:
        f, q = np.concatenate(self.float), np.concatenate(self.quant)
        cos = (f * q).sum(-1) / np.maximum(
            np.linalg.norm(f, axis=-1) * np.linalg.norm(q, axis=-1), 1e-30
        )
        agree = float((_nearest(f) == _nearest(q)).mean()) if len(f) > 1 else 1.0
        return {
            "nn_agreement": agree,
            "embedding_cosine_mean": float(cos.mean()),
            "embedding_cosine_min": float(cos.min()),
        }
