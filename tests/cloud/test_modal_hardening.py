"""ext.modal hardening (issue 8): no token reachable from our errors, the refused credential named,
exec deadlines that leave nothing running, throttle hints, probe and handle_id.

Same stand-in and fixtures as test_modal.py; the SDK is unmodified and speaks gRPC to it.
"""

from __future__ import annotations

import logging
import time

import pytest

from tests.cloud.test_modal import (  # noqa: F401 - fixtures
    ALICE_ID,
    ALICE_SECRET,
    OWNER,
    SENTINEL,
    TOKEN_ID,
    backend,
    inputs,
    load,
    standin,
    tokens,
    write_config,
)

from grpclib import Status  # noqa: E402

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.errors import AuthError, SandboxerError  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.modal_standin import SANDBOX_MARKER  # noqa: E402
from tests.cloud.procs import marked  # noqa: E402
from tests.support.leaks import caught, reachable_text  # noqa: E402

DEFAULT_PAIR = "env SBX_TEST_MODAL_TOKEN_ID + env SBX_TEST_MODAL_TOKEN_SECRET"
ALICE_PAIR = "env SBX_TEST_ALICE_TOKEN_ID + env SBX_TEST_ALICE_TOKEN_SECRET"


# ---------------------------------------------------------------- item 1: no token reachable from our errors

