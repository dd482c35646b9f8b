"""gc: reap what expired, retry what failed, and reconcile the store with each backend (a part of the Manager).

Rules kept here: a record another thread or process may still hold is left alone until its
deadline (a create) or its grace (a teardown) has passed; a ready sandbox its backend no longer
has becomes ``lost``; a resource carrying our labels that no live record holds, or that carries
a live record's id under another identity, is an orphan and torn down; a sandbox whose extension
is not configured is reported and left exactly as it is.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sandboxer.contract import OwnedSandbox, bound, dump
from sandboxer.errors import BackendError, ConfigError, SandboxerError
from sandboxer.extensions.base import SandboxExtension
from sandboxer.models import CleanupReport

if TYPE_CHECKING:
    from sandboxer.manager import Manager

    _Base = Manager
else:
    _Base = object


class GcMixin(_Base):
    """gc methods of :class:`~sandboxer.manager.Manager`."""

    def gc(self) -> CleanupReport:
        """Reap expired sandboxes, retry failed teardowns, and reconcile with the backends.

        Besides the store's own view, gc asks each backend what it holds: a sandbox the backend
        no longer has becomes ``lost`` (its usage closed when it was last seen alive), and a
        resource carrying our labels that no live record holds is an orphan and torn down.

        Returns:
            What was done; per-sandbox failures are in ``errors`` (gc never stops at the first).
        """
        report = CleanupReport()
        now = time.time()
        ready: list[dict[str, Any]] = []
        for row in self.state.list(states=("ready", "teardown_failed", "tearing_down", "provisioning")):
            if row["id"] in self._inflight or row["id"] in self._tearing:
                continue
            if row["extension"] not in self.catalog.extensions:
                report.errors[row["id"]] = str(self._missing(row))
                continue
            bucket: list[str] | None = None
            if row["state"] == "teardown_failed":
                bucket = report.retried
            elif row["state"] == "provisioning":
                if self._stale(row, now):
                    bucket = report.stale_provisioning
            elif row["state"] == "tearing_down":
                # judged from when the teardown started (and, for a create asked to stop, its deadline)
                started = row["teardown_started_at"] or row["ready_at"] or row["created_at"]
                creating = row["ready_at"] is None and (row["deadline_at"] or 0.0) + self.stale_grace > now
                if now - started > self.teardown_grace and not creating:
                    bucket = report.retried
            elif row["expires_at"] < now:
                bucket = report.expired
            else:
                ready.append(row)
            if bucket is None:
                continue
            try:
                self._teardown(row["id"], reason="gc", abandoned=True)
                bucket.append(row["id"])
            except SandboxerError as exc:
                report.errors[row["id"]] = str(exc)
        self.pools.reap(report)  # pooled sandboxes past their pool's max_age, or of a profile without a pool
        seen = self._reconcile(report)
        self._find_lost(ready, seen, report)
        self._reap_images(report)
        self.metering.close_abandoned()
        self.state.purge_claims()
        return report

    def _reap_images(self, report: CleanupReport) -> None:
        """What ``sandboxer images gc`` does, for each loaded backend with a build mode (vm-packer):
        build records left by builds whose process is gone, and their private directories."""
        for ext_id, loaded in self.catalog.extensions.items():
            if loaded.missing_extra or not hasattr(loaded.handler, "reap_images"):
                continue
            try:
                removed = self.extension(ext_id).reap_images(state=self.state)
            except (SandboxerError, OSError) as exc:
                report.errors[f"{ext_id} images"] = f"image gc failed: {exc}"
                continue
            report.images.extend(row["id"] for row in removed)

    def _missing(self, row: dict[str, Any]) -> ConfigError:
        try:
            self.extension(row["extension"], sandbox_id=row["id"])
        except ConfigError as exc:
            return exc
        raise AssertionError("extension is configured")  # pragma: no cover

    def _stale(self, row: dict[str, Any], now: float) -> bool:
        deadline = row["deadline_at"]
        if deadline is None:  # recorded before schema 3
            prof = self.catalog.profiles.get(row["profile"])
            deadline = row["created_at"] + (prof.ready_timeout if prof else 300.0)
        return now > deadline + self.stale_grace

    def _find_lost(self, ready: list[dict[str, Any]], seen: dict[str, set[str]], report: CleanupReport) -> None:
        """Probe the ready sandboxes that their backend's ``list_owned`` did not list (or could not)."""
        for row in ready:
            listed = seen.get(row["extension"])
            if listed is not None and row["id"] in listed:
                continue
            ext = self.extension(row["extension"])
            try:
                lost = self._refresh(row, ext) if row["handle"] else None
            except (BackendError, OSError) as exc:
                report.errors[row["id"]] = f"probe on {ext.id} failed: {exc}"
                continue
            if lost is not None:
                report.lost.append(row["id"])

    def _reconcile(self, report: CleanupReport) -> dict[str, set[str]]:
        """Tear down what a backend holds for us but no live record does.

        Returns:
            Per extension that could be listed, the ids of the live sandboxes it still holds.
        """
        seen: dict[str, set[str]] = {}
        # Every backend is asked at once, each under its own deadline: a hung one holds up no other.
        asked = []
        until = time.monotonic() + self.limits.list_owned
        for ext_id in self.state.extensions_used():
            loaded = self.catalog.extensions.get(ext_id)
            if loaded is None or loaded.missing_extra or "list_owned" not in loaded.manifest.capabilities.features:
                continue
            ext = loaded.instance(self.home, limits=self.limits, state=self.state)
            asked.append((ext, self._caller.start(bound(ext, "list_owned", "list_owned"), self.owner_labels,
                                                  what="list_owned", backend=ext.id)))
        for ext, call in asked:
            ext_id = ext.id
            try:
                owned = self._caller.wait(call, until, timeout=self.limits.list_owned, what="list_owned",
                                          backend=ext_id)
            except (BackendError, OSError) as exc:
                report.errors[ext_id] = f"list_owned failed: {exc}"
                continue
            alive: set[str] = set()
            for item in owned:
                sid = item.sandbox_id
                row = self.state.get(sid) if sid else None
                if row is not None and row["state"] in ("ready", "tearing_down", "teardown_failed"):
                    if self._same_resource(ext, row, item):
                        alive.add(sid)
                        continue
                    self._reap(ext, item, None, report, duplicate_of=row)  # a duplicate from a retried create
                    continue
                if row is not None and row["state"] == "provisioning" and (
                        sid in self._inflight or not self._stale(row, time.time())):
                    continue  # may still be in the hands of a creating thread or process
                self._reap(ext, item, row, report)
            self.state.touch(sorted(alive))
            seen[ext_id] = alive
        return seen

    def _same_resource(self, ext: SandboxExtension, row: dict[str, Any], item: OwnedSandbox) -> bool:
        if not row["handle"]:
            return True
        ident = bound(ext, "handle_id", f"gc of sandbox {row['id']}")
        mine = ident(row["handle"])
        return mine is None or mine == ident(item.handle)

    def _reap(self, ext: SandboxExtension, item: OwnedSandbox, row: dict[str, Any] | None, report: CleanupReport,
              duplicate_of: dict[str, Any] | None = None) -> None:
        sid = item.sandbox_id
        key = sid or repr(dump(item.handle))
        if duplicate_of is not None:
            key = f"{sid} (duplicate {bound(ext, 'handle_id', 'gc')(item.handle)})"
        try:
            self._teardown_call(ext, sid or "?", item.handle)
        except Exception as exc:  # noqa: BLE001 - recorded, retried next gc
            report.errors[key] = f"orphan teardown on {ext.id} failed: {exc}"
            return
        report.orphans.append(key)
        detail = {"handle": dump(item.handle), **({"duplicate_of": duplicate_of["handle"]} if duplicate_of else {})}
        if row is not None:
            self.state.transition(sid, "orphan_reaped", state="terminated" if row["state"] != "failed" else "failed",
                                  terminated_at=row["terminated_at"] or time.time(), detail=detail)
        else:
            self.state.record_event(sid, "orphan_reaped", extension=ext.id, detail=detail)
