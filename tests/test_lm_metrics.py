"""The ready-made perplexity plugin (quantcli.evaluate.lm_metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.evaluate.lm_metrics import Perplexity
from quantcli.evaluate.plugin import load_metric


def test_uniform_logits_have_the_vocabulary_as_perplexity() -> None:
    metric = Perplexity()
    ids = np.array([[1, 2, 3, 4]])
    uniform = np.zeros((1, 4, 10), np.float32)
    metric.update({"logits": uniform}, {"logits": uniform}, None, {"input_ids": ids})
    result = metric.result()
    assert result["perplexity"] == pytest.approx(10.0)
    assert result["perplexity_ratio"] == pytest.approx(1.0)
    assert result["next_token_agreement"] == 1.0


def test_a_sure_right_model_beats_a_sure_wrong_one_and_padding_is_ignored() -> None:
    ids = np.array([[0, 1, 2, 0]])
    mask = np.array([[1, 1, 1, 0]])  # the last target is padding
    right = np.full((1, 4, 3), -20.0, np.float32)
    wrong = right.copy()
    for t, nxt in enumerate(ids[0, 1:]):
        right[0, t, nxt] = 20.0
        wrong[0, t, (nxt + 1) % 3] = 20.0
    right[0, 2, :] = wrong[0, 2, :] = 0.0  # position 2 predicts a padded token
    wrong[0, 2, 1] = 50.0  # ...and a wild value there must change nothing
    metric = Perplexity()
    feeds = {"input_ids": ids, "attention_mask": mask}
    metric.update({"y": right}, {"y": wrong}, None, feeds)
    result = metric.result()
    assert result["perplexity_float"] == pytest.approx(1.0, abs=1e-6)
    assert result["perplexity"] > 1e10 and result["next_token_agreement"] == 0.0


def test_a_four_argument_update_gets_the_inputs() -> None:
    plugin = load_metric("quantcli.evaluate.lm_metrics:Perplexity")
    assert plugin.wants_inputs
    ids = np.array([[1, 0]])
    logits = np.zeros((1, 2, 2), np.float32)
    plugin.update({"y": logits}, {"y": logits}, None, {"input_ids": ids})
    assert plugin.result()["perplexity"] == pytest.approx(2.0)
