"""Commands in a ready sandbox: ``Manager.exec`` and stopping one (``kill_exec``)."""

from __future__ import annotations

import logging
import time
from typing import Any

from sandboxer.contract import bound
from sandboxer.errors import CapabilityError, SandboxerError, SandboxStateError
from sandboxer.execution import KILL_MARKED_TIMEOUT, check_argv, kill_marked_argv
from sandboxer.models import ExecResult
from sandboxer.records import dt

log = logging.getLogger("sandboxer")


class CommandsMixin:
    """``exec`` and ``kill_exec`` of :class:`~sandboxer.manager.Manager` (which provides ``_row``,
    ``extension``, ``_caller`` and ``limits``)."""

    def _ready_row(self, sandbox_id: str, what: str) -> dict[str, Any]:
        row = self._row(sandbox_id)
        if row["state"] != "ready":
            why = f" ({row['last_error']})" if row["state"] == "lost" and row["last_error"] else ""
            raise SandboxStateError(f"cannot {what} sandbox {sandbox_id}: it is {row['state']}, not ready{why}")
        if row["expires_at"] < time.time():
            raise SandboxStateError(
                f"cannot {what} sandbox {sandbox_id}: it expired at {dt(row['expires_at']):%Y-%m-%d %H:%M:%S}Z"
                " and will be reaped by gc"
            )
        return row

    def exec(self, sandbox_id: str, argv: list[str], **kwargs: Any) -> ExecResult:
        """Run ``argv`` in the sandbox; keyword arguments as :meth:`SandboxExtension.exec`.

        Raises:
            SandboxNotFound, SandboxStateError, CapabilityError, ExecError.
        """
        argv = check_argv(argv)  # before anything is looked up or run
        row = self._ready_row(sandbox_id, "exec in")
        ext = self.extension(row["extension"])
        if not ext.supports("exec"):
            raise CapabilityError(f"{ext.id} does not support exec (sandbox {sandbox_id})")
        limit = kwargs.get("timeout")
        deadline = limit + self.limits.exec_grace if limit else self.limits.exec
        # the command's own timeout is a keyword of exec: hand the call over as a closure
        what = f"exec in sandbox {sandbox_id}"
        run = bound(ext, "exec", what)
        return self._caller.call(lambda: run(row["handle"], list(argv), **kwargs), timeout=deadline,
                                 what=what, backend=ext.id)

    def kill_exec(self, sandbox_id: str, marker: str) -> None:
        """Kill, inside the sandbox, every process of an exec started with ``env={EXEC_MARKER: marker}``
        (what it forked and ``setsid`` children included). Best effort, bounded; never raises
        for a sandbox that is gone."""
        row = self._read("get", sandbox_id)
        if row is None or row["state"] != "ready":
            return
        ext = self.extension(row["extension"], sandbox_id=sandbox_id)
        try:
            self.exec(sandbox_id, kill_marked_argv(marker), timeout=KILL_MARKED_TIMEOUT)
        except SandboxerError as exc:
            log.warning("could not stop exec %s in sandbox %s on %s: %s", marker, sandbox_id, ext.id, exc)
