"""The SandboxExtension contract every backend implements.

Three methods are required: :meth:`provision`, :meth:`wait_ready` and
:meth:`teardown`. Everything else is an optional capability that a backend
declares in :attr:`SandboxExtension.features` *and* in its manifest's
``capabilities.features``; the manager checks :meth:`supports` before it
calls, so an unsupported call is refused before any work is done.

Inputs convention: the manager adds four reserved inputs to every provision
(a consumer may not set them):

* ``sandbox_id``: the manager's id for the sandbox;
* ``owner_labels``: ``dict[str, str]`` naming this manager's state store
  (``{"sandboxer.owner": ...}``); :meth:`list_owned` is asked for these;
* ``tags``: ``dict[str, str]`` to attach to whatever the backend creates
  (labels, metadata, tags): the owner labels plus ``sandboxer.sandbox_id``,
  ``sandboxer.consumer``, ``sandboxer.profile`` and the request's labels.
  A backend that cannot attach tags must still record ``sandbox_id`` and
  ``owner_labels`` where :meth:`list_owned` can read them;
* ``ttl``: the sandbox's effective lifetime in seconds (already checked against
  the profile's maximum), for backends that can expire sandboxes themselves.
"""

from __future__ import annotations

import abc
import inspect
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, TypeVar

from pydantic import BaseModel, ConfigDict

from sandboxer.errors import SandboxerError
from sandboxer.state import default_home
from sandboxer.models import ExecResult, ExtensionManifest, MeterQuote, Profile, SnapshotMeta

#: Inputs the manager sets; a consumer may not.
RESERVED_INPUTS = frozenset({"sandbox_id", "owner_labels", "tags", "ttl"})

#: Optional features a handler may implement (names also listed in registry/).
OPTIONAL_FEATURES = frozenset({"exec", "snapshots", "metering", "list_owned"})

T = TypeVar("T")


def translated(call: Callable[[], T], translate: Callable[[Exception], "SandboxerError | None"]) -> T:
    """Run ``call``; a foreign exception becomes ``translate(exc)``, raised *outside* the ``except``
    block, so neither its ``__cause__`` nor its ``__context__`` (nor a frame's locals) keeps the
    provider's exception, which may hold a key. ``translate`` returns None for an exception that
    is not the SDK's: it is re-raised as it is. Our own errors pass through untouched.
    """
    try:
        return call()
    except SandboxerError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated below, or re-raised untouched
        mapped = translate(exc)
        if mapped is None:
            raise
    raise mapped


#: The methods a class must override to have each optional feature.
FEATURE_METHODS: dict[str, tuple[str, ...]] = {
    "exec": ("exec",),
    "snapshots": ("snapshot", "restore_from_snapshot"),
    "metering": ("meter_actual",),
    "list_owned": ("list_owned",),
}


def check_features(cls: type["SandboxExtension"], features: Iterable[str]) -> str | None:
    """Why ``cls`` cannot serve ``features`` (a method not overridden, or one whose signature does
    not accept the contract's arguments), or None. pluggy checks a hook implementation likewise."""
    for feat in features:
        if feat not in cls.features:
            return f"{cls.__name__} does not list {feat!r} in its features"
        for name in FEATURE_METHODS.get(feat, ()):
            mine, base = getattr(cls, name, None), getattr(SandboxExtension, name)
            if mine is None or mine is base:
                return f"{cls.__name__} declares {feat!r} but does not implement {name}()"
            problem = _incompatible(inspect.signature(base), inspect.signature(mine))
            if problem:
                return f"{cls.__name__}.{name}{inspect.signature(mine)} {problem} (the contract: {name}{inspect.signature(base)})"
    return None


