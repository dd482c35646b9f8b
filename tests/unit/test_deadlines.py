"""Every extension call has a deadline: a handler that hangs is abandoned and the manager goes on."""

from __future__ import annotations

import threading
import time

import pytest

from sandboxer import ExtensionTimeout, Manager, RoutingError, TeardownError
from sandboxer.deadline import Caller, CallLimits
from sandboxer.extensions.fake import FakeExtension
from sandboxer.models import SandboxState
from tests.conftest import FAKE_EXT

QUICK = CallLimits(teardown=0.5, snapshot=0.5, list_owned=0.5, probe=0.5, meter=0.5, exec=0.5, exec_grace=0.3,
                   ready_grace=0.2)

STUB = """
    id: ext.stub
    title: stub
    version: 1.0.0
    handler: sandboxer.extensions.saas_stub:SaasStubExtension
    capabilities: {isolation_levels: [microvm], pricing_model: free, features: [exec, list_owned]}
"""

PROFILE = """
    slug: quick
    extension: ext.fake
    ready_timeout: 0.5s
"""


@pytest.fixture
def release():
    """Set at the end of the test, so every hung handler returns and its worker thread ends."""
    ev = threading.Event()
    yield ev
    ev.set()


@pytest.fixture
def mgr(cfg, make_manager) -> Manager:
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.quick.yaml", PROFILE)
    return make_manager(call_limits=QUICK)


def fake(m: Manager) -> FakeExtension:
    return m.extension("ext.fake")  # type: ignore[return-value]


def hang(release: threading.Event, then=None):
    def step(*args):
        release.wait(30)
        return then(*args) if then else None
    return step


def test_a_hung_wait_ready_fails_the_create_at_its_deadline_and_cleans_up(mgr, release):
    fake(mgr).script("wait_ready", hang(release))
    t0 = time.monotonic()
    with pytest.raises(ExtensionTimeout, match=r"ext.fake: wait_ready of sandbox sb-\w+ did not return within 0.7s"):
        mgr.create(profile="quick")
    assert time.monotonic() - t0 < 3
    (row,) = mgr.state.list(states=None)
    assert row["state"] == "failed" and fake(mgr).live == {}  # torn down before raising


def test_a_provision_that_returns_after_its_deadline_is_undone_when_it_does(mgr, release, monkeypatch):
    monkeypatch.setattr(FakeExtension, "deadline", lambda self, profile: 0.3)
    ext = fake(mgr)

    def late(req):
        release.wait(30)
        ext.live["late"] = {"sandbox_id": req.sandbox_id, "owner_labels": req.owner_labels}
        return {"fake_id": "late", "sandbox_id": req.sandbox_id}

    ext.script("provision", late)
    with pytest.raises(ExtensionTimeout, match="provision of sandbox"):
        mgr.create(profile="quick")
    (row,) = mgr.state.list(states=None)
    assert row["state"] == "failed"
    release.set()  # the hung provision returns now, with a handle: the manager undoes it
    deadline = time.monotonic() + 5
    while "late_provision_undone" not in [e["kind"] for e in mgr.events(row["id"])] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "late_provision_undone" in [e["kind"] for e in mgr.events(row["id"])]
    assert ext.live == {}


def test_a_hung_teardown_is_a_failed_teardown_and_gc_goes_on_with_the_others(mgr, release):
    stuck, other = mgr.create(profile="quick"), mgr.create(profile="quick")
    for sb in (stuck, other):
        mgr.state.transition(sb.id, "expire", expires_at=time.time() - 1)
    fake(mgr).script("teardown", hang(release))  # the first teardown gc runs hangs
    t0 = time.monotonic()
    report = mgr.gc()
    assert time.monotonic() - t0 < 5
    assert report.expired == [other.id] and "did not return within 0.5s" in report.errors[stuck.id]
    assert mgr.get(stuck.id).state is SandboxState.TEARDOWN_FAILED
    assert mgr.get(other.id).state is SandboxState.TERMINATED


