"""The manager's lifecycle against the scriptable fake extension."""

from __future__ import annotations

import sqlite3
import stat
import threading
import time

import pytest

from sandboxer import (
    CapabilityError,
    InputError,
    ProfileNotFound,
    ProvisionError,
    ReadinessTimeout,
    SandboxCreateRequest,
    SandboxNotFound,
    SandboxStateError,
    TeardownError,
    TTLError,
)
from sandboxer.models import SandboxState
from sandboxer.errors import BackendError, StateStoreError
from sandboxer.state import SCHEMA_VERSION
from tests.conftest import run_threads


def fake(mgr):
    return mgr.extension("ext.fake")


def states(mgr, sandbox_id):
    return [(e["kind"], e["to_state"]) for e in mgr.events(sandbox_id)]


def test_full_lifecycle_records_every_transition(fake_mgr):
    sb = fake_mgr.create(profile="fake", consumer="alice", labels={"team": "a"})
    assert sb.state is SandboxState.READY and sb.consumer == "alice" and sb.labels == {"team": "a"}
    assert sb.ready_at and sb.expires_at > sb.created_at
    assert fake_mgr.exec(sb.id, ["echo", "hi"]).stdout == "echo hi\n"
    done = fake_mgr.teardown(sb.id)
    assert done.state is SandboxState.TERMINATED and done.terminated_at
    assert states(fake_mgr, sb.id) == [
        ("create_intent", "provisioning"), ("provisioned", "provisioning"), ("ready", "ready"),
        ("teardown_started", "tearing_down"), ("terminated", "terminated"),
    ]
    ev = fake_mgr.events(sb.id)[0]
    assert ev["consumer"] == "alice" and ev["extension"] == "ext.fake" and ev["ts"] > 0
    assert fake(fake_mgr).live == {}


def test_provision_gets_merged_inputs_and_reserved_keys(fake_mgr):
    sb = fake_mgr.create(profile="fake", inputs={"size": "L"}, consumer="bob")
    (_, (req,)) = next(c for c in fake(fake_mgr).calls if c[0] == "provision")
    assert req.inputs == {"color": "blue", "size": "L"}  # no reserved names among the inputs
    assert req.sandbox_id == sb.id and req.owner_labels == fake_mgr.owner_labels
    assert req.tags["sandboxer.consumer"] == "bob" and req.tags["sandboxer.sandbox_id"] == sb.id
    assert req.ttl == 600 and req.profile.slug == "fake"


def test_intent_is_recorded_before_provision(fake_mgr):
    seen = {}

    def provision(req):
        seen["row"] = fake_mgr.state.get(req.sandbox_id)
        return {"fake_id": "x", "sandbox_id": req.sandbox_id}

    fake(fake_mgr).script("provision", provision)
    fake_mgr.create(profile="fake")
    assert seen["row"]["state"] == "provisioning" and seen["row"]["handle"] is None


def test_readiness_failure_tears_down_before_raising(fake_mgr):
    fake(fake_mgr).script("wait_ready", ReadinessTimeout("never came up"))
    with pytest.raises(ReadinessTimeout, match="never came up"):
        fake_mgr.create(profile="fake")
    assert fake(fake_mgr).live == {}
    (row,) = fake_mgr.state.list(states=None)
    assert row["state"] == "failed" and "never came up" in row["last_error"]
    assert [c[0] for c in fake(fake_mgr).calls][-1] == "teardown"


def test_provision_failure_cleans_leftovers_found_by_list_owned(fake_mgr):
    ext = fake(fake_mgr)

    def half_then_fail(req):
        ext.live["half"] = {"sandbox_id": req.sandbox_id, "owner_labels": req.owner_labels}
        raise ProvisionError("boom after creating something")

    ext.script("provision", half_then_fail)
    with pytest.raises(ProvisionError, match="boom"):
        fake_mgr.create(profile="fake")
    assert ext.live == {}
    assert fake_mgr.state.list(states=None)[0]["state"] == "failed"


