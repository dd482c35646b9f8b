"""Ed25519 key pairs of publishers: key ids, the private key file, and the public key's text form.

Rules kept here: a private key file is PEM (PKCS#8), created 0600 and never overwritten, optionally
encrypted with a passphrase read from an environment variable *named* by the caller (never a
literal); a key file others can read is refused, as ssh does. No key material is ever in a
message or a ``repr``: a key shows only its id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandboxer.errors import SigningKeyError

ALGORITHM = "ed25519"


def key_id(raw_public_key: bytes) -> str:
    """The key id: the first 16 hex digits of the sha256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def decode_public_key(text: str) -> bytes:
    """The raw 32 bytes of a base64 public key.

    Raises:
        ValueError: not base64 of 32 bytes.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return raw


def verify_signature(raw_public_key: bytes, signature: bytes, payload: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``payload`` by that public key."""
    try:
        Ed25519PublicKey.from_public_bytes(raw_public_key).verify(signature, payload)
        return True
    except (InvalidSignature, ValueError):
        return False


def _passphrase(env: str) -> bytes:
    value = os.environ.get(env, "")
    if not value:
        raise SigningKeyError(f"environment variable {env} is not set (it should hold the key's passphrase)")
    return value.encode("utf-8")


class SigningKey:
    """A publisher's private key. ``repr`` and ``str`` show only its id; it cannot be pickled."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.key_id = key_id(self.public_key_raw())

    @classmethod
    def generate(cls) -> "SigningKey":
        """A new random key pair."""
        return cls(Ed25519PrivateKey.generate())

    def public_key_raw(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def public_key_b64(self) -> str:
        """The public key as trust.yaml holds it: base64 of the raw 32 bytes."""
        return base64.b64encode(self.public_key_raw()).decode("ascii")

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload)

    def save(self, path: Path, *, passphrase_env: str | None = None) -> Path:
        """Write the private key to ``path`` (PEM, mode 0600, created new).

        Args:
            passphrase_env: the environment variable holding a passphrase to encrypt the file with.

        Raises:
            SigningKeyError: ``path`` exists (never overwritten), or the variable is unset.
        """
        path = Path(path)
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(_passphrase(passphrase_env)) if passphrase_env
            else serialization.NoEncryption())
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SigningKeyError(f"{path}: already exists; a key file is never overwritten (choose another "
                                  f"--out, or remove it first)", path=str(path)) from None
        except OSError as exc:
            raise SigningKeyError(f"{path}: cannot create: {exc.strerror}", path=str(path)) from None
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(pem)
        return path

    def _raw_private(self) -> bytes:
        """The raw private bytes, for tests that check they never appear anywhere."""
        return self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    def __repr__(self) -> str:
        return f"SigningKey(id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("a SigningKey is not pickled: save it with SigningKey.save")


def load_signing_key(path: Path, *, passphrase_env: str | None = None) -> SigningKey:
    """Read a private key file written by :meth:`SigningKey.save`.

    Raises:
        SigningKeyError: unreadable, readable by others, encrypted without a passphrase, the wrong
            passphrase, or not an Ed25519 PEM key. The message never holds key material.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        pem = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the key: {exc.strerror}", path=str(path)) from None
    if mode & 0o077:
        raise SigningKeyError(f"{path}: mode {mode:04o} lets others read the private key; chmod 600 {path}",
                              path=str(path))
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem
    if encrypted and not passphrase_env:
        raise SigningKeyError(f"{path}: the key is encrypted; pass the environment variable holding its "
                              f"passphrase (--passphrase-env NAME)", path=str(path))
    password = _passphrase(passphrase_env) if encrypted and passphrase_env else None
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError):
        # cryptography's text is not shown: it says nothing the operator can act on beyond this
        if encrypted:
            raise SigningKeyError(f"{path}: cannot decrypt the key with the passphrase in environment variable "
                                  f"{passphrase_env}", path=str(path)) from None
        raise SigningKeyError(f"{path}: not a PEM private key", path=str(path)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key (sandboxer extensions keygen makes one)", path=str(path))
    return SigningKey(key)
