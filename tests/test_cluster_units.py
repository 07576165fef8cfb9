"""The cluster layer's parts that need no Ray: exact merges, windows, the ledger, clean
errors without Ray or without a reachable cluster, and the layering."""

from __future__ import annotations

import math
import socket
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import sample
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcli.calibrate.channel_stats import BLOCK_BATCHES, ChannelStats
from quantcli.cluster.shards import Ledger, Part, PartResult, split
from quantcli.errors import ClusterError, DataError
from quantcli.evaluate.metrics import OutputAccumulator
from quantcli.exact import ExactSum

PACKAGE = Path(__file__).resolve().parent.parent / "quantcli"

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, max_size=40), st.data())
def test_exact_sum_is_the_correctly_rounded_sum_in_any_order_and_split(
    values: list[float], data: st.DataObject
) -> None:
    exact = sum((Fraction(v) for v in values), Fraction(0))
    try:
        want = float(exact)
    except OverflowError:  # beyond float64: +-inf
        want = math.inf if exact > 0 else -math.inf
    order = data.draw(st.permutations(values))
    cut = data.draw(st.integers(0, len(values)))
    a, b = ExactSum(), ExactSum()
    a.add_all(order[:cut])
    b.add_all(order[cut:])
    merged = b.merge(a)
    assert merged.value == want or (math.isinf(want) and math.isinf(merged.value))


def test_exact_sum_rounds_a_total_near_the_float64_limit_correctly() -> None:
    """A partial sum may pass 1.8e308 while the total still rounds to the largest float."""
    big = [8.988465674311579e307, 8.98846567431158e307]
    for values in ([*big, -1.0], [-1.0, *big], [1.7e308, 1.7e308, -1.7e308]):
        a, b = ExactSum(), ExactSum()
        a.add_all(values[:1])
        b.add_all(values[1:])
        want = float(sum(map(Fraction, values), Fraction(0)))
        assert b.merge(a).value == want and a.merge(b).value == want
    over = ExactSum()
    over.add_all([1.7e308, 1.7e308])
    assert over.value == math.inf


def test_exact_sum_keeps_nan_and_inf_apart() -> None:
    s = ExactSum()
    s.add_all([1.0, math.inf, 2.0])
    assert s.value == math.inf
    s.add(-math.inf)
    assert math.isnan(s.value)


def test_split_cuts_whole_steps_and_covers_everything() -> None:
    parts = split(100, 8, 4)
    assert [(p.start, p.stop) for p in parts] == [(0, 24), (24, 48), (48, 72), (72, 100)]
    assert all(p.start % 8 == 0 for p in parts)
    assert [p.window for p in split(5, 8, 4)] == [(0, 5)]  # never more parts than steps
    assert parts[3].label() == "part 4/4 (samples 73-100)"


def test_ledger_refuses_duplicates_and_names_missing_parts() -> None:
    parts = split(40, 10, 4)
    ledger = Ledger(4)
    ledger.add(PartResult(parts[0], 10))
    with pytest.raises(ClusterError, match=r"part 1/4 \(samples 1-10\) came back twice"):
        ledger.add(PartResult(parts[0], 10))
    ledger.add(PartResult(parts[2], 10))
    with pytest.raises(ClusterError, match=r"2 of 4 parts never came back \(parts 2, 4\)"):
        ledger.check_complete()
    with pytest.raises(ClusterError, match="part 1/3 of a 4-part job"):
        ledger.add(PartResult(Part(0, 3, 0, 10), 10))
    failed = PartResult(parts[1], 0, error=DataError("bad sample", hint="fix it"))
    with pytest.raises(DataError, match="bad sample"):
        ledger.add(failed)


def test_errors_keep_their_hint_across_processes() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DataError("what", hint="how")))
    assert type(err) is DataError and err.one_line() == "what (how)"


def _outputs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ref = rng.standard_normal((n, 10))
    return ref, ref + 0.1 * rng.standard_normal((n, 10)), rng.integers(0, 10, n)


def test_output_accumulators_merge_into_one_pass_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    ref, quant, labels = _outputs(rng, 37)
    one = OutputAccumulator("y")
    for s in range(0, 37, 4):
        one.update(
            ref[s : s + 4], quant[s : s + 4], np.arange(s, min(s + 4, 37)), labels[s : s + 4]
        )
    parts = []
    for lo, hi in ((0, 13), (13, 14), (14, 37)):  # other batch boundaries too
        acc = OutputAccumulator("y")
        for s in range(lo, hi, 3):
            e = min(s + 3, hi)
            acc.update(ref[s:e], quant[s:e], np.arange(s, e), labels[s:e])
        parts.append(acc)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.result() == one.result()


def test_channel_sums_fold_blocks_in_order_as_one_pass_does() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((1, 6, 3, 3)).astype(np.float32) for _ in range(75)]
    one = ChannelStats(1, track_gram=True)
    for b in batches:
        one.update(b)
    blocks = []
    for start in range(0, len(batches), BLOCK_BATCHES):  # what cluster tasks compute
        block = ChannelStats(1, track_gram=True)
        for b in batches[start : start + BLOCK_BATCHES]:
            block.update(b)
        blocks.append(block)
    folded = blocks[0]
    for block in blocks[1:]:
        folded = folded.merge(block)
    for name in ("sums", "squares", "gram", "absmax"):
        assert np.array_equal(getattr(folded, name), getattr(one, name)), name
    assert folded.count == one.count == 75 * 9
    everything = np.concatenate(batches).transpose(0, 2, 3, 1).reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(one.sums, everything.sum(0), rtol=1e-12)


def test_without_ray_asking_for_it_is_one_line_with_the_install_hint(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    s = sample("digits_cnn")
    out = tmp_path / "t.json"
    line = cli.fails("calibrate", s.model, "-d", s.calib, "-o", out, "--ray", "local")
    assert 'needs Ray, which is not installed (pip install "quantcli[ray]")' in line
    assert not out.exists()


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(cli, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = sample("digits_cnn")
    out = tmp_path / "t.json"
    line = cli.fails("calibrate", s.model, "-d", s.calib, "-o", out, "--ray", f"127.0.0.1:{port}")
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in line
    assert not out.exists()
    line = cli.fails("compare", s.model, s.model, "-d", s.eval, "--ray", f"127.0.0.1:{port}")
    assert "cannot reach the Ray cluster" in line
    tune = ["tune", s.model, "-d", s.calib, "--eval", s.eval, "--min-cosine", "0.9"]
    plugin = [*tune, "--metric", "quantcli.evaluate.lm_metrics:Perplexity", "--ray", "local"]
    assert "tune --ray does not ship them" in cli.fails(*plugin, "-o", tmp_path / "p.onnx")
    line = cli.fails(*tune, "-o", tmp_path / "t.onnx", "--ray", f"127.0.0.1:{port}")
    assert "cannot reach the Ray cluster" in line and not (tmp_path / "t.onnx").exists()
    assert "--ray-shards needs --ray" in cli.fails(
        "compare", s.model, s.model, "-d", s.eval, "--ray-shards", "2"
    )


def test_shards_count_from_one_on_the_command_line(cli, tmp_path: Path) -> None:
    s = sample("digits_cnn")
    line = cli.fails(
        "calibrate", s.model, "-d", s.calib, "-o", tmp_path / "t.json", "--shard", "0/2"
    )
    assert "shards count from 1 (the first of 2 shards is 1/2, the last 2/2)" in line
    cli.ok("calibrate", s.model, "-d", s.calib, "-o", tmp_path / "t.json", "--shard", "2/2")
