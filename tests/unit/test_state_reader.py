"""sandboxer.state.reader: the store's reads with sqlite3 alone return exactly what the store returns."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from sqlalchemy import JSON

from sandboxer.errors import ConfigError
from sandboxer.state import LIVE_STATES, StateStore
from sandboxer.state.reader import SANDBOX_JSON, open_reader
from sandboxer.state.schema import sandboxes


def _row(i: int, state: str, **kw):
    now = time.time() + i
    row = {"id": f"sb-{i}", "name": kw.pop("name", None), "profile": "p", "extension": "ext.e", "host": "h",
           "state": "provisioning", "handle": {"k": i, "é": "ü"}, "reachability": None, "consumer": f"c{i % 2}",
           "labels": {"n": str(i)}, "resources": {"cpu": 1.0}, "created_at": now, "expires_at": now + 60,
           "attempts": 0, "last_error": None, "inputs": {}, "policy": {"network": {"egress": "none"}}}
    return row, state


@pytest.fixture
def store(home):
    st = StateStore(home=home)
    for i, state in enumerate(["ready", "ready", "failed", "terminated", "provisioning", "tearing_down"]):
        row, target = _row(i, state, name=f"n{i}" if i % 2 else None)
        st.insert_intent(row)
        if target != "provisioning":
            st.transition(row["id"], target, state=target, reachability={"host": "h", "i": i})
    yield st
    st.close()


def test_the_json_columns_are_the_schemas():
    assert SANDBOX_JSON == {c.name for c in sandboxes.columns if isinstance(c.type, JSON)}


def test_every_read_returns_what_the_store_returns(store, home):
    reader = open_reader(home / "state.db")
    assert reader is not None
    try:
        for i in range(7):
            assert reader.get(f"sb-{i}") == store.get(f"sb-{i}")
        for name in ("n1", "n3", "n5", "n0", "nope"):
            assert reader.get_by_name(name) == store.get_by_name(name)
        fields = ("id", "state", "labels", "reachability", "created_at")
        for kw in ({}, {"states": None}, {"states": ("failed",)}, {"where": {"consumer": "c1"}},
                   {"states": LIVE_STATES, "where": {"consumer": "c0", "extension": "ext.e"}},
                   {"fields": fields}, {"states": None, "fields": fields}):
            assert reader.list(**kw) == store.list(**kw), kw
        with pytest.raises(ValueError, match="no column 'x; drop table'"):
            reader.list(where={"x; drop table": 1})
    finally:
        reader.close()


def test_a_store_it_cannot_answer_for_gets_no_reader(store, home, tmp_path):
    assert open_reader(tmp_path / "missing.db") is None
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    assert open_reader(tmp_path / "junk.db") is None
    db = sqlite3.connect(home / "state.db")
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    assert open_reader(home / "state.db") is None


def test_it_never_creates_or_changes_a_file(tmp_path):
    assert open_reader(tmp_path / "state.db") is None
    assert list(tmp_path.iterdir()) == []


LAZY = """
import json, sys
from sandboxer.manager import Manager
mgr = Manager(home=sys.argv[1], lazy=True)
out = [s.id for s in mgr.list(all=True)] + [mgr.get("sb-1").state.value]
print(json.dumps([out, "sqlalchemy" in sys.modules]))
"""


def test_a_lazy_manager_lists_without_sqlalchemy(store, home):
    p = subprocess.run([sys.executable, "-c", LAZY, str(home)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SANDBOXER_STATE_URL": ""})
    assert p.returncode == 0, p.stderr
    ids, loaded = json.loads(p.stdout)
    assert ids == [f"sb-{i}" for i in range(6)] + ["ready"] and loaded is False


def test_a_damaged_store_still_says_so_through_a_lazy_manager(home):
    from sandboxer import Manager

    home.mkdir(parents=True)
    (home / "state.db").write_bytes(b"garbage" * 1000)
    mgr = Manager(home=home, lazy=True)
    with pytest.raises(ConfigError, match=r"is damaged"):
        mgr.list()
