"""Bundle manifests and signature files: their models, reading them, and the bytes a signature covers.

A bundle is one artifact (a wheel or a tarball) plus a manifest: the ``ext.<name>.yaml`` fields
(:class:`~sandboxer.models.ExtensionManifest`) and ``publisher``, ``abi``, ``capabilities.grants``,
``dependencies`` and ``artifact: {file, sha256}``. Its signature, ``<manifest>.sig``, is JSON:
``key_id``, ``algorithm: ed25519``, ``expires`` (UTC ISO 8601) and ``signature`` (base64) over
:func:`signed_payload`: the canonical JSON of the whole manifest, with the key id and the expiry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import AfterValidator, Field, ValidationError, field_validator

from sandboxer.errors import BundleError
from sandboxer.models import Capabilities, ExtensionManifest, Strict
from sandboxer.trust.canonical import canonical_json

#: Names the signed payload, so a signature over a bundle can never be replayed as anything else.
PURPOSE = "sandboxer extension bundle/1"
#: The fields a bundle manifest adds to an ``ext.<name>.yaml``.
BUNDLE_FIELDS = ("publisher", "abi", "dependencies", "artifact")
_EXT_ID = r"^ext\.[a-z0-9][a-z0-9-]*$"


def _specifier(value: str) -> str:
    try:
        SpecifierSet(value)
    except InvalidSpecifier:
        raise ValueError(f"{value!r} is not a version specifier (like '>=1.2,<2')") from None
    return value


ExtensionId = Annotated[str, Field(pattern=_EXT_ID)]
VersionSpecifier = Annotated[str, AfterValidator(_specifier)]


class BundleCapabilities(Capabilities):
    grants: list[str] = Field(default_factory=list, description="what the broker may grant it "
                              "(the closed vocabulary of registry/capabilities.yaml's grants)")


class Artifact(Strict):
    file: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$", description="the artifact's file name, "
                      "beside the manifest")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BundleManifest(ExtensionManifest):
    """A signed bundle's manifest (extra fields forbidden)."""

    capabilities: BundleCapabilities
    publisher: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    abi: int = Field(ge=1, description="the extension-host ABI it was built for (sandboxer.host.ABI_VERSION)")
    dependencies: dict[ExtensionId, VersionSpecifier] = Field(default_factory=dict, description="extension id -> version specifier")
    artifact: Artifact

    @field_validator("version")
    @classmethod
    def _comparable(cls, v: str) -> str:
        try:
            Version(v)
        except InvalidVersion:
            raise ValueError(f"{v!r} cannot be ordered (packaging.version); use MAJOR.MINOR.PATCH[-rcN]") from None
        return v

    @property
    def parsed_version(self) -> Version:
        return Version(self.version)


class SignatureFile(Strict):
    """``<manifest>.sig``."""

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    algorithm: Literal["ed25519"]
    expires: str = Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", description="UTC, e.g. 2027-03-01T12:00:00Z")
    signature: str

    def expires_at(self) -> datetime:
        return datetime.strptime(self.expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)

    def signature_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            return b""


def format_expiry(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def signature_path(manifest_path: Path) -> Path:
    return Path(f"{manifest_path}.sig")


def signed_payload(data: dict[str, Any], key_id: str, expires: str) -> bytes:
    """The bytes signed: canonical JSON of the manifest's data with the key id, the expiry and the purpose."""
    return canonical_json({"purpose": PURPOSE, "algorithm": "ed25519", "key_id": key_id, "expires": expires,
                           "manifest": data})


def read_manifest_data(path: Path) -> dict[str, Any]:
    """The manifest's parsed YAML (what is signed), checked to be canonical-JSON-able.

    Raises:
        BundleError: unreadable, not YAML, not a mapping, or holding what JSON cannot carry.
    """
    from sandboxer.loader import read_yaml  # read_yaml's error class is given: BundleError is a TrustError
    from sandboxer.errors import ConfigError

    try:
        data = read_yaml(path, ConfigError)
    except ConfigError as exc:
        raise BundleError(str(exc), path=str(path)) from None
    try:
        canonical_json(data)
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}", path=str(path)) from None
    return data


def parse_manifest(path: Path, data: dict[str, Any]) -> BundleManifest:
    """Validate the data as a :class:`BundleManifest`.

    Raises:
        BundleError: one line per problem, naming file, field and value.
    """
    from sandboxer.loader import describe_validation

    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(describe_validation(str(path), exc), path=str(path)) from None


def read_signature(manifest_path: Path) -> SignatureFile | None:
    """The signature file beside the manifest, or None if there is none.

    Raises:
        BundleError: it is there but unreadable or malformed.
    """
    from sandboxer.loader import describe_validation

    path = signature_path(manifest_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}", path=str(path)) from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise BundleError(f"{path}: not JSON: {exc}", path=str(path)) from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object", path=str(path))
    try:
        return SignatureFile.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(describe_validation(str(path), exc), path=str(path)) from None


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks.

    Raises:
        BundleError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the artifact: {exc.strerror}", path=str(path)) from None
    return digest.hexdigest()


def extension_data(data: dict[str, Any]) -> dict[str, Any]:
    """The ``ext.<name>.yaml`` part of a bundle manifest's data (what the loader reads)."""
    out = {k: v for k, v in data.items() if k not in BUNDLE_FIELDS}
    caps = out.get("capabilities")
    if isinstance(caps, dict):
        out["capabilities"] = {k: v for k, v in caps.items() if k != "grants"}
    return out
