"""Lifecycle correctness under faults (issue 8): lost sandboxes, duplicates, stale judgements,
teardown racing a create, budgets, forced teardowns, missing extensions, restore inputs, name claims,
per-credential auth cooldowns. On the fake and saas-stub backends; the real backends have their own."""

from __future__ import annotations

import threading
import time

import pytest

from sandboxer import AuthError, BudgetExceeded, InputError, Manager, TeardownError
from sandboxer.errors import ConfigError, SandboxStateError
from sandboxer.extensions.fake import FakeExtension
from sandboxer.models import SandboxState
from tests.conftest import FAKE_EXT
from tests.unit.test_router import profile, stub


def fake(mgr: Manager) -> FakeExtension:
    return mgr.extension("ext.fake")  # type: ignore[return-value]


def kinds(mgr: Manager, sandbox_id: str) -> list[str]:
    return [e["kind"] for e in mgr.events(sandbox_id)]


# ------------------------------------------------------------------ lost sandboxes

def test_gc_marks_a_sandbox_killed_by_its_provider_lost_and_stops_its_meter(cfg, make_manager):
    stub(cfg, "a", per_vcpu=0.01)
    profile(cfg, "p", ["{extension: ext.a}"])
    mgr = make_manager()
    sb = mgr.create(profile="p", consumer="carol")
    mgr.gc()  # seen alive now
    seen = mgr.state.get(sb.id)["last_seen_at"]
    ext = mgr.extension("ext.a")
    ext.kill(sb.reachability["url"].removeprefix("stub://"))  # the provider ends it behind our back
    time.sleep(0.3)
    report = mgr.gc()
    assert report.lost == [sb.id]
    st = mgr.get(sb.id)
    assert st.state is SandboxState.LOST and "no longer has this sandbox" in st.last_error
    (rec,) = mgr.metering.records()
    assert rec["end"] == pytest.approx(seen, abs=0.01)  # billed until last seen alive, not until now
    with pytest.raises(SandboxStateError, match=f"cannot exec in sandbox {sb.id}: it is lost.*no longer has"):
        mgr.exec(sb.id, ["echo", "hi"])
    assert mgr.teardown(sb.id).state is SandboxState.LOST  # nothing to do: idempotent
    assert "lost" in kinds(mgr, sb.id)


