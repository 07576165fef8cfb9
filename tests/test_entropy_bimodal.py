"""Entropy calibration on bimodal tensors: it clips a tail, never a whole mode."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Cli, sample

from quantcli.calibrate.methods import ENTROPY_MAX_CLIPPED, choose_range
from quantcli.calibrate.observers import TensorStats


def stats_of(x: np.ndarray) -> TensorStats:
    s = TensorStats()
    s.update(x)
    return s


def normalized_image_pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    """MNIST-like: 80% background (one value), strokes up to full intensity, normalized."""
    pixels = np.where(rng.random(n) < 0.8, 0, rng.integers(1, 256, n))
    return (pixels / 255 - 0.1307) / 0.3081


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", ["spike_and_mode", "normalized_image", "spike_and_mode_positive"])
def test_entropy_keeps_the_upper_mode_of_a_bimodal_tensor(name: str, symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    x = {
        # a spike holding most values and a second mode 15% strong, far above it
        "spike_and_mode": np.r_[rng.normal(-0.4, 0.01, 850_000), rng.normal(2.5, 0.2, 150_000)],
        "spike_and_mode_positive": np.r_[
            rng.normal(0.4, 0.01, 850_000), rng.normal(2.5, 0.2, 150_000)
        ],
        "normalized_image": normalized_image_pixels(rng, 1_000_000),
    }[name]
    lo, hi = choose_range(stats_of(x), "entropy", symmetric=symmetric)
    # Before the fix: [-0.35, 0.35] (the spike itself cut) and [-0.42, 0.99] (strokes cut).
    clipped = np.mean((x > hi) | (x < lo))
    assert clipped <= ENTROPY_MAX_CLIPPED * 1.01
    assert hi > np.quantile(x, 0.99)


def test_entropy_still_clips_a_thin_tail() -> None:
    x = np.r_[np.random.default_rng(1).standard_normal(1_000_000), [40.0, -38.0, 45.0]]
    lo, hi = choose_range(stats_of(x), "entropy", symmetric=True)
    assert 2.5 < hi < 6.0 and lo == -hi


def test_entropy_on_the_sample_digit_cnn_keeps_its_accuracy(tmp_path) -> None:
    s, cli = sample("digits_cnn"), Cli()
    quant = tmp_path / "q.onnx"
    cli.ok("convert", s.model, "--data", s.calib, "--method", "entropy", "-o", quant)
    # 62% before the fix (float: 98.2%)
    cli.ok("compare", s.model, quant, "-d", s.eval, "--runs", "0", "--max-drop", "1.0")
