"""Every tampering case is refused at install, before anything is unpacked or imported: nothing
installed, no state row, and an audit event carrying the TrustError's reason."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from sandboxer.errors import TrustError
from sandboxer.state import StateStore
from sandboxer.trust import SigningKey, load_grants, load_trust, revoke_key, sign_bundle
from sandboxer.trust.installer import Installer
from tests.trust.conftest import manifest_text


def _unsigned(manifest, artifact, acme, trusted, tmp_path):
    pass


def _wrong_key(manifest, artifact, acme, trusted, tmp_path):
    sign_bundle(manifest, SigningKey.generate(), artifact)


def _revoked(manifest, artifact, acme, trusted, tmp_path):
    sign_bundle(manifest, acme, artifact)
    revoke_key(trusted, acme.key_id)


def _expired(manifest, artifact, acme, trusted, tmp_path):
    sign_bundle(manifest, acme, artifact, now=datetime.now(timezone.utc) - timedelta(days=30),
                expires_in=timedelta(days=1))


def _artifact_byte(manifest, artifact, acme, trusted, tmp_path):
    sign_bundle(manifest, acme, artifact)
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))


def _manifest_byte(manifest, artifact, acme, trusted, tmp_path):
    sign_bundle(manifest, acme, artifact)
    manifest.write_text(manifest.read_text().replace("max_workspaces: 50", "max_workspaces: 51"))


def _unknown_capability(manifest, artifact, acme, trusted, tmp_path):
    manifest.write_text(manifest_text(grants=["gpu:exclusive"]))
    newer = tmp_path / "capabilities.yaml"
    newer.write_text(yaml.safe_dump({"grants": {**load_grants().templates, "gpu:exclusive": "a whole GPU"}}))
    sign_bundle(manifest, acme, artifact, grants=load_grants(newer))


def _rollback(manifest, artifact, acme, trusted, tmp_path):
    sign_bundle(manifest, acme, artifact)  # 0.1.0, after 0.2.0 was once installed (seeded below)


def _undeclared_secret(manifest, artifact, acme, trusted, tmp_path):
    data = yaml.safe_load(manifest_text(grants=["fs:write:workspaces", "secrets:read:env:WORKSPACE_TOKEN"]))
    data["config"]["token"] = {"env": "DEPLOY_KEY"}  # a secret it never declared
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    sign_bundle(manifest, acme, artifact)


CASES = {"unsigned": (_unsigned, "unsigned"), "wrong key": (_wrong_key, "unknown-key"),
         "revoked key": (_revoked, "revoked-key"), "expired": (_expired, "expired"),
         "byte flipped in the artifact": (_artifact_byte, "artifact-changed"),
         "byte flipped in the manifest": (_manifest_byte, "manifest-changed"),
         "rollback": (_rollback, "rollback"), "unknown capability": (_unknown_capability, "unknown-capability"),
         "undeclared secret asked for": (_undeclared_secret, "undeclared-secret")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_bundle_is_refused_with_nothing_installed(case, bundle, acme, trusted, tmp_path):
    tamper, reason = CASES[case]
    manifest, artifact = bundle(manifest_text())
    tamper(manifest, artifact, acme, trusted, tmp_path)
    home = tmp_path / "home"
    state = StateStore(home=home)
    try:
        if case == "rollback":
            state.extension_transition("ext.workspace", "verified", who="earlier", publisher="acme", version="0.2.0")
            state.extension_transition("ext.workspace", "installed", who="earlier")
            state.forget_extension("ext.workspace", who="earlier", what="remove")
        inst = Installer(home, state, load_trust([trusted]), None, who="tester")
        with pytest.raises(TrustError) as err:
            inst.install(str(manifest))
        assert err.value.reason == reason
        assert state.installed_extension("ext.workspace") is None
        root = home / "extensions"
        assert not root.exists() or [p.name for p in root.iterdir() if not p.name.startswith(".fetch-")] == []
        assert not any(root.rglob("*")) if root.exists() else True  # no staging left either
        assert "sandboxer_workspace" not in sys.modules  # nothing of the bundle was imported
        last = state.audit_events("ext.workspace")[-1]
        assert (last["what"], last["reason"], last["who"], last["version"]) == ("verify_failed", reason, "tester",
                                                                                "0.1.0")
        assert last["detail"]["error"] == str(err.value)
        if case == "undeclared secret asked for":
            assert str(err.value) == (
                f"{manifest}: field 'config.token' (value 'env:DEPLOY_KEY'): the config asks for a secret its grants "
                f"do not declare (capabilities.grants would need 'secrets:read:env:DEPLOY_KEY'); an installed bundle "
                f"gets only the secrets it declares")
    finally:
        state.close()


def test_the_command_line_refuses_and_the_audit_shows_why(bundle, acme, trusted, tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    manifest, artifact = bundle(manifest_text())
    _manifest_byte(manifest, artifact, acme, trusted, tmp_path)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SANDBOXER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(repo)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "sandboxer", "--config", str(trusted), *map(str, args)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    p = run("extensions", "install", manifest)
    assert p.returncode == 77 and p.stderr == (f"error: {manifest}: the signature in {manifest}.sig does not verify: the "
                                              f"manifest (or the signature file) changed after signing; do not install "
                                              f"it\n")
    events = json.loads(run("extensions", "audit", "--json").stdout)
    assert [(e["what"], e["extension"], e["reason"]) for e in events] == [
        ("verify_failed", "ext.workspace", "manifest-changed")]
