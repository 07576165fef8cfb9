"""The `quantcli` Typer application: global flags and command registration."""

from __future__ import annotations

from typing import Annotated

import typer

from quantcli import __version__
from quantcli.cli import calibrate_cmd, compare_cmd, convert_cmd, inspect_cmd
from quantcli.cli.common import State

app = typer.Typer(
    name="quantcli",
    help="Post-training quantization of ONNX models: calibrate, convert to INT8/INT4, compare.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors.", envvar="QUANTCLI_DEBUG")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    State.debug = debug


app.command("inspect")(inspect_cmd.inspect)
app.command("calibrate")(calibrate_cmd.calibrate)
app.command("merge")(calibrate_cmd.merge)
app.command("convert")(convert_cmd.convert)
app.command("compare")(compare_cmd.compare)


def main() -> None:
    app()
