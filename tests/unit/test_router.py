"""Burst routing, fallback, admission control, budgets, export and the snapshot catalog, on saas-stub backends."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import run_threads

from sandboxer import BudgetExceeded, CapabilityError, RoutingError, SnapshotError
from sandboxer.errors import ConfigError


def stub(cfg, name, *, capacity=1000, latency=0.0, faults="[]", per_vcpu=0.00001):
    cfg.write(f"ext.{name}.yaml", f"""
        id: ext.{name}
        title: stub {name}
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {{isolation_levels: [microvm], pricing_model: metered, features: [exec, snapshots, metering, list_owned]}}
        pricing: {{per_vcpu_second: {per_vcpu}, source: test, as_of: "2026-11-01"}}
        config: {{latency_s: {latency}, capacity: {capacity}, faults: {faults}}}
    """)


def profile(cfg, slug, backends, routing="priority", ttl="{default: 10m, max: 1h}"):
    lines = "\n".join(f"  - {b}" for b in backends)
    cfg.write(f"profile.{slug}.yaml", f"slug: {slug}\nrouting: {routing}\nttl: {ttl}\nresources: {{cpu: 1}}\nbackends:\n{lines}\n")


def table(mgr, ext_id):
    return mgr.extension(ext_id).live()


def test_burst_never_over_admits_and_leaks_nothing(cfg, make_manager):
    caps = {"stub-a": 5, "stub-b": 10, "stub-c": 20}
    for name in caps:
        stub(cfg, name, latency=0.002)
    profile(cfg, "burst", [f"{{extension: ext.{n}, capacity: {c}}}" for n, c in caps.items()])
    mgr = make_manager()
    served, refused, other = [], [], []
    start = threading.Barrier(500)

    def one():
        start.wait()
        try:
            sb = mgr.create(profile="burst")
        except RoutingError as exc:
            refused.append(exc)
            return
        except Exception as exc:  # noqa: BLE001
            other.append(exc)
            return
        time.sleep(0.02)
        mgr.teardown(sb.id)
        served.append(sb)

    run_threads(one, 500, timeout=300)
    assert other == []
    assert len(served) + len(refused) == 500 and served
    for name, cap in caps.items():
        t = table(mgr, f"ext.{name}")
        assert t["peak"] <= cap, f"{name} admitted {t['peak']} > {cap}"
        assert t["live"] == {}
    for exc in refused:
        assert [a["backend"] for a in exc.attempts] == [f"ext.{n}" for n in caps]
        assert all("full" in a["error"] for a in exc.attempts)
    assert mgr.list() == []
    assert {r["state"] for r in mgr.state.list(states=None)} == {"terminated"}


def test_rate_limited_primary_falls_back_and_late_success_is_reaped(cfg, make_manager):
    stub(cfg, "primary", faults="[{stage: provision, error: rate_limited, retry_after: 30, rate: 1.0, "
                                "late_success: true, late_after_s: 0.3}]")
    stub(cfg, "fallback")
    profile(cfg, "burst", ["{extension: ext.primary}", "{extension: ext.fallback}"])
    mgr = make_manager(stale_grace=0)
    sb = mgr.create(profile="burst")
    assert sb.extension == "ext.fallback"
    first = next(r for r in mgr.state.list(states=None) if r["extension"] == "ext.primary")
    assert first["state"] == "failed" and "RateLimited" in first["last_error"]
    # the primary is now blocked for its retry_after: the next create does not even try it
    sb2 = mgr.create(profile="burst")
    assert sb2.extension == "ext.fallback"
    kinds = [e["kind"] for e in mgr.events() if e["extension"] == "ext.primary"]
    assert "backend_blocked" in kinds
    (intent,) = [e for e in mgr.events(sb2.id) if e["kind"] == "create_intent"]
    (skip,) = intent["detail"]["route"]["tried_before"]
    assert skip["backend"] == "ext.primary" and "blocked" in skip["error"]
    time.sleep(0.5)  # the abandoned create completes late on the primary
    late = table(mgr, "ext.primary")["live"]
    assert [v["sandbox_id"] for v in late.values()] == [first["id"]]
    report = mgr.gc()
    assert report.orphans == [first["id"]]
    assert table(mgr, "ext.primary")["live"] == {}


def test_auth_error_blocks_backend_for_cooldown(cfg, make_manager, monkeypatch):
    import sandboxer.router as router

    monkeypatch.setattr(router, "AUTH_COOLDOWN_S", 0.3)
    stub(cfg, "primary", faults="[{stage: provision, error: auth, rate: 1.0}]")
    stub(cfg, "fallback")
    profile(cfg, "p", ["{extension: ext.primary}", "{extension: ext.fallback}"])
    mgr = make_manager()
    assert mgr.create(profile="p").extension == "ext.fallback"
    blocked = [e for e in mgr.events() if e["kind"] == "backend_blocked"]
    assert blocked[0]["extension"] == "ext.primary" and "credentials refused" in blocked[0]["detail"]["reason"]
    attempts_before = len([r for r in mgr.state.list(states=None) if r["extension"] == "ext.primary"])
    mgr.create(profile="p")
    assert len([r for r in mgr.state.list(states=None) if r["extension"] == "ext.primary"]) == attempts_before
    time.sleep(0.35)
    mgr.create(profile="p")  # cooldown over: the primary is tried (and refused) again
    assert len([r for r in mgr.state.list(states=None) if r["extension"] == "ext.primary"]) == attempts_before + 1


def test_every_backend_failing_lists_each_attempt(cfg, make_manager):
    stub(cfg, "a", faults="[{stage: provision, error: capacity, rate: 1.0}]")
    stub(cfg, "b", faults="[{stage: provision, error: transient, rate: 1.0}]")
    profile(cfg, "p", ["{extension: ext.a}", "{extension: ext.b}"])
    mgr = make_manager()
    with pytest.raises(RoutingError) as e:
        mgr.create(profile="p")
    assert [(a["backend"], a["error"].split(":")[0]) for a in e.value.attempts] == [
        ("ext.a", "CapacityUnavailable"), ("ext.b", "ProvisionError")]
    assert "no backend could serve profile 'p'" in str(e.value) and "ext.b (host -)" in str(e.value)
    assert mgr.list() == []


def test_fatal_provision_error_stops_routing(cfg, make_manager):
    stub(cfg, "a", faults="[{stage: provision, error: fatal, rate: 1.0}]")
    stub(cfg, "b")
    profile(cfg, "p", ["{extension: ext.a}", "{extension: ext.b}"])
    mgr = make_manager()
    with pytest.raises(RoutingError) as e:
        mgr.create(profile="p")
    assert [a["backend"] for a in e.value.attempts] == ["ext.a"]
    assert table(mgr, "ext.b")["created"] == 0


def test_failed_cleanup_stops_falling_over(cfg, make_manager):
    stub(cfg, "a", faults="[{stage: ready, error: timeout, rate: 1.0}, {stage: teardown, error: fatal, rate: 1.0}]")
    stub(cfg, "b")
    profile(cfg, "p", ["{extension: ext.a}", "{extension: ext.b}"])
    mgr = make_manager()
    with pytest.raises(RoutingError, match="could not be cleaned up") as e:
        mgr.create(profile="p")
    assert [a["backend"] for a in e.value.attempts] == ["ext.a"]
    assert table(mgr, "ext.b")["created"] == 0
    assert [r["state"] for r in mgr.state.list(states=None)] == ["teardown_failed"]


def test_cheapest_policy_and_cost_ceiling(cfg, make_manager):
    stub(cfg, "dear", per_vcpu=0.001)
    stub(cfg, "cheap", per_vcpu=0.00001)
    profile(cfg, "p", ["{extension: ext.dear}", "{extension: ext.cheap}"], routing="cheapest")
    profile(cfg, "capped", ["{extension: ext.dear, cost_ceiling: 0.01}", "{extension: ext.cheap}"])
    mgr = make_manager()
    assert mgr.create(profile="p").extension == "ext.cheap"
    quotes = {q.extension: q.amount for q in mgr.quote("p", 3600)}
    assert quotes == {"ext.dear": 3.6, "ext.cheap": 0.036}
    assert mgr.create(profile="capped", ttl="10m").extension == "ext.cheap"


def test_budget_refuses_before_provisioning(cfg, make_manager):
    stub(cfg, "a", per_vcpu=0.001)
    profile(cfg, "p", ["{extension: ext.a}"])
    (cfg.root / "settings.yaml").write_text("budgets:\n  alice: {limit: 1.0, period: day}\n")
    mgr = make_manager()
    with pytest.raises(BudgetExceeded, match="consumer 'alice' has a budget of 1 USD per day.*nothing was provisioned"):
        mgr.create(profile="p", consumer="alice", ttl="1h")  # quoted 3.6
    assert table(mgr, "ext.a")["created"] == 0 and mgr.state.list(states=None) == []
    sb = mgr.create(profile="p", consumer="alice", ttl="10m")  # 0.6: fits
    with pytest.raises(BudgetExceeded):
        mgr.create(profile="p", consumer="alice", ttl="10m")  # 0.6 committed + 0.6 > 1
    mgr.create(profile="p", consumer="bob", ttl="1h")  # no budget for bob
    mgr.teardown(sb.id)


def test_metered_actuals_and_report(cfg, make_manager):
    stub(cfg, "a", per_vcpu=0.01)
    profile(cfg, "p", ["{extension: ext.a}"])
    mgr = make_manager()
    sb = mgr.create(profile="p", consumer="carol")
    time.sleep(0.2)
    mgr.teardown(sb.id)
    (rec,) = mgr.metering.records()
    assert rec["id"] == f"{sb.id}:{rec['period']}" and rec["consumer"] == "carol"
    assert 0.2 <= rec["seconds"] < 2 and rec["amount"] == pytest.approx(rec["seconds"] * 0.01, rel=0.01)
    rep = mgr.metering.report(by="backend")
    assert rep["ext.a"]["sandboxes"] == 1 and rep["ext.a"]["amount"] == pytest.approx(rec["amount"], rel=0.01)


def test_usage_interval_closes_at_last_seen_after_downtime(cfg, make_manager):
    stub(cfg, "a", per_vcpu=0.01)
    profile(cfg, "p", ["{extension: ext.a}"])
    mgr = make_manager()
    sb = mgr.create(profile="p")
    mgr.gc()  # sees it alive
    seen = mgr.state.get(sb.id)["last_seen_at"]
    ext = mgr.extension("ext.a")
    ext.teardown(ext.Handle.model_validate(mgr.state.get(sb.id)["handle"]))  # it dies while we are "down"
    time.sleep(0.3)
    mgr.teardown(sb.id)
    (rec,) = mgr.metering.records()
    assert rec["end"] == pytest.approx(seen, abs=0.01)


class _Hook(http.server.BaseHTTPRequestHandler):
    fail_first = 2
    bodies: list[bytes] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
        else:
            type(self).bodies.append(body)
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_export_is_idempotent_and_webhook_delivers_exactly_once(cfg, make_manager, tmp_path):
    stub(cfg, "a")
    profile(cfg, "p", ["{extension: ext.a}"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (cfg.root / "settings.yaml").write_text(textwrap.dedent(f"""
            sinks:
              file: {{kind: file, path: {tmp_path / 'usage.jsonl'}}}
              hook: {{kind: webhook, url: "http://127.0.0.1:{server.server_port}/usage", retries: 3, backoff_s: 0.01}}
        """))
        mgr = make_manager()
        for _ in range(3):
            mgr.teardown(mgr.create(profile="p").id)
        assert mgr.metering.records() == mgr.metering.records()
        assert mgr.metering.export(sink="file") == {"queued": 3, "delivered": 3, "pending": 0}
        assert mgr.metering.export(sink="file") == {"queued": 0, "delivered": 0, "pending": 0}
        lines = (tmp_path / "usage.jsonl").read_text().splitlines()
        assert len(lines) == 3 and len({json.loads(x)["id"] for x in lines}) == 3

        assert mgr.metering.export(sink="hook")["delivered"] == 3  # after two 503s
        assert mgr.metering.export(sink="hook")["queued"] == 0
        got = [json.loads(x)["id"] for b in _Hook.bodies for x in b.decode().splitlines()]
        assert sorted(got) == sorted(json.loads(x)["id"] for x in lines)
        with pytest.raises(ConfigError, match="unknown sink 'nope'"):
            mgr.metering.export(sink="nope")
    finally:
        server.shutdown()


def test_failed_push_is_kept_and_retried(cfg, make_manager):
    stub(cfg, "a")
    profile(cfg, "p", ["{extension: ext.a}"])
    (cfg.root / "settings.yaml").write_text(
        'sinks:\n  hook: {kind: webhook, url: "http://127.0.0.1:9/usage", retries: 0, timeout_s: 1}\n')
    mgr = make_manager()
    mgr.teardown(mgr.create(profile="p").id)
    assert mgr.metering.export(sink="hook") == {"queued": 1, "delivered": 0, "pending": 1}
    assert mgr.metering.export(sink="hook") == {"queued": 0, "delivered": 0, "pending": 1}


def test_snapshot_catalog_round_trip_and_partial_failure(cfg, make_manager):
    stub(cfg, "a")
    stub(cfg, "broken", faults="[{stage: snapshot, error: fatal, rate: 1.0}]")
    profile(cfg, "p", ["{extension: ext.a}"])
    profile(cfg, "q", ["{extension: ext.broken}"])
    mgr = make_manager()
    sb = mgr.create(profile="p", consumer="dave")
    snap = mgr.snapshot(sb.id)
    assert [s.id for s in mgr.snapshots()] == [snap.id]
    assert snap.sandbox_id == sb.id and snap.extension == "ext.a" and snap.consumer == "dave"
    restored = mgr.restore(snap.id)
    assert restored.extension == "ext.a" and restored.id != sb.id
    mgr.delete_snapshot(snap.id)
    assert mgr.snapshots() == []

    bad = mgr.create(profile="q")
    with pytest.raises(SnapshotError, match="injected fatal at snapshot"):
        mgr.snapshot(bad.id)
    assert mgr.snapshots() == []
    assert [r["state"] for r in mgr.state.list_snapshots(states=("pending", "ready", "failed"))] == ["failed"]


def test_backend_without_snapshots_is_refused_before_work(cfg, make_manager):
    cfg.write("ext.nosnap.yaml", """
        id: ext.nosnap
        title: no snapshots
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {isolation_levels: [microvm], pricing_model: free, features: [exec]}
        config: {latency_s: 0}
    """)
    profile(cfg, "p", ["{extension: ext.nosnap}"])
    mgr = make_manager()
    sb = mgr.create(profile="p")
    with pytest.raises(CapabilityError, match="ext.nosnap does not support snapshots"):
        mgr.snapshot(sb.id)
    assert mgr.state.list_snapshots(states=("pending", "ready", "failed")) == []


ADMIT = textwrap.dedent("""
    import sys, time
    from concurrent.futures import ThreadPoolExecutor
    from sandboxer import Manager, RoutingError, CapacityUnavailable
    mgr = Manager(config_dirs=[sys.argv[1]], home=sys.argv[2])
    def one(_):
        try:
            sb = mgr.create(profile="shared")
        except CapacityUnavailable:
            return 0
        time.sleep(0.03)
        mgr.teardown(sb.id)
        return 1
    with ThreadPoolExecutor(16) as pool:
        print(sum(pool.map(one, range(40))))
""")


def test_admission_is_atomic_across_processes(cfg, home, tmp_path, make_manager):
    stub(cfg, "shared")
    profile(cfg, "shared", ["{extension: ext.shared, capacity: 4}"])
    make_manager()  # creates the store
    script = tmp_path / "admit.py"
    script.write_text(ADMIT)
    procs = [subprocess.Popen([sys.executable, str(script), str(cfg.root), str(home)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    served = [int(p.communicate(timeout=240)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs) and sum(served) > 0
    from sandboxer import Manager

    mgr = Manager(config_dirs=[cfg.root], home=home)
    t = mgr.extension("ext.shared").live()
    mgr.close()
    assert t["peak"] <= 4 and t["live"] == {}
