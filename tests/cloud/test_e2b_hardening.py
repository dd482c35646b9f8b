"""ext.e2b hardening (issue 8): no key reachable from our errors, the refused credential named,
exec deadlines that leave nothing running, Retry-After, probe and handle_id.

Same stand-in and fixtures as test_e2b.py (tests/cloud/conftest_e2b.py); the SDK is unmodified.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import pytest

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.errors import AuthError, BackendError, ProvisionError, RateLimited  # noqa: E402
from sandboxer.extensions.e2b import KILL_ATTEMPTS  # noqa: E402
from sandboxer.models import SnapshotMeta  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_e2b import (  # noqa: E402,F401 - fixtures
    ALICE_ENV,
    KEY_ENV,
    OWNER,
    config_dir,
    inputs,
    make_ext,
    sentinel,
    standin,
)
from tests.cloud.e2b_standin import BOX_MARKER, E2BStandIn  # noqa: E402
from tests.cloud.procs import marked  # noqa: E402
from tests.support.leaks import caught, reachable_text  # noqa: E402


# ---------------------------------------------------------------- item 1: no key reachable from our errors

PATHS = {
    # name: (method, path regex of the faulted request, status, times)
    "provision": ("POST", "/v2/sandboxes", 500, 1),
    "wait_ready": ("POST", "/v2/sandboxes/.*/connect", 500, 1),
    "exec": ("POST", "/v2/sandboxes/.*/connect", 500, 1),
    "teardown": ("DELETE", "/sandboxes/.*", 500, KILL_ATTEMPTS),
    "list_owned": ("GET", "/v2/sandboxes", 500, 1),
    "snapshot": ("POST", "/sandboxes/.*/snapshots", 500, 1),
    "snapshot_delete": ("DELETE", "/templates/.*", 500, 1),
    "refused_key": ("POST", "/v2/sandboxes", 401, 1),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_key_the_provider_echoes_is_not_reachable_from_our_error(make_ext, standin: E2BStandIn, sentinel, path):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-leak"), None))
    meta = SnapshotMeta(id="snap-1", sandbox_id="sbx-leak", extension=ext.id, profile="test-e2b",
                        created_at="2026-11-21T00:00:00Z", data={"snapshot_id": "snapXYZ"})
    calls = {
        "provision": lambda: ext.provision(request(profile, inputs("sbx-leak2"), None)),
        "wait_ready": lambda: ext.wait_ready(handle, timeout=5),
        "exec": lambda: ext.exec(handle, ["true"]),
        "teardown": lambda: ext.teardown(handle),
        "list_owned": lambda: ext.list_owned(OWNER),
        "snapshot": lambda: ext.snapshot(handle),
        "snapshot_delete": lambda: ext.delete_snapshot(meta),
        "refused_key": lambda: ext.provision(request(profile, inputs("sbx-leak3"), None)),
    }
    method, route, status, times = PATHS[path]
    standin.fail(method, route, status, "scripted failure", times=times, echo_key=True)
    err = caught(calls[path])
    assert isinstance(err, BackendError), err
    assert sentinel in standin.calls[-1]["headers"]["x-api-key"]  # the stand-in had it to echo
    assert "scripted failure" in str(err) or status == 401  # the provider's text is kept, redacted
    assert sentinel not in reachable_text(err)
    ext.teardown(handle)


# ---------------------------------------------------------------- item 2: the refused credential, and gc after it


def test_auth_error_names_the_refused_reference(make_ext, standin: E2BStandIn, monkeypatch, tmp_path: Path):
    alice_file = tmp_path / "alice.key"
    alice_file.write_text("e2b_REVOKED" + secrets.token_hex(8) + "\n")
    ext, profile = make_ext(consumer_keys={"alice": {"file": str(alice_file)}})
    monkeypatch.setenv(KEY_ENV, "e2b_WRONG" + secrets.token_hex(8))
    err = caught(lambda: ext.provision(request(profile, inputs("sbx-a", consumer="bob"), None)))
    assert isinstance(err, AuthError) and err.credential == f"env {KEY_ENV}"
    err = caught(lambda: ext.provision(request(profile, inputs("sbx-b", consumer="alice"), None)))
    assert isinstance(err, AuthError) and err.credential == f"file {alice_file}"
    assert str(alice_file) in str(err)
    assert (ext.credential("alice"), ext.credential("bob")) == (f"file {alice_file}", f"env {KEY_ENV}")
    monkeypatch.delenv(KEY_ENV)  # unset: refused before any request, the same reference named
    err = caught(lambda: ext.provision(request(profile, inputs("sbx-c", consumer="bob"), None)))
    assert isinstance(err, AuthError) and err.credential == f"env {KEY_ENV}"


def test_list_owned_with_a_refused_key_still_lists_the_other_keys(make_ext, standin: E2BStandIn, monkeypatch,
                                                                 caplog, sentinel):
    alice_key = "e2b_ALICE" + secrets.token_hex(8)
    standin.keys.add(alice_key)
    monkeypatch.setenv(ALICE_ENV, alice_key)
    ext, profile = make_ext(consumer_keys={"alice": {"env": ALICE_ENV}})
    h_bob = ext.provision(request(profile, inputs("sbx-bob", consumer="bob"), None))
    h_alice = ext.provision(request(profile, inputs("sbx-alice", consumer="alice"), None))

    standin.keys.discard(alice_key)  # alice's key is revoked at E2B
    with caplog.at_level(logging.WARNING, logger="sandboxer"):
        owned = ext.list_owned(OWNER)
    assert [o.sandbox_id for o in owned] == ["sbx-bob"]
    assert f"env {ALICE_ENV}" in caplog.text and alice_key not in caplog.text

    standin.keys.add(alice_key)
    standin.keys.discard(sentinel)  # now the operator's key is the refused one: alice's still lists
    assert [o.sandbox_id for o in ext.list_owned(OWNER)] == ["sbx-alice"]
    standin.keys.discard(alice_key)
    err = caught(lambda: ext.list_owned(OWNER))  # every key refused: nothing can be listed, say so
    assert isinstance(err, AuthError) and err.credential == f"env {KEY_ENV}"
    standin.keys.update({sentinel, alice_key})
    ext.teardown(h_bob)
    ext.teardown(h_alice)


def test_gc_reaps_orphans_of_the_other_keys_while_one_key_is_refused(config_dir, standin: E2BStandIn, tmp_path,
                                                                     monkeypatch, sentinel):
    alice_key = "e2b_ALICE" + secrets.token_hex(8)
    standin.keys.add(alice_key)
    monkeypatch.setenv(ALICE_ENV, alice_key)
    mgr = Manager(config_dirs=[config_dir(consumer_keys={"alice": {"env": ALICE_ENV}})], home=tmp_path / "home")
    try:
        kept = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="bob"))  # gc asks backends in use
        ext = mgr.extension("ext.test-e2b")
        profile = mgr.effective_profile(mgr.profile("test-e2b"), 0)
        orphans = {}
        for consumer in ("bob", "alice"):
            sid = f"sb-orphan-{consumer}"
            orphans[consumer] = ext.provision(request(profile, {
                "sandbox_id": sid, "owner_labels": dict(mgr.owner_labels),
                "tags": {**mgr.owner_labels, "sandboxer.sandbox_id": sid, "sandboxer.consumer": consumer},
            }, None))
        standin.keys.discard(alice_key)
        mgr.gc()
        assert standin.boxes[orphans["bob"].e2b_sandbox_id].state == "killed"  # reaped despite alice's key
        assert standin.boxes[orphans["alice"].e2b_sandbox_id].state == "running"  # not reachable: left
        standin.keys.add(alice_key)
        mgr.gc()
        assert [b.id for b in standin.live()] == [kept.reachability["e2b_sandbox_id"]]
        mgr.teardown(kept.id)
    finally:
        mgr.close()


# ---------------------------------------------------------------- item 4: exec deadlines


def test_a_timed_out_command_is_124_and_leaves_nothing_running(make_ext, standin: E2BStandIn, tmp_path):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-deadline"), None))
    ext.wait_ready(handle, timeout=10)
    box = standin.boxes[handle.e2b_sandbox_id]
    script = "trap '' TERM; setsid sh -c 'echo $$ > escaped.pid; exec sleep 300' & echo $$ > main.pid; sleep 300"
    t0 = time.monotonic()
    res = ext.exec(handle, ["sh", "-c", script], timeout=2)
    assert (res.exit_code, res.timed_out) == (124, True)
    assert time.monotonic() - t0 < 15
    main, escaped = (int((box.workdir / f).read_text()) for f in ("main.pid", "escaped.pid"))
    assert main != escaped
    assert marked(BOX_MARKER, box.id) == [], "the command's processes outlived its deadline"
    assert ext.exec(handle, ["echo", "still usable"]).stdout == "still usable\n"
    ext.teardown(handle)


# ---------------------------------------------------------------- item 5: Retry-After


def test_retry_after_header_sets_retry_after(make_ext, standin: E2BStandIn):
    ext, profile = make_ext(rate_limit_retry_after=5)
    standin.fail("POST", "/v2/sandboxes", 429, "slow down", headers={"Retry-After": "42"})
    err = caught(lambda: ext.provision(request(profile, inputs("sbx-r"), None)))
    assert isinstance(err, RateLimited) and err.retry_after == 42
    standin.fail("POST", "/v2/sandboxes", 429, "slow down")  # no header: the configured fallback
    err = caught(lambda: ext.provision(request(profile, inputs("sbx-r"), None)))
    assert isinstance(err, RateLimited) and err.retry_after == 5
    standin.fail("GET", "/v2/sandboxes", 429, "slow down", headers={"Retry-After": "3"})
    err = caught(lambda: ext.list_owned(OWNER))
    assert isinstance(err, RateLimited) and err.retry_after == 3


# ---------------------------------------------------------------- item 6: probe and handle_id


def test_probe_says_whether_the_sandbox_still_exists(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-p"), None))
    ext.wait_ready(handle, timeout=10)
    assert ext.probe(handle) is True
    assert ext.handle_id(handle) == handle.e2b_sandbox_id
    standin.kill(handle.e2b_sandbox_id)  # killed by its provider
    assert ext.probe(handle) is False
    standin.fail("GET", "/sandboxes/.*", 500, "boom")
    err = caught(lambda: ext.probe(handle))  # the backend cannot be asked: an error, not an answer
    assert isinstance(err, BackendError) and "boom" in str(err)


def test_a_retried_create_is_one_sandbox_unless_the_provider_ignores_the_key(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    standin.lose_next_create_response()
    err = caught(lambda: ext.provision(request(profile, inputs("sbx-twice"), None)))
    assert isinstance(err, ProvisionError) and err.transient
    handle = ext.provision(request(profile, inputs("sbx-twice"), None))  # the retry: same idempotency key
    assert [o.sandbox_id for o in ext.list_owned(OWNER)] == ["sbx-twice"]

    standin.ignore_idempotency = True
    standin.lose_next_create_response()
    caught(lambda: ext.provision(request(profile, inputs("sbx-dup"), None)))
    kept = ext.provision(request(profile, inputs("sbx-dup"), None))
    dups = [o for o in ext.list_owned(OWNER) if o.sandbox_id == "sbx-dup"]
    assert len(dups) == 2
    ids = {ext.handle_id(o.handle) for o in dups}
    assert len(ids) == 2 and ext.handle_id(kept) in ids  # gc can tell the duplicate from the recorded one
    for o in ext.list_owned(OWNER):
        ext.teardown(o.handle)
    del handle


def test_the_sdks_own_retry_of_a_lost_create_makes_a_duplicate_when_the_key_is_ignored(make_ext, standin):
    ext, profile = make_ext(retries=1)  # the SDK retries a 502 itself
    standin.ignore_idempotency = True
    standin.lose_next_create_response()
    handle = ext.provision(request(profile, inputs("sbx-dup"), None))
    assert standin.routes().count("POST /v2/sandboxes") == 2
    dups = ext.list_owned(OWNER)
    assert [o.sandbox_id for o in dups] == ["sbx-dup", "sbx-dup"]
    assert {ext.handle_id(o.handle) for o in dups} - {ext.handle_id(handle)} != set()
    for o in dups:
        ext.teardown(o.handle)


# ---------------------------------------------------------------- through the Manager (core items of issue 8)


def test_a_refused_key_blocks_only_that_consumer_and_a_rotated_key_is_used_at_once(config_dir, standin: E2BStandIn,
                                                                                   tmp_path, monkeypatch):
    alice_key = "e2b_ALICE" + secrets.token_hex(8)
    monkeypatch.setenv(ALICE_ENV, alice_key)  # not among the stand-in's keys: refused
    mgr = Manager(config_dirs=[config_dir(consumer_keys={"alice": {"env": ALICE_ENV}})], home=tmp_path / "home")
    try:
        with pytest.raises(AuthError, match=ALICE_ENV) as e:
            mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice"))
        assert e.value.credential == f"env {ALICE_ENV}"
        bob = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="bob"))  # the operator's key: not blocked
        creates = standin.routes().count("POST /v2/sandboxes")
        with pytest.raises(AuthError, match="not retried for"):
            mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice"))
        assert standin.routes().count("POST /v2/sandboxes") == creates  # the refused key was not sent again
        rotated = "e2b_ALICE" + secrets.token_hex(8)
        standin.keys.add(rotated)
        monkeypatch.setenv(ALICE_ENV, rotated)
        alice = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice"))  # rotated: tried at once
        for sb in (alice, bob):
            mgr.teardown(sb.id)
        assert alice_key not in str(mgr.events()) and rotated not in str(mgr.events())
    finally:
        mgr.close()


def test_gc_marks_a_sandbox_e2b_killed_lost(config_dir, standin: E2BStandIn, tmp_path):
    mgr = Manager(config_dirs=[config_dir()], home=tmp_path / "home")
    try:
        sb = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="bob"))
        standin.kill(sb.reachability["e2b_sandbox_id"])
        assert mgr.gc().lost == [sb.id]
        assert mgr.get(sb.id).state.value == "lost"
    finally:
        mgr.close()


def test_gc_reaps_the_duplicate_of_a_retried_create_and_keeps_the_sandbox(config_dir, standin: E2BStandIn, tmp_path):
    mgr = Manager(config_dirs=[config_dir(retries=1)], home=tmp_path / "home")
    try:
        standin.ignore_idempotency = True
        standin.lose_next_create_response()
        sb = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="bob"))
        assert len(standin.live()) == 2
        report = mgr.gc()
        assert len(report.orphans) == 1 and report.orphans[0].startswith(f"{sb.id} (duplicate ")
        assert [b.id for b in standin.live()] == [mgr.state.get(sb.id)["handle"]["e2b_sandbox_id"]]
        assert mgr.exec(sb.id, ["echo", "still here"]).stdout == "still here\n"
        mgr.teardown(sb.id)
    finally:
        mgr.close()
