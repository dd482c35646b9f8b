"""The state store behaves the same on its two SQLite paths (plain sqlite3, and the SQLAlchemy
engine that server databases use), and keeps its rules: intent first, JSON columns, migrations."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest

from tests.conftest import run_threads

from sandboxer.state import SCHEMA_VERSION, StateStore


@pytest.fixture(params=[True, False], ids=["raw-sqlite", "engine"])
def path(request, monkeypatch):
    monkeypatch.setattr(StateStore, "raw_sqlite", request.param)
    return request.param


def stub(cfg, name: str, *, capacity: int, latency: float = 0) -> None:
    """A saas-stub backend ``ext.<name>`` and a profile ``<name>`` routing to it with ``capacity``."""
    cfg.write(f"ext.{name}.yaml", f"""
        id: ext.{name}
        title: stub
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {{isolation_levels: [microvm], pricing_model: metered, features: [exec, snapshots, list_owned]}}
        pricing: {{per_vcpu_second: 0.01}}
        config: {{latency_s: {latency}}}
    """)
    cfg.write(f"profile.{name}.yaml", f"slug: {name}\nbackends: [{{extension: ext.{name}, capacity: {capacity}}}]\n")


def test_same_behaviour_on_both_paths(path, cfg, make_manager, tmp_path):
    stub(cfg, "st", capacity=2)
    (cfg.root / "settings.yaml").write_text(f"sinks:\n  f: {{kind: file, path: {tmp_path / 'u.jsonl'}}}\n")
    mgr = make_manager()
    assert (mgr.state._raw_path is not None) is path
    a = mgr.create(profile="st", name="one", labels={"k": "v"})
    assert mgr.create(profile="st", name="one", labels={"k": "v"}).id == a.id
    b = mgr.create(profile="st")
    with pytest.raises(Exception, match="full"):
        mgr.create(profile="st")
    assert {s.id for s in mgr.list()} == {a.id, b.id}
    assert mgr.get(a.id).labels == {"k": "v"} and mgr.get(a.id).reachability["host"] == "stub"
    snap = mgr.snapshot(a.id)
    assert mgr.get_snapshot(snap.id).data == snap.data
    mgr.teardown(a.id)
    mgr.teardown(b.id)
    assert mgr.gc().errors == {}
    assert [e["kind"] for e in mgr.events(a.id)][:3] == ["create_intent", "provisioned", "ready"]
    assert mgr.events(a.id)[0]["detail"]["route"]["policy"] == "priority"
    assert mgr.metering.export(sink="f")["delivered"] == 2
    assert len((tmp_path / "u.jsonl").read_text().splitlines()) == 2
    assert mgr.metering.report(by="profile")["st"]["sandboxes"] == 2


def test_json_columns_hold_json_not_pickles(fake_mgr, home):
    sb = fake_mgr.create(profile="fake", labels={"team": "a"})
    db = sqlite3.connect(home / "state.db")
    labels, handle = db.execute("SELECT labels, handle FROM sandboxes WHERE id = ?", (sb.id,)).fetchone()
    assert json.loads(labels) == {"team": "a"} and json.loads(handle)["sandbox_id"] == sb.id


def test_migration_from_version_1(home):
    store = StateStore(home=home)
    store.close()
    db = sqlite3.connect(home / "state.db")
    db.execute("DROP TABLE usage")
    db.execute("DROP TABLE exports")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    store = StateStore(home=home)
    assert store.schema_version() == SCHEMA_VERSION
    tables = {r[0] for r in sqlite3.connect(home / "state.db").execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"usage", "exports", "sandboxes", "events", "snapshots", "meta"} <= tables
    store.close()


def test_migration_from_version_2_adds_claims_and_columns(cfg, home):
    from sandboxer import Manager

    StateStore(home=home).close()
    db = sqlite3.connect(home / "state.db")
    db.execute("DROP TABLE claims")
    for table, col in (("sandboxes", "inputs"), ("sandboxes", "deadline_at"), ("sandboxes", "teardown_started_at"),
                       ("snapshots", "inputs"), ("sandboxes", "policy")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    stub(cfg, "m3", capacity=5)
    mgr = Manager(config_dirs=[cfg.root], home=home)
    try:
        assert mgr.state.schema_version() == SCHEMA_VERSION == 7
        sb = mgr.create(profile="m3", inputs={"x": "1"})
        assert sb.policy["network"]["egress"] == "none"  # migration 4: the policy it was created under
        assert mgr.snapshot(sb.id).inputs == {"x": "1"} and mgr.teardown(sb.id).state.value == "terminated"
    finally:
        mgr.close()


def test_owner_id_is_stable_per_store(home):
    a = StateStore(home=home)
    b = StateStore(home=home)
    assert a.owner_id == b.owner_id and len(a.owner_id) == 16
    a.close()
    b.close()


def test_write_rolls_back_on_error(path, home):
    store = StateStore(home=home)
    now = time.time()
    row = {"id": "sb-x", "name": None, "profile": "p", "extension": "e", "host": None, "state": "provisioning",
           "handle": None, "reachability": None, "consumer": "c", "labels": {}, "resources": {},
           "created_at": now, "expires_at": now + 60, "attempts": 0, "last_error": None}
    store.insert_intent(row)

    def boom(conn, row):
        raise RuntimeError("fail inside the transaction")

    with pytest.raises(RuntimeError):
        store.transition("sb-x", "ready", state="ready", also=boom)
    assert store.get("sb-x")["state"] == "provisioning"
    assert [e["kind"] for e in store.events("sb-x")] == ["create_intent"]
    store.close()


@pytest.fixture(scope="module")
def pg_url():
    from tests.support.postgres import pg_url_or_skip

    yield from pg_url_or_skip()


def test_postgresql_state_store(pg_url, cfg, home, tmp_path):
    from sandboxer import Manager

    stub(cfg, "pgs", capacity=2)
    mgr = Manager(config_dirs=[cfg.root], home=home, state_url=pg_url)
    try:
        assert mgr.state.engine.dialect.name == "postgresql" and mgr.state.schema_version() == SCHEMA_VERSION
        a = mgr.create(profile="pgs", name="one", labels={"k": "v"})
        assert mgr.create(profile="pgs", name="one", labels={"k": "v"}).id == a.id
        b = mgr.create(profile="pgs")
        with pytest.raises(Exception, match="full"):
            mgr.create(profile="pgs")
        assert mgr.exec(a.id, ["echo", "hi"]).stdout == "hi\n"
        snap = mgr.snapshot(a.id)
        assert mgr.get_snapshot(snap.id).data == snap.data
        for sb in (a, b):
            mgr.teardown(sb.id)
        assert mgr.list() == [] and mgr.gc().errors == {}
        assert [e["kind"] for e in mgr.events(a.id)][:3] == ["create_intent", "provisioned", "ready"]
        assert len(mgr.metering.records()) == 2
    finally:
        mgr.close()


def test_a_password_in_the_state_url_is_never_shown(pg_url, cfg, home):
    from sandboxer import Manager

    url = pg_url.replace("postgres@", "postgres:pw-sentinel-8h2@")
    mgr = Manager(config_dirs=[cfg.root], home=home, state_url=url)
    try:
        assert "pw-sentinel-8h2" not in repr(mgr) + mgr.state.url and "***" in repr(mgr)
    finally:
        mgr.close()


def test_postgresql_admission_is_atomic_across_threads(pg_url, cfg, home):
    
    from sandboxer import Manager

    stub(cfg, "pga", capacity=3, latency=0.01)
    mgr = Manager(config_dirs=[cfg.root], home=home / "pga", state_url=pg_url)
    served = []

    def one():
        try:
            sb = mgr.create(profile="pga")
        except Exception:  # noqa: BLE001 - refused at capacity
            return
        time.sleep(0.05)
        mgr.teardown(sb.id)
        served.append(sb.id)

    try:
        run_threads(one, 20)
        assert served and mgr.extension("ext.pga").live()["peak"] <= 3
    finally:
        mgr.close()


def test_cli_on_postgresql(pg_url, home, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_STATE_URL": pg_url}
    run = lambda *a: subprocess.run([sys.executable, "-m", "sandboxer", *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, timeout=120)
    p = run("create", "saas-stub", "--json")
    assert p.returncode == 0, p.stderr
    sid = json.loads(p.stdout)["id"]
    assert sid in run("list", "--json").stdout
    assert run("teardown", sid).returncode == 0
    assert not (home / "state.db").exists()  # the state really went to PostgreSQL


# ------------------------------------------------------- a damaged state file

def _damage(home, how: str) -> bytes:
    """Leave ``home/state.db`` damaged: random bytes, or a real store cut short; returns its bytes."""
    db_path = home / "state.db"
    if how == "garbage":
        home.mkdir(parents=True)
        db_path.write_bytes(b"not a database, just some bytes\n" * 200)
    else:
        store = StateStore(home=home)
        now = time.time()
        for i in range(40):
            store.insert_intent({"id": f"sb-{i}", "name": None, "profile": "p", "extension": "e", "host": None,
                                 "state": "provisioning", "handle": None, "reachability": None, "consumer": "c",
                                 "labels": {"pad": "x" * 500}, "resources": {}, "created_at": now,
                                 "expires_at": now + 60, "attempts": 0, "last_error": None})
        store.close()
        db = sqlite3.connect(db_path)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        data = db_path.read_bytes()
        db_path.write_bytes(data[: len(data) // 2])  # a copy that ran out of disk, say
    for side in ("state.db-wal", "state.db-shm"):
        (home / side).unlink(missing_ok=True)
    return db_path.read_bytes()


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_damaged_state_file_refuses_start_and_keeps_a_copy(path, how, cfg, home):
    import threading

    from sandboxer import Manager
    from sandboxer.errors import ConfigError

    damaged = _damage(home, how)
    db_path = home / "state.db"
    before = set(threading.enumerate())
    with pytest.raises(ConfigError) as e:
        Manager(config_dirs=[cfg.root], home=home)
    msg = str(e.value)
    copies = sorted(home.glob("state.db.corrupt-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == damaged
    assert copies[0].stat().st_mode & 0o777 == 0o600
    assert msg.startswith(f"state store {db_path} is damaged (") and "\n" not in msg
    assert f"a copy is kept at {copies[0]}" in msg and "move the damaged file aside" in msg
    assert db_path.read_bytes() == damaged  # the original is never changed or removed
    # a second start says the same and keeps no second copy of the same bytes
    with pytest.raises(ConfigError, match=f"a copy is kept at {copies[0]}"):
        StateStore(home=home)
    assert sorted(home.glob("state.db.corrupt-*")) == copies
    started = [t for t in threading.enumerate() if t not in before]  # the refused stores' WAL checkpointers
    for t in started:
        t.join(5)
    assert not [t for t in started if t.is_alive()]
    # once the user moves it aside, a new empty store starts
    db_path.rename(home / "state.db.moved")
    store = StateStore(home=home)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()


def test_unreachable_server_database_is_one_line_without_the_password():
    pytest.importorskip("psycopg")
    from sandboxer.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        StateStore("postgresql+psycopg://sbx:hunter2@127.0.0.1:1/sbx")
    msg = str(e.value)
    assert msg.startswith("state store postgresql+psycopg://sbx:***@127.0.0.1:1/sbx: cannot open it: ")
    assert "hunter2" not in msg and "\n" not in msg and "SANDBOXER_STATE_URL" in msg
