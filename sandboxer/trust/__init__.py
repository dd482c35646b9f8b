"""Trust: signed extension bundles, the operator's trusted keys, and verification that fails closed.

``bundle`` owns the manifest and signature-file models and the signed bytes, ``canonical`` the
canonical JSON, ``keys`` Ed25519 key pairs and key files, ``grants`` the broker's capability
vocabulary, ``store`` the operator's trust.yaml, and ``verify`` signing and verifying a bundle.
The installer, the registry and the broker (later) call :func:`verify` and nothing lower.
"""

from sandboxer.lazy import lazy_names

# The names load on first use (PEP 562): the catalog imports ``sandboxer.trust.layout`` on every
# start, which must not pull in the signing stack (cryptography) with it.
_LAZY = {
    "BundleManifest": "bundle", "SignatureFile": "bundle", "canonical_json": "canonical", "Grants": "grants",
    "load_grants": "grants", "SigningKey": "keys", "key_id": "keys", "load_signing_key": "keys",
    "TrustStore": "store", "add_trusted_key": "store", "load_trust": "store", "revoke_key": "store",
    "DEFAULT_EXPIRY": "verify", "InstalledVersions": "verify", "VerifiedBundle": "verify", "sign_bundle": "verify",
    "verify": "verify",
}
__getattr__ = lazy_names(__name__, {name: f"sandboxer.trust.{module}" for name, module in _LAZY.items()})

__all__ = sorted(_LAZY)
