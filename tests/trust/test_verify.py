"""verify() refuses every tampered bundle, each with its own error naming the file and the reason."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from sandboxer.errors import (
    AbiMismatch,
    ArtifactMismatch,
    RevokedKey,
    RollbackRefused,
    SignatureExpired,
    SignatureMismatch,
    TrustError,
    UnknownCapability,
    UnknownKey,
    UnsignedBundle,
)
from sandboxer.host import ABI_VERSION
from sandboxer.trust import (
    SigningKey,
    add_trusted_key,
    load_grants,
    load_trust,
    revoke_key,
    sign_bundle,
    verify,
)
from tests.trust.conftest import MANIFEST


@pytest.fixture
def signed(bundle, acme, operator_dir):
    """A bundle signed by acme, whose key the operator trusts: (manifest, artifact)."""
    manifest, artifact = bundle()
    sign_bundle(manifest, acme, artifact)
    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    return manifest, artifact


def _trust(operator_dir):
    return load_trust([operator_dir])


def test_a_signed_bundle_verifies(signed, acme, operator_dir):
    manifest, artifact = signed
    # another test may have imported the example package (it is installed): set it aside, so the
    # check below sees only what verify imports
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "sandboxer_workspace"}
    try:
        vb = verify(manifest, artifact, _trust(operator_dir), {})
        imported = [k for k in sys.modules if k.split(".")[0] == "sandboxer_workspace"]
    finally:
        sys.modules.update(saved)
    assert imported == []  # nothing of the bundle was imported
    assert (vb.manifest.id, vb.manifest.version, vb.publisher, vb.key_id) == ("ext.workspace", "0.1.0", "acme",
                                                                            acme.key_id)
    assert vb.manifest.artifact.file == artifact.name and len(vb.sha256) == 64
    assert vb.manifest.capabilities.grants == ["fs:write:workspaces", "secrets:read:env:WORKSPACE_TOKEN",
                                               "network:egress:*.example.com"]
    # the ext.<name>.yaml part, as the loader reads it (no bundle fields)
    assert "publisher" not in vb.extension_data() and "grants" not in vb.extension_data()["capabilities"]
    sig = json.loads(Path(f"{manifest}.sig").read_text())
    assert set(sig) == {"key_id", "algorithm", "expires", "signature"} and sig["algorithm"] == "ed25519"
    assert sig["key_id"] == acme.key_id


def test_reformatting_the_manifest_keeps_the_signature(signed, operator_dir):
    """The signature covers the canonical JSON of the data, not the YAML text: comments, order, style."""
    manifest, artifact = signed
    data = yaml.safe_load(manifest.read_text())
    manifest.write_text("# reordered\n" + yaml.safe_dump(dict(reversed(list(data.items()))), default_flow_style=True))
    verify(manifest, artifact, _trust(operator_dir), {})


def test_unsigned_is_refused(bundle, acme, operator_dir):
    manifest, artifact = bundle()
    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    with pytest.raises(UnsignedBundle) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value) == f"{manifest}: no signature ({manifest}.sig is missing); ask the publisher for the " \
                            f"signed bundle, or sign it with `sandboxer extensions sign`"
    assert ei.value.reason == "unsigned" and ei.value.path == str(manifest)


def test_an_untrusted_key_is_refused(bundle, acme, operator_dir):
    manifest, artifact = bundle()
    stranger = SigningKey.generate()
    sign_bundle(manifest, stranger, artifact)
    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    with pytest.raises(UnknownKey) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value).startswith(f"{manifest}.sig: field 'key_id' (value {stranger.key_id!r}): unknown key: "
                                    f"not in trust.yaml of {operator_dir}")


def test_no_trust_yaml_trusts_nothing(signed, tmp_path):
    manifest, artifact = signed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnknownKey, match="no trust.yaml in the config dirs"):
        verify(manifest, artifact, load_trust([empty]), {})


def test_another_publishers_key_is_refused(bundle, operator_dir):
    manifest, artifact = bundle()
    other = SigningKey.generate()
    sign_bundle(manifest, other, artifact)
    add_trusted_key(operator_dir, "other", other.public_key_b64())
    with pytest.raises(UnknownKey) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert f"key {other.key_id} is trusted for publisher 'other', not for 'acme'" in str(ei.value)


def test_a_revoked_key_is_refused(signed, acme, operator_dir):
    manifest, artifact = signed
    revoke_key(operator_dir, acme.key_id)
    with pytest.raises(RevokedKey) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value) == (f"{manifest}.sig: field 'key_id' (value {acme.key_id!r}): key of publisher 'acme' "
                             f"is revoked in {operator_dir / 'trust.yaml'}; ask the publisher for a bundle signed "
                             f"with a new key")


def test_an_expired_signature_is_refused(signed, operator_dir):
    manifest, artifact = signed
    later = datetime.now(timezone.utc) + timedelta(days=91)  # signed for the default 90 days
    with pytest.raises(SignatureExpired) as ei:
        verify(manifest, artifact, _trust(operator_dir), {}, now=later)
    expires = json.loads(Path(f"{manifest}.sig").read_text())["expires"]
    assert str(ei.value) == f"{manifest}.sig: field 'expires' (value {expires!r}): the signature has expired; " \
                            f"ask the publisher to sign the bundle again"


def test_a_key_past_its_not_after_is_refused(bundle, acme, operator_dir):
    manifest, artifact = bundle()
    sign_bundle(manifest, acme, artifact)
    add_trusted_key(operator_dir, "acme", acme.public_key_b64(),
                    not_after=datetime.now(timezone.utc) - timedelta(days=1))
    with pytest.raises(SignatureExpired, match=r"key .* of publisher 'acme' expired on \d{4}-\d\d-\d\d"):
        verify(manifest, artifact, _trust(operator_dir), {})


def test_one_flipped_byte_in_the_artifact_is_refused(signed, operator_dir):
    manifest, artifact = signed
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value).startswith(f"{artifact}: sha256 ")
    assert "is not the signed manifest's" in str(ei.value) and str(manifest) in str(ei.value)


def test_one_changed_field_in_the_manifest_is_refused(signed, operator_dir):
    manifest, artifact = signed
    manifest.write_text(manifest.read_text().replace("max_workspaces: 50", "max_workspaces: 51"))
    with pytest.raises(SignatureMismatch) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value) == (f"{manifest}: the signature in {manifest}.sig does not verify: the manifest (or the "
                             f"signature file) changed after signing; do not install it")


def test_a_changed_expiry_in_the_signature_file_is_refused(signed, operator_dir):
    manifest, artifact = signed
    sig_path = Path(f"{manifest}.sig")
    sig = json.loads(sig_path.read_text())
    sig["expires"] = "2999-01-01T00:00:00Z"
    sig_path.write_text(json.dumps(sig))
    with pytest.raises(SignatureMismatch):
        verify(manifest, artifact, _trust(operator_dir), {})


def test_a_rollback_is_refused(signed, operator_dir):
    manifest, artifact = signed
    trust = _trust(operator_dir)
    verify(manifest, artifact, trust, {("acme", "ext.workspace"): "0.1.0"})  # the same again is fine
    verify(manifest, artifact, trust, {("other", "ext.workspace"): "9.0.0"})  # another publisher's is not ours
    with pytest.raises(RollbackRefused) as ei:
        verify(manifest, artifact, trust, {("acme", "ext.workspace"): "0.10.0"})  # semver order, not text order
    assert str(ei.value) == (f"{manifest}: field 'version' (value '0.1.0'): lower than 0.10.0, the highest version "
                             f"of ext.workspace ever installed from publisher 'acme'; a rollback is refused "
                             f"(install 0.10.0 or later)")


def test_an_unknown_capability_is_refused(bundle, acme, operator_dir, tmp_path):
    """A bundle signed for a newer vocabulary than this host's: the grant is refused, naming the field."""
    text = MANIFEST.replace("    - fs:write:workspaces\n", "    - gpu:exclusive\n")
    manifest, artifact = bundle(text)
    newer = tmp_path / "capabilities.yaml"
    newer.write_text(yaml.safe_dump({"grants": {**load_grants().templates, "gpu:exclusive": "a whole GPU"}}))
    sign_bundle(manifest, acme, artifact, grants=load_grants(newer))
    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    with pytest.raises(UnknownCapability) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value) == (
        f"{manifest}: field 'capabilities.grants.0' (value 'gpu:exclusive'): unknown capability; allowed: "
        "secrets:read:<ref>, network:egress:<host-pattern>, ssh:connect:<host>, fs:write:<path-under-home>, "
        "docker:engine, state:own-tables")


