"""list filters and --watch, teardown of several or by a filter, events/logs, one JSON shape."""

from __future__ import annotations

import json
import re

import pytest

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def three(sbx):
    a = json.loads(sbx("create", "saas-stub", "--consumer", "ann", "--label", "team=red", "--name", "a",
                       "--quiet", "--json", check=0).stdout)
    b = json.loads(sbx("create", "saas-stub", "--consumer", "bob", "--label", "team=red", "--label", "tier=gold",
                       "--quiet", "--json", check=0).stdout)
    c = json.loads(sbx("create", "local", "--consumer", "ann", "--quiet", "--json", check=0).stdout)
    yield a, b, c
    sbx("teardown", "--all", check=0)


def ids(p):
    return [s["id"] for s in json.loads(p.stdout)]


def test_list_filters(sbx, three):
    a, b, c = three
    assert ids(sbx("list", "--json", check=0)) == [a["id"], b["id"], c["id"]]
    assert ids(sbx("list", "--profile", "local", "--json", check=0)) == [c["id"]]
    assert ids(sbx("list", "--consumer", "ann", "--json", check=0)) == [a["id"], c["id"]]
    assert ids(sbx("list", "--label", "team=red", "--json", check=0)) == [a["id"], b["id"]]
    assert ids(sbx("list", "--label", "team=red", "--label", "tier=gold", "--json", check=0)) == [b["id"]]
    assert ids(sbx("list", "--backend", "ext.local", "--json", check=0)) == [c["id"]]
    assert ids(sbx("list", "--backend", "saas-stub", "--consumer", "bob", "--json", check=0)) == [b["id"]]
    assert ids(sbx("list", "--state", "terminated", "--json", check=0)) == []
    assert "error: --label: expected KEY=VALUE" in sbx("list", "--label", "oops", check=64).stderr
    table = sbx("list", check=0).stdout
    assert "NAME" in table and re.search(rf"{a['id']}\s+│ a\s+│", table)


def test_json_has_one_timestamp_format_and_lists_are_arrays_of_objects(sbx, three):
    listed = json.loads(sbx("list", "--json", check=0).stdout)
    status = json.loads(sbx("status", three[0]["id"], "--json", check=0).stdout)
    events = json.loads(sbx("events", three[0]["id"], "--json", check=0).stdout)
    assert isinstance(listed, list) and all(isinstance(x, dict) for x in listed + events)
    assert set(listed[0]) == set(status)  # the same field names everywhere
    for item in listed + [status]:
        assert ISO_Z.fullmatch(item["created_at"]) and ISO_Z.fullmatch(item["expires_at"])
    assert all(ISO_Z.fullmatch(e["ts"]) for e in events)
    quotes = json.loads(sbx("cost", "estimate", "saas-stub", "--json", check=0).stdout)
    assert isinstance(quotes, list) and all(isinstance(q, dict) for q in quotes)


def test_teardown_several_or_by_filter(sbx, three):
    a, b, c = three
    p = sbx("teardown", check=64)
    assert p.stderr.startswith("error: name the sandboxes to tear down (ids or names), or choose them with a filter")
    assert "not both" in sbx("teardown", a["id"], "--consumer", "ann", check=64).stderr
    # an unknown one among them: nothing is touched
    assert sbx("teardown", a["id"], "sb-nope", check=66).stderr == "error: no sandbox with id or name 'sb-nope'\n"
    assert len(ids(sbx("list", "--json", check=0))) == 3
    done = json.loads(sbx("teardown", "a", b["id"], "--json", check=0).stdout)  # a name and an id
    assert [(s["id"], s["state"]) for s in done] == [(a["id"], "terminated"), (b["id"], "terminated")]
    assert ids(sbx("list", "--json", check=0)) == [c["id"]]
    assert sbx("teardown", "--profile", "saas-stub", check=0).stdout == ""  # none left of it
    assert sbx("teardown", "--consumer", "ann", check=0).stdout == f"{c['id']} terminated\n"
    assert ids(sbx("list", "--json", check=0)) == []


def test_teardown_all(sbx, three):
    out = sbx("teardown", "--all", "--json", check=0).stdout
    assert sorted(s["id"] for s in json.loads(out)) == sorted(s["id"] for s in three)
    assert ids(sbx("list", "--json", check=0)) == []


def test_events_and_logs_show_the_history(sbx):
    sb = json.loads(sbx("create", "saas-stub", "--name", "hist", "--quiet", "--json", check=0).stdout)
    sbx("teardown", "hist", check=0)
    kinds = [e["kind"] for e in json.loads(sbx("events", "hist", "--json", check=0).stdout)]
    assert kinds[0] == "create_intent" and "ready" in kinds and kinds[-1] == "terminated"
    assert json.loads(sbx("logs", sb["id"], "--json", check=0).stdout) == \
        json.loads(sbx("events", sb["id"], "--json", check=0).stdout)
    table = sbx("events", "hist", check=0).stdout
    assert "create_intent" in table and "teardown_started" in table
    assert sbx("events", "nope", check=66).stderr == "error: no sandbox with id or name 'nope'\n"


def test_list_watch_refreshes_count_times(sbx, three):
    p = sbx("list", "--watch", "--count", "3", "--interval", "100ms", "--json", check=0)
    rounds = p.stdout.splitlines()
    assert len(rounds) == 3 and all(len(json.loads(r)) == 3 for r in rounds)
    assert sbx("list", "--watch", "--count", "2", "--interval", "100ms", check=0).stdout.count("PROFILE") == 2


def test_list_watch_ends_on_ctrl_c_with_130(sbx):
    import signal

    p = sbx.spawn("list", "--watch", "--interval", "200ms", "--json")
    assert p.stdout.readline() == "[]\n"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err == "error: interrupted\n"


def test_a_state_that_is_not_one_is_a_usage_error(sbx):
    for cmd in (["list"], ["teardown"]):
        p = sbx(*cmd, "--state", "bogus", check=64)
        assert p.stderr.strip().splitlines() == [
            "error: --state: 'bogus' is not a sandbox state; one of: provisioning, ready, "
            "tearing_down, terminated, teardown_failed, failed, lost"], p.stderr
