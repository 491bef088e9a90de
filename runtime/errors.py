"""User-facing errors, and the one place that turns them into a single CLI line.

A `WanError` is a user mistake or an environment problem the user can fix (bad input, missing or
altered files). CLIs print its message as one line and exit non-zero; anything else is a bug and
keeps its traceback. `--debug` shows tracebacks for `WanError` too.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

import click


class WanError(Exception):
    """A user mistake (bad input, missing file): printed as one line, no traceback."""


EXIT_USER_ERROR = 2


def run_cli(command: click.Command, prog_name: str) -> Callable[[], None]:
    """Return a console-script entry point that prints user errors as one line.

    Click's own usage errors (an unknown option, `--steps abc`) are folded into the same
    one-line form so every user mistake looks alike: `wan-run: error: ...`.
    """

    @functools.wraps(command.main)
    def main() -> None:
        debug = "--debug" in sys.argv[1:]
        # Our packages narrate at INFO; third-party libraries (the ONNX exporter is chatty) only
        # get through with --debug.
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format="%(message)s", stream=sys.stderr)
        for name in ("export", "engines", "runtime"):
            logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
        try:
            command.main(prog_name=prog_name, standalone_mode=False)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(f"{prog_name}: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            click.echo(f"{prog_name}: error: {exc.format_message()} (see --help)", err=True)
            sys.exit(EXIT_USER_ERROR)
        except WanError as exc:
            if debug:
                raise
            click.echo(f"{prog_name}: error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return main
