"""Tearing sandboxes down: ``Manager.teardown`` and the clean-up after a create that failed.

Rules kept here: the intent (``tearing_down``) is recorded before the backend is asked; a sandbox
already ended is returned as is (idempotent); a teardown another process runs is waited for, not
repeated; a failure leaves ``teardown_failed`` for gc to retry, and ``--forget`` records a sandbox
terminated only with ``force``. A create that fails after its backend made something tears that
down before raising, and one abandoned at its deadline is torn down when its handle comes late.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sandboxer.contract import Handle, OwnedSandbox, TeardownReport, bound, dump
from sandboxer.errors import InputError, SandboxerError, SandboxStateError, TeardownError
from sandboxer.extensions.base import SandboxExtension
from sandboxer.models import SandboxStatus
from sandboxer.records import short, status_of

log = logging.getLogger("sandboxer")
#: How often a teardown waiting for an in-flight create looks again.
_WAIT_STEP_S = 0.02


class TeardownMixin:
    """``teardown`` of :class:`~sandboxer.manager.Manager`, and its clean-up after failed creates
    (the manager provides ``state``, ``extension``, ``_call``, ``limits``, ``metering`` and the rest)."""

    def _teardown_call(self, ext: SandboxExtension, sandbox_id: str, handle: Handle | dict[str, Any]) -> TeardownReport:
        return self._call(ext, "teardown", handle, timeout=self.limits.teardown, what=f"teardown of sandbox {sandbox_id}")

    def _late_handle(self, ext: SandboxExtension, sandbox_id: str, handle: Handle) -> None:
        """A provision abandoned at its deadline returned after all: undo what it made."""
        try:
            bound(ext, "teardown", f"teardown of sandbox {sandbox_id}")(handle)
        except Exception as exc:  # noqa: BLE001 - gc's list_owned finds it
            log.warning("could not tear down what the abandoned provision of %s made late: %s", sandbox_id, exc)
            return
        self.state.record_event(sandbox_id, "late_provision_undone", extension=ext.id, detail={"handle": dump(handle)})

    def _abandon(self, ext: SandboxExtension, sandbox_id: str, handle: Handle) -> None:
        """The record left ``provisioning`` under us (a teardown was asked for while we were
        creating, or gc judged the create abandoned): undo it, close the record, and stop."""
        try:
            report = self._teardown_call(ext, sandbox_id, handle)
        except Exception as exc:  # noqa: BLE001 - recorded; gc retries (list_owned finds it too)
            log.warning("could not tear down %s after its record was closed: %s", sandbox_id, exc)
            self.state.transition(sandbox_id, "teardown_failed", expect=("tearing_down",), state="teardown_failed",
                                  handle=dump(handle), last_error=short(exc))
        else:
            self.state.transition(sandbox_id, "terminated", expect=("tearing_down",), state="terminated",
                                  handle=dump(handle), terminated_at=time.time(), detail=dump(report))
        raise SandboxStateError(f"sandbox {sandbox_id} was torn down while it was still provisioning")

    def _after_failed_provision(self, ext: SandboxExtension, sandbox_id: str, exc: BaseException) -> None:
        """Provision raised: make sure nothing of it is left, then mark the record failed."""
        leftovers: list[OwnedSandbox] = []
        # A backend raises InputError only before it creates anything (the contract): no leftovers to look for.
        if ext.supports("list_owned") and not isinstance(exc, InputError):
            try:
                owned = self._call(ext, "list_owned", self.owner_labels, timeout=self.limits.list_owned,
                                   what=f"list_owned (leftovers of sandbox {sandbox_id})")
                leftovers = [o for o in owned if o.sandbox_id == sandbox_id]
            except Exception as lexc:  # noqa: BLE001 - gc will retry; the original error matters more
                log.warning("could not check %s for leftovers of %s: %s", ext.id, sandbox_id, lexc)
        for item in leftovers:
            try:
                self._teardown_call(ext, sandbox_id, item.handle)
            except Exception as texc:
                self.state.transition(sandbox_id, "provision_failed", state="teardown_failed", handle=dump(item.handle),
                                      last_error=f"{short(exc)}; cleanup failed: {short(texc)}")
                raise TeardownError(
                    f"sandbox {sandbox_id}: provision on {ext.id} failed ({exc}) and cleaning up what it left "
                    f"failed too ({texc}); gc will retry", backend=ext.id,
                ) from texc
        self.state.transition(sandbox_id, "provision_failed", state="failed", last_error=short(exc),
                              terminated_at=time.time(), detail={"error": short(exc), "cleaned": len(leftovers)})

    def _teardown_after_failure(self, ext: SandboxExtension, sandbox_id: str, handle: Handle,
                                exc: BaseException) -> None:
        self.state.transition(sandbox_id, "ready_failed", state="tearing_down", last_error=short(exc))
        try:
            report = self._teardown_call(ext, sandbox_id, handle)
        except Exception as texc:
            self.state.transition(sandbox_id, "teardown_failed", state="teardown_failed",
                                  last_error=f"{short(exc)}; teardown failed: {short(texc)}")
            raise TeardownError(
                f"sandbox {sandbox_id}: not ready ({exc}) and teardown failed ({texc}); gc will retry",
                backend=ext.id,
            ) from texc
        self.state.transition(sandbox_id, "terminated", state="failed", terminated_at=time.time(), detail=dump(report))

    def teardown(self, sandbox_id: str, *, force: bool = False, forget: bool = False) -> SandboxStatus:
        """Tear a sandbox down. Idempotent: a sandbox that already ended is returned as is.

        A sandbox still being created is not refused: the teardown is recorded, the create
        undoes its work at its next step, and this call waits for that (bounded by the
        create's deadline), so the sandbox ends absent. A teardown another thread or process
        is running is waited for likewise.

        Args:
            force: take over at once whatever state the sandbox is in (a teardown or create
                that another process seems to hold), and retry the backend's teardown.
            forget: with ``force``, when the backend still cannot confirm, record the sandbox
                terminated anyway: the operator has confirmed that its resources are gone.
                An event ``forgotten`` records the error that was overridden.

        Raises:
            SandboxNotFound; ConfigError if its extension is not configured (nothing changes);
            TeardownError if the backend could not confirm (state ``teardown_failed``).
        """
        if forget and not force:
            raise InputError("forget needs force: `sandboxer teardown --force --forget ID`")
        return self._teardown(sandbox_id, reason="forced" if force else "requested", force=force, forget=forget)

    def _teardown(self, sandbox_id: str, *, reason: str, abandoned: bool = False, force: bool = False,
                  forget: bool = False) -> SandboxStatus:
        """Tear down; a ``provisioning`` record at once only when gc judged it ``abandoned`` (or ``force``)."""
        row = self._row(sandbox_id)
        if row["state"] in ("terminated", "failed", "lost"):
            return status_of(row)
        ext = self.extension(row["extension"], sandbox_id=sandbox_id)  # before any change: a missing one changes nothing
        if not (abandoned or force):
            row = self._await_other(row, reason)
            if row["state"] in ("terminated", "failed", "lost"):
                return status_of(row)
        allowed = ("ready", "tearing_down", "teardown_failed") + (("provisioning",) if abandoned or force else ())
        if row["state"] not in allowed:
            return status_of(row)
        # conditional on the state just read, so the row is not read again
        cur = self.state.transition(sandbox_id, "teardown_started", state="tearing_down", expect=(row["state"],),
                                    known=row, teardown_started_at=time.time(), detail={"reason": reason})
        if cur is None:  # it ended (or moved) meanwhile
            return status_of(self._row(sandbox_id))
        if not cur["handle"]:  # never got a handle: nothing the backend knows by it; gc's list_owned covers it
            done = self.state.transition(sandbox_id, "terminated", state="failed", terminated_at=time.time(),
                                         detail={"reason": "no handle was recorded"})
            return status_of(done or self._row(sandbox_id))
        with self._lock:
            self._tearing.add(sandbox_id)
        try:
            return self._run_teardown(ext, cur, forget)
        finally:
            with self._lock:
                self._tearing.discard(sandbox_id)

    def _await_other(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        """Let a create or teardown that another thread or process is running finish first.

        A create is asked to stop (its record moves to ``tearing_down``; the creator undoes its
        work at its next step). Waits at most until the create's deadline, or the teardown's
        grace, plus :attr:`stale_grace`; returns the row as it then is (still held: take it over).
        """
        sandbox_id = row["id"]
        if row["state"] == "provisioning":
            moved = self.state.transition(sandbox_id, "teardown_requested", expect=("provisioning",),
                                          state="tearing_down", teardown_started_at=time.time(),
                                          detail={"reason": reason, "during": "create"})
            if moved is None:
                return self._row(sandbox_id)
            until = (row["deadline_at"] or row["created_at"]) + self.stale_grace
        elif row["state"] == "tearing_down":
            until = (row["teardown_started_at"] or 0.0) + self.teardown_grace
            if row["ready_at"] is None:  # a create asked to stop: it may take until its deadline
                until = max(until, (row["deadline_at"] or 0.0) + self.stale_grace)
        else:
            return row
        while time.time() < until:
            cur = self._row(sandbox_id)
            if cur["state"] != "tearing_down":
                return cur
            time.sleep(_WAIT_STEP_S)
        return self._row(sandbox_id)

    def _run_teardown(self, ext: SandboxExtension, cur: dict[str, Any], forget: bool) -> SandboxStatus:
        sandbox_id = cur["id"]
        reported = None
        if ext.supports("metering"):
            try:
                reported = self._call(ext, "meter_actual", cur["handle"], timeout=self.limits.meter,
                                      what=f"meter_actual of sandbox {sandbox_id}")
            except SandboxerError as exc:  # the recorded interval still prices it
                log.warning("meter_actual for %s failed: %s", sandbox_id, exc)
        try:
            report = self._teardown_call(ext, sandbox_id, cur["handle"])
        except Exception as exc:
            if forget:
                now = time.time()
                done = self.state.transition(
                    sandbox_id, "forgotten", expect=("tearing_down",), state="terminated", terminated_at=now,
                    last_error=f"forgotten by the operator after: {short(exc)}",
                    detail={"error": short(exc), "confirmed_gone_by": "operator"},
                    also=lambda conn, row: self.metering.stopped(conn, sandbox_id, now, reported))
                return status_of(done or self._row(sandbox_id))
            self.state.transition(sandbox_id, "teardown_failed", state="teardown_failed", last_error=short(exc))
            if isinstance(exc, TeardownError):
                raise
            raise TeardownError(f"teardown of sandbox {sandbox_id} on {ext.id} failed: {exc}", backend=ext.id) from exc
        now = time.time()
        # A sandbox the backend had already lost was last alive when we last saw it (or at its expiry).
        stop = (cur["last_seen_at"] or min(now, cur["expires_at"])) if report.already_gone else now
        done = self.state.transition(sandbox_id, "terminated", expect=("tearing_down",), known=cur,
                                     state="terminated", terminated_at=now, detail=dump(report),
                                     also=lambda conn, row: self.metering.stopped(conn, sandbox_id, stop, reported))
        return status_of(done or self._row(sandbox_id))
