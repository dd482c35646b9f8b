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


def test_live_an_exposed_port_answers_only_with_the_traffic_token(tmp_path: Path):
    """What the stand-in cannot show: E2B really refuses a request to an exposed port without the token."""
    import time

    import e2b
    import httpx
    import yaml

    profile = yaml.safe_load((Path(__file__).parents[2] / "profiles" / "profile.e2b.yaml").read_text())
    profile.update(slug="e2b-serve", network={"egress": "none", "expose": [8080]})
    (tmp_path / "cfg" / "profiles").mkdir(parents=True)
    (tmp_path / "cfg" / "profiles" / "profile.e2b-serve.yaml").write_text(yaml.safe_dump(profile))
    with Manager(config_dirs=[tmp_path / "cfg"], home=tmp_path / "home") as mgr:
        sb = mgr.create(SandboxCreateRequest(profile="e2b-serve", consumer="live-smoke", ttl="5m"))
        try:
            url = sb.reachability["urls"]["8080"]
            mgr.exec(sb.id, ["sh", "-c", "nohup python3 -m http.server 8080 >/dev/null 2>&1 &"])
            token = e2b.Sandbox.connect(sb.reachability["e2b_sandbox_id"]).traffic_access_token
            assert token
            status = None
            for _ in range(30):  # the server needs a moment to listen
                status = httpx.get(url, headers={"e2b-traffic-access-token": token}, timeout=10).status_code
                if status == 200:
                    break
                time.sleep(1)
            assert status == 200
            assert httpx.get(url, timeout=10).status_code == 403
        finally:
            assert mgr.teardown(sb.id).state is SandboxState.TERMINATED
