"""Warm pools on ext.local: hand-out, refill, the cold path, capacity, gc, teardown, close."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sandboxer.errors import CapacityUnavailable
from sandboxer.models import POOL_CONSUMER
from sandboxer.pools import POOL_LABEL
from tests.pools.conftest import owned, pooled_ready, wait_for, write_pooled


def _end(mgr, sandbox_id: str) -> int:  # type: ignore[no-untyped-def]
    """The end ext.local's init keeps for a sandbox (epoch seconds)."""
    return int((mgr.extension("ext.local").root / ".meta" / f"{sandbox_id}.end").read_text())


def test_a_create_is_served_from_a_filled_pool(cfg, pool_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=2)
    mgr = pool_manager(refill=False)
    report = mgr.fill_pools()
    assert not report.errors and len(report.made["warm"]) == 2
    pooled = set(pooled_ready(mgr))
    assert pooled == set(report.made["warm"]) and owned(mgr) == pooled
    assert mgr.list() == []  # idle pooled sandboxes are not the consumer's: hidden by default
    for sb in mgr.list(pooled=True):
        assert sb.labels == {POOL_LABEL: "warm"} and sb.consumer == POOL_CONSUMER
    # provisioned for max_age plus a margin only
    assert all(_end(mgr, i) < time.time() + 5 * 60 + 200 for i in pooled)

    before = time.time()
    sb = mgr.create(profile="warm", consumer="alice")
    assert sb.id in pooled and sb.consumer == "alice" and sb.labels == {} and sb.state.value == "ready"
    # its TTL starts at hand-out, at the manager and at the backend (the profile's default, plus the init's grace)
    assert before + 600 - 1 <= sb.expires_at.timestamp() <= time.time() + 600 + 1
    assert before + 660 - 2 <= _end(mgr, sb.id) <= time.time() + 660 + 2
    assert mgr.exec(sb.id, ["echo", "hi"]).stdout == "hi\n"
    assert [s.id for s in mgr.list()] == [sb.id]
    kinds = [e["kind"] for e in mgr.events(sb.id)]
    assert kinds[-1] == "pool_handout" and "create_intent" in kinds
    usage = {u["sandbox_id"]: u for u in mgr.state.usage()}
    assert usage[sb.id]["consumer"] == "alice"  # its cost is the consumer's from here on

    second = mgr.create(profile="warm", consumer="bob", inputs={"ref": "main"})  # the defaults: still the pool's
    assert second.id in pooled and second.id != sb.id
    third = mgr.create(profile="warm", consumer="carol")  # the pool is empty: the cold path
    assert third.id not in pooled and third.consumer == "carol"


def test_the_refill_thread_makes_up_for_a_hand_out(cfg, pool_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=2)
    mgr = pool_manager()
    assert mgr.pools.running
    wait_for(lambda: len(pooled_ready(mgr)) == 2, what="a full pool")
    first = set(pooled_ready(mgr))
    sb = mgr.create(profile="warm", consumer="alice")
    assert sb.id in first
    wait_for(lambda: len(pooled_ready(mgr)) == 2, what="the pool refilled")
    now = set(pooled_ready(mgr))
    assert sb.id not in now and len(now - first) == 1
    time.sleep(0.3)  # and no more than its size
    assert len([s for s in mgr.list(pooled=True) if s.consumer == POOL_CONSUMER]) == 2


def test_close_stops_the_refill_thread(cfg, pool_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=1)
    mgr = pool_manager()
    wait_for(lambda: len(pooled_ready(mgr)) == 1, what="a full pool")
    thread = mgr.pools._thread
    assert thread is not None and thread.is_alive()
    mgr.pools.stop()  # what close() does first (the fixture closes the store after draining)
    assert not thread.is_alive() and thread not in threading.enumerate()


def test_manager_close_joins_the_thread(cfg, make_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=1)
    mgr = make_manager()
    wait_for(lambda: len(pooled_ready(mgr)) == 1, what="a full pool")
    thread = mgr.pools._thread
    mgr.pools.drain()
    mgr.close()
    assert not thread.is_alive()
    assert not mgr.pools.running


def test_no_pool_no_thread(cfg, make_manager):  # type: ignore[no-untyped-def]
    mgr = make_manager()
    assert mgr.pools._thread is None and not mgr.pools.profiles()


