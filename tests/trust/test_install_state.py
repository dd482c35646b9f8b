"""The state store's part for installed bundles, on SQLite (both paths) and PostgreSQL: lifecycle
transitions allowed and refused (naming the current state), highest versions kept past a remove,
the audit trail in order, and the schema step from version 4."""

from __future__ import annotations

import sqlite3

import pytest

from sandboxer.state import SCHEMA_VERSION, StateStore
from sandboxer.state.extensions import LifecycleError


@pytest.fixture(scope="module")
def pg_url():
    from tests.support.postgres import pg_url_or_skip

    yield from pg_url_or_skip()


@pytest.fixture(params=["raw-sqlite", "engine", "postgresql"])
def store(request, tmp_path, monkeypatch):
    if request.param == "postgresql":
        s = StateStore(request.getfixturevalue("pg_url"))
        from sqlalchemy import text

        with s.engine.begin() as conn:  # one server for the module: start each test empty
            for t in ("audit", "installed_extensions", "extension_versions"):
                conn.execute(text(f"DELETE FROM {t}"))
    else:
        monkeypatch.setattr(StateStore, "raw_sqlite", request.param == "raw-sqlite")
        s = StateStore(home=tmp_path / "home")
    yield s
    s.close()


def test_the_lifecycle_and_its_audit(store):
    t = store.extension_transition
    t("ext.a", "verified", who="ops", publisher="acme", version="1.0.0", grants=["docker:engine"])
    t("ext.a", "installed", who="ops", path="/h/extensions/ext.a/1.0.0")
    t("ext.a", "active", who="ops")
    with pytest.raises(LifecycleError, match=r"^ext.a is active; it cannot become installed \(from active it can only "
                                             r"become disabled\)$"):
        t("ext.a", "installed", who="ops")
    t("ext.a", "disabled", who="ops", reason="incident")
    t("ext.a", "active", who="ops")
    row = store.installed_extension("ext.a")
    assert (row["state"], row["version"], row["grants"], row["path"]) == (
        "active", "1.0.0", ["docker:engine"], "/h/extensions/ext.a/1.0.0")
    assert store.installed_versions() == {("acme", "ext.a"): "1.0.0"}
    store.forget_extension("ext.a", who="ops", what="remove")
    assert store.installed_extension("ext.a") is None
    assert store.installed_versions() == {("acme", "ext.a"): "1.0.0"}  # kept: a rollback is still refused
    with pytest.raises(LifecycleError, match=r"^ext.b is not installed; it cannot become active"):
        t("ext.b", "active", who="ops")
    trail = [(e["what"], e["from_state"], e["to_state"], e["reason"]) for e in store.audit_events("ext.a")]
    assert trail == [("transition", None, "verified", None), ("transition", "verified", "installed", None),
                     ("transition", "installed", "active", None), ("transition", "active", "disabled", "incident"),
                     ("transition", "disabled", "active", None), ("remove", "active", None, None)]
    assert all(e["who"] == "ops" for e in store.audit_events())


def test_the_highest_version_only_rises(store):
    for version in ("1.10.0", "1.9.0"):
        store.extension_transition("ext.a", "verified", who="ops", publisher="acme", version=version)
        store.extension_transition("ext.a", "installed", who="ops")
        store.forget_extension("ext.a", who="ops", what="remove")
    assert store.installed_versions() == {("acme", "ext.a"): "1.10.0"}  # semver order, not string order


def test_a_version_4_store_gains_the_tables(tmp_path):
    home = tmp_path / "home"
    StateStore(home=home).close()
    db = sqlite3.connect(home / "state.db")
    for t in ("audit", "installed_extensions", "extension_versions"):
        db.execute(f"DROP TABLE {t}")
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    s = StateStore(home=home)
    try:
        assert s.schema_version() == SCHEMA_VERSION
        s.record_audit("ops", "verify_failed", extension="ext.a", reason="unsigned")
        assert s.audit_events()[0]["reason"] == "unsigned"
    finally:
        s.close()
