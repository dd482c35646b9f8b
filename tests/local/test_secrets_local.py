"""ext.local's secrets: the init's environment holds them, every exec gets them (read from the init,
in whatever process runs the exec), and neither the workspace, its snapshot, the handle nor the
extension's own files ever hold a value."""

from __future__ import annotations

import hashlib
import json
import os
import secrets as _random
import subprocess
import sys

import pytest

from sandboxer.errors import CapabilityError

from sandboxer.errors import ProvisionError

PROFILE = """
    slug: sec
    extension: ext.local
    isolation: process
    ready_timeout: 10s
    resources: {cpu: 1, memory_mb: 512, disk_mb: 256, pids: 128}
    secrets:
      TOKEN: {env: SBX_LOCAL_TOKEN}
      OTHER: {env: SBX_LOCAL_OTHER}
"""


@pytest.fixture
def values(monkeypatch) -> dict[str, str]:
    out = {"TOKEN": "sbx_LOCAL_" + _random.token_hex(12), "OTHER": "sbx_OTHER with spaces; $(and) 'quotes'"}
    monkeypatch.setenv("SBX_LOCAL_TOKEN", out["TOKEN"])
    monkeypatch.setenv("SBX_LOCAL_OTHER", out["OTHER"])
    return out


@pytest.fixture
def mgr(cfg, make_manager):
    cfg.write("profile.sec.yaml", PROFILE)
    return make_manager()


def _sees(name: str, value: str) -> str:
    """A command that exits 0 only if ``$name`` holds ``value``, compared by hash (never echoed)."""
    digest = hashlib.sha256(value.encode()).hexdigest()
    return f'[ "$(printf %s "${name}" | sha256sum | cut -d" " -f1)" = {digest} ]'


def _files_hold(root, value: str) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                with open(p, "rb") as fh:
                    if value.encode() in fh.read():
                        hits.append(p)
            except OSError:
                pass
    return hits


def test_each_exec_sees_the_secrets_and_nothing_of_ours_holds_them(mgr, values, home, cfg):
    sb = mgr.create(profile="sec")
    try:
        for name, value in values.items():
            r = mgr.exec(sb.id, ["sh", "-c", _sees(name, value)])
            assert r.exit_code == 0, (name, r.stderr)
        # another process (the CLI's exec) has no values: it reads them from the sandbox's init
        env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}
        env.pop("SBX_LOCAL_TOKEN"), env.pop("SBX_LOCAL_OTHER")
        p = subprocess.run([sys.executable, "-m", "sandboxer", "exec", sb.id, "--", "sh", "-c",
                            _sees("TOKEN", values["TOKEN"])], capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        # an exec's own env still wins for the names it sets
        r = mgr.exec(sb.id, ["sh", "-c", 'test "$TOKEN" = mine'], env={"TOKEN": "mine"})
        assert r.exit_code == 0
        handle = json.dumps(mgr.state.get(sb.id)["handle"])
        assert '"secrets": ["OTHER", "TOKEN"]' in handle  # names only
        snap = mgr.snapshot(sb.id)
        for value in values.values():
            assert value not in handle
            assert _files_hold(home, value) == []  # workspace, snapshot, .meta, state store
        sb2 = mgr.restore(snap.id)
        assert mgr.exec(sb2.id, ["sh", "-c", _sees("TOKEN", values["TOKEN"])]).exit_code == 0
        mgr.teardown(sb2.id)
    finally:
        mgr.teardown(sb.id)


def test_a_sandbox_without_secrets_sees_none_of_another_sandboxs(mgr, values):
    sb = mgr.create(profile="sec")
    plain = mgr.create(profile="local")
    try:
        r = mgr.exec(plain.id, ["sh", "-c", "env; cat /proc/[0-9]*/environ 2>/dev/null; true"])
        assert values["TOKEN"] not in r.stdout and "TOKEN" not in r.stdout
    finally:
        mgr.teardown(sb.id)
        mgr.teardown(plain.id)


def test_isolation_none_refuses_secrets_before_making_anything(cfg, make_manager, values, home):
    cfg.write("profile.sec.yaml", PROFILE.replace("isolation: process", "isolation: none"))
    mgr = make_manager()
    with pytest.raises(CapabilityError) as err:
        mgr.create(profile="sec")
    assert ("ext.local cannot keep the policy of profile 'sec': " in str(err.value)
            and "'isolation: none' has no init process to hold secrets apart from the host (every process of this "
                "user would see them); drop 'isolation: none' for a profile with secrets" in str(err.value))
    assert mgr.list() == []
    assert not (home / "local").exists() or [p.name for p in (home / "local").iterdir() if p.name != ".meta"] == []
