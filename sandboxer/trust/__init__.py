"""Trust: signed extension bundles, the operator's trusted keys, and verification that fails closed.

``bundle`` owns the manifest and signature-file models and the signed bytes, ``canonical`` the
canonical JSON, ``keys`` Ed25519 key pairs and key files, ``grants`` the broker's capability
vocabulary, ``store`` the operator's trust.yaml, and ``verify`` signing and verifying a bundle.
The installer, the registry and the broker (later) call :func:`verify` and nothing lower.
"""

from sandboxer.trust.bundle import BundleManifest, SignatureFile
from sandboxer.trust.canonical import canonical_json
from sandboxer.trust.grants import Grants, load_grants
from sandboxer.trust.keys import SigningKey, key_id, load_signing_key
from sandboxer.trust.store import TrustStore, add_trusted_key, load_trust, revoke_key
from sandboxer.trust.verify import DEFAULT_EXPIRY, InstalledVersions, VerifiedBundle, sign_bundle, verify

__all__ = [
    "BundleManifest", "DEFAULT_EXPIRY", "Grants", "InstalledVersions", "SignatureFile", "SigningKey", "TrustStore",
    "VerifiedBundle", "add_trusted_key", "canonical_json", "key_id", "load_grants", "load_signing_key",
    "load_trust", "revoke_key", "sign_bundle", "verify",
]
