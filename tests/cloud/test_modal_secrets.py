"""ext.modal gives a sandbox its secrets as ``Sandbox.create(secrets=[modal.Secret.from_dict(...)])``: the
stand-in records the create's secret sources as the unmodified SDK sent them over gRPC, and runs every
exec with them."""

from __future__ import annotations

import hashlib
import os

import pytest

os.environ.setdefault("MODAL_CONFIG_PATH", "/nonexistent/sandboxer-tests/modal.toml")
pytest.importorskip("modal", reason="the modal extra is not installed (pip install 'sand-boxer[modal]')")

from sandboxer.models import SnapshotMeta  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.cloud.test_modal import backend, inputs, standin, tokens  # noqa: E402,F401 - fixtures


def test_secrets_go_as_one_inline_secret_and_every_exec_sees_them(backend, standin):
    ext, prof = backend
    value = "sbx_MODAL_secret with spaces"
    handle = ext.provision(request(prof, inputs("sbx-sec", env={"PLAIN": "1"}), None,
                                   secrets={"TOKEN": value, "OTHER": "two"}))
    try:
        sb = standin.sandboxes[handle.object_id]
        # Secret.from_dict's source first, then the env= input's: each as it arrived
        assert sb.secret_sources == [{"TOKEN": value, "OTHER": "two"}, {"PLAIN": "1"}]
        assert value not in str(sb.tags) and value not in handle.model_dump_json()
        ext.wait_ready(handle, timeout=10)
        digest = hashlib.sha256(value.encode()).hexdigest()
        res = ext.exec(handle, ["sh", "-c", f'[ "$(printf %s "$TOKEN" | sha256sum | cut -d" " -f1)" = {digest} ]'])
        assert res.exit_code == 0, res.stderr
        snap = ext.snapshot(handle)
        meta = SnapshotMeta(id="snap-1", sandbox_id="sbx-sec", extension=ext.id, profile=prof.slug,
                            created_at="2026-11-21T00:00:00Z", data=snap.data)
        restored = ext.restore_from_snapshot(request(prof, inputs("sbx-sec2"), None,
                                                     secrets={"TOKEN": "sbx_MODAL_restored"}), meta)
        assert standin.sandboxes[restored.object_id].secret_sources == [{"TOKEN": "sbx_MODAL_restored"}]
        ext.teardown(restored)
    finally:
        ext.teardown(handle)


def test_no_secrets_send_no_secret_source(backend, standin):
    ext, prof = backend
    handle = ext.provision(request(prof, inputs("sbx-nosec"), None))
    try:
        assert standin.sandboxes[handle.object_id].secret_sources == []
    finally:
        ext.teardown(handle)


def test_a_gpu_sandbox_gets_its_secrets_through_modals_v1_create(backend, standin):
    """modal 1.6 sends a GPU sandbox through the V1 create, where a from_dict Secret is made first
    (SecretGetOrCreate, ephemeral) and named in the definition: the sandbox still sees it."""
    from sandboxer.models import Profile

    ext, prof = backend
    gpu = Profile.model_validate({**prof.model_dump(), "resources": {**prof.resources.model_dump(),
                                                                     "gpu": {"count": 1, "type": "T4"}}})
    value = "sbx_MODAL_gpu_secret"
    handle = ext.provision(request(gpu, inputs("sbx-gpusec"), None, secrets={"TOKEN": value}))
    try:
        assert standin.called("SandboxCreate") and standin.called("SecretGetOrCreate")
        assert standin.sandboxes[handle.object_id].secret_sources == [{"TOKEN": value}]
        ext.wait_ready(handle, timeout=10)
        res = ext.exec(handle, ["sh", "-c", f'[ "$TOKEN" = {value} ]'])
        assert res.exit_code == 0, res.stderr
    finally:
        ext.teardown(handle)
