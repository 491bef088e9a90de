"""User-facing errors, and the one place that turns them into a single CLI line.

A `WanError` is a user mistake or an environment problem the user can fix (bad input, missing or
altered files). CLIs print its message as one line and exit non-zero; anything else is a bug and
keeps its traceback. `--debug` shows tracebacks for `WanError` too.
"""

from __future__ import annotations

import errno
import functools
import logging
import signal
import sys
from typing import Callable

import click


class WanError(Exception):
    """A user mistake (bad input, missing file): printed as one line, no traceback."""


class NonFiniteError(WanError):
    """A stage or the sampler produced NaN/Inf: the video would be garbage, so none is written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl+C, so every partial output is removed on the way."""


EXIT_USER_ERROR = 2
# The environment, not the program: these become one line too (the writers name the path).
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


# Signals the handler has seen. Its exception is lost when the signal lands inside a weakref
# callback or a __del__ (Python prints "Exception ignored" and goes on: seen once in an export),
# so the step loop and every output's commit ask `raise_if_terminated` as well.
_received: list[int] = []


def _terminate(signum, frame):
    _received.append(signum)
    raise Terminated(signum)


def raise_if_terminated() -> None:
    """Raise Terminated for a SIGTERM/SIGHUP already received (see `_received`)."""
    if _received:
        raise Terminated(_received[0])


def _quiet_lost_terminations(hook):
    """sys.unraisablehook without the traceback of a Terminated that was lost (it is raised
    again at the next check, and the run ends with its one line)."""
    def unraisable(info):
        if not isinstance(info.exc_value, Terminated):
            hook(info)
    return unraisable


def is_out_of_memory(exc: BaseException) -> bool:
    """numpy's MemoryError, or ONNX Runtime's failed allocation (it raises its own types)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(
        words in text for words in ("failed to allocate", "bad_alloc", "bad allocation", "out of memory"))


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
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                signal.signal(sig, _terminate)
        sys.unraisablehook = _quiet_lost_terminations(sys.unraisablehook)
        try:
            command.main(prog_name=prog_name, standalone_mode=False)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            cause = exc.__cause__ or exc.__context__  # click wraps the KeyboardInterrupt
            signum = cause.args[0] if isinstance(cause, Terminated) else None
            name = signal.Signals(signum).name if signum else "interrupted"
            click.echo(f"{prog_name}: {'interrupted' if signum is None else f'stopped by {name}'}"
                       "; nothing was written", err=True)
            sys.exit(128 + (signum or signal.SIGINT))
        except click.UsageError as exc:
            click.echo(f"{prog_name}: error: {exc.format_message()} (see --help)", err=True)
            sys.exit(EXIT_USER_ERROR)
        except WanError as exc:
            if debug:
                raise
            click.echo(f"{prog_name}: error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except Exception as exc:  # the environment ran out of something: not a bug to trace
            if debug or not (is_out_of_memory(exc) or (isinstance(exc, OSError)
                                                       and exc.errno in ENVIRONMENT_ERRNOS)):
                raise
            what = "out of memory" if is_out_of_memory(exc) else exc.strerror
            click.echo(f"{prog_name}: error: {what} ({type(exc).__name__}); nothing was written "
                       "(ask for fewer frames or a smaller size, or free memory/disk)", err=True)
            sys.exit(EXIT_USER_ERROR)

    return main
