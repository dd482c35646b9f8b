"""The ``secrets`` policy in the core: who resolves which reference when, and that a value goes to
the backend alone (never into state, events, errors or ``repr``), fallback and restore included."""

from __future__ import annotations

import json
import secrets as _random
import sqlite3

import pytest

from sandboxer.contract import ProvisionRequest
from sandboxer.errors import CapacityUnavailable, InputError, ProvisionError
from sandboxer.secrets import SecretRef
from tests.conftest import FAKE_EXT

PROFILE = """
    slug: agent
    backends: [{extension: ext.fake}]
    ready_timeout: 5s
    secrets:
      TOKEN: {env: SBX_TEST_TOKEN}
"""

TWO = """
    slug: agent
    backends: [{extension: ext.first}, {extension: ext.fake}]
    ready_timeout: 5s
    secrets:
      TOKEN: {env: SBX_TEST_TOKEN}
"""


@pytest.fixture
def sentinel(monkeypatch) -> str:
    value = "sbx_SENTINEL_" + _random.token_hex(12)
    monkeypatch.setenv("SBX_TEST_TOKEN", value)
    return value


@pytest.fixture
def mgr(cfg, make_manager):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.agent.yaml", PROFILE)
    return make_manager()


def _requests(ext, verb: str = "provision") -> list[ProvisionRequest]:
    return [args[0] for v, args in ext.calls if v == verb]


def _store_bytes(mgr) -> bytes:
    """Every byte of the SQLite state store (main file, WAL and journal)."""
    db = mgr.home / "state.db"
    out = b""
    for p in mgr.home.rglob("*"):
        if p.is_file() and p.name.startswith(db.name):
            out += p.read_bytes()
    return out


def _store_rows(mgr) -> str:
    con = sqlite3.connect(mgr.home / "state.db")
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return json.dumps({t: con.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}, default=str)
    finally:
        con.close()


def test_the_profile_secret_reaches_the_backend_and_nothing_else(mgr, sentinel):
    sb = mgr.create(profile="agent", consumer="me")
    fake = mgr.extension("ext.fake")
    (req,) = _requests(fake)
    assert req.secrets["TOKEN"].get_secret_value() == sentinel
    assert sentinel not in repr(req) and sentinel not in str(req)
    assert "secrets" not in req.model_dump() and sentinel not in req.model_dump_json()
    assert sb.policy["secrets"] == ["TOKEN"]
    mgr.teardown(sb.id)
    assert sentinel.encode() not in _store_bytes(mgr)
    assert sentinel not in _store_rows(mgr) and sentinel not in json.dumps(mgr.events(), default=str)


def test_a_consumer_reference_replaces_the_operators_for_a_declared_name(mgr, sentinel, tmp_path):
    mine = "sbx_MINE_" + _random.token_hex(8)
    (tmp_path / "tok").write_text(mine + "\n")
    mgr.create(profile="agent", secrets={"TOKEN": {"file": str(tmp_path / "tok")}})
    mgr.create(profile="agent", secrets={"TOKEN": SecretRef(file=tmp_path / "tok")})
    reqs = _requests(mgr.extension("ext.fake"))
    assert [r.secrets["TOKEN"].get_secret_value() for r in reqs] == [mine, mine]


def test_a_consumer_secret_the_profile_does_not_declare_is_refused_before_anything_is_recorded(mgr, sentinel):
    with pytest.raises(InputError) as err:
        mgr.create(profile="agent", secrets={"OTHER": {"env": "SBX_TEST_TOKEN"}})
    assert str(err.value) == ("secret 'OTHER' is not declared by profile 'agent' (it declares: TOKEN); a consumer may "
                              "give references only for the secrets its profile declares. Nothing was created.")
    assert mgr.list(all=True) == [] and _requests(mgr.extension("ext.fake")) == []


def test_a_bad_consumer_reference_is_refused(mgr, sentinel):
    with pytest.raises(InputError, match=r"^secret 'TOKEN': a reference is \{env: NAME\} or \{file: PATH\}"):
        mgr.create(profile="agent", secrets={"TOKEN": "the-value-itself"})
    assert mgr.list(all=True) == []


