"""ext.local called directly on the typed contract (issue 9): a request in, typed models out."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sandboxer.contract import OwnedSandbox, TeardownReport
from sandboxer.extensions.local import LocalHandle, LocalReachability
from sandboxer.models import SnapshotMeta
from sandboxer.testing import request


@pytest.fixture
def local(make_manager):
    mgr = make_manager()
    ext = mgr.extension("ext.local")
    eff = mgr.effective_profile(mgr.profile("local"), 0)
    return mgr, ext, eff


def _new(mgr, ext, eff, **fields):
    return ext.provision(request(eff, {}, None, owner_labels=mgr.owner_labels, ttl=600.0, **fields))


def test_provision_returns_a_typed_handle_and_reachability(local):
    mgr, ext, eff = local
    handle = _new(mgr, ext, eff)
    try:
        assert isinstance(handle, LocalHandle) and handle.host == "localhost"
        assert Path(handle.workspace).is_dir() and Path(f"/proc/{handle.pid}").exists()
        assert handle.tool in ("bwrap", "unshare") and handle.starttime and handle.outer_pid
        # it survives the state store's JSON round trip unchanged
        assert LocalHandle.model_validate(handle.model_dump(mode="json")) == handle
        reach = ext.wait_ready(handle, timeout=5)
        assert isinstance(reach, LocalReachability)
        assert (reach.workspace, reach.isolation, reach.network) == (handle.workspace, handle.tool, False)
        assert reach.limits == handle.limits and set(reach.limits) == {"memory", "pids", "cpu", "disk", "shm"}
        assert ext.exec(handle, ["sh", "-c", "echo $HOME"]).stdout == handle.workspace + "\n"
    finally:
        ext.teardown(handle)


def test_list_owned_gives_typed_handles(local):
    mgr, ext, eff = local
    handle = _new(mgr, ext, eff)
    try:
        owned = [o for o in ext.list_owned(mgr.owner_labels) if o.sandbox_id == handle.sandbox_id]
        assert len(owned) == 1 and isinstance(owned[0], OwnedSandbox)
        assert isinstance(owned[0].handle, LocalHandle) and owned[0].handle == handle
    finally:
        ext.teardown(handle)
    assert [o for o in ext.list_owned(mgr.owner_labels) if o.sandbox_id == handle.sandbox_id] == []


def test_teardown_report_lists_what_it_removed_then_says_already_gone(local):
    mgr, ext, eff = local
    handle = _new(mgr, ext, eff)
    dirs = handle.cgroup.dirs if handle.cgroup else []
    report = ext.teardown(handle)
    assert isinstance(report, TeardownReport) and report.already_gone is False
    assert report.removed == [*dirs, handle.workspace]
    assert report.detail == {"killed": True, "workspace_removed": True}
    assert not Path(handle.workspace).exists() and not any(os.path.exists(d) for d in dirs)
    again = ext.teardown(handle)
    assert (again.already_gone, again.removed) == (True, [])


def test_snapshot_and_restore_from_snapshot_with_a_request(local):
    mgr, ext, eff = local
    handle = _new(mgr, ext, eff)
    try:
        ext.exec(handle, ["sh", "-c", "echo kept > f"])
        snap = ext.snapshot(handle)
    finally:
        ext.teardown(handle)
    assert Path(snap.data["path"]).is_file() and snap.size_bytes > 0 and snap.checksum.startswith("sha256:")
    meta = SnapshotMeta(id="snap-1", sandbox_id=handle.sandbox_id, extension=ext.id, profile="local",
                        created_at=datetime.now(timezone.utc), size_bytes=snap.size_bytes,
                        checksum=snap.checksum, data=snap.data)
    restored = ext.restore_from_snapshot(request(eff, {}, None, owner_labels=mgr.owner_labels), meta)
    try:
        assert isinstance(restored, LocalHandle) and restored.sandbox_id != handle.sandbox_id
        assert ext.exec(restored, ["cat", "f"]).stdout == "kept\n"
    finally:
        ext.teardown(restored)
        ext.delete_snapshot(meta)
    assert not Path(snap.data["path"]).exists()
