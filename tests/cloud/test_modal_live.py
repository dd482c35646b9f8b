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
