"""How ext.daytona runs one command: a toolbox session of its own, its logs followed as they come.

Daytona's ``process.exec`` returns only when the command ends, and with stdout and stderr mixed;
a *session* command run with ``run_async`` has its two streams followed over a WebSocket
(``get_session_command_logs_async``) while it runs. So each exec:

1. creates a session named after the exec's marker;
2. uploads ``stdin`` (if any) to a file in the user's home, which the command reads and removes;
3. runs ``( rm stdin; cd CWD && env VARS ARGV ) < stdin`` in a subshell (the session's own
   shell keeps its state), every process of it carrying :data:`~sandboxer.execution.EXEC_MARKER`;
4. follows its logs on a thread of its own into an :class:`~sandboxer.execution.OutputCollector`
   (the SDK decodes each stream incrementally), until they end or the deadline passes;
5. at the deadline, kills everything carrying the marker (``setsid`` children too) and reports
   exit 124; else reads the command's exit code (a log stream still open :data:`LINGER`
   seconds after Daytona reported the command exited is left: its output has arrived);
6. deletes the session, whatever happened.
"""

from __future__ import annotations

import asyncio
import secrets
import shlex
import threading
import time
from typing import TYPE_CHECKING, Any

from sandboxer.errors import ExecError
from sandboxer.execution import EXEC_MARKER, KILL_MARKED_TIMEOUT, OutputCollector, check_argv, kill_marked_argv
from sandboxer.extensions.base import OutputCallback
from sandboxer.models import ExecResult
from sandboxer.poll import poll

from sandboxer.extensions.daytona import _sdk, log

if TYPE_CHECKING:
    from sandboxer.extensions.daytona import DaytonaExtension, DaytonaHandle

#: Seconds the log stream may take to end once the command's processes are killed.
DRAIN_TIMEOUT = 10.0
#: Seconds between asking Daytona whether a command whose log stream is still open has exited.
CHECK_INTERVAL = 1.0
#: Seconds a log stream may stay open after Daytona reported its command's exit code.
LINGER = 2.0


def command_line(argv: list[str], env: dict[str, str], cwd: str | None, stdin_path: str | None) -> str:
    """The shell line a session runs for ``argv``: a subshell, so the session's shell keeps its state.

    ``env`` goes through ``env`` (any name, any value, quoted), ``cwd`` through ``cd``; stdin is
    the uploaded file (removed as soon as it is open) or ``/dev/null``, never the session's own.
    """
    parts: list[str] = []
    if stdin_path:
        parts.append(f"rm -f -- {shlex.quote(stdin_path)};")
    if cwd:
        parts.append(f"cd -- {shlex.quote(cwd)} &&")
    parts.append(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv]))
    return f"( {' '.join(parts)} ) < {shlex.quote(stdin_path or '/dev/null')}"


