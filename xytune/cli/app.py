"""The ``xytune`` command line (typer + rich).

Every user error is one red sentence and exit code 2; a regression found by
``compare`` is exit code 1; an interrupted profile saves its partial table
and exits 130.
"""

from __future__ import annotations

import warnings

import typer
from rich.console import Console

from xytune import __version__

# rich_markup_mode=None: click's plain help, which keeps "[default: ...]" and brackets in help texts (rich markup
# ate them) and full option names at any terminal width (rich's boxed columns cut them at 80)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Offline profiler, cost tables and regression reports for LLM serving (after XY-Serve).")
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warned(make, *args):
    """``make(*args)``, its warnings printed as one yellow line each (a table without a fit, say), not as
    Python's two-line warning text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make(*args)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
    return result


def _version(value: bool):
    if value:
        console.print(f"xytune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def _interrupt(signum, frame):
    """SIGTERM takes the Ctrl-C path, so a killed sweep still saves its partial table."""
    raise KeyboardInterrupt


def main() -> None:
    app()
