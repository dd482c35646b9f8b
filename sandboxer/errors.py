"""The one error tree of sand-boxer.

Every error raised by the library derives from :class:`SandboxerError`.
Backends translate their own exceptions into these at their boundary (one
context manager per backend); callers never need to match message text.

::

    SandboxerError
    ├── ConfigError                      bad configuration, found at load time
    │   ├── ManifestError                an ext.<name>.yaml is malformed or invalid
    │   ├── ProfileError                 a profile.<slug>.yaml is malformed or invalid
    │   ├── ExtensionLoadError           a handler is not allowed or cannot be loaded
    │   ├── CapabilityError              a capability/feature is unknown or unsupported
    │   └── StateStoreError              the state store cannot be opened, is damaged or is too new
    ├── RequestError                     the request itself is wrong; retrying elsewhere won't help
    │   ├── InputError                   a missing, unknown or hostile input value
    │   ├── TTLError                     a negative or over-maximum TTL
    │   ├── ProfileNotFound
    │   ├── SandboxNotFound
    │   ├── SandboxStateError            the sandbox exists but is not in a state for that
    │   ├── SnapshotNotFound
    │   ├── NameConflict                 a live sandbox has that name but was asked for differently
    │   └── BudgetExceeded               the consumer's budget would be exceeded
    ├── BackendError                     the backend failed; may be worth trying another
    │   ├── ProvisionError               (.transient says whether a retry elsewhere may help)
    │   ├── ReadinessTimeout
    │   ├── TeardownError
    │   ├── ExecError
    │   ├── SnapshotError
    │   ├── CapacityUnavailable          no room on the backend/host right now
    │   ├── QuotaExceeded                an account quota is used up
    │   ├── RateLimited                  (.retry_after seconds, or None)
    │   ├── AuthError                    credentials refused; never carries the secret
    │   ├── HostKeyError                 an SSH host key did not verify
    │   ├── ExtensionTimeout             an extension call passed its deadline and was abandoned
    │   └── ExtensionCrashed             an out-of-process extension's worker died or broke the protocol
    ├── TrustError                       a signed bundle is refused (.reason, .path); fails closed
    │   ├── BundleError                  a bundle manifest or its signature file is malformed
    │   ├── SigningKeyError              a private key file cannot be written, read or decrypted
    │   ├── UnsignedBundle               no signature file beside the manifest
    │   ├── UnknownKey                   the key is not in trust.yaml, or is another publisher's
    │   ├── RevokedKey                   trust.yaml revokes the key
    │   ├── SignatureExpired             the signature's expiry (or the key's not_after) has passed
    │   ├── SignatureMismatch            the signature does not verify: the manifest changed after signing
    │   ├── ArtifactMismatch             the artifact's sha256 is not the manifest's
    │   ├── RollbackRefused              a version lower than the highest ever installed from that publisher
    │   ├── UnknownCapability            a grant outside registry/capabilities.yaml's vocabulary
    │   ├── AbiMismatch                  the bundle needs an extension-host ABI this host does not speak
    │   ├── UndeclaredSecret             the bundle's config references a secret its grants do not name
    │   └── GrantDenied                  the capability broker refused a call its grants do not allow
    ├── MissingExtra                     an optional dependency (pip extra) is not installed
    └── RoutingError                     every backend failed; .attempts lists each one
"""

from __future__ import annotations

from typing import Any


class SandboxerError(Exception):
    """Root of every sand-boxer error."""


class ConfigError(SandboxerError):
    """Configuration is wrong; found when loading, before any sandbox is touched."""


class ManifestError(ConfigError):
    """An extension manifest is malformed or invalid."""


class ProfileError(ConfigError):
    """A profile is malformed or invalid."""


class ExtensionLoadError(ConfigError):
    """A handler is outside the allowed set or could not be loaded."""


class CapabilityError(ConfigError):
    """A capability or feature is unknown, or the backend does not support it."""


class RegistryError(ConfigError):
    """A registry cannot be read, is malformed, lists one name and version twice, or lacks what was asked."""


class StateStoreError(ConfigError):
    """The state store cannot be opened, is damaged, or was written by a newer sand-boxer."""


class RequestError(SandboxerError):
    """The request itself is wrong; routing it elsewhere would not help."""


class InputError(RequestError):
    """An input is missing, unknown or refused as hostile."""


class TTLError(RequestError):
    """A TTL is negative, zero or over the profile's maximum."""


class ProfileNotFound(RequestError):
    """No profile has that slug."""


class SandboxNotFound(RequestError):
    """No sandbox has that id."""


class SandboxStateError(RequestError):
    """The sandbox exists but its state does not allow the operation (e.g. exec after teardown)."""


class SandboxFileNotFound(RequestError):
    """No file or directory at the path asked for inside the sandbox (the message names both)."""


class LifecycleError(RequestError):
    """An installed extension is not in a state for that (the message names its current state)."""


class NameConflict(RequestError):
    """A create named a live sandbox that was created with other parameters (profile, inputs, labels,
    TTL, consumer): the message names the sandbox and what differs. Nothing was created."""


