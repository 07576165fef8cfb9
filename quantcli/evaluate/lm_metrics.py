"""Ready-made `--metric` plugins for language models.

    quantcli compare F.onnx Q.onnx --data text.npz \\
        --metric quantcli.evaluate.lm_metrics:Perplexity --metric-gate "perplexity_ratio<=1.03"

The data holds `input_ids` (and optionally `attention_mask`); the model's first output is the
logits [batch, tokens, vocabulary]. Each position predicts the next token; padded positions
(mask 0) are left out.
"""

from __future__ import annotations

import numpy as np


def _next_token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log p(next token) at each position but the last, float64 [batch, tokens - 1]."""
    x = logits[:, :-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=-1))
    picked = np.take_along_axis(x, ids[:, 1:, None], axis=-1)[..., 0]
    return log_z - picked


class Perplexity:
    """Perplexity of both models on the data's own next tokens, their ratio, and how often
    the quantized model's top token agrees with float's."""

    def __init__(self) -> None:
        self.nll = {"float": 0.0, "quant": 0.0}
        self.tokens = 0
        self.agree = 0

    def update(self, float_out, quant_out, labels, inputs) -> None:
        ids = np.asarray(inputs["input_ids"]).astype(np.int64)
        mask = inputs.get("attention_mask")
        keep = np.ones(ids[:, 1:].shape, bool) if mask is None else np.asarray(mask)[:, 1:] > 0
        f, q = next(iter(float_out.values())), next(iter(quant_out.values()))
        for key, logits in (("float", f), ("quant", q)):
            self.nll[key] += float(_next_token_nll(np.asarray(logits), ids)[keep].sum())
        top_f, top_q = np.asarray(f)[:, :-1].argmax(-1), np.asarray(q)[:, :-1].argmax(-1)
        self.agree += int((top_f == top_q)[keep].sum())
        self.tokens += int(keep.sum())

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        pf, pq = np.exp(self.nll["float"] / n), np.exp(self.nll["quant"] / n)
        return {
            "perplexity": float(pq),
            "perplexity_float": float(pf),
            "perplexity_ratio": float(pq / pf),
            "next_token_agreement": self.agree / n,
        }
