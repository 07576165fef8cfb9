"""`quantcli tune MODEL --data CALIB --eval EVAL <budget> -o OUT`: the fastest INT8 model
whose accuracy stays within the budget, searched per node (quantcli/search/)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from quantcli.calibrate.config import DEFAULT_METHOD
from quantcli.cli.calibrate_cmd import MethodOpt
from quantcli.cli.cluster_opts import RayOpt, cluster_config
from quantcli.cli.common import (
    BatchOpt,
    ForceOpt,
    JsonOpt,
    LabelsOpt,
    LimitOpt,
    MaxDropOpt,
    MetricGateOpt,
    MetricOpt,
    MinCosineOpt,
    MinTop1Opt,
    ModelArg,
    OutputOpt,
    handle_errors,
    out,
    print_json,
    print_table,
    progress_bar,
)


@handle_errors
def tune(
    model: ModelArg,
    output: OutputOpt,
    data: Annotated[str, typer.Option("--data", "-d", help="Calibration samples.")],
    eval_: Annotated[
        str, typer.Option("--eval", help="Evaluation samples (kept apart from --data).")
    ],
    labels: LabelsOpt = None,
    metric: MetricOpt = None,
    max_drop: MaxDropOpt = None,
    min_cosine: MinCosineOpt = None,
    min_top1: MinTop1Opt = None,
    metric_gate: MetricGateOpt = None,
    min_speedup: Annotated[
        float | None, typer.Option("--min-speedup", help="Also require this speedup.")
    ] = None,
    max_trials: Annotated[
        int, typer.Option("--max-trials", min=1, help="Candidates to build and score, at most.")
    ] = 200,
    time_budget: Annotated[
        float | None,
        typer.Option("--time-budget", min=1, help="Seconds for the search, calibration included."),
    ] = None,
    rank_samples: Annotated[
        int, typer.Option("--rank-samples", min=1, help="Worst samples used to rank moves.")
    ] = 64,
    runs: Annotated[
        int, typer.Option("--runs", min=1, help="Timed runs per latency measurement.")
    ] = 30,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Intra-op threads of every session.")
    ] = None,
    target: Annotated[
        str, typer.Option("--target", help="INT8 target: cpu (default) or cpu-vnni.")
    ] = "cpu",
    method: MethodOpt = DEFAULT_METHOD,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 1,
    write_best: Annotated[
        bool,
        typer.Option("--write-best", help="Write the closest candidate even if none fits."),
    ] = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    ray: RayOpt = None,
) -> None:
    """Find the fastest INT8 model of MODEL within an accuracy budget; exit 1 if none fits."""
    from quantcli.calibrate.config import CalibrationConfig
    from quantcli.data import read_labels_file
    from quantcli.evaluate.gates import GateSpec, parse_metric_gate
    from quantcli.evaluate.result import CompareConfig
    from quantcli.quantize.int8.config import Int8Config
    from quantcli.search.trials import raise_if_not_found
    from quantcli.search.tune import TuneConfig, tune_file

    gates = GateSpec(
        max_drop=max_drop,
        min_cosine=min_cosine,
        min_top1=min_top1,
        min_speedup=min_speedup,
        metrics=tuple(parse_metric_gate(g) for g in metric_gate or ()),
    )
    config = TuneConfig(
        gates=gates,
        max_trials=max_trials,
        time_budget=time_budget,
        rank_samples=rank_samples,
        base=Int8Config(target=target),
        calibration=CalibrationConfig(method=method, limit=limit, batch_size=batch_size),
        compare=CompareConfig(
            batch_size=batch_size, runs=runs, warmup=5, threads=threads, metric=metric
        ),
    )
    result = tune_file(
        model,
        output,
        config,
        data_spec=data,
        eval_spec=eval_,
        labels=read_labels_file(labels) if labels is not None else None,
        write_best=write_best,
        force=force,
        progress=_TuneBar(max_trials),
        cluster=cluster_config(ray),
    )
    doc = result.to_dict()
    if json_:
        print_json(doc)
    else:
        render(doc)
    raise_if_not_found(result)


class _TuneBar:
    """One bar: trials done, with the best speedup so far in the description."""

    def __init__(self, total: int) -> None:
        self.total, self.bar, self.update = total, None, None

    def __call__(self, stage: str, done: int, total: int, best: float | None) -> None:
        if self.bar is None:
            self.bar, self.update = progress_bar("tuning", total)
            self.bar.start()
        text = f"tuning ({stage}; best {best:.2f}x)" if best else f"tuning ({stage})"
        self.bar.update(self.bar.task_ids[0], description=text)
        self.update(done, total)
        if done >= total:
            self.bar.stop()


def render(doc: dict[str, Any]) -> None:
    best = doc["best"]
    verdict = "found" if doc["found"] else "NOT FOUND"
    trials = sum(1 for t in doc["trials"] if not t["subset"])
    out.print(
        escape(
            f"Budget {verdict} after {len(doc['trials'])} trials ({trials} on the full set); "
            f"{doc['stopped']}"
        )
    )
    if best:
        counts: dict[str, int] = {}
        for fmt in best["formats"].values():
            counts[fmt] = counts.get(fmt, 0) + 1
        print_table("Formats of the best candidate", ["format", "nodes"], sorted(counts.items()))
        rows = [
            [g["name"], g["threshold"], g["value"], g["passed"]] for g in best["score"]["gates"]
        ]
        print_table("Budget", ["gate", "threshold", "value", "met"], rows)
        if best["speedup"]:
            out.print(escape(f"speedup vs float: {best['speedup']:.2f}x"))
    for line in doc["held_back"]:
        out.print(escape(f"held back by {line}"))
    if doc["output"]:
        out.print(escape(f"Wrote {doc['output']} and its recipe {doc['recipe']}"))
