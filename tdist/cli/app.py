"""Root typer app. Commands live in sibling modules, each exposing `register(app)`."""

from __future__ import annotations

import importlib
import sys

import typer

from tdist.errors import TdistError

app = typer.Typer(
    name="tdist",
    help="Deploy distributed inference graphs from one YAML: validate, plan, deploy, infer, status, stop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = ("tdist.cli.spec_cmds", "tdist.cli.runtime_cmds")

for _mod in _COMMAND_MODULES:
    try:
        importlib.import_module(_mod).register(app)
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != _mod:
            raise


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv


def main() -> None:
    """Entry point: a TdistError becomes its message and exit code (traceback only with --debug).

    Usage errors (unknown option, missing argument) are typer's own: message and exit 2.
    """
    argv = sys.argv[1:]
    debug = _debug_requested(argv)
    if debug:
        argv = [a for a in argv if a != "--debug"]
    try:
        app(args=argv, prog_name="tdist")
    except TdistError as exc:
        if debug:
            raise
        from rich.console import Console

        from rich.markup import escape

        Console(stderr=True, highlight=False, soft_wrap=True).print("[bold red]error:[/] " + escape(exc.render()))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