def test_an_unset_secret_names_the_secret_and_its_reference_never_a_value(mgr, monkeypatch, tmp_path):
    monkeypatch.delenv("SBX_TEST_TOKEN", raising=False)
    with pytest.raises(InputError) as err:
        mgr.create(profile="agent")
    assert str(err.value) == ("secret 'TOKEN' of profile 'agent' (the profile's reference): no value in environment "
                              "variable SBX_TEST_TOKEN; set it and try again. Nothing was created.")
    with pytest.raises(InputError) as err:
        mgr.create(profile="agent", secrets={"TOKEN": {"file": str(tmp_path / "missing")}})
    assert str(err.value) == (f"secret 'TOKEN' of profile 'agent' (the consumer's reference): cannot read file "
                              f"{tmp_path / 'missing'}: No such file or directory. Nothing was created.")
    assert mgr.list(all=True) == [] and mgr.events() == []


def test_fallback_reuses_the_values_resolved_once(cfg, make_manager, sentinel, tmp_path):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("ext.first.yaml", FAKE_EXT.replace("id: ext.fake", "id: ext.first"))
    cfg.write("profile.agent.yaml", TWO)
    mgr = make_manager()
    first, second = mgr.extension("ext.first"), mgr.extension("ext.fake")
    tok = tmp_path / "tok"
    tok.write_text("sbx_ONCE_value\n")

    def full(request):
        tok.write_text("sbx_CHANGED_later\n")  # read again, it would differ
        raise CapacityUnavailable(f"ext.first is full", backend="ext.first")

    first.script("provision", full)
    sb = mgr.create(profile="agent", secrets={"TOKEN": {"file": str(tok)}})
    assert sb.extension == "ext.fake"
    got = [r.secrets["TOKEN"].get_secret_value() for r in _requests(first) + _requests(second)]
    assert got == ["sbx_ONCE_value", "sbx_ONCE_value"]


def test_an_error_that_echoes_a_value_is_scrubbed_before_it_is_recorded_or_raised(mgr, sentinel):
    fake = mgr.extension("ext.fake")
    fake.script("provision", ProvisionError(f"the provider refused env TOKEN={sentinel}", backend="ext.fake"))
    with pytest.raises(ProvisionError) as err:
        mgr.create(profile="agent")
    assert str(err.value) == "the provider refused env TOKEN=***"
    assert sentinel not in _store_rows(mgr) and "TOKEN=***" in _store_rows(mgr)


def test_a_restore_gets_the_profiles_secrets_again(mgr, sentinel):
    sb = mgr.create(profile="agent")
    snap = mgr.snapshot(sb.id)
    mgr.restore(snap.id)
    (req,) = _requests(mgr.extension("ext.fake"), "provision")[1:]
    assert req.secrets["TOKEN"].get_secret_value() == sentinel
    assert sentinel.encode() not in _store_bytes(mgr)


def test_a_profile_without_secrets_gives_none(cfg, make_manager):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.agent.yaml", PROFILE.split("    secrets:")[0])
    mgr = make_manager()
    mgr.create(profile="agent")
    assert _requests(mgr.extension("ext.fake"))[0].secrets == {}
    with pytest.raises(InputError, match="it declares: none"):
        mgr.create(profile="agent", secrets={"TOKEN": {"env": "X"}})


def test_a_routing_error_never_carries_a_value_an_attempt_echoed(cfg, make_manager, sentinel):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("ext.first.yaml", FAKE_EXT.replace("id: ext.fake", "id: ext.first"))
    cfg.write("profile.agent.yaml", TWO)
    mgr = make_manager()
    mgr.extension("ext.first").script("provision", ProvisionError(f"rejected TOKEN={sentinel}", backend="ext.first",
                                                                  transient=True))
    mgr.extension("ext.fake").script("provision", CapacityUnavailable(f"full; env was {sentinel}", backend="ext.fake"))
    from sandboxer.errors import RoutingError

    with pytest.raises(RoutingError) as err:
        mgr.create(profile="agent")
    assert sentinel not in str(err.value) and sentinel not in json.dumps(err.value.attempts, default=str)
    assert "rejected TOKEN=***" in str(err.value)
    assert sentinel not in _store_rows(mgr) and sentinel.encode() not in _store_bytes(mgr)
