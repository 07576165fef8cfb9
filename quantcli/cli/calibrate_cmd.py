"""`quantcli calibrate` and `quantcli merge`: streaming calibration tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from quantcli.calibrate.config import DEFAULT_METHOD
from quantcli.cli.cluster_opts import ClusterBar, RayOpt, cluster_config
from quantcli.cli.common import (
    BatchOpt,
    DataOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    LimitOpt,
    ModelArg,
    OpTypesOpt,
    OutputOpt,
    PreprocessOpt,
    SmoothOpt,
    handle_errors,
    op_selection,
    out,
    parse_preprocess,
    print_json,
    progress_bar,
    warn,
)

MethodOpt = Annotated[
    str,
    typer.Option("--method", help="Range method: minmax, percentile, entropy or mse."),
]
PercentileOpt = Annotated[
    float, typer.Option("--percentile", help="Percentile for --method percentile.")
]
SymmetricOpt = Annotated[
    bool,
    typer.Option("--symmetric/--asymmetric", help="Symmetric ranges (for int8 activations)."),
]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="The INT8 format the table is for, as in convert: auto (MatMuls dynamic, "
        "not calibrated), qdq or qoperator.",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="I/N, shard I of N counted from 1 (1/4 ... 4/4): calibrate the samples whose "
        "index % N == I - 1; merge the N tables later.",
    ),
]


def _check_output(path: Path, force: bool, inputs: list[Path]) -> None:
    from quantcli.graph.io import check_output_path

    check_output_path(path, inputs=inputs, force=force)  # never a table over its inputs


@handle_errors
def calibrate(
    model: ModelArg,
    data: DataOpt,
    output: OutputOpt,
    method: MethodOpt = DEFAULT_METHOD,
    percentile: PercentileOpt = 99.99,
    symmetric: SymmetricOpt = False,
    batch_size: BatchOpt = 1,
    limit: LimitOpt = None,
    shard: ShardOpt = None,
    format_: FormatOpt = "auto",
    op_types: OpTypesOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    smooth: SmoothOpt = True,
    preprocess: PreprocessOpt = None,
    ray: RayOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Record activation ranges of MODEL over the samples in --data into a table (JSON)."""
    from quantcli.calibrate.config import CalibrationConfig
    from quantcli.calibration import calibrate_file
    from quantcli.data import parse_shard
    from quantcli.quantize.int8.config import Int8Config

    config = CalibrationConfig(
        method=method,
        percentile=percentile,
        symmetric=symmetric,
        batch_size=batch_size,
        limit=limit,
        shard=parse_shard(shard) if shard else None,
    )
    # The same plan as convert's: a table for --format qdq also covers the MatMul inputs.
    int8 = Int8Config(format=format_, smooth=smooth, **op_selection(op_types, include, exclude))
    _check_output(output, force, [model, Path(data)])
    images, cluster = parse_preprocess(preprocess), cluster_config(ray)
    if cluster is None:
        table, source = calibrate_file(model, data, config, int8, images=images, progress=_Bar())
    else:
        from quantcli.cluster.calibrate import calibrate_on_cluster

        bar = ClusterBar("calibrating on Ray")
        try:
            table, source = calibrate_on_cluster(
                model, data, config, int8, cluster, images=images, progress=bar
            )
        finally:
            bar.close()
    if source.synthetic:
        warn("random data: ranges are not representative; use real samples for a real model")
    _save_and_report(table, output, json_)


class _Bar:
    """Progress callback that opens a rich bar on first use and closes it at the end."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar, self.update = progress_bar("calibrating", total)
            self.bar.start()
        self.update(done, total)
        if done >= total:
            self.bar.stop()


def table_summary(table: Any, path: Path) -> dict[str, Any]:
    from quantcli.calibrate.methods import is_degenerate

    tensors = []
    for name, stats in table.stats.items():
        lo, hi = table.ranges[name]
        width = max(abs(stats.min), abs(stats.max))
        tensors.append(
            {
                "name": name,
                "min": stats.min,
                "max": stats.max,
                "range": [lo, hi],
                "clipped": width > 0 and max(-lo, hi) < 0.5 * width,  # outliers cut by the method
                "constant": is_degenerate(stats),
            }
        )
    tensors.sort(key=lambda t: -(t["range"][1] - t["range"][0]))
    return {
        "schema": "quantcli.calibrate-summary/1",
        "table": str(path),
        "method": table.method,
        "samples": table.samples,
        # as on the command line: [I, N] counted from 1 (the table file keeps [I - 1, N])
        "shard": [table.shard[0] + 1, table.shard[1]] if table.shard else None,
        "tensors": tensors,
    }


def render(summary: dict[str, Any], top: int = 10) -> None:
    tensors = summary["tensors"]
    text = (
        f"Calibrated {len(tensors)} tensors on {summary['samples']} samples "
        f"with {summary['method']} -> {summary['table']}"
    )
    out.print(escape(text))
    table = Table(title=f"Widest ranges (top {min(top, len(tensors))})", title_justify="left")
    for col in ("tensor", "observed min", "observed max", "chosen range", "note"):
        table.add_column(col)
    for t in tensors[:top]:
        note = "outliers clipped" if t["clipped"] else ("constant" if t["constant"] else "")
        table.add_row(
            escape(t["name"]),
            f"{t['min']:.4g}",
            f"{t['max']:.4g}",
            f"[{t['range'][0]:.4g}, {t['range'][1]:.4g}]",
            note,
        )
    out.print(table)
    clipped = sum(t["clipped"] for t in tensors)
    constant = [t["name"] for t in tensors if t["constant"]]
    if clipped:
        out.print(f"{clipped} tensors have outliers the method clipped (range < half the max).")
    if constant:
        warn(f"{len(constant)} tensors are constant (zero range), e.g. '{constant[0]}'")


@handle_errors
def merge(
    tables: Annotated[list[Path], typer.Argument(help="Calibration tables (JSON) to combine.")],
    output: OutputOpt,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Merge shard tables into exactly the table one run over all their samples gives."""
    from quantcli.calibrate.table import load_table, merge_tables

    _check_output(output, force, tables)
    _save_and_report(merge_tables([load_table(p) for p in tables]), output, json_)


def _save_and_report(table: Any, output: Path, json_: bool) -> None:
    """Write the table atomically, then print its summary (JSON or a rich table)."""
    from quantcli.calibrate.table import save_table

    save_table(table, output)
    summary = table_summary(table, output)
    if json_:
        print_json(summary)
    else:
        render(summary)
