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
    ExtensionCrashed,
    ExtensionLoadError,
    ExtensionTimeout,
    InputError,
    ManifestError,
    MissingExtra,
    NameConflict,
    ProfileError,
    ProfileNotFound,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    RequestError,
    RoutingError,
    SandboxerError,
    SandboxFileNotFound,
    SandboxNotFound,
    SandboxStateError,
    SnapshotError,
    SnapshotNotFound,
    StateStoreError,
    TeardownError,
    TTLError,
)
from sandboxer.deadline import CallLimits
from sandboxer.extensions.base import SandboxExtension
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

# The manager and the loader (SQLAlchemy, YAML) load on first use: ``import sandboxer.testing``
# (the pytest plugin every test run of an author's gets) and a worker process stay light.
_LAZY = {"Manager": "sandboxer.manager", "Catalog": "sandboxer.loader", "load_catalog": "sandboxer.loader"}


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sandboxer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "AuthError", "BackendError", "BudgetExceeded", "CallLimits", "CapabilityError", "CapacityUnavailable", "Catalog",
    "CleanupReport", "ConfigError", "ExecError", "ExecResult", "ExtensionLoadError", "ExtensionManifest",
    "ExtensionCrashed", "ExtensionTimeout", "StateStoreError",
    "InputError", "Manager", "ManifestError", "MeterQuote", "MissingExtra", "NameConflict", "Profile", "ProfileError",
    "ProfileNotFound", "ProvisionError", "QuotaExceeded", "RateLimited", "ReadinessTimeout", "RequestError",
    "RoutingError", "SandboxCreateRequest", "SandboxExtension", "SandboxFileNotFound", "SandboxNotFound", "SandboxState",
    "SandboxStateError", "SandboxStatus", "SandboxerError", "SnapshotError", "SnapshotMeta", "SnapshotNotFound",
    "TTLError", "TeardownError", "load_catalog", "__version__",
]