PATHS = {
    "provision": ("SandboxCreateV2", Status.FAILED_PRECONDITION),
    "provision_invalid": ("SandboxCreateV2", Status.INVALID_ARGUMENT),
    "wait_ready": ("SandboxWaitUntilReady", Status.FAILED_PRECONDITION),
    "exec": ("TaskExecStart", Status.FAILED_PRECONDITION),
    "teardown": ("SandboxTerminateV2", Status.FAILED_PRECONDITION),
    "list_owned": ("SandboxListV2", Status.FAILED_PRECONDITION),
    "snapshot": ("TaskSnapshotFilesystem", Status.FAILED_PRECONDITION),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_token_the_provider_echoes_is_not_reachable_from_our_error(backend, standin, path):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    calls = {
        "provision": lambda: ext.provision(request(profile, inputs("sbx-2"), None)),
        "provision_invalid": lambda: ext.provision(request(profile, inputs("sbx-2"), None)),
        "wait_ready": lambda: ext.wait_ready(handle, timeout=5),
        "exec": lambda: ext.exec(handle, ["true"]),
        "teardown": lambda: ext.teardown(handle),
        "list_owned": lambda: ext.list_owned(OWNER),
        "snapshot": lambda: ext.snapshot(handle),
    }
    method, status = PATHS[path]
    standin.fail_next(method, status, "scripted failure", echo_secret=True)
    err = caught(calls[path])
    assert isinstance(err, SandboxerError), err
    assert "scripted failure" in str(err)  # the provider's text is kept, redacted
    assert SENTINEL not in reachable_text(err)
    standin._faults.clear()
    ext.teardown(handle)


def test_a_refused_token_is_not_reachable_from_our_error(tmp_path, standin, tokens, monkeypatch):
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_ID", "ak-wrong")  # the stand-in echoes id:secret back
    ext, profile = load(write_config(tmp_path / "cfg", standin.url))
    err = caught(lambda: ext.provision(request(profile, inputs(), None)))
    assert isinstance(err, AuthError)
    assert SENTINEL not in reachable_text(err)


# ---------------------------------------------------------------- item 2: the refused credential, and gc after it


def test_auth_error_names_the_refused_token_pair(tmp_path, standin, tokens, monkeypatch):
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_SECRET", "as-revoked")
    monkeypatch.setenv("SBX_TEST_ALICE_TOKEN_SECRET", "as-revoked-too")
    ext, profile = load(write_config(tmp_path / "cfg", standin.url))
    err = caught(lambda: ext.provision(request(profile, inputs(consumer="bob"), None)))
    assert isinstance(err, AuthError) and err.credential == DEFAULT_PAIR
    assert "SBX_TEST_MODAL_TOKEN_ID" in str(err) and "SBX_TEST_MODAL_TOKEN_SECRET" in str(err)
    err = caught(lambda: ext.provision(request(profile, inputs(consumer="alice"), None)))
    assert isinstance(err, AuthError) and err.credential == ALICE_PAIR
    assert (ext.credential("alice"), ext.credential("bob")) == (ALICE_PAIR, DEFAULT_PAIR)
    assert "SBX_TEST_ALICE_TOKEN_ID" in str(err) and "SBX_TEST_ALICE_TOKEN_SECRET" in str(err)
    monkeypatch.delenv("SBX_TEST_MODAL_TOKEN_SECRET")  # unset: refused before any call, the same pair named
    err = caught(lambda: ext.provision(request(profile, inputs(consumer="bob"), None)))
    assert isinstance(err, AuthError) and err.credential == DEFAULT_PAIR
    assert "SBX_TEST_MODAL_TOKEN_SECRET" in str(err)
    assert TOKEN_ID not in reachable_text(err)  # the id that did resolve is not left in a frame either


def test_list_owned_with_the_default_token_refused_still_lists_the_others(backend, standin, caplog):
    ext, profile = backend
    mine = ext.provision(request(profile, inputs("sbx-me"), None))
    alices = ext.provision(request(profile, inputs("sbx-alice", consumer="alice"), None))
    standin.tokens[TOKEN_ID] = "as-rotated-away"  # the operator's token is revoked at Modal
    with caplog.at_level(logging.WARNING, logger="sandboxer"):
        assert [o.sandbox_id for o in ext.list_owned(OWNER)] == ["sbx-alice"]
    assert DEFAULT_PAIR in caplog.text
    standin.tokens[ALICE_ID] = "as-gone-too"
    err = caught(lambda: ext.list_owned(OWNER))  # every token refused: say so
    assert isinstance(err, AuthError) and err.credential == DEFAULT_PAIR
    standin.tokens.update({TOKEN_ID: SENTINEL, ALICE_ID: ALICE_SECRET})
    ext.teardown(mine)
    ext.teardown(alices)


def test_gc_reaps_orphans_of_the_other_tokens_while_one_is_refused(tmp_path, standin, tokens):
    mgr = Manager(config_dirs=[write_config(tmp_path / "cfg", standin.url)], home=tmp_path / "home")
    try:
        kept = mgr.create(SandboxCreateRequest(profile="test-modal", consumer="me"))  # gc asks backends in use
        ext = mgr.extension("ext.test-modal")
        profile = mgr.effective_profile(mgr.profile("test-modal"), 0)
        orphans = {}
        for consumer in ("me", "alice"):
            sid = f"sb-orphan-{consumer}"
            orphans[consumer] = ext.provision(request(profile, {
                "sandbox_id": sid, "owner_labels": dict(mgr.owner_labels),
                "tags": {**mgr.owner_labels, "sandboxer.sandbox_id": sid, "sandboxer.consumer": consumer},
            }, None)).object_id
        standin.tokens[ALICE_ID] = "as-revoked"
        mgr.gc()
        assert standin.sandboxes[orphans["me"]].status  # reaped despite alice's token
        assert not standin.sandboxes[orphans["alice"]].status  # not reachable: left for later
        standin.tokens[ALICE_ID] = ALICE_SECRET
        mgr.gc()
        assert standin.sandboxes[orphans["alice"]].status
        live = [sb.id for sb in standin.sandboxes.values() if not sb.status]
        assert live == [kept.reachability["sandbox_id"]]
        mgr.teardown(kept.id)
    finally:
        mgr.close()


# ---------------------------------------------------------------- item 4: exec deadlines


def test_a_timed_out_command_is_124_and_leaves_nothing_running(backend, standin):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    ext.wait_ready(handle, timeout=10)
    sb = standin.sandboxes[handle.object_id]
    script = "trap '' TERM; setsid sh -c 'echo $$ > escaped.pid; exec sleep 300' & echo $$ > main.pid; sleep 300"
    t0 = time.monotonic()
    res = ext.exec(handle, ["sh", "-c", script], timeout=2)
    assert (res.exit_code, res.timed_out) == (124, True)
    assert time.monotonic() - t0 < 20
    main, escaped = (int((sb.root / f).read_text()) for f in ("main.pid", "escaped.pid"))
    assert main != escaped
    assert marked(SANDBOX_MARKER, sb.id) == [], "the command's processes outlived its deadline"
    assert ext.exec(handle, ["echo", "still usable"]).stdout == "still usable\n"
    ext.teardown(handle)


# ---------------------------------------------------------------- item 6: probe and handle_id


def test_probe_says_whether_the_sandbox_still_exists(backend, standin):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    ext.wait_ready(handle, timeout=10)
    assert ext.probe(handle) is True
    assert ext.handle_id(handle) == handle.object_id
    standin.kill(handle.object_id)  # killed by its provider
    assert ext.probe(handle) is False
    other = ext.provision(request(profile, inputs("sbx-2"), None))
    standin.forget(other.object_id)  # purged: Modal no longer knows it at all
    assert ext.probe(other) is False


def test_a_create_retried_past_a_lost_response_makes_a_duplicate(backend, standin):
    ext, profile = backend
    standin.lose_next_create_response()
    handle = ext.provision(request(profile, inputs("sbx-dup"), None))  # the SDK retried the UNAVAILABLE create itself
    assert len(standin.called("SandboxCreateV2")) == 2
    dups = ext.list_owned(OWNER)
    assert [o.sandbox_id for o in dups] == ["sbx-dup", "sbx-dup"]
    ids = {ext.handle_id(o.handle) for o in dups}
    assert len(ids) == 2 and ext.handle_id(handle) in ids  # gc can tell the duplicate from the recorded one
    for o in dups:
        ext.teardown(o.handle)
