"""The snapshot catalog: capture, restore, list and delete (a part of the Manager).

Rules kept here: a snapshot is recorded ``pending`` before the backend is asked and is usable
only once ``ready``; a failed capture is never usable; a restore starts a new sandbox on the
backend that made the snapshot, with the inputs its sandbox was created with.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from sandboxer.errors import CapabilityError, CapacityUnavailable, InputError, SnapshotError, SnapshotNotFound
from sandboxer.models import SandboxStatus, SnapshotMeta
from sandboxer.policy import describe_lacking, lacking
from sandboxer.records import short, snapshot_meta
from sandboxer.sandbox import Sandbox
from sandboxer.secrets import sandbox_secrets
from sandboxer.state import OverCapacity

if TYPE_CHECKING:
    from sandboxer.manager import Manager

    _Base = Manager
else:
    _Base = object


class SnapshotsMixin(_Base):
    """Snapshot methods of :class:`~sandboxer.manager.Manager`."""

    def snapshot(self, sandbox_id: str) -> SnapshotMeta:
        """Capture a ready sandbox into the snapshot catalog.

        Raises:
            CapabilityError: the backend has no snapshots (checked before any work).
            SnapshotError: the backend failed; nothing usable is recorded.
        """
        row = self._ready_row(sandbox_id, "snapshot")
        ext = self.extension(row["extension"])
        if not ext.supports_snapshots():
            raise CapabilityError(f"{ext.id} does not support snapshots (sandbox {sandbox_id})")
        snap_id = "snap-" + uuid.uuid4().hex[:12]
        now = time.time()
        self.state.insert_snapshot({
            "id": snap_id, "sandbox_id": sandbox_id, "extension": ext.id, "profile": row["profile"],
            "consumer": row["consumer"], "state": "pending", "created_at": now, "data": None,
            "inputs": row["inputs"] or {},
        })
        try:
            out = self._call(ext, "snapshot", row["handle"], timeout=self.limits.snapshot,
                             what=f"snapshot of sandbox {sandbox_id}")
        except BaseException as exc:
            self.state.update_snapshot(snap_id, "snapshot_failed", state="failed", error=short(exc))
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"snapshot of sandbox {sandbox_id} on {ext.id} failed: {exc}", backend=ext.id) from exc
        self.state.update_snapshot(snap_id, "snapshot_ready", state="ready", data=out.data,
                                   size_bytes=out.size_bytes, checksum=out.checksum)
        return snapshot_meta(self.state.get_snapshot(snap_id) or {})

    def get_snapshot(self, snapshot_id: str) -> SnapshotMeta:
        row = self.state.get_snapshot(snapshot_id)
        if row is None or row["state"] != "ready":
            raise SnapshotNotFound(f"no usable snapshot with id {snapshot_id!r}")
        return snapshot_meta(row)

    def snapshots(self) -> list[SnapshotMeta]:
        return [snapshot_meta(r) for r in self.state.list_snapshots()]

    def restore(self, snapshot_id: str, profile: str | None = None, *, inputs: dict[str, Any] | None = None,
                consumer: str | None = None, ttl: float | None = None, labels: dict[str, str] | None = None,
                host: str | None = None, secrets: dict[str, Any] | None = None) -> SandboxStatus:
        """Start a new sandbox from a snapshot, on the backend that made it.

        The snapshot's sandbox's inputs are used again; ``inputs`` override them. The secrets are
        those of the profile it is restored under, resolved again now (a snapshot holds none);
        ``secrets`` gives the consumer's references, as for :meth:`create`. The other arguments
        are those of :meth:`create`.
        """
        meta = self.get_snapshot(snapshot_id)
        prof = self.profile(profile or meta.profile)
        index = next((i for i, c in enumerate(prof.candidates) if c.extension == meta.extension), None)
        if index is None:
            raise InputError(
                f"snapshot {snapshot_id} was made on {meta.extension}, which profile {prof.slug!r} does not use"
            )
        ext = self.extension(meta.extension)
        if not ext.supports_snapshots():
            raise CapabilityError(f"{ext.id} does not support snapshots")
        loaded = self.catalog.extensions[meta.extension]
        lacks = lacking(prof.enforcements(), loaded.enforces)
        refused = loaded.refusals.get((prof.slug, index), [])
        if refused and not lacks:
            raise CapabilityError(f"cannot restore {snapshot_id} under profile {prof.slug!r}: {meta.extension} cannot "
                                  f"keep its policy: {'; '.join(refused)}")
        if lacks:  # a restore is placed on the snapshot's backend only: it must keep the policy too
            raise CapabilityError(f"cannot restore {snapshot_id} under profile {prof.slug!r}: {meta.extension} does not "
                                  f"enforce {describe_lacking(lacks, loaded.unavailable)}, which its policy needs ({prof.network.describe()})")
        given = {**meta.inputs, **(inputs or {})}
        merged = self._check_inputs(prof, given)
        ttl_s = self._ttl(prof, ttl)
        values = sandbox_secrets(prof.slug, prof.secrets, secrets)  # before anything is recorded
        sandbox_id = "sb-" + uuid.uuid4().hex[:12]
        who = consumer or meta.consumer
        try:
            _, _, row = self.admit(sandbox_id=sandbox_id, profile=prof, placements=[(index, host)], ttl=ttl_s,
                                   consumer=who, labels=labels or {}, name=None, detail={"restore_of": snapshot_id},
                                   inputs=merged, given=given)
        except OverCapacity as exc:
            raise CapacityUnavailable(f"cannot restore {snapshot_id}: {exc}", backend=meta.extension) from None
        return Sandbox.attach(self, self.launch(  # type: ignore[attr-defined]
            sandbox_id=sandbox_id, profile=prof, index=index, host=host, inputs=merged, ttl=ttl_s,
            consumer=who, labels=labels or {}, row=row, secrets=values,
            start=lambda e, r: e.restore_from_snapshot(r, meta)))

    def delete_snapshot(self, snapshot_id: str) -> None:
        row = self.state.get_snapshot(snapshot_id)
        if row is None:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")
        if row["state"] == "ready":
            ext = self.extension(row["extension"])
            self._call(ext, "delete_snapshot", snapshot_meta(row), timeout=self.limits.snapshot,
                       what=f"delete of snapshot {snapshot_id}")
        self.state.delete_snapshot(snapshot_id)
