"""A sandbox's lifetime after create: ``Manager.extend_ttl``.

Rules kept here: a ready sandbox's expiry moves later only (by ``seconds``, from its current
expiry or from now if that has passed), never past its creation plus the profile's maximum TTL
(TTLError, naming the latest time it may live to). What the backend does with a TTL of its own
(its class's ``own_ttl``) decides the rest: ``"none"`` (the manager's gc is what ends it) needs
nothing; ``"settable"`` is told first (:meth:`~sandboxer.extensions.base.SandboxExtension.set_ttl`),
and a failure there leaves the expiry as it was; ``"fixed"`` (set at create, never moved) is
refused with TTLError, since the backend would end the sandbox at the old time anyway. The new
expiry is recorded through the state store with an event ``ttl_extended``. Extensions from two
threads of one manager are serialised; across processes the last one recorded wins.
"""

from __future__ import annotations

import math
import threading
import time

from sandboxer.errors import SandboxStateError, TTLError
from sandboxer.models import SandboxStatus, format_duration
from sandboxer.records import dt, status_of

_EXTEND_LOCK = threading.Lock()


class LifetimeMixin:
    """``extend_ttl`` of :class:`~sandboxer.manager.Manager` (which provides ``_ready_row``, ``profile``,
    ``extension``, ``_call``, ``limits`` and ``state``)."""

    def extend_ttl(self, sandbox_id: str, seconds: float) -> SandboxStatus:
        """Let a ready sandbox live ``seconds`` longer.

        Returns:
            Its status with the new ``expires_at``.

        Raises:
            TTLError: ``seconds`` is not positive, or the new expiry is past the profile's maximum TTL
                (counted from the sandbox's creation), or the backend cannot follow.
            SandboxNotFound, SandboxStateError (not ready, or expired already).
        """
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) \
                or seconds <= 0:
            raise TTLError(f"sandbox {sandbox_id}: a TTL extension must be a positive number of seconds, "
                           f"got {seconds!r}")
        with _EXTEND_LOCK:
            row = self._ready_row(sandbox_id, "extend the TTL of")  # type: ignore[attr-defined]
            profile = self.profile(row["profile"])  # type: ignore[attr-defined]
            now = time.time()
            new = max(row["expires_at"], now) + float(seconds)
            latest = row["created_at"] + profile.ttl.max
            if new > latest + 1e-6:
                raise TTLError(
                    f"sandbox {sandbox_id}: extending its TTL by {format_duration(seconds)} would make it live "
                    f"{format_duration(new - row['created_at'])}, over profile {profile.slug!r}'s maximum of "
                    f"{format_duration(profile.ttl.max)}; it may live until {dt(latest):%Y-%m-%d %H:%M:%S}Z at most")
            ext = self.extension(row["extension"], sandbox_id=sandbox_id)  # type: ignore[attr-defined]
            own = getattr(ext, "own_ttl", "fixed")
            if own == "fixed":
                raise TTLError(
                    f"sandbox {sandbox_id}: {ext.id} ends it at the TTL it was created with, "
                    f"{dt(row['expires_at']):%Y-%m-%d %H:%M:%S}Z, and cannot move it; create it with a longer TTL")
            if own == "settable":
                self._call(ext, "set_ttl", row["handle"], new - now,  # type: ignore[attr-defined]
                           timeout=self.limits.probe, what=f"set_ttl of sandbox {sandbox_id}")  # type: ignore[attr-defined]
            done = self.state.transition(  # type: ignore[attr-defined]
                sandbox_id, "ttl_extended", expect=("ready",), expires_at=new,
                detail={"from": row["expires_at"], "to": new, "by": float(seconds)})
        if done is None:
            raise SandboxStateError(f"cannot extend the TTL of sandbox {sandbox_id}: it is no longer ready")
        return status_of(done)
