"""`tune_file`: the fastest INT8 model whose accuracy stays within a budget.

1. Calibrate once for the default plan (a candidate that needs a tensor more, e.g. the input
   of a Conv whose producer went float, gets it calibrated once into the shared table) and
   score the default conversion on the full evaluation set.
2. If it misses the budget, rank the groups (space.py): each group moved one rung towards
   float alone, scored on the samples the default gets most wrong (NNCF's ranking idea).
   Moves of dynamic and weight-only groups are scored on one switch model (switch.py)
   instead of a built candidate each; static ones are built (or run on a Ray cluster).
3. Greedy: the best-ranked 1, 2, 4, ... groups moved together until the budget holds, then
   bisected to the fewest that hold it; failing that, the ranked moves one at a time, each
   checked on the full set and undone if it did not help; then a second rung where needed.
4. Speed pass: from the fastest fitting candidate, each group one rung back towards int8
   (kept if the budget holds and it is not clearly slower than the fastest seen: float
   islands cost Q/DQ and layout work) or towards float (kept only if clearly faster).

Every trial is logged and the state saved after each, so an interrupted run resumes. The
winner is written with a recipe that `convert --recipe` replays byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from quantcli.calibrate.config import CalibrationConfig
from quantcli.calibrate.runner import calibrate_model
from quantcli.calibrate.table import CalibrationTable, model_fingerprint, save_table
from quantcli.calibration import calibrate_file
from quantcli.data import WithLabels, open_data
from quantcli.errors import InputError
from quantcli.evaluate.gates import GateSpec, check_gates_possible
from quantcli.evaluate.result import CompareConfig
from quantcli.graph.io import check_model_path, check_output_path, load_model, save_model
from quantcli.graph.signature import input_specs
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.pipeline import gram_inputs, quantize_int8
from quantcli.quantize.int8.plan import build_plan
from quantcli.quantize.int8.prepare import prepare_for_int8
from quantcli.quantize.int8.recipe import Recipe
from quantcli.quantize.math.affine import reusing_weights
from quantcli.search.evaluator import Evaluator, Score
from quantcli.search.space import Assignment, Space, build_space
from quantcli.search.switch import FloatFacts, switch_model
from quantcli.search.trials import (
    Trial,
    TuneResult,
    closer,
    held_back,
    shortfall,
    sqnr,
)

SPEED_MARGIN = 1.02  # a move must be this much faster to count: latency is noisy
# Speed pass: a group handed back to int8 is kept unless clearly slower (within this
# factor: a noisy timing must not keep a float island), one moved to float only if
# clearly faster.
BACK_TO_INT8 = 0.9
TO_FLOAT = 1.05
# Moves from these formats are ranked on a switch model (switch.py). Not from static QDQ:
# its outputs feed ONNX Runtime's DQ -> op -> Q fusions, which the If reading them blocks,
# so a switched static group is scored unfused (digits CNN, first block Conv to float:
# 34.9 dB output SQNR switched, exactly the built candidate's without ORT's optimizations,
# but 32.1 dB for the built candidate as ORT runs it). Built candidates rank those.
SWITCHED = frozenset({"dynamic", "weight-only"})
RANK_SHARE = 1 / 3  # of the time left, for one ranking round under --time-budget
RANK_MIN = 4  # ranking samples, at the least
Progress = Callable[[str, int, int, float | None], None]  # stage, trials, max, best speedup


@dataclass(frozen=True)
class TuneConfig:
    gates: GateSpec  # the accuracy budget (min-speedup, if set, must hold too)
    max_trials: int = 200
    time_budget: float | None = None  # seconds for the whole search
    rank_samples: int = 64  # the worst samples used to rank moves
    base: Int8Config = field(default_factory=Int8Config)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    compare: CompareConfig = field(default_factory=lambda: CompareConfig(runs=30, warmup=5))

    def __post_init__(self) -> None:
        if not self.gates.active():
            raise InputError(
                "tune needs an accuracy budget",
                hint="give --max-drop, --min-cosine, --min-top1 or --metric-gate",
            )
        if self.max_trials < 1 or self.rank_samples < 1:
            raise InputError("--max-trials and --rank-samples must be at least 1")
        if self.base.format != "auto" or self.base.node_formats:
            raise InputError("tune searches the auto format", hint="drop --format")


# Scores ranking candidates elsewhere (search/remote.py, on a Ray cluster): given the shared
# table and (node formats, subset) per candidate, yields (score, seconds) in that order.
NodeFormats = tuple[tuple[str, str], ...]
RemoteScorer = Callable[[CalibrationTable, list[tuple[NodeFormats, list[int]]]], Iterator]


class _Search:
    def __init__(self, model: Path, config: TuneConfig, evaluator: Evaluator, table, calib,
                 space, workdir: Path, state: Path, progress: Progress | None,
                 remote: RemoteScorer | None = None,
                 started: float | None = None, setup: str = "") -> None:  # fmt: skip
        self.model, self.config, self.evaluator, self.calib = model, config, evaluator, calib
        self.remote = remote
        self.remote_trials = 0  # ranking trials scored on the cluster
        self.winner: Trial | None = None  # set by the speed pass
        self.table: CalibrationTable = table
        self.space: Space = space
        self.workdir, self.state, self.progress = workdir, state, progress
        self.trials: list[Trial] = []
        self.known: dict[tuple[str, Assignment, bool], Trial] = {}
        self.started = time.monotonic() if started is None else started  # calibration too
        # What the trials' scores depend on besides the model (the search's bounds do not).
        bounds = replace(config, max_trials=1, time_budget=None)
        self.setup = hashlib.sha256(f"{bounds!r} {setup}".encode()).hexdigest()
        self.stopped = "search finished"
        self.build_s = 0.0  # how long building a candidate takes
        self.trial_s = 0.0  # how long the last full-set trial took
        self._load_state()

    # ------------------------------------------------------------------ budget and state

    def fresh_trials(self) -> int:
        return sum(1 for t in self.trials if t.seconds > 0)

    def out_of_budget(self) -> bool:
        if self.fresh_trials() >= self.config.max_trials:
            self.stopped = f"--max-trials {self.config.max_trials} reached"
            return True
        limit = self.config.time_budget
        # A trial is not started unless it and writing the winner (a build, then saving and
        # validating it: about two builds; 53 s on SmolLM2) fit in what is left.
        reserve = self.trial_s + 2 * self.build_s
        if limit is not None and time.monotonic() - self.started > limit - reserve:
            self.stopped = f"--time-budget {limit:g} s reached"
            return True
        return False

    def _load_state(self) -> None:
        if not self.state.exists():
            return
        doc = json.loads(self.state.read_text())
        if doc.get("fingerprint") != model_fingerprint(self.model):
            return  # another model: start afresh (the file is rewritten)
        if doc.get("setup") != self.setup:
            return  # another budget, batch, metric or data: its scores do not apply
        for t in doc.get("trials", []):
            trial = Trial(
                t["stage"], tuple(t["assignment"]), t["formats"], t["score"], t["passed"],
                t["subset"], t["speedup"], t["quant_ms"], 0.0,
            )  # fmt: skip
            key = ("rank" if trial.subset else "full", trial.assignment, trial.subset)
            self.known[key] = trial

    def _save_state(self) -> None:
        doc = {
            "fingerprint": model_fingerprint(self.model),
            "setup": self.setup,
            "trials": [t.to_dict() for t in self.trials],
        }
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.state)

    # ------------------------------------------------------------------ trials

    def config_for(self, assignment: Assignment) -> Int8Config:
        return replace(self.config.base, node_formats=self.space.node_formats(assignment))

    def build(self, assignment: Assignment) -> Path:
        start = time.monotonic()
        path = self._build(assignment)
        self.build_s = time.monotonic() - start  # the last: weights are cached after the first
        return path

    def _build(self, assignment: Assignment) -> Path:
        config = self.config_for(assignment)
        self._extend_table(config)
        loaded = load_model(self.model)
        result = quantize_int8(loaded, config, table=self.table)
        path = self.workdir / ("-".join(map(str, assignment)) or "default") / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(result.model, path, force=True, external_data=loaded.external_data)
        return path

    def build_switch(self, current: Assignment, groups: list[int]) -> tuple[Path, set[int]]:
        """The switch model (switch.py) of `current` and each of `groups` one rung
        towards float, and the groups it can move."""
        stepped = current
        for index in groups:
            stepped = self.space.step(stepped, index) or stepped
        protos = []
        prepared, _ = prepare_for_int8(load_model(self.model).model, self.config.base)
        for assignment in (current, stepped):
            config = self.config_for(assignment)
            if build_plan(prepared, config).empty:  # all float: the model itself
                protos.append(ir.serde.serialize_model(prepared))
                continue
            self._extend_table(config)
            result = quantize_int8(load_model(self.model), config, table=self.table)
            protos.append(ir.serde.serialize_model(result.model))
            del result
        nodes = {i: list(self.space.groups[i].nodes) for i in groups}
        merged, movable = switch_model(*protos, FloatFacts(prepared), nodes)
        del protos
        path = self.workdir / "switch" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(
            merged, path, save_as_external_data=True, location="model.onnx.data",
            size_threshold=1024,
        )  # fmt: skip
        return path, movable

    def _extend_table(self, config: Int8Config) -> None:
        """Calibrate the tensors a candidate needs that the table lacks (a node gone float
        can leave its reader's input without a shared range), once, into the shared table."""
        prepared, plan = prepare_for_int8(load_model(self.model).model, config)
        missing = [t for t in plan.activations if t not in self.table.ranges]
        axes = {t: a for t, a in plan.channel_axes().items() if t not in self.table.channels}
        if not missing and not axes:
            return
        gram = gram_inputs(prepared, plan) if config.pair_safe else set()  # as convert will
        extra = calibrate_model(
            prepared, self.model, missing, self.calib, self.config.calibration, None, axes, gram
        )
        self.table.stats.update(extra.stats)
        self.table.ranges.update(extra.ranges)
        self.table.channels.update(extra.channels)

    def trial(self, stage: str, assignment: Assignment, subset: list[int] | None = None) -> Trial:
        key = ("rank" if subset else "full", assignment, subset is not None)
        if key in self.known:
            trial = self.known[key]
            if not any(t is trial for t in self.trials):
                self.trials.append(trial)  # from a saved state: logged again, not re-run
            return trial
        start = time.monotonic()
        path = self.build(assignment)
        score: Score = self.evaluator.score(path, subset)
        trial = self._new(stage, assignment, score, subset)
        if score.passed and subset is None:
            lat = self.evaluator.latency(path)
            trial.speedup, trial.quant_ms = lat.speedup, lat.quant_stats.median_ms
            trial.passed = self._speed_ok(lat.speedup)
        shutil.rmtree(path.parent, ignore_errors=True)
        if subset is None:
            self.trial_s = time.monotonic() - start
        return self._record(key, trial, time.monotonic() - start)

    def ranking_trials(
        self, assignments: list[Assignment], subset: list[int]
    ) -> list[Trial | None]:
        """Ranking trials are independent of each other: with a cluster they are scored in
        parallel (never more than the trials left), else one by one. None: not run, the
        search is out of budget."""
        if self.remote is not None and not self.out_of_budget():
            room = self.config.max_trials - self.fresh_trials()
            todo = [a for a in dict.fromkeys(assignments) if ("rank", a, True) not in self.known]
            todo = todo[:room]
            for assignment in todo:  # ranges a candidate needs, into the shared table
                self._extend_table(self.config_for(assignment))
            calls = [(self.space.node_formats(a), subset) for a in todo]
            scores = self.remote(self.table, calls) if calls else iter(())
            for assignment, (score, seconds) in zip(todo, scores, strict=True):
                trial = self._new("rank", assignment, score, subset)
                self._record(("rank", assignment, True), trial, seconds)
                self.remote_trials += 1
        done = []
        for assignment in assignments:
            key = ("rank", assignment, True)
            run = key in self.known or not self.out_of_budget()
            done.append(self.trial("rank", assignment, subset) if run else None)
        return done

    def switched_trials(
        self, current: Assignment, moves: list[tuple[int, Assignment]], subset: list[int]
    ) -> None:
        """The ranking trials of `current` and of each move, from one switch model where
        they can be (switch.py); those it cannot move are left to ranking_trials."""
        todo = [
            (i, m)
            for i, m in moves
            if ("rank", m, True) not in self.known
            and self.space.groups[i].ladder[current[i]] in SWITCHED
        ]
        base_known = ("rank", current, True) in self.known
        if not todo or self.out_of_budget():
            return
        start = time.monotonic()
        path, movable = self.build_switch(current, [i for i, _ in todo])
        runs = [(-1, current)] if not base_known else []
        runs += [(i, m) for i, m in todo if i in movable]
        scores = self.evaluator.switched_scores(path, (i for i, _ in runs), subset)
        extra = time.monotonic() - start  # the build, charged to the first trial
        for (_, assignment), (score, seconds) in zip(runs, scores, strict=False):
            trial = self._new("rank", assignment, score, subset)
            self._record(("rank", assignment, True), trial, seconds + extra)
            extra = 0.0
            if self.out_of_budget():
                break
        shutil.rmtree(path.parent, ignore_errors=True)

    def _new(
        self, stage: str, assignment: Assignment, score: Score, subset: list[int] | None
    ) -> Trial:
        formats = self.space.formats(assignment)
        return Trial(stage, assignment, formats, score.to_dict(), score.passed, subset is not None)

    def _record(self, key: tuple[str, Assignment, bool], trial: Trial, seconds: float) -> Trial:
        trial.seconds = seconds
        self.known[key] = trial
        self.trials.append(trial)
        self._save_state()
        best = self.best()
        if self.progress:
            done = sum(1 for t in self.trials if t.seconds > 0)
            speedup = best.speedup if best else None
            self.progress(trial.stage, done, self.config.max_trials, speedup)
        return trial

    def _speed_ok(self, speedup: float) -> bool:
        wanted = self.config.gates.min_speedup
        return wanted is None or speedup >= wanted

    def best(self) -> Trial | None:
        """The search's pick once it has one (the speed pass sets it), else the fastest
        passing trial; earlier ones win ties within SPEED_MARGIN (latency is noisy)."""
        if self.winner is not None:
            return self.winner
        best = None
        for t in self.trials:
            if not t.passed or t.subset or t.speedup is None:
                continue
            if best is None or t.speedup > (best.speedup or 0) * SPEED_MARGIN:
                best = t
        return best

    # ------------------------------------------------------------------ the search

    def run(self, worst: Callable[[Path], list[int]]) -> None:
        current = self.trial("default", self.space.start)
        if not current.passed and not self.out_of_budget():
            current = self.greedy(current, worst)
        if self.best() is not None and not self.out_of_budget():
            self.speed_pass()

    def greedy(self, current: Trial, worst: Callable[[Path], list[int]]) -> Trial:
        built = self.build(current.assignment)
        start = time.monotonic()  # the pass over the data only: ranking runs no builds
        ordered = worst(built)
        per_sample = (time.monotonic() - start) / max(self.evaluator.data.num_samples, 1)
        subset = sorted(ordered[: self.rank_count(len(ordered), per_sample)])
        for _ in range(max(len(g.ladder) for g in self.space.groups) if self.space.groups else 0):
            order = self.rank(current, subset)
            if not order:
                break
            current = self.prefixes(current, order)
            if current.passed:
                return current
            for index in order:
                if self.out_of_budget():
                    return current
                moved = self.space.step(current.assignment, index)
                if moved is None:
                    continue
                trial = self.trial("greedy", moved)
                if trial.passed or closer(trial, current):
                    current = trial  # kept; otherwise the move is undone
                if current.passed:
                    return current
        return current

    def rank_count(self, available: int, per_sample: float) -> int:
        """Ranking samples: --rank-samples, fewer where the time budget is short. One
        ranking round runs every group's move on them (about a pass over the evaluation set
        each): it gets a third of the time left, and at least RANK_MIN of the worst samples.
        SmolLM2-135M (121 groups, 0.3 s per 128-token sample on 2 cores) gets a handful."""
        limit = self.config.time_budget
        if limit is None or per_sample <= 0:
            return available
        left = limit - (time.monotonic() - self.started)
        moves = sum(1 for g in self.space.groups if len(g.ladder) > 1)
        fits = int(left * RANK_SHARE / (max(moves, 1) * per_sample))
        return max(min(available, fits), min(available, RANK_MIN))

    def prefixes(self, current: Trial, order: list[int]) -> Trial:
        """The best-ranked 1, 2, 4, ... groups moved together until the budget holds, then
        a bisection down to the fewest that hold it: a fitting candidate in a few full-set
        checks, with no more float groups than the ranking needs (the speed pass then tries
        handing back each). Returns the fitting one, else the closest."""

        def moved(count: int) -> Trial:
            assignment = current.assignment
            for index in order[:count]:
                assignment = self.space.step(assignment, index) or assignment
            return self.trial("greedy", assignment)

        low, best, fit = 0, current, None  # `low` groups moved: known not to fit
        count = 1
        while not self.out_of_budget():
            trial = moved(count)
            if trial.passed:
                fit = (count, trial)
                break
            if closer(trial, best):
                best = trial
            if count == len(order):
                return best
            low, count = count, min(2 * count, len(order))
        if fit is None:
            return best
        high, winner = fit
        while high - low > 1 and not self.out_of_budget():
            middle = (low + high) // 2
            trial = moved(middle)
            if trial.passed:
                high, winner = middle, trial
            else:
                low = middle
        return winner

    def rank(self, current: Trial, subset: list[int]) -> list[int]:
        """Groups by how much one rung towards float helps on the worst samples: by the
        rise of the output SQNR there (continuous, where a top-1 count on 64 samples is
        coarse), then by the budget's own shortfall; moves that did not help come last."""
        moves = [(i, self.space.step(current.assignment, i)) for i in range(len(self.space.groups))]
        moves = [(i, m) for i, m in moves if m is not None]
        self.switched_trials(current.assignment, moves, subset)  # one session, here
        base = self.trial("rank", current.assignment, subset)
        scored = self.ranking_trials([m for _, m in moves], subset)
        gains, rest = [], []
        for (i, _), trial in zip(moves, scored, strict=True):
            if trial is None:
                continue
            err_gain = shortfall(base) - shortfall(trial)
            sqnr_gain = sqnr(trial) - sqnr(base)
            helps = err_gain > 0 or (err_gain == 0 and sqnr_gain > 0)
            (gains if helps else rest).append((sqnr_gain, err_gain, i))
        # The moves that did not help on the ranking samples come last, in the same order:
        # alone they may not show on a few samples (or in runs of another batch size) and
        # still be what the full set needs once the helpful ones are not enough.
        order = sorted(gains, key=lambda g: (-g[0], -g[1], g[2]))
        order += sorted(rest, key=lambda g: (-g[0], -g[1], g[2]))
        return [i for _, _, i in order]

    def speed_pass(self) -> None:
        """One rung either way per group from the fastest fitting candidate. Back towards
        int8 is kept when the budget holds and it is not clearly slower (int8 is the
        smaller model, and a float island costs Q/DQ and layout changes); towards float
        only when the budget holds and it is clearly faster (an int8 kernel slower than
        float, as on tiny layers)."""
        best = self.best()
        fastest = (best.speedup or 0) if best else 0  # the tolerance does not compound
        handed_back: set[int] = set()
        # Every hand-back first: on a model with many groups the time budget may end the
        # pass, and returning float groups to int8 is where most of the speed is.
        for by in (-1, 1):
            for index in range(len(self.space.groups)):
                if best is None or self.out_of_budget():
                    self.winner = best
                    return
                moved = self.space.step(best.assignment, index, by=by)
                if moved is None or index in handed_back:  # stepping back would undo it
                    continue
                trial = self.trial("speed", moved)
                speed = trial.speedup or 0
                need = (best.speedup or 0) * TO_FLOAT if by > 0 else fastest * BACK_TO_INT8
                if trial.passed and speed >= need:
                    best, fastest = trial, max(fastest, speed)
                    if by < 0:
                        handed_back.add(index)
        self.winner = best


def tune_file(
    model_path: Path,
    output: Path,
    config: TuneConfig,
    *,
    data_spec: str,
    eval_spec: str,
    labels: Any = None,
    write_best: bool = False,
    force: bool = False,
    state_path: Path | None = None,
    progress: Progress | None = None,
    cluster: Any = None,
) -> TuneResult:
    """Search per-node formats for the fastest model within the budget and write it.

    `cluster` (a `ClusterConfig`): ranking trials run as Ray tasks there (search/remote.py).
    """
    from quantcli.convert import convert_int8_file

    started = time.monotonic()
    check_model_path(Path(model_path))
    check_output_path(
        output, inputs=[Path(model_path), Path(data_spec), Path(eval_spec)], force=force
    )
    loaded = load_model(model_path)
    evaluation = open_data(eval_spec, input_specs(loaded.model))
    if labels is not None:
        evaluation = WithLabels(evaluation, labels)
    cfg = config.compare
    check_gates_possible(
        config.gates,
        has_labels=evaluation.labels is not None,
        latency_runs=max(cfg.runs, 1),
        has_metric=cfg.metric is not None,
    )
    _, plan = prepare_for_int8(loaded.model, config.base)
    space = build_space(plan, _activation_inputs(loaded.model))
    state = state_path or output.with_name(output.name + ".tune-state.json")
    with contextlib.ExitStack() as stack:
        remote, where = None, None
        if cluster is not None and cfg.metric is not None:
            raise InputError(
                "--metric plugins run in one process; tune --ray does not ship them to workers",
                hint="run tune without --ray for a custom metric",
            )
        if cluster is not None:  # joined first: an unreachable cluster fails before any work
            from quantcli.cluster.engine import connect
            from quantcli.search.remote import ray_scorer

            joined = stack.enter_context(connect(cluster))
            where = {"address": joined.address, "nodes": len(joined.nodes), "cpus": joined.cpus}
            remote = ray_scorer(
                joined, cluster.retries, Path(model_path), eval_spec, labels, config.gates,
                cfg, config.base,
            )  # fmt: skip
        table, calib = calibrate_file(model_path, data_spec, config.calibration, config.base)
        workdir = Path(tempfile.mkdtemp(prefix=".quantcli-tune-", dir=output.parent))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        evaluator = Evaluator(Path(model_path), evaluation, config.gates, cfg, workdir / "float")
        search = _Search(
            Path(model_path), config, evaluator, table, calib, space, workdir, state, progress,
            remote, started, f"{data_spec} {eval_spec} {labels is not None}",
        )  # fmt: skip
        # The winner is written with the candidates' weights: the pair-safe search is
        # most of an LM's conversion time.
        stack.enter_context(reusing_weights())
        search.run(lambda path: evaluator.worst_samples(path, config.rank_samples))
        best = search.best()
        found = best is not None
        result = TuneResult(found, best, search.trials, space, None, None, search.stopped, [])
        if where is not None:
            result.cluster = where | {"ranking_trials": search.remote_trials}
        pick = best or min((t for t in search.trials if not t.subset), key=shortfall, default=None)
        if not found:
            result.best = pick
            result.held_back = held_back(pick)
        if pick is not None and (found or write_best):
            recipe = Recipe(
                model_fingerprint(Path(model_path)),
                replace(config.base, node_formats=space.node_formats(pick.assignment)),
                config.calibration,
            )
            recipe_path = output.with_name(output.stem + ".recipe.json")
            # The search's own table: its ranges are per tensor, the same the replay's
            # calibration computes (tests/test_tune.py checks the bytes), without a pass.
            search._extend_table(recipe.int8)
            table_path = workdir / "table.json"
            save_table(search.table, table_path)
            convert_int8_file(
                model_path, output, recipe.int8, table_path=table_path,
                calibration=recipe.calibration, force=force,
            )  # fmt: skip
            recipe.save(recipe_path)
            result.output, result.recipe = output, recipe_path
    if found:
        state.unlink(missing_ok=True)
    return result


def _activation_inputs(model: Any) -> dict[str, str]:
    return {
        node.name or "": node.inputs[0].name or ""
        for node in model.graph
        if node.inputs and node.inputs[0] is not None
    }
