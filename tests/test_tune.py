"""quantcli tune: per-node formats, the search, its recipe and its honest ending."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from conftest import Cli, Tiny, run_ort, sample

from quantcli.calibrate.config import CalibrationConfig
from quantcli.convert import convert_int8_file
from quantcli.errors import InputError
from quantcli.graph.io import load_model
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.plan import build_plan
from quantcli.quantize.int8.prepare import prepare_for_int8
from quantcli.search.space import build_space

DIGITS = sample("digits_cnn")
ENCODER = sample("encoder")
SECOND_CONV = "/block1/block1.3/Conv"  # reads the first block Conv's fused Relu output


def _tune(cli: Cli, out: Path, *budget: str, code: int = 0) -> dict:
    args = ["tune", DIGITS.model, "--data", DIGITS.calib, "--eval", DIGITS.eval, "-o", out]
    result = cli(*args, *budget, "--runs", "5", "--json")
    assert result.exit_code == code, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _accuracy(path: Path) -> float:
    x, labels = DIGITS.eval_arrays(512)
    (logits,) = run_ort(path, {"input": x})
    return float((logits.argmax(1) == labels).mean())


def test_a_float_conv_keeps_the_relu_its_producer_fused(tmp_path: Path) -> None:
    """Regression: a Conv kept float after a Conv+Relu lost the Relu (it was dropped as
    clamped by a Q whose only reader then read the float tensor)."""
    out = tmp_path / "q.onnx"
    config = Int8Config(exclude=(SECOND_CONV,))
    convert_int8_file(DIGITS.model, out, config, data_spec=str(DIGITS.calib))
    assert _accuracy(out) >= _accuracy(DIGITS.model) - 0.005


def test_node_formats_override_the_planner() -> None:
    prepared, _ = prepare_for_int8(load_model(ENCODER.model).model, Int8Config())
    default = build_plan(prepared, Int8Config())
    name = default.dynamic[0][0]
    plan = build_plan(prepared, Int8Config(node_formats=((name, "weight-only"),)))
    assert name in {n for n, _ in plan.blockwise} and name not in {n for n, _ in plan.dynamic}
    plan = build_plan(prepared, Int8Config(node_formats=((name, "float"),)))
    assert (name, "MatMul", "float by the recipe") in plan.skipped
    with pytest.raises(InputError, match="cannot be dynamic"):
        conv = load_model(DIGITS.model).model
        prepared_cnn, cnn = prepare_for_int8(conv, Int8Config())
        build_plan(prepared_cnn, Int8Config(node_formats=((cnn.nodes[0].node, "dynamic"),)))
    with pytest.raises(InputError, match="does not have"):
        build_plan(prepared, Int8Config(node_formats=(("nope", "float"),)))
    with pytest.raises(InputError, match="is not supported"):
        Int8Config(node_formats=((name, "int3"),))


def test_siblings_share_a_group_and_climb_the_transformer_ladder(tiny: Tiny) -> None:
    model = load_model(tiny.path("attention_like")).model  # q and k MatMuls read x
    prepared, plan = prepare_for_int8(model, Int8Config())
    inputs = {n.name: n.inputs[0].name for n in prepared.graph if n.inputs}
    space = build_space(plan, inputs)
    shared = [g for g in space.groups if len(g.nodes) > 1]
    assert shared and shared[0].ladder == ("dynamic", "weight-only", "float")
    assert len({inputs[n] for n in shared[0].nodes}) == 1  # one activation read by all
    moved = space.step(space.start, space.groups.index(shared[0]), by=2)
    assert moved is not None and space.step(moved, space.groups.index(shared[0])) is None
    assert dict(space.node_formats(moved)) == dict.fromkeys(shared[0].nodes, "float")


def test_tune_finds_a_model_within_a_tight_budget_and_convert_replays_it(
    cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "tuned.onnx"
    doc = _tune(cli, out, "--min-cosine", "0.99995", "--max-trials", "40")
    assert doc["found"] and doc["output"] == str(out) and out.exists()
    best = doc["best"]
    assert best["score"]["summary"]["cosine_min"] >= 0.99995 and best["speedup"] > 0
    assert "float" in best["formats"].values()  # the default misses it: something moved
    stages = {t["stage"] for t in doc["trials"]}
    assert {"default", "rank", "greedy"} <= stages
    recipe = Path(doc["recipe"])
    formats = json.loads(recipe.read_text())["int8"]["node_formats"]
    assert formats == {k: v for k, v in best["formats"].items() if v != "static"}
    replay = tmp_path / "replay.onnx"
    args = ("convert", DIGITS.model, "--recipe", recipe, "--data", DIGITS.calib, "-o", replay)
    cli.ok(*args)
    assert replay.read_bytes() == out.read_bytes()
    assert not Path(str(out) + ".tune-state.json").exists()  # finished: no state left


def test_an_impossible_budget_exits_1_and_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "none.onnx"
    doc = _tune(cli, out, "--min-cosine", "1.0", "--max-trials", "3", code=1)
    assert not doc["found"] and doc["output"] is None and not out.exists()
    assert doc["held_back"] and "min-cosine" in doc["held_back"][0]
    assert "--max-trials 3" in doc["stopped"]
    assert sum(1 for t in doc["trials"] if t["seconds"] > 0) == 3
    state = Path(str(out) + ".tune-state.json")
    assert state.exists()  # to resume from
    doc = _tune(cli, out, "--min-cosine", "1.0", "--max-trials", "4", "--write-best", code=1)
    fresh = [t for t in doc["trials"] if t["seconds"] > 0]
    assert len(fresh) == 4 and sum(1 for t in doc["trials"] if t["seconds"] == 0) >= 3
    assert out.exists() and doc["output"] == str(out)  # --write-best: the closest one


def test_tune_refuses_bad_input_with_one_line(cli: Cli, tmp_path: Path) -> None:
    base = ["tune", DIGITS.model, "--data", DIGITS.calib, "--eval", DIGITS.eval]
    assert "budget" in cli.fails(*base, "-o", tmp_path / "o.onnx")
    line = cli.fails(*base, "--max-drop", "1", "--metric-gate", "ppl<3", "-o", tmp_path / "o.onnx")
    assert "NAME<=VALUE" in line
    assert not (tmp_path / "o.onnx").exists()


def test_recipes_are_checked(cli: Cli, tmp_path: Path) -> None:
    config = Int8Config(node_formats=(("/head/Gemm", "float"),))
    from quantcli.calibrate.table import model_fingerprint
    from quantcli.quantize.int8.recipe import Recipe

    recipe = Recipe(model_fingerprint(DIGITS.model), config, CalibrationConfig())
    path = tmp_path / "r.json"
    recipe.save(path)
    out = tmp_path / "o.onnx"
    cli.ok("convert", DIGITS.model, "--recipe", path, "--data", DIGITS.calib, "-o", out)
    proto = onnx.load(out)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in {t.name for t in proto.graph.initializer}  # float weight
    other = cli.fails(
        "convert", ENCODER.model, "--recipe", path, "--data", ENCODER.calib, "-o", out, "--force"
    )
    assert "another model" in other
    doc = json.loads(path.read_text())
    doc["int8"]["typo_option"] = 1
    path.write_text(json.dumps(doc))
    assert "unknown keys: typo_option" in cli.fails(
        "convert", DIGITS.model, "--recipe", path, "--data", DIGITS.calib, "-o", out, "--force"
    )
    assert onnx.load(out) == proto  # the earlier output is untouched
    recipe.save(path)
    for extra in (["--reduce-range"], ["--format", "qdq"], ["--standard-ops"], ["--limit", "8"]):
        line = cli.fails(
            "convert", DIGITS.model, "--recipe", path, "-d", DIGITS.calib, "-o", out, "--force",
            *extra,
        )  # fmt: skip
        assert f"--recipe sets every conversion option; {extra[0]} cannot change it" in line


def test_an_interrupted_search_resumes_to_the_same_result(cli: Cli, tmp_path: Path) -> None:
    budget = ("--min-cosine", "0.99995")
    whole = _tune(cli, tmp_path / "whole.onnx", *budget, "--max-trials", "40")
    cut = tmp_path / "cut.onnx"
    _tune(cli, cut, *budget, "--max-trials", "4", code=1)  # stopped part-way
    resumed = _tune(cli, cut, *budget, "--max-trials", "40")
    assert resumed["found"]
    assert sum(1 for t in resumed["trials"] if t["seconds"] == 0) >= 4  # reused, not re-run

    def accuracy_path(doc: dict) -> list:
        """The accuracy-driven part: which moves were tried and the first that fits.
        (The speed pass then picks by measured latency, which is noisy run to run.)"""
        steps = [(t["stage"], t["assignment"]) for t in doc["trials"] if t["stage"] != "speed"]
        first = next(t["assignment"] for t in doc["trials"] if t["passed"])
        return [steps, first]

    assert accuracy_path(resumed) == accuracy_path(whole)


def test_a_saved_search_resumes_only_with_the_same_setup(cli: Cli, tmp_path: Path) -> None:
    cut = tmp_path / "cut.onnx"
    _tune(cli, cut, "--min-cosine", "0.99995", "--max-trials", "3", code=1)
    other = _tune(cli, cut, "--min-cosine", "0.9999", "--max-trials", "3", code=1)
    assert all(t["seconds"] > 0 for t in other["trials"])  # another budget: nothing reused
    again = _tune(cli, cut, "--min-cosine", "0.9999", "--max-trials", "4", code=1)
    assert sum(1 for t in again["trials"] if t["seconds"] == 0) == 3  # more trials: reused


def test_budgets_that_cannot_be_measured_are_refused(cli: Cli, tmp_path: Path) -> None:
    sample_enc = ["tune", ENCODER.model, "--data", ENCODER.calib, "--eval", ENCODER.calib]
    line = cli.fails(*sample_enc, "--max-drop", "1", "-o", tmp_path / "o.onnx")
    assert "needs labels" in line
    base = ["tune", DIGITS.model, "--data", DIGITS.calib, "--eval", DIGITS.eval]
    line = cli.fails(*base, "--metric-gate", "ppl<=3", "-o", tmp_path / "o.onnx")
    assert "needs a metric plugin" in line
    line = cli.fails(
        *base, "--min-cosine", "1", "--metric", "nope_mod:fn", "-o", tmp_path / "o.onnx"
    )
    assert "nope_mod" in line
    assert not list(tmp_path.iterdir())


def test_compare_gates_on_top1_and_on_a_plugin_metric(cli: Cli, tmp_path: Path) -> None:
    plugin = tmp_path / "mae.py"
    plugin.write_text(
        "import numpy as np\n"
        "class Mae:\n"
        "    def __init__(self):\n"
        "        self.total, self.n = 0.0, 0\n"
        "    def update(self, f, q, labels):\n"
        "        a, b = next(iter(f.values())), next(iter(q.values()))\n"
        "        self.total += float(np.abs(a - b).mean()); self.n += 1\n"
        "    def result(self):\n"
        "        return {'mae': self.total / self.n}\n"
    )
    out = tmp_path / "q.onnx"
    convert_int8_file(DIGITS.model, out, Int8Config(), data_spec=str(DIGITS.calib))
    base = ["compare", DIGITS.model, out, "--data", DIGITS.eval, "--runs", "0", "--json"]
    base += ["--metric", f"{plugin}:Mae"]
    result = cli(*base, "--min-top1", "0.99", "--metric-gate", "mae<=0.000001")
    assert result.exit_code == 1
    gates = {g["name"]: g for g in json.loads(result.stdout)["gates"]}
    assert gates["min-top1"]["passed"] and gates["min-top1"]["value"] >= 0.99
    assert not gates["metric mae <="]["passed"] and gates["metric mae <="]["value"] > 0
    result = cli(*base, "--metric-gate", "mae<=10")
    assert result.exit_code == 0, result.stderr


def test_the_search_scores_in_the_given_batches(cli: Cli, tmp_path: Path) -> None:
    """Dynamic int8 gives each run's activations one scale: a budget must be checked in the
    batches the user will run, as compare checks it."""
    s = ENCODER
    args = ["tune", s.model, "--data", s.calib, "--eval", s.eval, "--min-cosine", "0.5"]
    args += ["--max-trials", "1", "--runs", "2", "--json"]
    scores = {}
    for batch in ("1", "8"):
        out = tmp_path / f"t{batch}.onnx"
        doc = json.loads(cli.ok(*args, "--batch-size", batch, "-o", out).stdout)
        (default,) = [t for t in doc["trials"] if t["stage"] == "default"]
        cmp = ["compare", s.model, out, "--data", s.eval, "--batch-size", batch, "--json"]
        compared = json.loads(cli.ok(*cmp, "--runs", "2").stdout)["summary"]
        assert default["score"]["summary"]["cosine_min"] == compared["cosine_min"]
        scores[batch] = compared["cosine_min"]
    assert scores["1"] != scores["8"]  # the batching does change a dynamic model's output


def test_the_time_budget_stops_the_search_and_says_so(cli: Cli, tmp_path: Path) -> None:
    """Calibration alone outlasts a 1 s budget: the default is scored (the one trial a
    search always makes) and nothing more; nothing fits, so nothing is written."""
    doc = _tune(cli, tmp_path / "t.onnx", "--min-cosine", "0.99995", "--time-budget", "1", code=1)
    assert doc["stopped"] == "--time-budget 1 s reached"
    assert [t["stage"] for t in doc["trials"]] == ["default"]
    assert not (tmp_path / "t.onnx").exists()
