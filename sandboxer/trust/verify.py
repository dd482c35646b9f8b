"""Signing a bundle, and verifying one before anything of it is installed or imported.

:func:`verify` fails closed, in this order, each refusal its own :class:`~sandboxer.errors.TrustError`:
no signature; a key not trusted (or trusted for another publisher); a revoked key; an expired
signature or key; a signature that does not verify (the manifest changed); then, the manifest
now known to be the publisher's, its schema, its grants, its ABI, the artifact's digest, and a
rollback below the highest version ever installed. Nothing of the bundle is imported or run.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

import yaml
from packaging.version import InvalidVersion, Version

from sandboxer.errors import (
    AbiMismatch,
    ArtifactMismatch,
    BundleError,
    RevokedKey,
    RollbackRefused,
    SignatureExpired,
    SignatureMismatch,
    UnknownCapability,
    UnknownKey,
    UnsignedBundle,
)
from sandboxer.trust.bundle import (
    BundleManifest,
    extension_data,
    format_expiry,
    parse_manifest,
    read_manifest_data,
    read_signature,
    sha256_file,
    signature_path,
    signed_payload,
)
from sandboxer.trust.grants import Grants, check_config_secrets, load_grants
from sandboxer.trust.keys import ALGORITHM, SigningKey, verify_signature
from sandboxer.trust.store import TrustStore

#: How long a signature is valid unless ``sign_bundle`` is told otherwise.
DEFAULT_EXPIRY = timedelta(days=90)

#: (publisher, extension id) -> the highest version ever installed from that publisher; the
#: installer keeps it in the state store and passes it in.
InstalledVersions = Mapping[tuple[str, str], str]


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed :func:`verify`: what the installer may unpack."""

    manifest: BundleManifest
    #: the manifest's data exactly as signed
    data: dict[str, Any]
    manifest_path: Path
    artifact_path: Path
    sha256: str
    publisher: str
    key_id: str
    expires: datetime

    def extension_data(self) -> dict[str, Any]:
        """The ``ext.<name>.yaml`` part (no bundle fields), as the loader reads a manifest."""
        return extension_data(self.data)


def _host_abi() -> int:
    from sandboxer.host.protocol import ABI_VERSION

    return ABI_VERSION