class _Follow:
    """The command's logs, followed on a thread of their own into ``out`` until they end or we stop."""

    def __init__(self, sbx: Any, session: str, cmd_id: str, out: OutputCollector):
        self.out = out
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, args=(sbx, session, cmd_id), daemon=True,
                                        name=f"daytona-logs-{session}")
        self._thread.start()

    def _feed(self, stream: str, text: str) -> None:
        with self._lock:
            if not self._stopped:  # nothing reaches the result once it has been built
                self.out.feed_text(stream, text)

    def _run(self, sbx: Any, session: str, cmd_id: str) -> None:
        try:
            asyncio.run(sbx.process.get_session_command_logs_async(
                session, cmd_id, lambda text: self._feed("stdout", text), lambda text: self._feed("stderr", text)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, translated there
            self.error = exc
        finally:
            self.done.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


def run_in_session(ext: "DaytonaExtension", handle: "DaytonaHandle", argv: list[str], *,
                   env: dict[str, str] | None, cwd: str | None, timeout: float | None, stdin: bytes | None,
                   on_output: OutputCallback | None) -> ExecResult:
    """Run ``argv`` in sandbox ``handle`` by the exec convention (see the module docstring).

    Raises:
        InputError: ``argv`` is refused (before any request).
        ExecError: the command could not be run (the sandbox is gone or not started, the toolbox
            failed); a command that ran and exited non-zero is a result, not an error.
    """
    argv = check_argv(argv, backend=ext.id)
    sdk = _sdk()
    sid = handle.daytona_sandbox_id
    limit = float(timeout) if timeout is not None else ext.config.exec_timeout
    marker = secrets.token_hex(12)
    session = f"sandboxer-exec-{marker}"

    def run(client: Any) -> ExecResult:
        sbx = client.get(sid)
        state = str(getattr(sbx.state, "value", sbx.state))
        if state != "started":
            raise ExecError(f"Daytona exec of sandbox {sid}: the sandbox is {state}, not started", backend=ext.id)
        # a fresh collector per call: output of one command only
        out = OutputCollector(on_output, ext.config.max_output_bytes)
        sbx.process.create_session(session)
        try:
            stdin_path = None
            if stdin is not None:
                stdin_path = f"{sbx.get_user_home_dir().rstrip('/')}/.sandboxer-stdin-{marker}"
                sbx.fs.upload_file(bytes(stdin), stdin_path)
            line = command_line(argv, {**(env or {}), EXEC_MARKER: marker}, cwd or handle.cwd, stdin_path)
            started = time.monotonic()
            cmd_id = sbx.process.execute_session_command(
                session, sdk.SessionExecuteRequest(command=line, run_async=True)).cmd_id
            follow = _Follow(sbx, session, cmd_id, out)
            ended = _wait(follow, sbx, session, cmd_id, started + limit)
            if ended is None:
                _kill_marked(ext, sbx, marker)
                follow.done.wait(DRAIN_TIMEOUT)
                follow.stop()
                return out.result(None, timed_out=True)
            follow.stop()
            if follow.error is not None:
                raise follow.error
            if ended[0] is not None:
                return out.result(ended[0])
            # the logs end with the command; its exit code may be recorded a moment later
            (code,) = poll(lambda: _exit_code(sbx, session, cmd_id),
                           timeout=max(1.0, ext.config.request_timeout), interval=0.05,
                           on_timeout=lambda: ExecError(
                               f"Daytona exec of sandbox {sid}: the command's output ended but Daytona reported "
                               "no exit code", backend=ext.id))
            return out.result(code)
        finally:
            try:
                sbx.process.delete_session(session)
            except Exception as exc:  # noqa: BLE001 - the session goes with the sandbox; say so and go on
                log.info("Daytona sandbox %s: session %s not deleted: %s", sid, session, type(exc).__name__)

    return ext._call("exec", run, consumer=handle.consumer, fallback=ExecError, sandbox=sid)


def _wait(follow: _Follow, sbx: Any, session: str, cmd_id: str, deadline: float) -> tuple[int | None] | None:
    """Wait for the command's end, at most until ``deadline``: None if it is still running then.

    The end is its log stream ending (``(None,)``: read the exit code next), or, should the
    stream stay open, Daytona reporting its exit code for :data:`LINGER` seconds (``(code,)``):
    asked every :data:`CHECK_INTERVAL` seconds while the stream runs.
    """
    exited_at: float | None = None
    code: int | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if follow.done.wait(min(CHECK_INTERVAL, remaining)):
            return (None,)
        if exited_at is None:
            found = _exit_code(sbx, session, cmd_id)
            if found is not None:
                exited_at, code = time.monotonic(), found[0]
        elif time.monotonic() - exited_at >= LINGER:
            return (code,)  # the output it wrote has long arrived: the stream is just not closing


def _exit_code(sbx: Any, session: str, cmd_id: str) -> tuple[int] | None:
    code = sbx.process.get_session_command(session, cmd_id).exit_code
    return None if code is None else (int(code),)


def _kill_marked(ext: "DaytonaExtension", sbx: Any, marker: str) -> None:
    """Kill what a timed-out command left (its subshell, ``setsid`` children) by the exec's marker."""
    try:
        res = sbx.process.exec(shlex.join(kill_marked_argv(marker)), timeout=int(KILL_MARKED_TIMEOUT))
        failed = None if res.exit_code == 0 else f"exit {res.exit_code}"
    except Exception as exc:  # noqa: BLE001 - reported below; the exec's result stands
        failed = type(exc).__name__
    if failed:
        log.warning("Daytona sandbox %s: could not kill what a timed-out command left running (%s)",
                        sbx.id, failed)
