"""A smoke test against the real E2B service, with the operator's own key.

Skipped unless ``E2B_API_KEY`` is set (and then it needs internet access and
spends a few cents of E2B time): create from the built-in ``e2b`` profile,
run one command, tear down.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.models import SandboxState  # noqa: E402

pytestmark = pytest.mark.skipif(
    not os.environ.get("E2B_API_KEY"),
    reason="live E2B smoke test: no credentials (set E2B_API_KEY to run it against the real service)",
)


def test_live_create_exec_teardown(tmp_path: Path):
    with Manager(config_dirs=[], home=tmp_path / "home") as mgr:
        sb = mgr.create(SandboxCreateRequest(profile="e2b", consumer="live-smoke", ttl="5m"))
        try:
            assert sb.state is SandboxState.READY
            res = mgr.exec(sb.id, ["sh", "-c", "echo ok"])
            assert (res.exit_code, res.stdout) == (0, "ok\n")
        finally:
            assert mgr.teardown(sb.id).state is SandboxState.TERMINATED
        assert mgr.gc().orphans == []
