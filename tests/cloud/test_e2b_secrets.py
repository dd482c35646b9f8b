"""ext.e2b gives a sandbox its secrets as the unmodified SDK's ``Sandbox.create(envs=...)``: the stand-in
records the create body's ``envVars`` as they arrived on the wire, and runs every command with them."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer.models import SnapshotMeta  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_e2b import config_dir, inputs, make_ext, sentinel, standin  # noqa: E402,F401 - fixtures
from tests.cloud.e2b_standin import E2BStandIn  # noqa: E402


def test_secrets_go_as_envs_and_every_command_sees_them(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    value = "sbx_E2B_secret_value with spaces"
    handle = ext.provision(request(profile, inputs("sbx-sec"), None, secrets={"TOKEN": value}))
    try:
        box = standin.boxes[handle.e2b_sandbox_id]
        assert box.env == {"TOKEN": value}  # envVars, as the SDK sent them
        assert value not in json.dumps(box.metadata)
        reach = ext.wait_ready(handle, timeout=10)
        digest = hashlib.sha256(value.encode()).hexdigest()
        res = ext.exec(handle, ["sh", "-c", f'[ "$(printf %s "$TOKEN" | sha256sum | cut -d" " -f1)" = {digest} ]'])
        assert res.exit_code == 0, res.stderr
        assert value not in handle.model_dump_json() and value not in reach.model_dump_json()
        snap = ext.snapshot(handle)
        assert value not in json.dumps(snap.data)
        meta = SnapshotMeta(id="snap-1", sandbox_id="sbx-sec", extension=ext.id, profile="test-e2b",
                            created_at="2026-11-21T00:00:00Z", data=snap.data)
        restored = ext.restore_from_snapshot(request(profile, inputs("sbx-sec2"), None,
                                                     secrets={"TOKEN": "sbx_E2B_restored"}), meta)
        assert standin.boxes[restored.e2b_sandbox_id].env == {"TOKEN": "sbx_E2B_restored"}  # the new request's
        ext.teardown(restored)
    finally:
        ext.teardown(handle)


def test_no_secrets_send_no_envs(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-nosec"), None))
    try:
        assert standin.boxes[handle.e2b_sandbox_id].env == {}
    finally:
        ext.teardown(handle)
