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
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


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
            err.print(f"[red]error:[/red] {exc.one_line()}", highlight=False, markup=True)
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