def test_one_hung_backend_does_not_keep_gc_from_reaping_another(cfg, mgr, release):
    cfg.write("ext.stub.yaml", STUB)
    cfg.write("profile.stub.yaml", "slug: stub\nextension: ext.stub\n")
    m = Manager(config_dirs=[cfg.root], home=mgr.home, call_limits=QUICK)
    try:
        m.create(profile="quick")
        sb = m.create(profile="stub")
        m.state.transition(sb.id, "forgotten_by_a_crash", state="failed")  # an orphan on ext.stub
        fake(m).script("list_owned", hang(release))
        t0 = time.monotonic()
        report = m.gc()
        assert time.monotonic() - t0 < 3
        assert "ext.fake: list_owned did not return within 0.5s" in report.errors["ext.fake"]
        assert report.orphans == [sb.id] and m.extension("ext.stub").live()["live"] == {}
    finally:
        for s in m.list():
            m.teardown(s.id)
        m.close()


def test_a_hung_exec_returns_at_its_deadline(mgr, release):
    sb = mgr.create(profile="quick")
    fake(mgr).script("exec", hang(release))
    t0 = time.monotonic()
    with pytest.raises(ExtensionTimeout, match=r"exec in sandbox .* did not return within 1.3s"):
        mgr.exec(sb.id, ["sleep", "100"], timeout=1.0)
    assert 1.2 < time.monotonic() - t0 < 3
    assert mgr.exec(sb.id, ["echo", "hi"]).stdout == "echo hi\n"  # the manager and the sandbox go on


def test_a_hung_backend_falls_back_to_the_next(cfg, make_manager, release):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("ext.stub.yaml", STUB)
    cfg.write("profile.two.yaml", """
        slug: two
        ready_timeout: 0.5s
        backends: [{extension: ext.fake}, {extension: ext.stub}]
    """)
    m = make_manager(call_limits=QUICK)
    fake(m).script("wait_ready", hang(release))
    sb = m.create(profile="two")
    assert sb.extension == "ext.stub"
    (intent,) = [e for e in m.events(sb.id) if e["kind"] == "create_intent"]
    assert intent["detail"]["route"]["tried_before"][0]["error"].startswith("ExtensionTimeout: ext.fake: wait_ready")


def test_a_hung_teardown_of_a_failed_attempt_stops_routing(cfg, make_manager, release):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.two.yaml", """
        slug: two
        ready_timeout: 0.5s
        backends: [{extension: ext.fake}, {extension: ext.saas-stub}]
    """)
    m = make_manager(call_limits=QUICK)
    fake(m).script("wait_ready", hang(release))
    fake(m).script("teardown", hang(release))
    with pytest.raises(RoutingError, match="could not be cleaned up"):
        m.create(profile="two")
    assert [r["state"] for r in m.state.list(states=None)] == ["teardown_failed"]
    release.set()
    fake(m).live.clear()


def test_the_caller_runs_calls_in_time_and_reuses_its_workers():
    c = Caller(max_workers=2)
    assert [c.call(lambda i=i: i * 2, timeout=1, what="double", backend="ext.x") for i in range(50)] == list(range(0, 100, 2))
    with pytest.raises(ValueError, match="boom"):
        c.call(lambda: (_ for _ in ()).throw(ValueError("boom")), timeout=1, what="raise", backend="ext.x")
    gate = threading.Event()
    with pytest.raises(ExtensionTimeout):
        c.call(gate.wait, 30, timeout=0.05, what="hang 1", backend="ext.x")
    with pytest.raises(ExtensionTimeout):
        c.call(gate.wait, 30, timeout=0.05, what="hang 2", backend="ext.x")
    with pytest.raises(ExtensionTimeout, match="2 extension calls are already in flight"):
        c.call(lambda: 1, timeout=1, what="third", backend="ext.x")
    gate.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            assert c.call(lambda: 7, timeout=1, what="after", backend="ext.x") == 7
            break
        except ExtensionTimeout:
            time.sleep(0.01)
    else:
        raise AssertionError("the workers never came back")


def test_teardown_error_still_raised_in_time(mgr):
    sb = mgr.create(profile="quick")
    fake(mgr).script("teardown", TeardownError("nope", backend="ext.fake"))
    with pytest.raises(TeardownError, match="nope"):
        mgr.teardown(sb.id)
