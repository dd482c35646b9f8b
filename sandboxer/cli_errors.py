"""The command line's one table from failures to exit codes, and the one ``error:`` line.

``exec`` exits with the command's own code; sand-boxer's own failures use a range of their
own (in the style of BSD's sysexits.h), so a script can tell "the command exited 1" from
"no such sandbox". ``--json`` never changes the code. 1 means only "it ran, and failed"
(``gc`` with errors, a failed ``conformance`` step, undelivered usage records). Nothing
prints a traceback unless ``--debug`` (or ``SANDBOXER_DEBUG=1``) asks for it.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Sequence

import click

from sandboxer import errors

FAILED = 1
USAGE = 64
REFUSED = 65
NOT_FOUND = 66
CONFLICT = 67
BACKEND = 69
UNEXPECTED = 70
TRUST = 77
CONFIG = 78
INTERRUPTED = 130

class Interrupted(Exception):
    """Ctrl-C, carried past Click's own handler to :func:`report`."""


#: Most specific first: the first class an error is an instance of gives its code.
CODES: tuple[tuple[type[BaseException], int], ...] = (
    (errors.SandboxNotFound, NOT_FOUND),
    (errors.ProfileNotFound, NOT_FOUND),
    (errors.SnapshotNotFound, NOT_FOUND),
    (errors.SandboxFileNotFound, NOT_FOUND),
    (errors.SandboxStateError, CONFLICT),
    (errors.NameConflict, CONFLICT),
    (errors.LifecycleError, CONFLICT),
    (errors.RequestError, REFUSED),
    (errors.BackendError, BACKEND),
    (errors.RoutingError, BACKEND),
    (errors.MissingExtra, BACKEND),
    (errors.TrustError, TRUST),
    (errors.ConfigError, CONFIG),
    (errors.SandboxerError, UNEXPECTED),
)

#: For docs/cli.md and ``sandboxer --help``: code, meaning.
TABLE = (
    (0, "success (exec: the command exited 0)"),
    (FAILED, "it ran and failed: gc had errors, a conformance step failed, usage records stayed queued"),
    (USAGE, "bad usage: an unknown flag, a missing argument, a bad duration or KEY=VALUE"),
    (REFUSED, "the request was refused: a bad or missing input, a TTL over the maximum, over budget"),
    (NOT_FOUND, "no such sandbox, profile, snapshot or file"),
    (CONFLICT, "a state or name conflict: the sandbox is not ready, the name is taken differently"),
    (BACKEND, "the backend failed (every backend, for a profile with several), or its SDK is missing"),
    (UNEXPECTED, "an unexpected error, e.g. an extension raised something outside the error tree"),
    (TRUST, "a signed bundle, signature or key was refused"),
    (CONFIG, "the configuration is wrong: a corrupt config, manifest, profile or state store; a policy no backend keeps"),
    (INTERRUPTED, "interrupted (Ctrl-C): what was started was stopped and cleaned up"),
)


def code_for(exc: BaseException) -> int:
    """The exit code of a failure (see :data:`TABLE`)."""
    if isinstance(exc, click.UsageError):
        return USAGE
    if isinstance(exc, (KeyboardInterrupt, Interrupted)):
        return INTERRUPTED
    if isinstance(exc, click.Abort):
        return INTERRUPTED if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt) else FAILED
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return UNEXPECTED


def message(exc: BaseException) -> str:
    """What follows ``error:`` for a failure."""
    if isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter):
        name = exc.param_hint
        if name is None and exc.param is not None:
            opts = getattr(exc.param, "opts", None)
            name = opts[0] if opts and exc.param.param_type_name == "option" else exc.param.human_readable_name
        text = exc.message
        if isinstance(name, (list, tuple)):
            name = " / ".join(name)
        return text if not name or text.startswith(f"{name}:") else f"{name}: {text}"
    if isinstance(exc, click.UsageError):
        cmd = exc.ctx.command_path if exc.ctx is not None else "sandboxer"
        return f"{exc.format_message()} (see `{cmd} --help`)"
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    if isinstance(exc, (KeyboardInterrupt, Interrupted, click.Abort)):
        return "interrupted" if code_for(exc) == INTERRUPTED else "aborted"
    if isinstance(exc, errors.SandboxerError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return (f"unexpected {type(exc).__name__}{': ' + text[0] if text else ''} "
            f"(a bug, or an extension's; run with --debug for the traceback)")


def wants_debug(args: Sequence[str]) -> bool:
    """``--debug`` among the options (before a ``--``), or ``SANDBOXER_DEBUG`` set."""
    head = list(args)[: list(args).index("--")] if "--" in args else list(args)
    return "--debug" in head or os.environ.get("SANDBOXER_DEBUG", "") not in ("", "0")


def report(exc: BaseException, debug: bool) -> int:
    """Print the traceback (with ``debug``) and the one ``error:`` line; return the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {message(exc)}", err=True)
    return code_for(exc)
