"""The issue's sentinel test: after a full lifecycle through the CLI, fallback included, the values of
a sandbox's secrets are in none of: the state store's bytes and tables, the events, any CLI output
(``--json`` too, errors too), the handles, or any file under the manager's home (workspaces,
snapshots, the backends' own files). The sandbox itself still sees them."""

from __future__ import annotations

import hashlib
import json
import os
import secrets as _random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

STUB_DOWN = """
    id: ext.stub-down
    title: a stand-in whose creates all fail (capacity)
    version: 0.1.0
    handler: sandboxer.extensions.saas_stub:SaasStubExtension
    capabilities:
      isolation_levels: [microvm]
      pricing_model: metered
      features: [exec, snapshots, metering, list_owned]
    config: {faults: [{stage: provision, error: capacity, rate: 1.0}]}
"""

PROFILE = """
    slug: agent
    backends: [{extension: ext.stub-down}, {extension: ext.local}]
    ready_timeout: 10s
    resources: {cpu: 1, memory_mb: 512, disk_mb: 256, pids: 128}
    secrets:
      OPS_TOKEN: {env: SBX_SENTINEL_OPS}
      USER_TOKEN: {env: SBX_SENTINEL_PLACEHOLDER}
"""


def _sees(name: str, value: str) -> str:
    digest = hashlib.sha256(value.encode()).hexdigest()
    return f'[ "$(printf %s "${name}" | sha256sum | cut -d" " -f1)" = {digest} ]'


def _everything_under(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            try:
                out[str(p)] = p.read_bytes()
            except OSError:
                pass
    return out


def test_a_secret_sentinel_is_nowhere_after_a_full_lifecycle_fallback_included(cfg, home, tmp_path):
    ops = "sbx_SENTINEL_ops_" + _random.token_hex(12)
    user = "sbx_SENTINEL_user_" + _random.token_hex(12)
    sentinels = (ops, user)
    cfg.write("ext.stub-down.yaml", STUB_DOWN)
    cfg.write("profile.agent.yaml", PROFILE)
    user_file = tmp_path / "user-token"
    user_file.write_text(user + "\n")
    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root), "SBX_SENTINEL_OPS": ops}
    env.pop("SBX_SENTINEL_PLACEHOLDER", None)
    outputs: list[str] = []

    def sbx(*args: str, check: int | None = 0, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, text=True,
                           env=environ or env, timeout=120)
        outputs.extend([p.stdout, p.stderr])
        if check is not None:
            assert p.returncode == check, (args, p.returncode, p.stdout, p.stderr)
        return p

    # error paths first: an unset operator reference, a consumer name the profile does not declare,
    # a literal where a reference belongs: each names the secret (and reference), never a value
    unset = {k: v for k, v in env.items() if k != "SBX_SENTINEL_OPS"}
    p = sbx("create", "agent", "--secret", f"USER_TOKEN=file:{user_file}", check=65, environ=unset)
    assert p.stderr == ("error: secret 'OPS_TOKEN' of profile 'agent' (the profile's reference): no value in "
                        "environment variable SBX_SENTINEL_OPS; set it and try again. Nothing was created.\n")
    p = sbx("create", "agent", "--secret", f"NOPE=file:{user_file}", check=65)
    assert p.stderr.startswith("error: secret 'NOPE' is not declared by profile 'agent' (it declares: OPS_TOKEN, "
                               "USER_TOKEN)")
    p = sbx("create", "agent", "--secret", f"USER_TOKEN={user}", check=64)
    assert "expected NAME=env:VARIABLE or NAME=file:PATH for secret 'USER_TOKEN'" in p.stderr
    assert json.loads(sbx("list", "--all", "--json").stdout) == []

    # create: ext.stub-down refuses (capacity), ext.local takes it, with both secrets
    sb = json.loads(sbx("create", "agent", "--secret", f"USER_TOKEN=file:{user_file}", "--json").stdout)
    assert sb["extension"] == "ext.local" and sb["policy"]["secrets"] == ["OPS_TOKEN", "USER_TOKEN"]
    route = [e for e in sqlite3.connect(home / "state.db").execute("SELECT detail FROM events")]
    assert "ext.stub-down" in json.dumps([str(r) for r in route])  # the fallback is on record
    for name, value in (("OPS_TOKEN", ops), ("USER_TOKEN", user)):
        sbx("exec", sb["id"], "--", "sh", "-c", _sees(name, value))
    p = sbx("exec", sb["id"], "--", "no-such-binary-here", check=None)
    assert p.returncode != 0
    sbx("exec", sb["id"], "--", "sh", "-c", "exit 3", check=3)
    assert "USER_TOKEN" in sbx("status", sb["id"]).stdout  # by name
    assert json.loads(sbx("status", sb["id"], "--json").stdout)["policy"]["secrets"] == ["OPS_TOKEN", "USER_TOKEN"]
    sbx("list", "--json")
    sbx("profiles", "explain", "agent")
    snap = sbx("snapshot", sb["id"]).stdout.split()[0]
    restored = json.loads(sbx("restore", snap, "--secret", f"USER_TOKEN=file:{user_file}", "--json").stdout)
    sbx("exec", restored["id"], "--", "sh", "-c", _sees("USER_TOKEN", user))
    sbx("exec", restored["id"], "--", "sh", "-c", _sees("OPS_TOKEN", ops))
    sbx("snapshots", "list")
    handles = [sqlite3.connect(home / "state.db").execute("SELECT handle FROM sandboxes WHERE id = ?",
                                                          (i,)).fetchone()[0] for i in (sb["id"], restored["id"])]
    sbx("teardown", sb["id"], "--json")
    sbx("teardown", restored["id"], "--json")
    sbx("gc", "--json")
    sbx("list", "--all", "--json")
    sbx("cost", "report", "--json")

    con = sqlite3.connect(home / "state.db")
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    rows = json.dumps({t: con.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}, default=str)
    con.close()
    assert "events" in tables and "sandboxes" in tables
    files = _everything_under(home)
    assert any(name.endswith("state.db") for name in files) and any("snapshots" in name for name in files)
    for value in sentinels:
        assert value not in rows
        assert all(value not in h for h in handles)
        assert not any(value in text for text in outputs)
        leaked = [name for name, data in files.items() if value.encode() in data]
        assert leaked == []