def test_failed_teardown_is_recorded_and_retried_by_gc(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    fake(fake_mgr).script("teardown", TeardownError("api down"))
    with pytest.raises(TeardownError, match="api down"):
        fake_mgr.teardown(sb.id)
    st = fake_mgr.get(sb.id)
    assert st.state is SandboxState.TEARDOWN_FAILED and "api down" in st.last_error
    report = fake_mgr.gc()
    assert report.retried == [sb.id] and fake_mgr.get(sb.id).state is SandboxState.TERMINATED
    assert fake(fake_mgr).live == {}


def test_teardown_is_idempotent(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    fake_mgr.teardown(sb.id)
    assert fake_mgr.teardown(sb.id).state is SandboxState.TERMINATED
    assert [c[0] for c in fake(fake_mgr).calls].count("teardown") == 1


def test_context_manager_tears_down_on_error(fake_mgr):
    with pytest.raises(RuntimeError):
        with fake_mgr.sandbox("fake") as sb:
            raise RuntimeError("consumer code failed")
    assert fake_mgr.get(sb.id).state is SandboxState.TERMINATED


def test_ttl_default_override_and_limits(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    assert abs((sb.expires_at - sb.created_at).total_seconds() - 600) < 1
    sb2 = fake_mgr.create(profile="fake", ttl="30m")
    assert abs((sb2.expires_at - sb2.created_at).total_seconds() - 1800) < 1
    with pytest.raises(TTLError, match="TTL 2h is over profile 'fake''s maximum of 1h"):
        fake_mgr.create(profile="fake", ttl="2h")
    with pytest.raises(ValueError, match="must not be negative"):
        SandboxCreateRequest(profile="fake", ttl="-5m")
    with pytest.raises(ValueError, match="TTL must be positive"):
        SandboxCreateRequest(profile="fake", ttl=0)
    assert len(fake_mgr.list()) == 2  # the refused ones left nothing


def test_required_and_reserved_inputs(cfg, make_manager):
    from tests.conftest import FAKE_EXT, FAKE_PROFILE

    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.fake.yaml", FAKE_PROFILE.replace("defaults: {color: blue}", "required: [repo]"))
    mgr = make_manager()
    with pytest.raises(InputError, match="profile 'fake' requires input 'repo'"):
        mgr.create(profile="fake")
    with pytest.raises(InputError, match="input 'owner_labels' is reserved"):
        mgr.create(profile="fake", inputs={"repo": "x", "owner_labels": {}})
    assert mgr.state.list(states=None) == [] and fake(mgr).calls == []


def test_unknown_profile_and_sandbox(fake_mgr):
    with pytest.raises(ProfileNotFound, match="unknown profile 'nope'; known profiles: .*fake"):
        fake_mgr.create(profile="nope")
    for op in (fake_mgr.get, fake_mgr.teardown, lambda i: fake_mgr.exec(i, ["true"])):
        with pytest.raises(SandboxNotFound, match="no sandbox with id 'sb-missing'"):
            op("sb-missing")


def test_exec_after_teardown_and_bad_argv(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    with pytest.raises(InputError, match="exec needs a non-empty argv"):
        fake_mgr.exec(sb.id, [])
    with pytest.raises(InputError, match=r"exec argv\[1\] 'a\\x00b' holds a NUL byte"):
        fake_mgr.exec(sb.id, ["echo", "a\x00b"])
    fake_mgr.teardown(sb.id)
    with pytest.raises(SandboxStateError, match=f"cannot exec in sandbox {sb.id}: it is terminated"):
        fake_mgr.exec(sb.id, ["true"])


def test_unsupported_feature_is_refused_before_any_work(cfg, make_manager):
    from tests.conftest import FAKE_EXT, FAKE_PROFILE

    cfg.write("ext.fake.yaml", FAKE_EXT.replace("[exec, snapshots, list_owned]", "[]"))
    cfg.write("profile.fake.yaml", FAKE_PROFILE)
    mgr = make_manager()
    sb = mgr.create(profile="fake")
    with pytest.raises(CapabilityError, match="ext.fake does not support exec"):
        mgr.exec(sb.id, ["true"])
    with pytest.raises(CapabilityError, match="does not support snapshots"):
        mgr.snapshot(sb.id)
    assert [c[0] for c in fake(mgr).calls] == ["provision", "wait_ready"]
    assert mgr.state.list_snapshots(states=("pending", "ready", "failed")) == []


def test_gc_reaps_expired(fake_mgr):
    sb = fake_mgr.create(profile="fake", ttl=0.2)
    keep = fake_mgr.create(profile="fake")
    time.sleep(0.3)
    with pytest.raises(SandboxStateError, match="expired"):
        fake_mgr.exec(sb.id, ["true"])
    report = fake_mgr.gc()
    assert report.expired == [sb.id]
    assert fake_mgr.get(sb.id).state is SandboxState.TERMINATED
    assert fake_mgr.get(keep.id).state is SandboxState.READY


def test_gc_reaps_orphans_the_store_lost(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    ext = fake(fake_mgr)
    ext.live["lost"] = {"sandbox_id": "sb-lost", "owner_labels": fake_mgr.owner_labels}
    ext.live["foreign"] = {"sandbox_id": "sb-other", "owner_labels": {"sandboxer.owner": "someone-else"}}
    report = fake_mgr.gc()
    assert report.orphans == ["sb-lost"]
    assert set(ext.live) == {next(k for k, v in ext.live.items() if v["sandbox_id"] == sb.id), "foreign"}


def test_state_file_is_private_and_versioned(fake_mgr, home):
    mode = stat.S_IMODE((home / "state.db").stat().st_mode)
    assert mode == 0o600
    assert fake_mgr.state.schema_version() == SCHEMA_VERSION
    db = sqlite3.connect(home / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(fake_mgr, home, make_manager):
    db = sqlite3.connect(home / "state.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    with pytest.raises(StateStoreError, match="schema version 99, newer than this sand-boxer"):
        make_manager()


def test_fifty_threads_create_and_teardown(fake_mgr):
    errors = []

    def work():
        try:
            sb = fake_mgr.create(profile="fake")
            fake_mgr.exec(sb.id, ["true"])
            fake_mgr.teardown(sb.id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads(work, 50)
    assert errors == []
    rows = fake_mgr.state.list(states=None)
    assert len(rows) == 50 and {r["state"] for r in rows} == {"terminated"}
    assert fake(fake_mgr).live == {} and fake_mgr.list() == []
    assert len(fake_mgr.events()) == 250


def test_twenty_racing_creates_with_one_name_yield_one_sandbox(fake_mgr):
    def slow(req):
        time.sleep(0.05)
        return {"fake_id": req.sandbox_id, "sandbox_id": req.sandbox_id}

    fake(fake_mgr).script("provision", *([slow] * 20))
    results, errors = [], []
    barrier = threading.Barrier(20)

    def work():
        barrier.wait()
        try:
            results.append(fake_mgr.create(profile="fake", name="build-42"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads(work, 20)
    assert errors == []
    assert len({r.id for r in results}) == 1 and len(results) == 20
    assert len(fake_mgr.state.list(states=None)) == 1
    assert [c[0] for c in fake(fake_mgr).calls].count("provision") == 1



def test_create_stops_if_gc_closed_its_record_meanwhile(fake_mgr):
    ext = fake(fake_mgr)

    def provision(req):
        # another process's gc judged this record abandoned and closed it
        fake_mgr.state.transition(req.sandbox_id, "terminated", state="failed")
        ext.live["late"] = {"sandbox_id": req.sandbox_id, "owner_labels": req.owner_labels}
        return {"fake_id": "late", "sandbox_id": req.sandbox_id}

    ext.script("provision", provision)
    with pytest.raises(SandboxStateError, match="torn down while it was still provisioning"):
        fake_mgr.create(profile="fake")
    assert ext.live == {} and fake_mgr.list() == []


# ------------------------------------------------------------ the typed boundary (issue 9)

def test_a_handle_that_is_not_the_backends_model_fails_the_create_naming_backend_and_method(fake_mgr):
    fake(fake_mgr).script("provision", lambda req: "sb-handle-as-a-string")
    with pytest.raises(BackendError, match=r"^ext\.fake\.provision returned str, not a FakeHandle: \(the whole value\): "
                                           r"Input should be a valid dictionary or instance of FakeHandle"):
        fake_mgr.create(profile="fake")
    (row,) = fake_mgr.state.list(states=None)
    assert row["state"] == "failed" and "ext.fake.provision returned str" in row["last_error"]


def test_a_teardown_report_that_does_not_fit_is_a_failed_teardown_not_a_terminated_sandbox(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    fake(fake_mgr).script("teardown", lambda handle: {"already_gone": "perhaps", "freed": 3})
    with pytest.raises(TeardownError, match=r"ext\.fake\.teardown returned dict, not a TeardownReport: "
                                            r"already_gone: Input should be a valid boolean"):
        fake_mgr.teardown(sb.id)
    assert fake_mgr.get(sb.id).state is SandboxState.TEARDOWN_FAILED
    assert fake_mgr.teardown(sb.id).state is SandboxState.TERMINATED  # the next, honest teardown ends it


def test_the_backend_gets_its_own_handle_model_back_and_the_store_keeps_json(fake_mgr):
    from sandboxer.extensions.fake import FakeHandle

    sb = fake_mgr.create(profile="fake")
    stored = fake_mgr.state.get(sb.id)["handle"]
    assert stored == {"host": "fake", "fake_id": stored["fake_id"], "sandbox_id": sb.id}
    fake_mgr.exec(sb.id, ["true"])
    (_, (handle, argv)) = next(c for c in fake(fake_mgr).calls if c[0] == "exec")
    assert type(handle) is FakeHandle and handle.fake_id == stored["fake_id"]


def test_a_recorded_handle_that_no_longer_fits_is_an_error_naming_the_sandbox(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    fake_mgr.state.transition(sb.id, "tampered", handle={"fake_id": None})
    with pytest.raises(BackendError, match=rf"^exec in sandbox {sb.id}: the recorded handle does not fit ext\.fake's "
                                           r"FakeHandle: fake_id: Input should be a valid string; the record was "
                                           r"written by another version of ext\.fake"):
        fake_mgr.exec(sb.id, ["true"])