def test_status_refresh_notices_a_lost_sandbox_and_plain_status_does_not_ask(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    fake(fake_mgr).live.clear()
    assert fake_mgr.get(sb.id).state is SandboxState.READY  # no backend call without refresh
    assert fake_mgr.get(sb.id, refresh=True).state is SandboxState.LOST
    assert fake_mgr.list() == []


def test_a_probe_that_cannot_tell_changes_nothing(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    fake(fake_mgr).script("probe", lambda handle: None)
    assert fake_mgr.get(sb.id, refresh=True).state is SandboxState.READY


# ------------------------------------------------------------------ duplicates from retried creates

def test_gc_reaps_a_duplicate_made_by_a_retried_create_and_keeps_the_sandbox(cfg, make_manager):
    cfg.write("ext.dup.yaml", """
        id: ext.dup
        title: provider that ignores idempotency keys
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {isolation_levels: [microvm], pricing_model: metered, features: [exec, list_owned]}
        config: {duplicate_creates: true}
    """)
    profile(cfg, "p", ["{extension: ext.dup}"])
    mgr = make_manager()
    sb = mgr.create(profile="p")
    ext = mgr.extension("ext.dup")
    assert len(ext.live()["live"]) == 2  # the provider made two for one create
    report = mgr.gc()
    assert len(report.orphans) == 1 and report.orphans[0].startswith(f"{sb.id} (duplicate stub-")
    (left,) = ext.live()["live"]
    assert left == mgr.state.get(sb.id)["handle"]["stub_id"]
    assert mgr.get(sb.id).state is SandboxState.READY and mgr.exec(sb.id, ["echo", "ok"]).stdout == "ok\n"
    assert mgr.gc().orphans == []


# ------------------------------------------------------------------ stale judgements

def test_gc_does_not_take_over_a_teardown_another_process_started_recently(fake_mgr, make_manager):
    sb = fake_mgr.create(profile="fake")
    # long ready: judged from ready_at, the teardown that just started would look stale
    fake_mgr.state.transition(sb.id, "teardown_started", state="tearing_down", ready_at=time.time() - 3600,
                              teardown_started_at=time.time())
    other = make_manager(stale_grace=0)  # another process on the same store
    report = other.gc()
    assert report.retried == [] and fake(fake_mgr).calls[-1][0] != "teardown"
    fake_mgr.state.transition(sb.id, "teardown_stuck", teardown_started_at=time.time() - 3600)
    assert other.gc().retried == [sb.id]


def test_gc_in_another_process_waits_for_the_backends_own_deadline(fake_mgr, make_manager, monkeypatch):
    monkeypatch.setattr(FakeExtension, "deadline", lambda self, profile: 60.0)
    release = threading.Event()

    def slow_provision(req):
        release.wait(10)
        return {"fake_id": "slow", "sandbox_id": req.sandbox_id}

    fake(fake_mgr).script("provision", slow_provision)
    out: list = []
    t = threading.Thread(target=lambda: out.append(fake_mgr.create(profile="fake")))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not fake_mgr.list() and time.monotonic() < deadline:
            time.sleep(0.01)
        (row,) = fake_mgr.state.list()
        # past the profile's 5 s ready timeout, but inside the backend's 60 s deadline
        fake_mgr.state.transition(row["id"], "backdate", created_at=time.time() - 10)
        other = make_manager(stale_grace=0)
        assert other.gc().stale_provisioning == []
    finally:
        release.set()
        t.join(10)
    assert out and out[0].state is SandboxState.READY


# ------------------------------------------------------------------ teardown during a create

def test_teardown_during_an_inflight_create_waits_and_the_sandbox_ends_absent(fake_mgr):
    ext = fake(fake_mgr)
    provisioning, release = threading.Event(), threading.Event()

    def provision(req):
        provisioning.set()
        release.wait(10)
        ext.live["fx"] = {"sandbox_id": req.sandbox_id, "owner_labels": req.owner_labels}
        return {"fake_id": "fx", "sandbox_id": req.sandbox_id}

    ext.script("provision", provision)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            fake_mgr.create(profile="fake")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=create)
    t.start()
    assert provisioning.wait(5)
    (row,) = fake_mgr.state.list()
    threading.Timer(0.2, release.set).start()
    done = fake_mgr.teardown(row["id"])  # not refused: waits for the create to undo itself
    t.join(10)
    assert done.state is SandboxState.TERMINATED
    assert ext.live == {}
    assert len(errors) == 1 and isinstance(errors[0], SandboxStateError)
    assert "teardown_requested" in kinds(fake_mgr, row["id"])


# ------------------------------------------------------------------ budgets

def test_a_budget_skips_the_dear_backend_and_routes_to_a_free_one(cfg, make_manager):
    stub(cfg, "dear", per_vcpu=0.001)
    stub(cfg, "free", per_vcpu=0.0)
    profile(cfg, "p", ["{extension: ext.dear}", "{extension: ext.free}"])
    (cfg.root / "settings.yaml").write_text("budgets:\n  alice: {limit: 1.0, period: day}\n")
    mgr = make_manager()
    sb = mgr.create(profile="p", consumer="alice", ttl="1h")  # 3.6 on ext.dear, 0 on ext.free
    assert sb.extension == "ext.free"
    (intent,) = [e for e in mgr.events(sb.id) if e["kind"] == "create_intent"]
    (skip,) = intent["detail"]["route"]["tried_before"]
    assert skip["backend"] == "ext.dear" and skip["error"].startswith("BudgetExceeded: consumer 'alice'")
    assert mgr.extension("ext.dear").live()["created"] == 0


def test_over_budget_everywhere_is_still_budget_exceeded(cfg, make_manager):
    stub(cfg, "a", per_vcpu=0.001)
    stub(cfg, "b", per_vcpu=0.002)
    profile(cfg, "p", ["{extension: ext.a}", "{extension: ext.b}"])
    (cfg.root / "settings.yaml").write_text("budgets:\n  alice: {limit: 1.0, period: day}\n")
    mgr = make_manager()
    with pytest.raises(BudgetExceeded, match="consumer 'alice'") as e:
        mgr.create(profile="p", consumer="alice", ttl="1h")
    assert "ext.a" in "".join(e.value.__notes__) and "ext.b" in "".join(e.value.__notes__)
    assert mgr.state.list(states=None) == []


# ------------------------------------------------------------------ forced teardown

def test_teardown_failed_has_a_way_out_force_then_forget(fake_mgr):
    sb = fake_mgr.create(profile="fake")
    ext = fake(fake_mgr)
    broken = TeardownError("host is gone for good", backend="ext.fake")
    ext.script("teardown", broken, broken, broken)
    with pytest.raises(TeardownError):
        fake_mgr.teardown(sb.id)
    assert fake_mgr.get(sb.id).state is SandboxState.TEARDOWN_FAILED
    with pytest.raises(InputError, match="forget needs force"):
        fake_mgr.teardown(sb.id, forget=True)
    with pytest.raises(TeardownError):
        fake_mgr.teardown(sb.id, force=True)  # retried, still failing: stays teardown_failed
    assert fake_mgr.get(sb.id).state is SandboxState.TEARDOWN_FAILED
    done = fake_mgr.teardown(sb.id, force=True, forget=True)
    assert done.state is SandboxState.TERMINATED and "forgotten by the operator" in done.last_error
    (ev,) = [e for e in fake_mgr.events(sb.id) if e["kind"] == "forgotten"]
    assert ev["detail"]["confirmed_gone_by"] == "operator" and "host is gone for good" in ev["detail"]["error"]
    (rec,) = fake_mgr.metering.records()
    assert rec["end"] is not None


# ------------------------------------------------------------------ a missing extension

def test_teardown_and_gc_without_the_sandboxs_extension_change_nothing(fake_mgr, home, tmp_path):
    sb = fake_mgr.create(profile="fake")
    fake_mgr.state.transition(sb.id, "expire", expires_at=time.time() - 1)
    empty = tmp_path / "other-config"
    empty.mkdir()
    other = Manager(config_dirs=[empty], home=home)
    try:
        with pytest.raises(ConfigError, match=f"sandbox {sb.id} runs on extension 'ext.fake', which is not defined"):
            other.teardown(sb.id)
        report = other.gc()
        assert "ext.fake" in report.errors[sb.id] and report.expired == []
        assert other.get(sb.id).state is SandboxState.READY
    finally:
        other.close()
    assert fake_mgr.teardown(sb.id).state is SandboxState.TERMINATED


# ------------------------------------------------------------------ inputs

REQ_PROFILE = """
    slug: needs-repo
    extension: ext.fake
    inputs: {required: [repo], defaults: {vm: builder}}
"""


def test_restore_uses_the_inputs_the_snapshot_was_made_with(cfg, make_manager):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.needs-repo.yaml", REQ_PROFILE)
    mgr = make_manager()
    sb = mgr.create(profile="needs-repo", inputs={"repo": "https://git.example/r.git"})
    snap = mgr.snapshot(sb.id)
    assert snap.inputs == {"repo": "https://git.example/r.git"}
    back = mgr.restore(snap.id, ttl=120, labels={"k": "v"})
    (_, (req,)) = [c for c in fake(mgr).calls if c[0] == "provision"][-1]
    inputs = req.inputs
    assert inputs["repo"] == "https://git.example/r.git" and back.labels == {"k": "v"}
    over = mgr.restore(snap.id, inputs={"repo": "https://git.example/other.git"})
    (_, (req,)) = [c for c in fake(mgr).calls if c[0] == "provision"][-1]
    inputs = req.inputs
    assert inputs["repo"] == "https://git.example/other.git" and over.state is SandboxState.READY


def test_an_input_replaces_a_default_it_excludes(cfg, make_manager, monkeypatch):
    monkeypatch.setattr(FakeExtension, "exclusive_inputs", (frozenset({"vm", "ssh_target"}),))
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.needs-repo.yaml", REQ_PROFILE)
    mgr = make_manager()
    mgr.create(profile="needs-repo", inputs={"repo": "r", "ssh_target": "me@127.0.0.1"})
    (_, (req,)) = [c for c in fake(mgr).calls if c[0] == "provision"][-1]
    inputs = req.inputs
    assert inputs["ssh_target"] == "me@127.0.0.1" and "vm" not in inputs
    mgr.create(profile="needs-repo", inputs={"repo": "r"})
    (_, (req,)) = [c for c in fake(mgr).calls if c[0] == "provision"][-1]
    inputs = req.inputs
    assert inputs["vm"] == "builder"


def test_a_refused_input_does_not_search_the_backend_for_leftovers(fake_mgr):
    ext = fake(fake_mgr)
    ext.script("provision", InputError("ext.fake: input 'color' (value 'x\\n') is not a color"))
    with pytest.raises(InputError, match="not a color"):
        fake_mgr.create(profile="fake")
    assert "list_owned" not in [c[0] for c in ext.calls]
    assert [r["state"] for r in fake_mgr.state.list(states=None)] == ["failed"]


# ------------------------------------------------------------------ backend-side names

def test_two_live_sandboxes_never_share_a_backend_side_name(fake_mgr, monkeypatch):
    monkeypatch.setattr(FakeExtension, "resource_names",
                        lambda self, req: [str(req.inputs.get("project") or f"sbx-{req.sandbox_id}").casefold()])
    first = fake_mgr.create(profile="fake", inputs={"project": "Web"})
    with pytest.raises(InputError, match=f"'web' on ext.fake is already used by live sandbox {first.id}"):
        fake_mgr.create(profile="fake", inputs={"project": "WEB"})
    second = fake_mgr.create(profile="fake")  # takes its default name, sbx-<id>
    with pytest.raises(InputError, match=second.id):  # that default, chosen by a consumer
        fake_mgr.create(profile="fake", inputs={"project": f"sbx-{second.id}"})
    assert [r["id"] for r in fake_mgr.state.list(states=None)] == [first.id, second.id]  # nothing half-made
    assert len(fake(fake_mgr).live) == 2
    fake_mgr.teardown(first.id)
    again = fake_mgr.create(profile="fake", inputs={"project": "web"})  # free once the holder ended
    assert again.state is SandboxState.READY
    fake_mgr.gc()
    assert fake_mgr.state.claims_of(first.id) == []


# ------------------------------------------------------------------ auth cooldowns per credential

KEYED_STUB = """
    id: ext.keyed
    title: stub with per-consumer keys
    version: 1.0.0
    handler: sandboxer.extensions.saas_stub:SaasStubExtension
    capabilities: {isolation_levels: [microvm], pricing_model: metered, features: [exec, list_owned]}
    config:
      refuse_keys_with_prefix: "revoked-"
      consumer_keys: {alice: {env: SBX_TEST_ALICE_KEY}, bob: {env: SBX_TEST_BOB_KEY}}
"""


def test_a_refused_key_blocks_only_that_key_and_a_rotated_one_works_at_once(cfg, make_manager, monkeypatch):
    monkeypatch.setenv("SBX_TEST_ALICE_KEY", "revoked-alice-1")
    monkeypatch.setenv("SBX_TEST_BOB_KEY", "bob-good")
    cfg.write("ext.keyed.yaml", KEYED_STUB)
    profile(cfg, "p", ["{extension: ext.keyed}"])
    mgr = make_manager()
    with pytest.raises(AuthError, match="SBX_TEST_ALICE_KEY") as e:
        mgr.create(profile="p", consumer="alice")
    assert e.value.credential == "env SBX_TEST_ALICE_KEY"
    assert mgr.create(profile="p", consumer="bob").state is SandboxState.READY  # another key: not blocked
    tried = len(mgr.state.list(states=None))
    with pytest.raises(AuthError, match="SBX_TEST_ALICE_KEY.*not retried for"):  # still an AuthError
        mgr.create(profile="p", consumer="alice")
    assert len(mgr.state.list(states=None)) == tried  # the refused key was not sent again
    (ev,) = [e for e in mgr.events() if e["kind"] == "backend_blocked"]
    assert ev["detail"]["credential"] == "env SBX_TEST_ALICE_KEY" and "revoked-alice-1" not in str(ev)
    monkeypatch.setenv("SBX_TEST_ALICE_KEY", "alice-rotated")
    assert mgr.create(profile="p", consumer="alice").state is SandboxState.READY  # rotated: tried at once


# ------------------------------------------------------------------ the same through the CLI

def test_cli_status_shows_lost_and_teardown_force_forget(cfg, home):
    import json
    import os
    import sqlite3
    import subprocess
    import sys

    cfg.write("ext.flaky.yaml", """
        id: ext.flaky
        title: stub whose teardowns always fail
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {isolation_levels: [microvm], pricing_model: metered, features: [exec, list_owned]}
        config: {faults: [{stage: teardown, error: fatal, rate: 1.0}]}
    """)
    profile(cfg, "p", ["{extension: ext.flaky}"])
    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}

    def sbx(*args: str, code: int) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, text=True, env=env,
                           timeout=60)
        assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
        return p

    a = json.loads(sbx("create", "p", "--json", code=0).stdout)["id"]
    b = json.loads(sbx("create", "p", "--json", code=0).stdout)["id"]
    p = sbx("teardown", a, code=69)
    assert p.stderr.startswith("error: ") and "injected fatal at teardown" in p.stderr
    assert "--forget needs --force" in sbx("teardown", "--forget", a, code=64).stderr
    p = sbx("teardown", "--force", "--forget", "--yes", a, "--json", code=0)
    assert json.loads(p.stdout)["state"] == "terminated"
    # the "provider" drops b behind our back: status (which asks the backend) says lost
    db = sqlite3.connect(home / "saas-stub" / "ext.flaky.db")
    db.execute("DELETE FROM live WHERE sandbox_id = ?", (b,))
    db.commit()
    db.close()
    assert json.loads(sbx("status", b, "--json", "--no-refresh", code=0).stdout)["state"] == "ready"
    st = json.loads(sbx("status", b, "--json", code=0).stdout)
    assert st["state"] == "lost" and "no longer has this sandbox" in st["last_error"]
    assert json.loads(sbx("list", "--json", code=0).stdout) == []
