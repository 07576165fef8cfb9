"""The ready-made nearest-neighbour plugin (quantcli.evaluate.embedding_metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.evaluate.embedding_metrics import NeighbourAgreement
from quantcli.evaluate.plugin import load_metric


def _run(batches: list[tuple[np.ndarray, np.ndarray]], mask=None) -> dict[str, float]:
    metric = NeighbourAgreement()
    for f, q in batches:
        inputs = {} if mask is None else {"attention_mask": mask}
        metric.update({"e": f}, {"e": q}, None, inputs)
    return metric.result()


def test_identical_embeddings_agree_fully_across_batches() -> None:
    emb = np.random.default_rng(0).standard_normal((12, 8))
    result = _run([(emb[:5], emb[:5]), (emb[5:], emb[5:])])
    assert result["nn_agreement"] == 1.0
    assert result["embedding_cosine_min"] == pytest.approx(1.0)


def test_swapped_neighbours_are_counted() -> None:
    # 0 and 1 are neighbours, 2 and 3 too; the quantized side pairs 0 with 2 instead.
    f = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    q = np.array([[0.7, 0.7], [1.0, 0.1], [0.7, 0.71], [0.1, 1.0]])
    result = _run([(f, q)])
    # nearest neighbours: float 1, 0, 3, 2; quantized 2, 0, 0, 2: samples 1 and 3 agree
    assert result["nn_agreement"] == pytest.approx(0.5)
    assert result["embedding_cosine_min"] < 0.8


def test_token_embeddings_are_mean_pooled_over_the_mask() -> None:
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((4, 3, 5))
    wild = tokens.copy()
    wild[:, 2] = 1e3  # padded: must not count
    mask = np.array([[1, 1, 0]] * 4)
    result = _run([(tokens, wild)], mask)
    assert result["embedding_cosine_min"] == pytest.approx(1.0)
    assert result["nn_agreement"] == 1.0


def test_loads_as_a_plugin() -> None:
    plugin = load_metric("quantcli.evaluate.embedding_metrics:NeighbourAgreement")
    emb = np.eye(3)
    plugin.update({"e": emb}, {"e": emb}, None, {})
    assert plugin.result()["nn_agreement"] == 1.0
