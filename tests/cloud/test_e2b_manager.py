"""ext.e2b through the Manager: the whole lifecycle, gc of orphans, and no secret anywhere.

Same stand-in and fixtures as test_e2b.py (tests/cloud/conftest_e2b.py); the SDK is
unmodified and talks to it over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest

from sandboxer.extensions.e2b import KILL_ATTEMPTS

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.errors import SandboxerError, TTLError  # noqa: E402
from sandboxer.models import SandboxState  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.e2b_standin import E2BStandIn  # noqa: E402
from tests.cloud.conftest_e2b import config_dir, sentinel, standin  # noqa: E402,F401 - fixtures


@pytest.fixture
def manager(config_dir, tmp_path: Path):  # noqa: F811 - the fixture imported above
    def make(**config):
        return Manager(config_dirs=[config_dir(**config)], home=tmp_path / "home")

    made: list[Manager] = []

    def factory(**config):
        made.append(make(**config))
        return made[-1]

    yield factory
    for m in made:
        m.close()


def test_manager_create_exec_snapshot_restore_teardown(manager, standin: E2BStandIn):  # noqa: F811
    mgr = manager()
    sb = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice", labels={"team": "ml"}))
    assert sb.state is SandboxState.READY and sb.extension == "ext.test-e2b"
    box = standin.boxes[sb.reachability["e2b_sandbox_id"]]
    assert box.metadata["sandboxer.sandbox_id"] == sb.id
    assert box.metadata["sandboxer.consumer"] == "alice"
    assert box.metadata["sandboxer.owner"] == mgr.owner_labels["sandboxer.owner"]
    assert box.metadata["team"] == "ml"

    assert mgr.exec(sb.id, ["sh", "-c", "echo kept > f.txt; echo hi"]).stdout == "hi\n"
    snap = mgr.snapshot(sb.id)
    assert snap.data["snapshot_id"] in standin.snapshots
    again = mgr.restore(snap.id)
    assert again.id != sb.id and again.state is SandboxState.READY
    assert mgr.exec(again.id, ["cat", "f.txt"]).stdout == "kept\n"

    assert mgr.teardown(sb.id).state is SandboxState.TERMINATED
    assert mgr.teardown(again.id).state is SandboxState.TERMINATED
    mgr.delete_snapshot(snap.id)
    assert standin.live() == [] and standin.snapshots == {}


def test_gc_reaps_an_orphan_found_through_list_owned(manager, standin: E2BStandIn):  # noqa: F811
    mgr = manager()
    kept = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="bob"))
    # a sandbox the state store never heard of (e.g. the DB was restored from a backup), carrying our owner label
    ext = mgr.extension("ext.test-e2b")
    profile = mgr.effective_profile(mgr.profile("test-e2b"), 0)
    lost = ext.provision(request(profile, {
        "sandbox_id": "sb-lost", "owner_labels": dict(mgr.owner_labels),
        "tags": {**mgr.owner_labels, "sandboxer.sandbox_id": "sb-lost", "sandboxer.consumer": "bob"},
    }, None))
    # and one that belongs to another manager: never touched
    stranger = ext.provision(request(profile, {
        "sandbox_id": "sb-theirs", "owner_labels": {"sandboxer.owner": "another-manager"},
        "tags": {"sandboxer.owner": "another-manager", "sandboxer.sandbox_id": "sb-theirs"},
    }, None))
    standin.page_limit = 1  # make gc follow x-next-token

    report = mgr.gc()
    assert report.orphans == ["sb-lost"]
    assert standin.boxes[lost.e2b_sandbox_id].state == "killed"
    assert standin.boxes[stranger.e2b_sandbox_id].state == "running"
    assert mgr.get(kept.id).state is SandboxState.READY
    lists = [c for c in standin.calls if c["method"] == "GET" and c["path"] == "/v2/sandboxes"]
    assert len(lists) >= 2 and any(c["query"].get("nextToken") for c in lists)
    mgr.teardown(kept.id)
    ext.teardown(stranger)


def test_ttl_over_plan_maximum_leaves_nothing_behind(manager, standin: E2BStandIn):  # noqa: F811
    mgr = manager(plan_max_ttl="5m")  # the profile's default TTL is 10m
    with pytest.raises(SandboxerError) as info:
        mgr.create(SandboxCreateRequest(profile="test-e2b"))
    assert isinstance(info.value, TTLError)  # a request error: no other backend is tried
    assert "plan maximum of 5m" in str(info.value)
    assert standin.live() == []
    assert all(s.state is not SandboxState.READY for s in mgr.list(all=True))


def test_sentinel_secret_absent_from_state_logs_and_errors(manager, standin: E2BStandIn, sentinel: str,  # noqa: F811
                                                           tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    mgr = manager()
    texts: list[str] = []

    def capture(exc: BaseException) -> None:
        texts.append("".join(traceback.format_exception(exc)))
        texts.append(repr(exc))

    sb = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="carol"))
    mgr.exec(sb.id, ["echo", "fine"])
    snap = mgr.snapshot(sb.id)
    # provider errors that echo the key back, on each verb
    for method, path, call in (
        ("POST", "/v2/sandboxes", lambda: mgr.create(SandboxCreateRequest(profile="test-e2b"))),
        ("POST", "/v2/sandboxes/.*/connect", lambda: mgr.exec(sb.id, ["true"])),
        ("POST", "/sandboxes/.*/snapshots", lambda: mgr.snapshot(sb.id)),
        ("DELETE", "/sandboxes/.*", lambda: mgr.teardown(sb.id)),
    ):
        standin.fail(method, path, 500, f"internal error for api key {sentinel}",
                     times=KILL_ATTEMPTS if method == "DELETE" else 1)  # teardown retries a kill
        with pytest.raises(SandboxerError) as info:
            call()
        capture(info.value)
        assert "***" in str(info.value)  # the provider's message is kept, redacted
    mgr.gc()  # retries the failed teardown
    assert mgr.get(sb.id).state is SandboxState.TERMINATED
    mgr.delete_snapshot(snap.id)

    texts.append(caplog.text)
    texts.append(repr(mgr.events()))
    texts.append(repr(mgr.list(all=True)))
    texts.append(repr(mgr.catalog.extensions["ext.test-e2b"]))
    texts.append(repr(mgr.extension("ext.test-e2b").config))
    for text in texts:
        assert sentinel not in text
    mgr.close()
    files = [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    assert files, "expected a state database under the manager's home"
    for p in files:
        assert sentinel.encode() not in p.read_bytes(), f"secret found in {p}"
    # and the key really was used
    assert any(c["headers"].get("x-api-key") == sentinel for c in standin.calls)


def test_extend_ttl_moves_e2bs_own_timeout(manager, standin: E2BStandIn):  # noqa: F811
    # E2B ends a sandbox at its own timeout: extending our TTL must move that too (Sandbox.set_timeout),
    # or the sandbox would die at the old time while the manager says it lives on.
    mgr = manager()
    sb = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice", ttl=300))
    box = standin.boxes[sb.reachability["e2b_sandbox_id"]]
    before = box.end_at
    try:
        sb.extend_ttl(600)
        assert box.end_at == pytest.approx(sb.expires_at.timestamp(), abs=2)
        assert box.end_at - before == pytest.approx(600, abs=2)
        assert "POST /sandboxes/{id}/timeout" in standin.routes()
    finally:
        mgr.teardown(sb.id)


def test_extend_ttl_past_the_plan_maximum_is_refused_and_changes_nothing(manager, standin: E2BStandIn):  # noqa: F811
    mgr = manager(plan_max_ttl="10m")
    sb = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice", ttl=300))
    box = standin.boxes[sb.reachability["e2b_sandbox_id"]]
    before = box.end_at
    try:
        with pytest.raises(TTLError, match=r"over the E2B plan maximum of 10m"):
            sb.extend_ttl(600)
        assert box.end_at == before and mgr.get(sb.id).expires_at == sb.expires_at
    finally:
        mgr.teardown(sb.id)
