"""sand-boxer: one API to create, use, meter, snapshot and tear down sandboxes on any backend.

    from sandboxer import Manager, SandboxCreateRequest
    mgr = Manager()
    sb = mgr.create(SandboxCreateRequest(profile="local", consumer="me"))
    print(mgr.exec(sb.id, ["echo", "hi"]).stdout)
    mgr.teardown(sb.id)
"""

from sandboxer.lazy import lazy_names

__version__ = "0.1.0"

# Every name loads on first use (PEP 562): ``import sandboxer.cli`` (a CLI start), the pytest
# plugin every author's test run gets, and a worker process import only what they touch.
_MODULES = {
    "sandboxer.errors": (
        "AuthError", "BackendError", "BudgetExceeded", "CapabilityError", "CapacityUnavailable",
        "ConfigError", "ExecError", "ExtensionCrashed", "ExtensionLoadError", "ExtensionTimeout",
        "InputError", "ManifestError", "MissingExtra", "NameConflict", "ProfileError", "ProfileNotFound", "ProvisionError",
        "QuotaExceeded", "RateLimited", "ReadinessTimeout", "RequestError", "RoutingError",
        "SandboxFileNotFound", "SandboxNotFound", "SandboxStateError", "SandboxerError", "SnapshotError",
        "SnapshotNotFound", "StateStoreError", "TTLError", "TeardownError",
    ),
    "sandboxer.models": (
        "CleanupReport", "ExecResult", "ExtensionManifest", "MeterQuote", "Profile", "SandboxCreateRequest",
        "SandboxState", "SandboxStatus", "SnapshotMeta",
    ),
    "sandboxer.deadline": (
        "CallLimits",
    ),
    "sandboxer.extensions.base": (
        "SandboxExtension",
    ),
    "sandboxer.manager": (
        "Manager",
    ),
    "sandboxer.loader": (
        "Catalog", "load_catalog",
    ),
    "sandboxer.sandbox": (
        "Sandbox",
    ),
    "sandboxer.aio": (
        "AsyncManager", "AsyncSandbox",
    ),
    "sandboxer.contract": (
        "FileInfo",
    ),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


__getattr__ = lazy_names(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AsyncManager", "AsyncSandbox", "AuthError", "BackendError", "BudgetExceeded", "CallLimits", "CapabilityError",
    "CapacityUnavailable", "Catalog", "CleanupReport", "ConfigError", "ExecError", "ExecResult", "ExtensionCrashed",
    "ExtensionLoadError", "ExtensionManifest", "ExtensionTimeout", "FileInfo", "InputError", "load_catalog",
    "Manager", "ManifestError", "MeterQuote", "MissingExtra", "NameConflict", "Profile", "ProfileError", "ProfileNotFound",
    "ProvisionError", "QuotaExceeded", "RateLimited", "ReadinessTimeout", "RequestError", "RoutingError", "Sandbox",
    "SandboxCreateRequest", "SandboxerError", "SandboxExtension", "SandboxFileNotFound", "SandboxNotFound",
    "SandboxState", "SandboxStateError", "SandboxStatus", "SnapshotError", "SnapshotMeta", "SnapshotNotFound",
    "StateStoreError", "TeardownError", "TTLError", "__version__"
]
