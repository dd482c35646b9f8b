"""ext.daytona through the Manager: the whole lifecycle with snapshots, gc of orphans, and no key anywhere.

Same stand-in and fixtures as test_daytona.py (tests/cloud/conftest_daytona.py); the SDK is
unmodified and talks to it over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402 - after the importorskip
from sandboxer.errors import SandboxerError, SnapshotError  # noqa: E402
from sandboxer.models import SandboxState  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_daytona import EXT, PROFILE, config_dir, sentinel, standin  # noqa: E402,F401 - fixtures
from tests.cloud.daytona_standin import DaytonaStandIn  # noqa: E402


@pytest.fixture
def manager(config_dir, tmp_path: Path):  # noqa: F811 - the fixture imported above
    made: list[Manager] = []

    def factory(**config):
        made.append(Manager(config_dirs=[config_dir(None, **config)], home=tmp_path / "home"))
        return made[-1]

    yield factory
    for m in made:
        m.close()


def test_manager_create_exec_snapshot_restore_teardown(manager, standin: DaytonaStandIn):  # noqa: F811
    mgr = manager()
    sb = mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="alice", labels={"team": "ml"}))
    assert sb.state is SandboxState.READY and sb.extension == EXT
    box = standin.boxes[sb.reachability["daytona_sandbox_id"]]
    assert box.labels["sandboxer.sandbox_id"] == sb.id
    assert box.labels["sandboxer.consumer"] == "alice"
    assert box.labels["sandboxer.owner"] == mgr.owner_labels["sandboxer.owner"]
    assert box.labels["team"] == "ml"

    assert mgr.exec(sb.id, ["sh", "-c", "echo kept > f.txt; echo hi"]).stdout == "hi\n"
    snap = mgr.snapshot(sb.id)
    assert [s["name"] for s in standin.snapshots.values()] == [snap.data["snapshot"]]
    again = mgr.restore(snap.id)
    assert again.id != sb.id and again.state is SandboxState.READY
    assert mgr.exec(again.id, ["cat", "f.txt"]).stdout == "kept\n"
    restored = standin.boxes[again.reachability["daytona_sandbox_id"]]
    assert (restored.snapshot, restored.labels["sandboxer.sandbox_id"]) == (snap.data["snapshot"], again.id)

    assert mgr.teardown(sb.id).state is SandboxState.TERMINATED
    assert mgr.teardown(again.id).state is SandboxState.TERMINATED
    mgr.delete_snapshot(snap.id)
    assert standin.live() == [] and standin.snapshots == {}


def test_a_snapshot_of_a_sandbox_that_is_gone_is_a_snapshot_error(manager, standin: DaytonaStandIn):  # noqa: F811
    mgr = manager()
    sb = mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="bob"))
    standin.destroy(sb.reachability["daytona_sandbox_id"])
    with pytest.raises(SnapshotError, match=rf"Daytona snapshot of sandbox {sb.reachability['daytona_sandbox_id']}"):
        mgr.snapshot(sb.id)
    assert standin.snapshots == {}


def test_gc_reaps_an_orphan_found_through_list_owned(manager, standin: DaytonaStandIn):  # noqa: F811
    mgr = manager()
    kept = mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="bob"))
    # a sandbox the state store never heard of (the DB was restored from a backup), with our owner label
    ext = mgr.extension(EXT)
    profile = mgr.effective_profile(mgr.profile(PROFILE), 0)
    lost = ext.provision(request(profile, {
        "sandbox_id": "sb-lost", "owner_labels": dict(mgr.owner_labels),
        "tags": {**mgr.owner_labels, "sandboxer.sandbox_id": "sb-lost", "sandboxer.consumer": "bob"},
    }, None))
    # and one that belongs to another manager: never touched
    stranger = ext.provision(request(profile, {
        "sandbox_id": "sb-theirs", "owner_labels": {"sandboxer.owner": "another-manager"},
        "tags": {"sandboxer.owner": "another-manager", "sandboxer.sandbox_id": "sb-theirs"},
    }, None))
    standin.page_limit = 1  # make gc follow nextCursor

    report = mgr.gc()
    assert report.orphans == ["sb-lost"]
    assert standin.boxes[lost.daytona_sandbox_id].state == "destroyed"
    assert standin.boxes[stranger.daytona_sandbox_id].state == "started"
    assert mgr.get(kept.id).state is SandboxState.READY
    lists = [c for c in standin.calls if c["method"] == "GET" and c["path"] == "/api/sandbox"]
    assert any(c["query"].get("cursor") for c in lists)
    mgr.teardown(kept.id)
    ext.teardown(stranger)


def test_sentinel_key_absent_from_state_logs_and_errors(manager, standin: DaytonaStandIn, sentinel: str,  # noqa: F811
                                                        tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    mgr = manager()
    texts: list[str] = []

    sb = mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="carol"))
    mgr.exec(sb.id, ["echo", "fine"])
    snap = mgr.snapshot(sb.id)
    # provider errors that echo the key back, on each verb
    for method, path, call in (
        ("POST", "/api/sandbox", lambda: mgr.create(SandboxCreateRequest(profile=PROFILE))),
        ("POST", "/toolbox/.*/process/session", lambda: mgr.exec(sb.id, ["true"])),
        ("POST", "/api/sandbox/.*/snapshot", lambda: mgr.snapshot(sb.id)),
        ("DELETE", "/api/sandbox/.*", lambda: mgr.teardown(sb.id)),
    ):
        standin.fail(method, path, 500, "internal error", echo_key=True)
        with pytest.raises(SandboxerError) as info:
            call()
        texts += ["".join(traceback.format_exception(info.value)), repr(info.value)]
        assert "***" in str(info.value)  # the provider's message is kept, redacted
    mgr.gc()  # retries the failed teardown
    assert mgr.get(sb.id).state is SandboxState.TERMINATED
    mgr.delete_snapshot(snap.id)

    texts += [caplog.text, repr(mgr.events()), repr(mgr.list(all=True)), repr(mgr.catalog.extensions[EXT]),
              repr(mgr.extension(EXT).config)]
    for text in texts:
        assert sentinel not in text
    mgr.close()
    files = [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    assert files, "expected a state database under the manager's home"
    for p in files:
        assert sentinel.encode() not in p.read_bytes(), f"key found in {p}"
    assert any(c["headers"].get("authorization") == f"Bearer {sentinel}" for c in standin.calls)  # it was used
