"""The state store's image records (schema 7) on SQLite and PostgreSQL: claim, busy, ready, drop,
stale takeover and reaping, one claim among racing threads, and the migration from schema 5."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid

import pytest

from sandboxer.state import SCHEMA_VERSION, StateStore


@pytest.fixture(scope="module")
def pg_url():
    from tests.support.postgres import pg_url_or_skip

    yield from pg_url_or_skip()


@pytest.fixture(params=["sqlite", "sqlite-engine", "postgresql"])
def store(request, tmp_path, monkeypatch):
    if request.param == "postgresql":
        s = StateStore(request.getfixturevalue("pg_url"))
    else:
        if request.param == "sqlite-engine":
            monkeypatch.setattr(StateStore, "raw_sqlite", False)
        s = StateStore(home=tmp_path / "home")
    yield s
    s.close()


def row(template: str, variables: str = "v" * 64, deadline: float = 600) -> dict:
    return {"id": uuid.uuid4().hex[:16], "profile": "p", "extension": "ext.vm-packer", "builder": "pending",
            "template": "/t.pkr.hcl", "template_sha256": template, "variables_sha256": variables,
            "owner": "here:1", "deadline_at": time.time() + deadline}


def test_claim_busy_finish_reuse_drop(store):
    t = uuid.uuid4().hex
    state, mine = store.claim_image_build(row(t))
    assert state == "claimed" and mine["state"] == "building"
    other = row(t, "w" * 64)
    assert store.claim_image_build(other) == ("busy", mine)  # one build per template at a time
    done = store.finish_image_build(mine["id"], "Null", builder="null", detail={"builder_id": "fnoeding.null"})
    assert done["state"] == "ready" and done["artifact_id"] == "Null" and done["builder"] == "null"
    assert done["detail"] == {"builder_id": "fnoeding.null"} and done["deadline_at"] is None
    again = row(t)
    assert store.claim_image_build(again) == ("ready", done)
    state, second = store.claim_image_build(other)
    assert state == "claimed"
    assert store.drop_image_build(second["id"]) is True and store.drop_image_build(second["id"]) is False
    assert store.drop_image_build(mine["id"]) is False  # a ready record is never dropped as a failed build
    assert [r["id"] for r in store.list_images() if r["template_sha256"] == t] == [mine["id"]]


def test_a_stale_build_is_taken_over_and_reaped(store):
    t = uuid.uuid4().hex
    _, crashed = store.claim_image_build(row(t, deadline=-1))
    state, taker = store.claim_image_build(row(t, "w" * 64))
    assert state == "claimed" and store.image_build(crashed["id"]) is None
    assert store.finish_image_build(crashed["id"], "x", builder="null", detail={}) is None  # its claim is lost
    _, stale = store.claim_image_build(row(uuid.uuid4().hex, deadline=-1))
    assert [r["id"] for r in store.reap_stale_images()] == [stale["id"]]
    assert store.image_build(stale["id"]) is None and store.image_build(taker["id"])["state"] == "building"


def test_racing_claims_of_one_template_claim_once(store):
    t = uuid.uuid4().hex
    results: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claim(i: int) -> None:
        start.wait(10)
        state, _ = store.claim_image_build(row(t, f"{i:064d}"))
        with lock:
            results.append(state)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(results) == ["busy"] * 7 + ["claimed"]


def test_schema_6_store_gains_the_images_table(tmp_path):
    home = tmp_path / "home"
    StateStore(home=home).close()
    db = sqlite3.connect(home / "state.db")
    db.execute("DROP TABLE images")
    db.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    store = StateStore(home=home)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 7
        assert store.list_images() == []
        assert store.claim_image_build(row("t" * 64))[0] == "claimed"
    finally:
        store.close()