@pytest.mark.parametrize("ask", [
    {"inputs": {"ref": "dev"}},
    {"name": "mine"},
    {"labels": {"team": "x"}},
    {"ttl": "20m", "_fixed": True},
], ids=["inputs", "name", "labels", "ttl-over-default-on-a-fixed-backend"])
def test_a_request_the_pool_cannot_serve_takes_the_cold_path(cfg, pool_manager, ask):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=1)
    mgr = pool_manager(refill=False)
    mgr.fill_pools()
    pooled = set(pooled_ready(mgr))
    if ask.pop("_fixed", False):  # as on a backend that cannot move a sandbox's end
        mgr.pools._fixed["warm"] = True
    sb = mgr.create(profile="warm", consumer="alice", **ask)
    assert sb.id not in pooled
    assert set(pooled_ready(mgr)) == pooled  # the pool is untouched
    kinds = [e["kind"] for e in mgr.events(sb.id)]
    assert "pool_handout" not in kinds


def test_a_request_with_its_own_secrets_takes_the_cold_path(cfg, pool_manager, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("POOLTEST_OPERATOR", "operator-value")
    monkeypatch.setenv("POOLTEST_MINE", "consumer-value")
    write_pooled(cfg, size=1, extra="secrets: {TOKEN: {env: POOLTEST_OPERATOR}}\n")
    mgr = pool_manager(refill=False)
    mgr.fill_pools()
    pooled = set(pooled_ready(mgr))
    mine = mgr.create(profile="warm", consumer="alice", secrets={"TOKEN": {"env": "POOLTEST_MINE"}})
    assert mine.id not in pooled
    assert mgr.exec(mine.id, ["sh", "-c", "echo $TOKEN"]).stdout == "consumer-value\n"
    theirs = mgr.create(profile="warm", consumer="bob")  # the operator's secrets: what a pooled one has
    assert theirs.id in pooled
    assert mgr.exec(theirs.id, ["sh", "-c", "echo $TOKEN"]).stdout == "operator-value\n"


def test_the_pool_counts_against_capacity(cfg, pool_manager):  # type: ignore[no-untyped-def]
    cfg.write("profile.warm.yaml", """
        slug: warm
        backends: [{extension: ext.local, capacity: 2}]
        isolation: process
        ttl: {default: 10m, max: 1h}
        pool: {size: 2, max_age: 5m}
    """)
    mgr = pool_manager(refill=False)
    assert len(mgr.fill_pools().made["warm"]) == 2
    with pytest.raises(CapacityUnavailable, match="full"):  # the pool holds the backend's whole capacity
        mgr.create(profile="warm", consumer="alice", name="cold-one")
    sb = mgr.create(profile="warm", consumer="alice")  # a pooled one is still there to hand out
    report = mgr.fill_pools()  # and the refill cannot go over capacity either
    assert "full" in report.errors["warm"] and not report.made
    assert len(owned(mgr)) == 2
    mgr.teardown(sb.id)
    assert len(mgr.fill_pools().made["warm"]) == 1


def test_gc_reaps_pooled_sandboxes_past_max_age(cfg, pool_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=2, max_age="1m")
    mgr = pool_manager(refill=False)
    old, young = mgr.fill_pools().made["warm"]
    mgr.state.transition(old, "test_aged", created_at=time.time() - 61)  # as if made a minute ago
    sb = mgr.create(profile="warm", consumer="alice")
    assert sb.id == young  # the aged one is never handed out
    report = mgr.gc()
    assert report.expired == [old] and not report.errors
    assert mgr.get(old).state.value == "terminated" and old not in owned(mgr)
    assert mgr.get(sb.id).state.value == "ready"  # the handed-out one is the consumer's, not the pool's


def test_gc_reaps_the_pool_of_a_profile_that_lost_it(cfg, pool_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=1)
    mgr = pool_manager(refill=False)
    [pooled] = mgr.fill_pools().made["warm"]
    cfg.write("profile.warm.yaml", "slug: warm\nextension: ext.local\nisolation: process\n")
    after = pool_manager(refill=False)
    assert after.create(profile="warm", consumer="alice").id != pooled  # no pool: nothing handed out
    assert after.gc().expired == [pooled]
    assert pooled not in owned(after)


def test_teardown_of_a_handed_out_sandbox(cfg, pool_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=1)
    mgr = pool_manager(refill=False)
    [pooled] = mgr.fill_pools().made["warm"]
    sb = mgr.create(profile="warm", consumer="alice")
    assert sb.id == pooled
    ws = Path(sb.reachability["workspace"])
    pid = mgr.state.get(sb.id)["handle"]["pid"]
    done = mgr.teardown(sb.id)
    assert done.state.value == "terminated" and not ws.exists() and not Path(f"/proc/{pid}").exists()
    assert sb.id not in owned(mgr)
    assert not (mgr.extension("ext.local").root / ".meta" / f"{sb.id}.end").exists()
    usage = {u["sandbox_id"]: u for u in mgr.state.usage()}[sb.id]
    assert usage["consumer"] == "alice" and usage["stopped_at"] is not None


def test_a_dead_pooled_sandbox_is_not_handed_out(cfg, pool_manager):  # type: ignore[no-untyped-def]
    import os
    import signal

    write_pooled(cfg, size=2)
    mgr = pool_manager(refill=False)
    dead, alive = mgr.fill_pools().made["warm"]
    os.kill(mgr.state.get(dead)["handle"]["pid"], signal.SIGKILL)
    wait_for(lambda: mgr.extension("ext.local").probe(
        mgr.extension("ext.local").Handle.model_validate(mgr.state.get(dead)["handle"])) is False, what="init gone")
    sb = mgr.create(profile="warm", consumer="alice")
    assert sb.id == alive
    assert mgr.get(dead).state.value == "lost"


def test_threads_never_share_a_pooled_sandbox(cfg, pool_manager):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=6)
    mgr = pool_manager(refill=False)
    pooled = set(mgr.fill_pools().made["warm"])
    got: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        sb = mgr.create(profile="warm", consumer="alice")
        with lock:
            got.append(sb.id)

    from tests.conftest import run_threads

    run_threads(one, 8)
    assert len(got) == len(set(got)) == 8
    assert len(set(got) & pooled) == 6  # every pooled one handed out once; two went cold