def _incompatible(base: inspect.Signature, mine: inspect.Signature) -> str | None:
    params = list(mine.parameters.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    names = {p.name: p for p in params}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, bp in enumerate(base.parameters.values()):
        if bp.kind in (bp.POSITIONAL_ONLY, bp.POSITIONAL_OR_KEYWORD):
            if i >= len(positional) and not var_pos:
                return f"does not take the argument {bp.name!r}"
        elif bp.kind is bp.KEYWORD_ONLY and bp.name not in names and not var_kw:
            return f"does not take the keyword argument {bp.name!r}"
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    extra = [p.name for p in required if p.name not in base.parameters]
    return f"requires arguments the manager never passes: {', '.join(extra)}" if extra else None


#: ``on_output(stream, text)`` where stream is ``"stdout"`` or ``"stderr"``.
OutputCallback = Callable[[str, str], None]


class NoConfig(BaseModel):
    """The config model of a backend that takes no config."""

    model_config = ConfigDict(extra="forbid")


class SandboxExtension(abc.ABC):
    """Base class of every backend.

    Subclasses set :attr:`Config` (validates the manifest's ``config``),
    :attr:`ProfileOptions` (validates a profile's ``options``) and
    :attr:`features`. Instances are shared by every thread of a manager, so
    methods must be thread-safe.

    Handles and reachability are JSON-serialisable dicts: the handle is what
    the backend needs to find the sandbox again (stored in the state store,
    so never a secret); reachability is what a consumer needs to reach it.
    """

    Config: ClassVar[type[BaseModel]] = NoConfig
    ProfileOptions: ClassVar[type[BaseModel]] = NoConfig
    features: ClassVar[frozenset[str]] = frozenset()
    #: ``(module, pip extra)`` of an optional SDK this backend needs. The
    #: handler module must import that SDK lazily, so a core-only install
    #: still loads every built-in manifest; using the backend then raises
    #: MissingExtra naming the extra.
    requires: ClassVar[tuple[str, str] | None] = None

    #: Groups of inputs of which a sandbox takes one: an input the consumer sets
    #: replaces the profile's default for any other input of its group (e.g. an
    #: ``ssh_target`` given on the command line replaces a profile's default ``vm``).
    exclusive_inputs: ClassVar[tuple[frozenset[str], ...]] = ()

    #: Where a backend may keep local files (workspaces, snapshot stores, its own
    #: tables): the manager's home. The manager sets it after construction.
    home: Path = default_home()

    def __init__(self, manifest: ExtensionManifest, config: BaseModel):
        self.manifest = manifest
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.manifest.id}>"

    @property
    def id(self) -> str:
        return self.manifest.id

    def supports(self, feature: str) -> bool:
        """Whether the manifest declares ``feature`` (the loader checked the class has it)."""
        return feature in self.manifest.capabilities.features

    def options(self, profile: Profile) -> Any:
        """The profile's ``options`` validated by :attr:`ProfileOptions`."""
        return self.ProfileOptions.model_validate(profile.options)

    def resource_names(self, profile: Profile, inputs: dict[str, Any], host: str | None) -> list[str]:
        """Backend-side names the sandbox will take if placed on ``host`` (project names, directories...).

        Called before admission with the same inputs :meth:`provision` gets. The state store
        claims them atomically among this backend's live sandboxes: two never share a name, so
        one's teardown can never destroy the other. A name must say where it lives (the machine,
        the engine: ``"workspace 10.0.0.5:22:/srv/sbx/x"``), since two router hosts may reach one
        machine; and be normalised the way the backend compares it (case-folded where it folds
        case). Pure: no I/O.

        Raises:
            InputError: an input is refused (nothing has been created yet).
        """
        return []

    def deadline(self, profile: Profile) -> float:
        """Most seconds a create may take from :meth:`provision` to ready.

        gc in another process treats a ``provisioning`` record as abandoned only after this
        (plus a grace). A backend whose provision itself may run long (a clone, an image pull)
        adds those timeouts to the profile's ready timeout.
        """
        return float(profile.ready_timeout)

    def probe(self, handle: dict[str, Any]) -> bool | None:
        """Whether the sandbox still exists at the backend: True, False (gone), or None (cannot tell).

        Must be cheap (one lookup) and must not raise for a sandbox that is gone; raise a
        BackendError only when the backend itself cannot be asked. The manager marks a ready
        sandbox ``lost`` when this says False.
        """
        return None

    def handle_id(self, handle: dict[str, Any]) -> str | None:
        """The backend's own identity of the resource a handle names (a container id, a VM id).

        gc compares it between the recorded handle and what :meth:`list_owned` finds: a resource
        carrying a live sandbox's id under another identity (a duplicate made by a retried
        create) is an orphan. None: this backend cannot make duplicates.
        """
        return None

    def credential_key(self, consumer: str | None) -> str | None:
        """An opaque key for the credential a create for ``consumer`` would use now, or None.

        The router cools a backend down per credential after an AuthError, keyed by this: the
        reference plus a fingerprint of its current value, so another consumer's key is never
        blocked and a rotated key is tried at once. Held in memory only; never the secret itself.
        """
        return None

    def hosts(self) -> dict[str, int | None]:
        """Hosts this backend spreads sandboxes over, with each one's capacity.

        Returns an empty dict when the backend has no host pool of its own.
        """
        return {}

    # ------------------------------------------------------------ required

    @abc.abstractmethod
    def provision(self, profile: Profile, inputs: dict[str, Any], host: str | None) -> dict[str, Any]:
        """Start creating a sandbox.

        Args:
            profile: the effective profile (its ``options`` are this backend's).
            inputs: the profile's defaults merged with the request's inputs,
                plus the reserved ``sandbox_id`` and ``owner_labels``.
            host: the host the router chose, or None to let the backend pick.

        Returns:
            The handle: a JSON-serialisable dict, with ``host`` when known.

        Raises:
            InputError: an input is missing or refused.
            CapacityUnavailable, QuotaExceeded, RateLimited, AuthError,
            ProvisionError: the backend could not create it. Partial work is
            cleaned up before raising.
        """

    @abc.abstractmethod
    def wait_ready(self, handle: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Block until the sandbox is reachable.

        Returns:
            The reachability dict (how a consumer reaches the sandbox).

        Raises:
            ReadinessTimeout: not ready within ``timeout`` seconds.
        """

    @abc.abstractmethod
    def teardown(self, handle: dict[str, Any]) -> dict[str, Any]:
        """Destroy the sandbox. Idempotent: a sandbox already gone is a success.

        Returns:
            A cleanup report dict (what was removed).

        Raises:
            TeardownError: the backend could not confirm the sandbox is gone.
        """

    # ------------------------------------------------------------ optional

    def exec(
        self,
        handle: dict[str, Any],
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` inside the sandbox (feature ``exec``).

        ``on_output`` receives output as it arrives; the result holds all of it.
        """
        raise NotImplementedError  # pragma: no cover - guarded by supports()

    def snapshot(self, handle: dict[str, Any]) -> dict[str, Any]:
        """Capture the sandbox (feature ``snapshots``).

        Returns:
            ``{"data": {...backend reference...}, "size_bytes": int|None, "checksum": str|None}``.
        """
        raise NotImplementedError  # pragma: no cover

    def restore_from_snapshot(
        self, profile: Profile, snapshot_meta: SnapshotMeta, inputs: dict[str, Any], host: str | None
    ) -> dict[str, Any]:
        """Provision a new sandbox from a snapshot; returns a handle like :meth:`provision`."""
        raise NotImplementedError  # pragma: no cover

    def delete_snapshot(self, snapshot_meta: SnapshotMeta) -> None:
        """Forget a snapshot's stored data. Idempotent."""

    def supports_snapshots(self) -> bool:
        return self.supports("snapshots")

    def list_owned(self, owner_labels: dict[str, str]) -> list[dict[str, Any]]:
        """Every live sandbox carrying ``owner_labels`` (feature ``list_owned``).

        Returns:
            ``[{"sandbox_id": str, "handle": dict}, ...]``.
        """
        raise NotImplementedError  # pragma: no cover

    def estimate_cost(self, profile: Profile, duration: float | timedelta) -> MeterQuote:
        """Price ``duration`` of ``profile`` from the manifest's ``pricing`` (zero without one)."""
        from sandboxer.metering import price  # metering imports models only; kept lazy to stay acyclic

        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        return price(self.manifest, profile, seconds)

    def meter_actual(self, handle: dict[str, Any]) -> dict[str, Any] | None:
        """What the backend itself reports of a sandbox's usage, if anything (feature ``metering``)."""
        return None
