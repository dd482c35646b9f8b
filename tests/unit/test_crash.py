"""Crash consistency: the process dies between provision and recording the handle; gc still finds it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sandboxer import Manager

CRASHER = textwrap.dedent("""
    import os, sys
    from sandboxer import Manager
    from sandboxer.state import StateStore

    real = StateStore.transition
    def transition(self, sandbox_id, kind, **kw):
        if kind == "provisioned":      # provision returned; the handle is not recorded yet
            print(sandbox_id, flush=True)
            os._exit(17)               # a crash: no cleanup, no finally blocks
        return real(self, sandbox_id, kind, **kw)
    StateStore.transition = transition

    mgr = Manager(config_dirs=[sys.argv[1]], home=sys.argv[2])
    mgr.create(profile=sys.argv[3])
""")


@pytest.mark.parametrize("profile", ["crash-stub", "crash-local"])
def test_gc_reaps_sandbox_created_by_a_process_that_crashed(cfg, home, tmp_path, profile):
    cfg.write("ext.crash-stub.yaml", """
        id: ext.crash-stub
        title: stub for the crash test
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {isolation_levels: [microvm], pricing_model: metered, features: [exec, list_owned]}
        config: {latency_s: 0}
    """)
    cfg.write("profile.crash-stub.yaml", "slug: crash-stub\nextension: ext.crash-stub\nready_timeout: 1s\n")
    cfg.write("profile.crash-local.yaml", "slug: crash-local\nextension: ext.local\nready_timeout: 1s\n")
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    proc = subprocess.run([sys.executable, str(script), str(cfg.root), str(home), profile],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr
    sandbox_id = proc.stdout.strip()

    mgr = Manager(config_dirs=[cfg.root], home=home, stale_grace=0)
    try:
        row = mgr.state.get(sandbox_id)
        assert row["state"] == "provisioning" and row["handle"] is None
        ext = mgr.extension(row["extension"])
        owned = [o for o in ext.list_owned(mgr.owner_labels) if o.sandbox_id == sandbox_id]
        assert len(owned) == 1, "the backend really holds a sandbox the store has no handle for"
        if profile == "crash-local":
            pid = owned[0].handle.pid
            assert Path(f"/proc/{pid}").exists()

        assert mgr.gc().orphans == []  # not stale yet: a creating process may still own it
        time.sleep(1.1)
        report = mgr.gc()
        assert report.stale_provisioning == [sandbox_id]
        assert report.orphans == [sandbox_id]
        assert [o for o in ext.list_owned(mgr.owner_labels) if o.sandbox_id == sandbox_id] == []
        assert mgr.state.get(sandbox_id)["state"] in ("failed", "terminated")
        if profile == "crash-local":
            assert not Path(f"/proc/{pid}").exists()
            assert not Path(owned[0].handle.workspace).exists()
        assert [e["kind"] for e in mgr.events(sandbox_id)][-1] == "orphan_reaped"
    finally:
        mgr.close()