class SnapshotNotFound(RequestError):
    """No snapshot has that id."""


class BudgetExceeded(RequestError):
    """A create would take the consumer over its budget."""


class BackendError(SandboxerError):
    """A backend failed. ``backend`` and ``host`` say where, when known; ``transient`` says
    whether the same call may succeed later or elsewhere (the router reads it)."""

    def __init__(self, message: str, *, backend: str | None = None, host: str | None = None,
                 transient: bool = False):
        super().__init__(message)
        self.backend = backend
        self.host = host
        self.transient = transient


class ProvisionError(BackendError):
    """Provisioning failed. ``transient`` says whether another backend may succeed."""


class ReadinessTimeout(BackendError):
    """The sandbox did not become ready within its deadline."""


class TeardownError(BackendError):
    """The backend could not confirm a teardown."""


class ExecError(BackendError):
    """A command could not be run (not: the command exited non-zero)."""


class SnapshotError(BackendError):
    """A snapshot or restore failed."""


class CapacityUnavailable(BackendError):
    """The backend (or every host of it) has no free capacity right now."""


class QuotaExceeded(BackendError):
    """An account or plan quota is used up."""


class RateLimited(BackendError):
    """The backend asked us to slow down; ``retry_after`` is in seconds, if given."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class AuthError(BackendError):
    """Credentials were refused. The message never contains the secret.

    ``credential`` names the reference that was refused (``"env E2B_API_KEY"``,
    ``"file /etc/keys/e2b"``), never its value: the router cools down that
    backend *for that reference* only, so another consumer's key still works.
    """

    def __init__(self, message: str, *, credential: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.credential = credential


class HostKeyError(BackendError):
    """An SSH host key was unknown or did not match; nothing was run."""


class ExtensionTimeout(BackendError):
    """An extension call did not return within its deadline; the manager abandoned it and went on.

    ``timeout`` is the deadline in seconds.
    """

    def __init__(self, message: str, *, timeout: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.timeout = timeout


class ExtensionCrashed(BackendError):
    """An out-of-process extension's worker died, or wrote what is not the protocol, during a call.

    The worker was killed (if still running) and is started again on the next call. ``log``
    is the file holding the worker's stderr, for the operator.
    """

    def __init__(self, message: str, *, log: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.log = log


class TrustError(SandboxerError):
    """A bundle, a signature or a key was refused. Verification fails closed: any doubt is one of these.

    ``reason`` is a short stable code (``"unsigned"``, ``"revoked-key"``, ...) for audit events and
    ``--json``; ``path`` is the file refused. The message names the file and says why.
    """

    reason = "refused"

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class DependencyError(TrustError):
    """A bundle's dependency is neither installed in a matching version nor installable from a registry."""

    reason = "dependency"


class BundleError(TrustError):
    """A bundle manifest or its signature file is malformed (the message names file, field and value)."""

    reason = "malformed"


class SigningKeyError(TrustError):
    """A private key file cannot be written, read or decrypted. Never carries key material."""

    reason = "key-file"


class UnsignedBundle(TrustError):
    """The manifest has no signature file (``<manifest>.sig``)."""

    reason = "unsigned"


class UnknownKey(TrustError):
    """The signing key is not trusted (not in trust.yaml), or is trusted for another publisher."""

    reason = "unknown-key"


class RevokedKey(TrustError):
    """The signing key is revoked in trust.yaml."""

    reason = "revoked-key"


class SignatureExpired(TrustError):
    """The signature's ``expires``, or the trusted key's ``not_after``, has passed."""

    reason = "expired"


class SignatureMismatch(TrustError):
    """The signature does not verify: the manifest (or the signature file) changed after signing."""

    reason = "manifest-changed"


class ArtifactMismatch(TrustError):
    """The artifact's sha256 is not the one the signed manifest holds: a changed byte."""

    reason = "artifact-changed"


class RollbackRefused(TrustError):
    """The version is lower than the highest ever installed from that publisher for that extension."""

    reason = "rollback"


class UnknownCapability(TrustError):
    """A ``capabilities.grants`` entry is outside the closed vocabulary of registry/capabilities.yaml."""

    reason = "unknown-capability"


class AbiMismatch(TrustError):
    """The bundle's ``abi`` is not the extension-host ABI this host speaks."""

    reason = "abi-mismatch"


class UndeclaredSecret(TrustError):
    """A bundle's config references a secret that no ``secrets:read:<ref>`` grant names."""

    reason = "undeclared-secret"


class GrantDenied(TrustError):
    """The capability broker refused a worker's call: no grant allows it (the message names the call and the grants)."""

    reason = "not-granted"


class MissingExtra(SandboxerError):
    """An optional dependency is missing; the message names the pip extra."""


class RoutingError(SandboxerError):
    """Every candidate backend failed. ``attempts`` holds one dict per attempt."""

    def __init__(self, message: str, attempts: list[dict[str, Any]]):
        lines = [message] + [
            f"  - {a['backend']} (host {a.get('host') or '-'}): {a['error']}" for a in attempts
        ]
        super().__init__("\n".join(lines))
        self.attempts = attempts
