"""ext.modal through the Manager, against the Modal stand-in (real SDK, real gRPC, real state store)."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest

from tests.cloud.test_modal import (  # noqa: F401 - fixtures
    OWNER,
    SENTINEL,
    assert_no_secret,
    standin,
    tokens,
    write_config,
)

from grpclib import Status  # noqa: E402
from modal_proto import api_pb2  # noqa: E402

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.errors import AuthError, RateLimited, RoutingError, SandboxerError  # noqa: E402
from sandboxer.models import SandboxState  # noqa: E402
from sandboxer.testing import request  # noqa: E402

_TERMINATED = api_pb2.GenericResult.GENERIC_STATUS_TERMINATED


@pytest.fixture
def manager(tmp_path, standin, tokens):
    mgr = Manager(config_dirs=[write_config(tmp_path / "cfg", standin.url)], home=tmp_path / "home")
    try:
        yield mgr
    finally:
        mgr.close()


def live_on_modal(standin) -> list[str]:
    return [sb.id for sb in standin.sandboxes.values() if not sb.status]


def test_manager_cycle_create_exec_snapshot_restore_teardown(manager, standin):
    sb = manager.create(SandboxCreateRequest(profile="test-modal", consumer="me", ttl="20m"))
    assert sb.state == SandboxState.READY and sb.reachability["provider"] == "modal"
    (object_id,) = live_on_modal(standin)
    tags = standin.sandboxes[object_id].tags
    assert tags["sandboxer.sandbox_id"] == sb.id and tags["sandboxer.consumer"] == "me"
    assert tags["sandboxer.owner"] == manager.owner_labels["sandboxer.owner"]

    res = manager.exec(sb.id, ["sh", "-c", "echo state > kept.txt; echo hi"])
    assert (res.exit_code, res.stdout) == (0, "hi\n")

    snap = manager.snapshot(sb.id)
    assert snap.data["image_id"] in standin.images
    restored = manager.restore(snap.id)
    assert restored.state == SandboxState.READY and restored.id != sb.id
    assert manager.exec(restored.id, ["cat", "kept.txt"]).stdout == "state\n"
    manager.delete_snapshot(snap.id)

    for s in (sb, restored):
        assert manager.teardown(s.id).state == SandboxState.TERMINATED
    assert live_on_modal(standin) == []
    assert all(s.status == _TERMINATED for s in standin.sandboxes.values())


def test_manager_gc_reaps_an_orphan_found_by_list_owned(manager, standin):
    kept = manager.create(SandboxCreateRequest(profile="test-modal", consumer="me"))
    # An orphan: a sandbox this manager's owner labels are on, that the state store lost.
    ext = manager.extension("ext.test-modal")
    profile = manager.profile("test-modal")
    tags = {**manager.owner_labels, "sandboxer.sandbox_id": "sbx-lost", "sandboxer.consumer": "me"}
    lost = ext.provision(request(profile, {"sandbox_id": "sbx-lost", "owner_labels": dict(manager.owner_labels),
                                   "tags": tags}, None))
    report = manager.gc()
    assert report.orphans == ["sbx-lost"]
    assert standin.sandboxes[lost.object_id].status == _TERMINATED
    assert live_on_modal(standin) == [standin_id(standin, kept.id)]
    manager.teardown(kept.id)


def standin_id(standin, sandbox_id: str) -> str:
    return next(sb.id for sb in standin.sandboxes.values() if sb.tags.get("sandboxer.sandbox_id") == sandbox_id)


def test_manager_rate_limit_and_bad_token_leave_nothing_behind(manager, standin):
    standin.fail_next("SandboxCreateV2", Status.RESOURCE_EXHAUSTED, "slow down",
                      [api_pb2.RPCRetryPolicy(retry_after_secs=30)])
    with pytest.raises((RateLimited, RoutingError)) as info:
        manager.create(SandboxCreateRequest(profile="test-modal", consumer="me"))
    err = info.value
    if isinstance(err, RoutingError):
        assert "RateLimited" in str(err)
    assert live_on_modal(standin) == []


def test_sentinel_secret_absent_from_state_logs_and_errors(tmp_path, standin, tokens, monkeypatch, caplog):
    home = tmp_path / "home"
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        mgr = Manager(config_dirs=[write_config(tmp_path / "cfg", standin.url)], home=home)
        try:
            sb = mgr.create(SandboxCreateRequest(profile="test-modal", consumer="me"))
            texts.append(mgr.exec(sb.id, ["env"]).stdout)
            snap = mgr.snapshot(sb.id)
            mgr.teardown(sb.id)
            mgr.delete_snapshot(snap.id)
            mgr.gc()
            # The provider echoes the secret in its refusal; nothing of it may come through.
            monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_ID", "ak-rotated-wrong")
            standin.tokens["ak-rotated-wrong"] = "as-something-else"
            with pytest.raises(SandboxerError) as info:
                mgr.create(SandboxCreateRequest(profile="test-modal", consumer="me"))
            assert isinstance(info.value, (AuthError, RoutingError))
            texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
            texts += [str(s.model_dump()) for s in mgr.list(all=True)]
            texts += [str(e) for e in mgr.events()]
        finally:
            mgr.close()
    texts.append(caplog.text)
    assert_no_secret(*texts)
    stored = b"".join(p.read_bytes() for p in Path(home).rglob("*") if p.is_file())
    assert stored, "the state store wrote nothing"
    assert SENTINEL.encode() not in stored