def test_an_unknown_feature_is_refused_as_the_loader_would(bundle, acme, operator_dir):
    """sign refuses it; a bundle signed by other tooling anyway is refused by verify."""
    import base64

    from sandboxer.trust.bundle import format_expiry, read_manifest_data, sha256_file, signed_payload

    manifest, artifact = bundle(MANIFEST.replace("features: [exec, list_owned]", "features: [exec, teleport]"))
    before = manifest.read_text()
    with pytest.raises(UnknownCapability, match=r"field 'capabilities.features' \(value 'teleport'\): unknown"):
        sign_bundle(manifest, acme, artifact)
    assert manifest.read_text() == before and not Path(f"{manifest}.sig").exists()  # nothing written
    data = read_manifest_data(manifest)
    data["artifact"] = {"file": artifact.name, "sha256": sha256_file(artifact)}
    manifest.write_text(yaml.safe_dump(data))
    expires = format_expiry(datetime.now(timezone.utc) + timedelta(days=1))
    Path(f"{manifest}.sig").write_text(json.dumps({
        "key_id": acme.key_id, "algorithm": "ed25519", "expires": expires,
        "signature": base64.b64encode(acme.sign(signed_payload(data, acme.key_id, expires))).decode()}))
    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    with pytest.raises(UnknownCapability) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value) == (f"{manifest}: field 'capabilities.features' (value 'teleport'): unknown; allowed: "
                             f"exec, snapshots, metering, list_owned, files")


