"""One error path for every command: a user error is one line on stderr and exit code 2.

Every command function is wrapped in :func:`user_errors` where it is defined, so it behaves the same
in the ``obliviate`` app and in any app a test builds from it. User errors are
:class:`~obliviate.errors.UserError` and the built-in kinds that the layers raise for bad input
(``USER_ERRORS``); anything else is a bug and keeps its traceback. ``typer.BadParameter`` stays
typer's usage error (also exit code 2).
"""

from __future__ import annotations

import functools
import signal
from typing import Any, Callable, TypeVar, cast

import typer

from obliviate.errors import UserError
from obliviate.runs import RunInterrupted

F = TypeVar("F", bound=Callable[..., Any])

# ValueError covers DataError, OptionsError, RunFileError, AuditError, JSON and UTF-8 errors; the OS
# errors are about paths the user gave (a broken registry is a RegistryError, a UserError).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, IsADirectoryError, PermissionError)


def error_line(exc: BaseException) -> str:
    """The message on one line: an OS error as ``PATH: reason``, other messages with their lines joined."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None and not isinstance(exc, UserError):
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(exc).__name__


def fail(exc: BaseException) -> typer.Exit:
    """Print ``error: ...`` to stderr; the exit to raise (the exception's ``exit_code``, else 2)."""
    typer.echo(typer.style("error:", fg="red") + " " + error_line(exc), err=True)
    return typer.Exit(getattr(exc, "exit_code", 2))


def user_errors(fn: F) -> F:
    """Run a command; a user error ends it with one line and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise fail(exc) from None
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM through RunInterrupted: the run says so
            signum = exc.signum if isinstance(exc, RunInterrupted) else signal.SIGINT
            typer.echo(f"interrupted ({signal.Signals(signum).name}): a run that was running is marked "
                       "interrupted; continue it with --resume", err=True)
            raise typer.Exit(128 + signum) from None

    wrapper.__user_errors__ = True  # type: ignore[attr-defined]  # a function attribute; tests check every command
    return cast(F, wrapper)  # functools.wraps keeps fn's signature
