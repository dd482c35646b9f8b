"""A live smoke test of the built-in ext.modal against Modal itself, with the operator's token.

Skipped (saying why) unless MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are set and
SANDBOXER_LIVE=1 asks for it: it creates a real sandbox and costs real money.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    not (os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET")
         and os.environ.get("SANDBOXER_LIVE") == "1"),
    reason="live Modal test: set MODAL_TOKEN_ID, MODAL_TOKEN_SECRET and SANDBOXER_LIVE=1 to run it (bills your workspace)",
)


def test_live_modal_create_exec_teardown(tmp_path):
    pytest.importorskip("modal", reason="the modal extra is not installed")
    from sandboxer import Manager, SandboxCreateRequest
    from sandboxer.models import SandboxState

    with Manager(config_dirs=[], home=tmp_path) as mgr:
        sb = mgr.create(SandboxCreateRequest(profile="modal", consumer="live-smoke", ttl="10m"))
        try:
            assert sb.state == SandboxState.READY
            res = mgr.exec(sb.id, ["python", "-c", "print(6 * 7)"])
            assert (res.exit_code, res.stdout.strip()) == (0, "42")
        finally:
            assert mgr.teardown(sb.id).state == SandboxState.TERMINATED
        assert all(o.sandbox_id != sb.id for o in mgr.extension("ext.modal").list_owned(mgr.owner_labels))


def test_live_modal_serves_an_exposed_port_with_no_egress(tmp_path):
    """What the stand-in cannot show: with egress none and a port exposed, ext.modal sends an outbound
    allow-list naming nothing; Modal must then serve the tunnel and let nothing out."""
    pytest.importorskip("modal", reason="the modal extra is not installed")
    import time
    from pathlib import Path

    import httpx
    import yaml

    from sandboxer import Manager, SandboxCreateRequest
    from sandboxer.models import SandboxState

    profile = yaml.safe_load((Path(__file__).parents[2] / "profiles" / "profile.modal.yaml").read_text())
    profile.update(slug="modal-serve", network={"egress": "none", "expose": [8080]})
    (tmp_path / "cfg" / "profiles").mkdir(parents=True)
    (tmp_path / "cfg" / "profiles" / "profile.modal-serve.yaml").write_text(yaml.safe_dump(profile))
    with Manager(config_dirs=[tmp_path / "cfg"], home=tmp_path / "home") as mgr:
        sb = mgr.create(SandboxCreateRequest(profile="modal-serve", consumer="live-smoke", ttl="10m"))
        try:
            url = sb.reachability["urls"]["8080"]
            mgr.exec(sb.id, ["sh", "-c", "nohup python -m http.server 8080 >/dev/null 2>&1 &"])
            status = None
            for _ in range(30):  # the server needs a moment to listen
                try:
                    status = httpx.get(url, timeout=10).status_code
                except httpx.HTTPError:
                    status = None
                if status == 200:
                    break
                time.sleep(1)
            assert status == 200
            out = mgr.exec(sb.id, ["python", "-c", "import socket; socket.create_connection(('1.1.1.1', 443), 5)"])
            assert out.exit_code != 0, "the sandbox reached 1.1.1.1: an empty allow-list did not block egress"
        finally:
            assert mgr.teardown(sb.id).state == SandboxState.TERMINATED
