"""sand-boxer: one API to create, use, meter, snapshot and tear down sandboxes on any backend.

    from sandboxer import Manager, SandboxCreateRequest
    mgr = Manager()
    sb = mgr.create(SandboxCreateRequest(profile="local", consumer="me"))
    print(mgr.exec(sb.id, ["echo", "hi"]).stdout)
    mgr.teardown(sb.id)
"""

from sandboxer.errors import (
    AuthError,
    BackendError,
    BudgetExceeded,
    CapabilityError,
    CapacityUnavailable,
    ConfigError,
    ExecError,
    ExtensionLoadError,
    ExtensionTimeout,
    InputError,
    ManifestError,
    MissingExtra,
    ProfileError,
    ProfileNotFound,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    RequestError,
    RoutingError,
    SandboxerError,
    SandboxNotFound,
    SandboxStateError,
    SnapshotError,
    SnapshotNotFound,
    StateStoreError,
    TeardownError,
    TTLError,
)
from sandboxer.extensions.base import SandboxExtension
from sandboxer.loader import Catalog, load_catalog
from sandboxer.deadline import CallLimits
from sandboxer.manager import Manager
from sandboxer.models import (
    CleanupReport,
    ExecResult,
    ExtensionManifest,
    MeterQuote,
    Profile,
    SandboxCreateRequest,
    SandboxState,
    SandboxStatus,
    SnapshotMeta,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError", "BackendError", "BudgetExceeded", "CallLimits", "CapabilityError", "CapacityUnavailable", "Catalog",
    "CleanupReport", "ConfigError", "ExecError", "ExecResult", "ExtensionLoadError", "ExtensionManifest",
    "ExtensionTimeout", "StateStoreError",
    "InputError", "Manager", "ManifestError", "MeterQuote", "MissingExtra", "Profile", "ProfileError",
    "ProfileNotFound", "ProvisionError", "QuotaExceeded", "RateLimited", "ReadinessTimeout", "RequestError",
    "RoutingError", "SandboxCreateRequest", "SandboxExtension", "SandboxNotFound", "SandboxState",
    "SandboxStateError", "SandboxStatus", "SandboxerError", "SnapshotError", "SnapshotMeta", "SnapshotNotFound",
    "TTLError", "TeardownError", "load_catalog", "__version__",
]
