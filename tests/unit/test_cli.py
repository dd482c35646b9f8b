"""The CLI end to end, as a user runs it: exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pytest


@pytest.fixture
def sbx(home, cfg):
    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}

    def run(*args, check=None):
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, text=True, env=env, timeout=120,
                           stdin=subprocess.DEVNULL)
        if check is not None:
            assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
        return p

    return run


def test_local_lifecycle_through_cli(sbx):
    p = sbx("create", "local", "--consumer", "ci", "--ttl", "30m", "--label", "job=7", "--json", check=0)
    sb = json.loads(p.stdout)
    assert sb["state"] == "ready" and sb["consumer"] == "ci" and sb["labels"] == {"job": "7"}
    p = sbx("exec", sb["id"], "--", "sh", "-c", "echo out; echo err >&2; exit 5", check=5)
    assert p.stdout == "out\n" and p.stderr == "err\n"
    assert json.loads(sbx("status", sb["id"], "--json", check=0).stdout)["state"] == "ready"
    assert [s["id"] for s in json.loads(sbx("list", "--json", check=0).stdout)] == [sb["id"]]
    assert json.loads(sbx("teardown", sb["id"], "--json", check=0).stdout)["state"] == "terminated"
    assert json.loads(sbx("list", "--json", check=0).stdout) == []
    assert len(json.loads(sbx("list", "--all", "--json", check=0).stdout)) == 1
    assert json.loads(sbx("gc", "--json", check=0).stdout)["errors"] == {}


def test_create_prints_id_and_reachability(sbx):
    p = sbx("create", "saas-stub", check=0)
    sandbox_id, reach = p.stdout.splitlines()
    assert sandbox_id.startswith("sb-") and reach.startswith("reachability: ")
    sbx("teardown", sandbox_id, check=0)


@pytest.mark.parametrize("args, code, message", [
    (["create", "nope"], 66, "error: unknown profile 'nope'; known profiles:"),
    (["status", "sb-nope"], 66, "error: no sandbox with id or name 'sb-nope'"),
    (["teardown", "sb-nope"], 66, "error: no sandbox with id or name 'sb-nope'"),
    (["exec", "sb-nope", "--", "true"], 66, "error: no sandbox with id or name 'sb-nope'"),
    (["create", "local", "--ttl", "48h"], 65, "error: TTL 2d is over profile 'local''s maximum of 1d"),
    (["create", "local", "--input", "sandbox_id=x"], 65, "error: input 'sandbox_id' is reserved"),
])
def test_bad_input_exits_nonzero_with_one_line(sbx, args, code, message):
    p = sbx(*args, check=code)
    assert p.stderr.startswith(message) and p.stderr.count("\n") == 1
    assert p.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["create", "local", "--ttl", "-5m"], "must not be negative"),
    (["create", "local", "--ttl", "soon"], "not a duration"),
    (["create", "local", "--input", "novalue"], "expected KEY=VALUE"),
])
def test_usage_errors_exit_64(sbx, args, message):
    p = sbx(*args, check=64)
    assert message in p.stderr


def test_broken_config_fails_validate_naming_the_file(sbx, cfg):
    path = cfg.write("ext.broken.yaml", "id: ext.broken\n")
    p = sbx("validate", check=78)
    assert str(path) in p.stderr and "field 'title'" in p.stderr
    p = sbx("create", "local", "--consumer", "ci", check=78)
    assert str(path) in p.stderr
    # list reads the state store only: a broken file elsewhere does not hide the sandboxes there
    assert sbx("list", "--json", check=0).stdout.strip() == "[]"


def test_validate_and_listings(sbx):
    assert sbx("validate", check=0).stdout.startswith("ok: ")
    exts = json.loads(sbx("extensions", "list", "--json", check=0).stdout)
    assert {"ext.local", "ext.saas-stub"} <= {e["id"] for e in exts}
    profs = json.loads(sbx("profiles", "list", "--json", check=0).stdout)
    assert "local" in {p["slug"] for p in profs}


def test_schema_writes_both_kinds(sbx, tmp_path):
    sbx("schema", "--out", str(tmp_path / "s"), check=0)
    ext = json.loads((tmp_path / "s" / "extension.schema.json").read_text())
    prof = json.loads((tmp_path / "s" / "profile.schema.json").read_text())
    assert "handler" in ext["properties"] and "resources" in prof["properties"]


def test_cost_snapshot_and_export_commands(sbx, cfg, tmp_path):
    quotes = json.loads(sbx("cost", "estimate", "saas-stub", "--duration", "2h", "--json", check=0).stdout)
    assert quotes[0]["extension"] == "ext.saas-stub" and quotes[0]["amount"] > 0 and quotes[0]["duration_s"] == 7200
    assert "not a duration" in sbx("cost", "estimate", "saas-stub", "--duration", "soon", check=64).stderr

    sb = json.loads(sbx("create", "saas-stub", "--consumer", "erin", "--json", check=0).stdout)
    snap = json.loads(sbx("snapshot", sb["id"], "--json", check=0).stdout)
    assert [s["id"] for s in json.loads(sbx("snapshots", "list", "--json", check=0).stdout)] == [snap["id"]]
    restored = json.loads(sbx("restore", snap["id"], "--json", check=0).stdout)
    assert restored["state"] == "ready" and restored["consumer"] == "erin"
    for sid in (sb["id"], restored["id"]):
        sbx("teardown", sid, check=0)
    assert sbx("restore", "snap-nope", check=66).stderr.startswith("error: no usable snapshot with id 'snap-nope'")

    report = json.loads(sbx("cost", "report", "--by", "consumer", "--json", check=0).stdout)
    assert [(r["consumer"], r["sandboxes"]) for r in report] == [("erin", 2)]
    lines = sbx("meter", "export", check=0).stdout.splitlines()
    assert len(lines) == 2 and {json.loads(x)["consumer"] for x in lines} == {"erin"}
    assert sbx("meter", "export", "--format", "csv", check=0).stdout.startswith("id,sandbox_id,period")
    (cfg.root / "settings.yaml").write_text(f"sinks:\n  f: {{kind: file, path: {tmp_path / 'u.jsonl'}}}\n")
    assert "queued: 2  delivered: 2" in sbx("meter", "export", "--sink", "f", check=0).stdout
    assert "queued: 0" in sbx("meter", "export", "--sink", "f", check=0).stdout
    assert "unknown sink 'g'" in sbx("meter", "export", "--sink", "g", check=78).stderr


def test_validate_and_extensions_list_show_a_config_override(sbx, cfg):
    path = cfg.write("ext.saas-stub.yaml", "id: ext.saas-stub\noverride: config\nconfig: {capacity: 1}\n")
    p = sbx("validate", check=0)
    assert f"note: ext.saas-stub: config overridden by {path}" in p.stdout.splitlines()
    exts = {e["id"]: e for e in json.loads(sbx("extensions", "list", "--json", check=0).stdout)}
    assert exts["ext.saas-stub"]["config_overrides"] == [str(path)]
    assert exts["ext.saas-stub"]["source"] != str(path)  # the manifest still comes from the shipped file
    assert exts["ext.local"]["config_overrides"] == []
    table = sbx("extensions", "list", check=0).stdout
    assert "CONFIG" in table and "overridden" in table
    assert table.splitlines()[-1] == f"ext.saas-stub: config overridden by {path}"
    path.write_text("id: ext.saas-stub\noverride: config\nconfig: {capacity: -1}\n")
    p = sbx("validate", check=78)
    assert p.stderr.startswith(f"error: {path}: field 'config.capacity' (value -1)") and p.stderr.count("\n") == 1


def test_damaged_state_file_is_one_error_line(sbx, home):
    home.mkdir(parents=True)
    (home / "state.db").write_bytes(b"\x00garbage" * 512)
    p = sbx("list", check=78)
    copies = list(home.glob("state.db.corrupt-*"))
    assert len(copies) == 1
    assert p.stderr.startswith(f"error: state store {home / 'state.db'} is damaged (file is not a database); "
                               f"a copy is kept at {copies[0]}. To go on, move the damaged file aside")
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and p.stdout == ""


def test_restore_takes_the_options_of_create(sbx):
    sb = json.loads(sbx("create", "saas-stub", "--consumer", "erin", "--json", check=0).stdout)
    snap = json.loads(sbx("snapshot", sb["id"], "--json", check=0).stdout)["id"]
    p = sbx("restore", snap, "--ttl", "20m", "--label", "job=9", "--label", "team=a", "--consumer", "ci",
            "--input", "color=red", "--json", check=0)
    restored = json.loads(p.stdout)
    status = json.loads(sbx("status", restored["id"], "--json", check=0).stdout)
    assert status["state"] == "ready" and status["consumer"] == "ci" and status["labels"] == {"job": "9", "team": "a"}
    created = datetime.fromisoformat(status["created_at"])
    assert abs((datetime.fromisoformat(status["expires_at"]) - created).total_seconds() - 1200) < 60
    plain = sbx("restore", snap, check=0).stdout.splitlines()  # without --json: just the new id
    assert len(plain) == 1 and plain[0].startswith("sb-")
    assert json.loads(sbx("status", plain[0], "--json", check=0).stdout)["consumer"] == "erin"  # the snapshot's
    for sid in (sb["id"], restored["id"], plain[0]):
        sbx("teardown", sid, check=0)

    p = sbx("restore", snap, "--input", "novalue", check=64)
    assert p.stderr == "error: --input: expected KEY=VALUE, got 'novalue'\n"
    assert sbx("restore", snap, "--label", "=x", check=64).stderr == "error: --label: expected KEY=VALUE, got '=x'\n"
    assert "not a duration" in sbx("restore", snap, "--ttl", "soon", check=64).stderr
    for args, message in ((["--ttl", "5h"], "error: TTL 5h is over profile 'saas-stub''s maximum of 4h"),
                          (["--input", "sandbox_id=x"], "error: input 'sandbox_id' is reserved")):
        p = sbx("restore", snap, *args, check=65)
        assert p.stderr.startswith(message) and p.stderr.count("\n") == 1 and p.stdout == ""
    assert json.loads(sbx("list", "--json", check=0).stdout) == []  # a refused restore leaves nothing behind
