"""Ranking from one switch model (search/switch.py) scores like candidates built one by one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import run_ort, sample

from quantcli.calibration import calibrate_file
from quantcli.data import open_data
from quantcli.evaluate.gates import GateSpec
from quantcli.evaluate.result import CompareConfig
from quantcli.graph.io import load_model
from quantcli.graph.signature import input_specs
from quantcli.quantize.int8.prepare import prepare_for_int8
from quantcli.search.evaluator import Evaluator
from quantcli.search.space import build_space
from quantcli.search.switch import SWITCH, switch_points
from quantcli.search.trials import sqnr
from quantcli.search.tune import SWITCHED, TuneConfig, _activation_inputs, _Search


def _search(tmp_path: Path, model: Path, calib: Path, evals: Path) -> _Search:
    config = TuneConfig(GateSpec(min_cosine=0.99999), compare=CompareConfig(runs=2, warmup=1))
    loaded = load_model(model)
    evaluation = open_data(str(evals), input_specs(loaded.model))
    _, plan = prepare_for_int8(loaded.model, config.base)
    space = build_space(plan, _activation_inputs(loaded.model))
    table, data = calibrate_file(model, str(calib), config.calibration, config.base)
    evaluator = Evaluator(model, evaluation, config.gates, config.compare, tmp_path / "float")
    state = tmp_path / "state.json"
    return _Search(model, config, evaluator, table, data, space, tmp_path, state, None)


def test_switched_to_g_the_model_computes_the_candidate_with_g_moved(tmp_path: Path) -> None:
    """Exactly, as written: ORT's graph optimizations are off on both sides (they fuse
    static Q/DQ around a node differently once an If reads its output; see SWITCHED)."""
    s = sample("encoder")
    search = _search(tmp_path, s.model, s.calib, s.eval)
    start = search.space.start
    groups = [i for i, g in enumerate(search.space.groups) if g.ladder[0] in SWITCHED]
    path, movable = search.build_switch(start, groups)
    assert movable == set(groups) and len(groups) >= 2
    x = {"input": s.eval_arrays(8)[0]}
    for index in [-1, *groups]:
        moved = start if index < 0 else search.space.step(start, index)
        (want,) = run_ort(search.build(moved), x, optimize=False)
        (got,) = run_ort(path, {**x, SWITCH: np.array(index, np.int64)}, optimize=False)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(index))


def test_transformer_moves_are_ranked_on_the_switch_model_like_built_ones(
    tmp_path: Path,
) -> None:
    s = sample("encoder")
    search = _search(tmp_path, s.model, s.calib, s.eval)
    start = search.space.start
    moves = [(i, search.space.step(start, i)) for i in range(len(search.space.groups))]
    moves = [(i, m) for i, m in moves if search.space.groups[i].ladder[0] in SWITCHED]
    assert len(moves) >= 2
    subset = list(range(16))
    search.switched_trials(start, moves, subset)
    switched = {m: search.known.pop(("rank", m, True)) for _, m in moves}
    base = search.known.pop(("rank", start, True))
    assert all(t.seconds > 0 for t in switched.values())
    built = {m: search.trial("rank", m, subset) for _, m in moves}
    assert abs(sqnr(search.trial("rank", start, subset)) - sqnr(base)) < 0.01
    for _, m in moves:
        assert abs(sqnr(switched[m]) - sqnr(built[m])) < 0.01, m


def test_static_groups_are_left_to_built_candidates(tmp_path: Path) -> None:
    s = sample("digits_cnn")
    search = _search(tmp_path, s.model, s.calib, s.eval)
    start = search.space.start
    moves = [(i, search.space.step(start, i)) for i in range(len(search.space.groups))]
    search.switched_trials(start, moves, [0, 1])
    assert not search.trials  # nothing switchable: no switch model built, nothing scored


def test_switch_points_follow_an_absorbed_output_to_its_reader() -> None:
    onward = {"mm": ("add",), "add": ("relu",)}
    assert switch_points(["mm"], onward, {"mm", "add"}) == ["mm"]
    assert switch_points(["mm"], onward, {"add"}) == ["add"]
    assert switch_points(["mm"], onward, {"relu"}) == ["relu"]
    assert switch_points(["mm"], {}, {"add"}) is None  # no single reader to follow