def sign_bundle(manifest_path: Path, key: SigningKey, artifact_path: Path, *,
                expires_in: timedelta = DEFAULT_EXPIRY, now: datetime | None = None,
                grants: Grants | None = None) -> Path:
    """Fill the manifest's ``artifact`` (file name, sha256), check it, and write ``<manifest>.sig``.

    The manifest is checked first, then rewritten only if its ``artifact`` changed (comments are
    then not kept); nothing is written if it is refused.

    Args:
        grants: the vocabulary to check ``capabilities.grants`` against (default: this host's).

    Returns:
        The signature file's path.

    Raises:
        BundleError: the manifest is malformed (naming file, field and value) or the artifact unreadable.
        UnknownCapability: a grant outside the vocabulary.
    """
    manifest_path, artifact_path = Path(manifest_path), Path(artifact_path)
    data = read_manifest_data(manifest_path)
    artifact = {"file": artifact_path.name, "sha256": sha256_file(artifact_path)}
    changed = data.get("artifact") != artifact
    data["artifact"] = artifact
    manifest = parse_manifest(manifest_path, data)  # checked before anything is written
    (grants or load_grants()).check(manifest.capabilities.grants, str(manifest_path))
    _check_registry(manifest, str(manifest_path))
    expires = format_expiry((now or datetime.now(timezone.utc)) + expires_in)
    signature = key.sign(signed_payload(data, key.key_id, expires))
    sig = {"key_id": key.key_id, "algorithm": ALGORITHM, "expires": expires,
           "signature": base64.b64encode(signature).decode("ascii")}
    if changed:
        _replace(manifest_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    path = signature_path(manifest_path)
    _replace(path, json.dumps(sig, indent=2, sort_keys=True) + "\n")
    return path


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def verify(manifest_path: Path, artifact_path: Path | None, trust: TrustStore,
           installed_versions: InstalledVersions, *, now: datetime | None = None,
           grants: Grants | None = None) -> VerifiedBundle:
    """Verify a bundle, failing closed; nothing of it is imported.

    Args:
        manifest_path: the bundle manifest (its signature is ``<manifest>.sig``).
        artifact_path: the artifact; default: the manifest's ``artifact.file`` beside it.
        trust: the operator's trusted keys (:func:`~sandboxer.trust.load_trust`).
        installed_versions: the highest version ever installed per (publisher, extension id).
        now: the time to check expiry against (default: now).
        grants: the grant vocabulary (default: this host's registry/capabilities.yaml).

    Raises:
        UnsignedBundle, UnknownKey, RevokedKey, SignatureExpired, SignatureMismatch, BundleError,
        UnknownCapability, AbiMismatch, ArtifactMismatch, RollbackRefused: each naming the file and why.
    """
    manifest_path = Path(manifest_path)
    now = now or datetime.now(timezone.utc)
    data = read_manifest_data(manifest_path)
    sig = read_signature(manifest_path)
    sig_path = signature_path(manifest_path)
    where = str(manifest_path)
    if sig is None:
        raise UnsignedBundle(f"{manifest_path}: no signature ({sig_path} is missing); ask the publisher for the "
                             f"signed bundle, or sign it with `sandboxer extensions sign`", path=where)
    claimed = data.get("publisher")
    entry = trust.keys.get(sig.key_id)
    if entry is None:
        raise UnknownKey(f"{sig_path}: field 'key_id' (value {sig.key_id!r}): unknown key: not in "
                         f"{trust.describe_sources()}; trust the publisher's key with `sandboxer extensions trust "
                         f"add-key` if you trust the publisher", path=str(sig_path))
    # a manifest without a (string) publisher goes on to fail the signature or the schema: the true reason
    if isinstance(claimed, str) and entry.publisher != claimed:
        raise UnknownKey(f"{sig_path}: field 'key_id' (value {sig.key_id!r}): unknown key for this bundle: key "
                         f"{sig.key_id} is trusted for publisher {entry.publisher!r}, not for {claimed!r} (the "
                         f"manifest's publisher; {entry.source})", path=str(sig_path))
    if sig.key_id in trust.revoked:
        raise RevokedKey(f"{sig_path}: field 'key_id' (value {sig.key_id!r}): key of publisher {entry.publisher!r} "
                         f"is revoked in {trust.revoked[sig.key_id]}; ask the publisher for a bundle signed with a "
                         f"new key", path=str(sig_path))
    if entry.key.not_after is not None and now > entry.key.not_after:
        raise SignatureExpired(f"{sig_path}: key {sig.key_id} of publisher {entry.publisher!r} expired on "
                               f"{format_expiry(entry.key.not_after)} ({entry.source}); ask the publisher for a "
                               f"bundle signed with a current key", path=str(sig_path))
    if now >= sig.expires_at():
        raise SignatureExpired(f"{sig_path}: field 'expires' (value {sig.expires!r}): the signature has expired; "
                               f"ask the publisher to sign the bundle again", path=str(sig_path))
    if not verify_signature(entry.key.raw(), sig.signature_bytes(), signed_payload(data, sig.key_id, sig.expires)):
        raise SignatureMismatch(f"{manifest_path}: the signature in {sig_path} does not verify: the manifest (or "
                                f"the signature file) changed after signing; do not install it", path=where)
    # From here on the manifest is the publisher's own words: check what they say.
    manifest = parse_manifest(manifest_path, data)
    (grants or load_grants()).check(manifest.capabilities.grants, where)
    check_config_secrets(manifest.config, manifest.capabilities.grants, where)
    _check_registry(manifest, where)
    abi = _host_abi()
    if manifest.abi != abi:
        raise AbiMismatch(f"{manifest_path}: field 'abi' (value {manifest.abi}): this host speaks extension-host "
                          f"ABI {abi}; install a bundle built for it, or a sand-boxer that speaks ABI "
                          f"{manifest.abi}", path=where)
    artifact = Path(artifact_path) if artifact_path is not None else manifest_path.parent / manifest.artifact.file
    digest = sha256_file(artifact)
    if digest != manifest.artifact.sha256:
        raise ArtifactMismatch(f"{artifact}: sha256 {digest} is not the signed manifest's "
                               f"{manifest.artifact.sha256} ({manifest_path}): the artifact changed after signing; "
                               f"do not install it", path=str(artifact))
    highest = installed_versions.get((manifest.publisher, manifest.id))
    if highest is not None:
        try:
            floor = Version(str(highest))
        except InvalidVersion:
            raise BundleError(f"installed versions: {highest!r} of {manifest.id} is not a version") from None
        if manifest.parsed_version < floor:
            raise RollbackRefused(f"{manifest_path}: field 'version' (value {manifest.version!r}): lower than "
                                  f"{highest}, the highest version of {manifest.id} ever installed from publisher "
                                  f"{manifest.publisher!r}; a rollback is refused (install {highest} or later)",
                                  path=where)
    return VerifiedBundle(manifest=manifest, data=data, manifest_path=manifest_path, artifact_path=artifact,
                          sha256=digest, publisher=manifest.publisher, key_id=sig.key_id, expires=sig.expires_at())


def _check_registry(manifest: BundleManifest, where: str) -> None:
    """Isolation levels, pricing model and features against registry/capabilities.yaml, as the loader does."""
    from sandboxer.loader import Registry

    reg = Registry.load()
    caps = manifest.capabilities
    checks = [("isolation_levels", v, reg.isolation_levels) for v in caps.isolation_levels]
    checks += [("pricing_model", caps.pricing_model, reg.pricing_models)]
    checks += [("features", v, reg.features) for v in caps.features]
    for name, value, known in checks:
        if value not in known:
            raise UnknownCapability(f"{where}: field 'capabilities.{name}' (value {value!r}): unknown; "
                                    f"allowed: {', '.join(known)}", path=where)
