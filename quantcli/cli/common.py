"""What every command shares: consoles, option types, JSON output, error mapping.

Errors are mapped in one place: a QuantcliError becomes one line on stderr and its exit
code; anything else is a bug: exit 3, with the traceback saved to a file to report.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from quantcli.errors import QuantcliError

# stdout carries results (a table, or exactly one JSON document); stderr carries the rest.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """Global flags set by the app callback."""

    debug = False


ModelArg = Annotated[
    Path, typer.Argument(help="ONNX model file (.onnx); external data is read from beside it.")
]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="File to write.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output file if it exists.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Samples: an .npz (keys = input names), a folder of .npz/.npy or images, "
        "or random[:N].",
    ),
]


def print_json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


def handle_errors(command: F) -> F:
    """Wrap a command so expected errors exit with their code and one line on stderr."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except QuantcliError as exc:
            if State.debug:
                traceback.print_exc()
            # Messages name shapes like [batch, 3]: escaped, or rich would eat them as markup.
            err.print(f"[red]error:[/red] {escape(exc.one_line())}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception:
            raise typer.Exit(_report_bug()) from None

    return wrapper  # type: ignore[return-value]


def _report_bug() -> int:
    if State.debug:
        traceback.print_exc()
        return EXIT_INTERNAL
    with tempfile.NamedTemporaryFile(
        "w", prefix="quantcli-crash-", suffix=".txt", delete=False
    ) as fh:
        traceback.print_exc(file=fh)
    kind = sys.exc_info()[0]
    name = kind.__name__ if kind else "error"
    err.print(
        f"[red]internal error[/red] ({name}): this is a bug in quantcli; "
        f"please report it with the traceback saved to {fh.name} (or rerun with --debug)",
        highlight=False,
    )
    return EXIT_INTERNAL


OpTypesOpt = Annotated[
    str | None,
    typer.Option(
        "--op-types", help="Comma-separated op types to quantize (default: the measured set)."
    ),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", help="Node name or glob to quantize even if defaults skip it."),
]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option("--exclude", help="Node name or glob to keep in float.")
]
SmoothOpt = Annotated[
    bool,
    typer.Option(
        "--smooth/--no-smooth",
        help="auto: move outlier channels of dynamic MatMul inputs into the weights.",
    ),
]
PreprocessOpt = Annotated[
    str | None,
    typer.Option(
        "--preprocess",
        help="Image preprocessing, e.g. 'size=224x224,resize=resize-crop,scale=0.00392,"
        "mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW,channels=RGB'.",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per inference run.")]

# Accuracy gates: `compare` fails on them, `tune` searches within them.
LabelsOpt = Annotated[
    Path | None,
    typer.Option("--labels", help="An .npy of class ids (or a 'labels' key in the .npz)."),
]
MetricOpt = Annotated[
    str | None,
    typer.Option("--metric", help="Your metric: module:function or path/file.py:function."),
]
MaxDropOpt = Annotated[
    float | None, typer.Option("--max-drop", help="Gate: max accuracy drop, points.")
]
MinCosineOpt = Annotated[
    float | None, typer.Option("--min-cosine", help="Gate: min mean cosine per output.")
]
MinTop1Opt = Annotated[
    float | None, typer.Option("--min-top1", help="Gate: min top-1 agreement with float.")
]
MetricGateOpt = Annotated[
    list[str] | None,
    typer.Option("--metric-gate", help="Gate on a --metric result: NAME<=V or NAME>=V."),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="Use at most this many samples.")
]


def op_selection(
    op_types: str | None, include: list[str] | None, exclude: list[str] | None
) -> dict[str, Any]:
    """Int8Config fields for the node selection options, validated."""
    from quantcli.errors import InputError
    from quantcli.quantize.int8.rules import RULES

    selected = None
    if op_types:
        selected = tuple(t.strip() for t in op_types.split(",") if t.strip())
        unknown = [t for t in selected if t not in RULES]
        if unknown:
            raise InputError(
                f"--op-types: '{unknown[0]}' is not an op type quantcli can quantize",
                hint=f"supported: {', '.join(sorted(RULES))}",
            )
    return {"op_types": selected, "include": tuple(include or ()), "exclude": tuple(exclude or ())}


def parse_preprocess(text: str | None) -> Any:
    """'key=value,...' into ImageOptions; an unknown key is an error."""
    from quantcli.data import ImageOptions
    from quantcli.errors import InputError

    if not text:
        return None
    fields: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise InputError(f"--preprocess: '{item}' is not key=value", hint="e.g. size=224x224")
        if key == "size":
            h, _, w = value.lower().partition("x")
            fields["size"] = (int(h), int(w or h))
        elif key in ("mean", "std"):
            fields[key] = tuple(float(v) for v in value.split("/"))
        elif key == "scale":
            num, _, den = value.partition("/")
            fields["scale"] = float(num) / float(den) if den else float(num)
        elif key in ("resize", "layout", "channels"):
            fields[key] = value.strip()
        else:
            raise InputError(
                f"--preprocess: unknown key '{key}'",
                hint="keys: size, resize, scale, mean, std, layout, channels",
            )
    return ImageOptions(**fields)


def progress_bar(description: str, total: int) -> Any:
    """A rich progress bar on stderr (samples/s, ETA); returns (progress, update callback)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # piped stderr keeps only warnings and errors
    )
    task = progress.add_task(description, total=total, rate="")

    def update(done: int, total_: int) -> None:
        speed = progress.tasks[task].speed
        rate = f"{speed:.1f} samples/s" if speed else ""
        progress.update(task, completed=done, total=total_, rate=rate)

    return progress, update


def print_table(title: str, head: list[str], rows: list[list[str]]) -> None:
    """A titled rich table on stdout; cells are escaped ("[batch, 3]" is no markup) unless
    they carry colour markup on purpose (a cell starting with "[green]" or "[red]")."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(head):
        table.add_column(col, justify="right" if i and col in ("count", "nodes") else "left")
    for row in rows:
        table.add_row(
            *(c if c.startswith(("[green]", "[red]", "[yellow]")) else escape(c) for c in row)
        )
    out.print(table)


def count_rows(counts: dict[str, int]) -> list[list[str]]:
    return [[key, str(count)] for key, count in counts.items()]
