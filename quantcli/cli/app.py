"""The `quantcli` Typer application: global flags and command registration."""

from __future__ import annotations

import signal
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from quantcli import __version__
from quantcli.cli import calibrate_cmd, compare_cmd, convert_cmd, inspect_cmd, tune_cmd
from quantcli.cli.common import EXIT_INPUT, State


class OneLineUsageErrors(TyperGroup):
    """Usage errors (missing option, bad value, unknown command) as one `error:` line and
    exit 2, like every other bad input, instead of click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(EXIT_INPUT)
        except Exception as exc:
            if not hasattr(exc, "format_message") or type(exc).__name__ == "NoArgsIsHelpError":
                if hasattr(exc, "show"):  # `quantcli` alone prints the help
                    exc.show()
                    sys.exit(getattr(exc, "exit_code", EXIT_INPUT))
                raise
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            typer.echo(f"error: {message}{hint}", err=True)
            sys.exit(getattr(exc, "exit_code", EXIT_INPUT))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
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
app.command("tune")(tune_cmd.tune)


def _terminated(signum: int, frame: Any) -> None:
    # SystemExit unwinds like an exception: temp files and work folders are removed on the
    # way out (a CI job's timeout or a killed benchmark sends SIGTERM, not Ctrl-C).
    sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    app()