def test_an_abi_the_host_does_not_speak_is_refused(bundle, acme, operator_dir):
    manifest, artifact = bundle(MANIFEST.replace(f"abi: {ABI_VERSION}", f"abi: {ABI_VERSION + 1}"))
    sign_bundle(manifest, acme, artifact)
    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    with pytest.raises(AbiMismatch) as ei:
        verify(manifest, artifact, _trust(operator_dir), {})
    assert str(ei.value) == (f"{manifest}: field 'abi' (value {ABI_VERSION + 1}): this host speaks extension-host "
                             f"ABI {ABI_VERSION}; install a bundle built for it, or a sand-boxer that speaks "
                             f"ABI {ABI_VERSION + 1}")


def test_every_refusal_is_a_trust_error_with_a_reason():
    import sandboxer.errors as e

    reasons = {c.reason for c in vars(e).values() if isinstance(c, type) and issubclass(c, TrustError)}
    assert {"unsigned", "unknown-key", "revoked-key", "expired", "artifact-changed", "manifest-changed",
            "rollback", "unknown-capability", "abi-mismatch"} <= reasons


@pytest.mark.parametrize("old, new, field, why", [
    ("dependencies: {}", "dependencies: {ext.base: 'newest please'}", "dependencies.ext.base",
     "'newest please' is not a version specifier (like '>=1.2,<2')"),
    ("dependencies: {}", "dependencies: {base: '>=1'}", "dependencies.base.[key]", "String should match pattern"),
    ("version: 0.1.0", "version: 0.1.0-alpha.beta", "version", "'0.1.0-alpha.beta' cannot be ordered"),
    ("publisher: acme", "publisher: Acme Corp", "publisher", "String should match pattern"),
])
def test_a_malformed_manifest_is_refused_naming_the_field(bundle, acme, old, new, field, why):
    from sandboxer.errors import BundleError

    manifest, artifact = bundle(MANIFEST.replace(old, new))
    with pytest.raises(BundleError) as ei:
        sign_bundle(manifest, acme, artifact)
    assert str(ei.value).startswith(f"{manifest}: field {field!r} (value ")
    assert why in str(ei.value)


def test_a_publisher_removed_after_signing_is_a_changed_manifest(signed, operator_dir):
    manifest, artifact = signed
    manifest.write_text(manifest.read_text().replace("publisher: acme\n", ""))
    with pytest.raises(SignatureMismatch):
        verify(manifest, artifact, _trust(operator_dir), {})
