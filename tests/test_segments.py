"""Calibration by segments: the same statistics as one session, bounded cached batches."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import Sample, sample
from int4_models import tiny_lm

from quantcli.calibrate.channel_stats import ChannelStats
from quantcli.calibrate.runner import collect_stats
from quantcli.calibrate.segments import BatchStore, frontier, weight_segments
from quantcli.data import open_data
from quantcli.graph.mapped import load_model_mapped
from quantcli.graph.passes import prepare_model
from quantcli.graph.signature import input_specs
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.pipeline import gram_inputs
from quantcli.quantize.int8.prepare import prepare_for_int8


def test_weight_segments_cut_between_layers_where_one_tensor_crosses() -> None:
    model = prepare_model(ir.from_proto(tiny_lm(layers=3, d=32, ff=64, vocab=96)))
    layer = (4 * 32 * 32 + 3 * 32 * 64) * 4 + 4  # one layer's weights, in bytes
    ranges = weight_segments(model, layer)
    nodes = list(model.graph)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(nodes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    for start, end in ranges:
        weights = {
            id(v): v.const_value.nbytes
            for n in nodes[start:end]
            for v in n.inputs
            if v is not None and v.const_value is not None
        }
        assert end - start == 1 or sum(weights.values()) <= layer
    # Each cut is placed where the residual stream alone crosses it.
    pos = {n.name: i for i, n in enumerate(nodes)}
    assert len(ranges) >= 3
    for _, cut in ranges[:-1]:
        crossing = frontier(model, nodes, pos, cut)
        assert len(crossing) == 1 and crossing[0].split(".")[1] in ("r1", "out"), crossing


def test_batch_store_spills_to_disk_and_cleans_up() -> None:
    rng = np.random.default_rng(0)
    batches = [{"a": rng.normal(size=(2, 3)), "b/c:0": np.arange(i + 1)} for i in range(4)]
    store = BatchStore(limit=batches[0]["a"].nbytes + 8)  # the first batch only, in memory
    for batch in batches:
        store.append(batch)
    assert store.spilled and len(store) == 4
    for i, batch in enumerate(batches):
        got = store[i]
        assert list(got) == list(batch)
        for name in batch:
            np.testing.assert_array_equal(got[name], batch[name])
    store[2] = {"x": np.ones(5)}
    np.testing.assert_array_equal(store[2]["x"], np.ones(5))
    folder = Path(store._tmp.name)  # type: ignore[union-attr]
    store.close()
    assert not folder.exists()


def _stats(item: Sample, segment_weights: int | None):
    model = load_model_mapped(item.model).model
    model, plan = prepare_for_int8(model, Int8Config())
    data = open_data(str(item.calib), input_specs(model), limit=12)
    axes = plan.channel_axes()
    return collect_stats(
        model,
        plan.activations,
        data,
        batch_size=4,
        channel_axes=axes,
        gram=gram_inputs(model, plan) & set(axes),
        segment_weights=segment_weights,
    )


@pytest.mark.parametrize("name", ["digits_cnn", "encoder", "mlp"])
def test_segmented_calibration_matches_one_session(name: str) -> None:
    """Every node a segment of its own (the hardest split): the same statistics."""
    whole, whole_ch = _stats(sample(name), None)
    split, split_ch = _stats(sample(name), 1)
    assert whole.keys() == split.keys() and whole_ch.keys() == split_ch.keys()
    for t, a in whole.items():
        b = split[t]
        assert (a.count, a.zero_count, a.exp) == (b.count, b.zero_count, b.exp), t
        np.testing.assert_allclose([a.min, a.max], [b.min, b.max], rtol=1e-5, atol=1e-6)
        assert np.abs(a.counts - b.counts).sum() <= 0.001 * a.count + 2, t
    for t, a in whole_ch.items():
        b = split_ch[t]
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-5, atol=1e-6)
        if a.gram is not None:
            np.testing.assert_allclose(a.gram, b.gram, rtol=1e-4, atol=1e-4)
            assert isinstance(b._gram, np.memmap), t  # spilled once its segment was done
        assert (a.gram is None) == (b.gram is None)


def test_spilled_gram_reads_merges_and_grows_the_same() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(8, 6)) for _ in range(3)]
    kept, spilled = ChannelStats(1, track_gram=True), ChannelStats(1, track_gram=True)
    for stats in (kept, spilled):
        for x in batches[:2]:
            stats.update(x)
    spilled.spill_gram()
    assert isinstance(spilled._gram, np.memmap)
    np.testing.assert_array_equal(spilled.gram, kept.gram)
    np.testing.assert_array_equal(spilled.merge(kept).gram, kept.merge(kept).gram)
    for stats in (kept, spilled):  # more data after a spill: summed in memory
        stats.update(batches[2])
    np.testing.assert_array_equal(spilled.gram, kept.gram)
    spilled.gram = None
    assert spilled.gram is None