def test_a_budget_is_kept_on_the_pool_path(cfg, pool_manager):  # type: ignore[no-untyped-def]
    from sandboxer.errors import BudgetExceeded

    cfg.write("profile.metered.yaml", """
        slug: metered
        extension: ext.saas-stub
        ttl: {default: 30m, max: 4h}
        pool: {size: 1, max_age: 5m}
    """)
    (cfg.root / "settings.yaml").write_text("budgets:\n  rich: {limit: 100}\n  poor: {limit: 0.0001}\n")
    mgr = pool_manager(refill=False)
    [pooled] = mgr.fill_pools().made["metered"]
    with pytest.raises(BudgetExceeded):  # the pool never lets a create past a budget the cold path refuses
        mgr.create(profile="metered", consumer="poor")
    assert pooled_ready(mgr, "metered") == [pooled]
    assert mgr.create(profile="metered", consumer="rich").id == pooled
    stub = mgr.extension("ext.saas-stub")
    assert {o.sandbox_id for o in stub.list_owned(mgr.owner_labels)} == {pooled}
    mgr.teardown(pooled)
    assert stub.list_owned(mgr.owner_labels) == []


def test_a_ttl_the_backend_refuses_at_hand_out_takes_the_cold_path(cfg, pool_manager, monkeypatch):  # type: ignore[no-untyped-def]
    # A settable backend may refuse the consumer's TTL at hand-out (E2B: over the plan's maximum).
    # The claimed sandbox must not stay with the consumer unknown to them: it is torn down, and the
    # create goes the cold way (where the backend says the same at provision, or serves it).
    from sandboxer.errors import TTLError

    write_pooled(cfg, size=1)
    mgr = pool_manager(refill=False)
    (pooled,) = mgr.fill_pools().made["warm"]
    ext = mgr.extension("ext.local")

    def refuse(handle, ttl):  # type: ignore[no-untyped-def]
        raise TTLError("over the plan maximum")

    monkeypatch.setattr(ext, "set_ttl", refuse)  # the seam: the backend's answer at hand-out
    sb = mgr.create(profile="warm", consumer="alice")
    assert sb.id != pooled and sb.consumer == "alice"
    assert mgr.get(pooled).state.value == "terminated"
