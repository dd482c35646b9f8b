"""The SandboxExtension contract every backend implements.

Three methods are required: :meth:`provision`, :meth:`wait_ready` and
:meth:`teardown`. Everything else is an optional capability that a backend
declares in :attr:`SandboxExtension.features` *and* in its manifest's
``capabilities.features``; the manager checks :meth:`supports` before it
calls, so an unsupported call is refused before any work is done.

What crosses the boundary is typed (:mod:`sandboxer.contract`): ``provision`` gets a
:class:`~sandboxer.contract.ProvisionRequest` (the reserved ``sandbox_id``, ``owner_labels``,
``tags`` and ``ttl`` are its fields) and returns the backend's :attr:`SandboxExtension.Handle`;
``wait_ready`` returns a :class:`~sandboxer.contract.Reachability`, ``teardown`` a
:class:`~sandboxer.contract.TeardownReport`, ``snapshot`` a
:class:`~sandboxer.contract.SnapshotResult`, ``list_owned`` a list of
:class:`~sandboxer.contract.OwnedSandbox`. Every method that takes a handle gets the backend's
own ``Handle`` model, rebuilt from the state store.
"""

from __future__ import annotations

import abc
import inspect
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Callable, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict

from sandboxer.contract import (RESERVED_INPUTS, FileInfo, Handle, OwnedSandbox, ProvisionRequest, Reachability,
                                SnapshotResult, TeardownReport, translated)
from sandboxer.models import ExecResult, ExtensionManifest, MeterQuote, Profile, SnapshotMeta

__all__ = ["RESERVED_INPUTS", "OPTIONAL_FEATURES", "FEATURE_METHODS", "SandboxExtension", "NoConfig",
           "check_features", "translated", "OutputCallback"]

#: Optional features a handler may implement (names also listed in registry/).
OPTIONAL_FEATURES = frozenset({"exec", "snapshots", "metering", "list_owned", "files"})

#: The methods a class must override to have each optional feature.
FEATURE_METHODS: dict[str, tuple[str, ...]] = {
    "exec": ("exec",),
    "snapshots": ("snapshot", "restore_from_snapshot"),
    "metering": ("meter_actual",),
    "list_owned": ("list_owned",),
    "files": ("write_file", "read_file", "list_files", "remove_file"),
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


#: Contract methods a handler may override besides the feature methods; each is checked too.
CONTRACT_METHODS = ("provision", "wait_ready", "teardown", "resource_names", "deadline", "probe", "handle_id",
                    "credential_key", "hosts", "delete_snapshot", "options", "set_ttl")


def check_signatures(cls: type["SandboxExtension"]) -> str | None:
    """Why one of the contract methods ``cls`` overrides cannot be called as the manager calls it, or None.

    Every method, not only the declared features' ones: a ``resource_names`` written for an
    older contract fails at load, naming the method, instead of on the first create.
    """
    for name in CONTRACT_METHODS:
        mine, base = getattr(cls, name, None), getattr(SandboxExtension, name)
        if mine is None or mine is base or not callable(mine):
            continue
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

    A handle is the backend's :attr:`Handle` model: what it needs to find the sandbox again.
    The manager stores it as JSON (so never a secret) and rebuilds it before every call.
    """

    Config: ClassVar[type[BaseModel]] = NoConfig
    ProfileOptions: ClassVar[type[BaseModel]] = NoConfig
    features: ClassVar[frozenset[str]] = frozenset()
    #: The parts of the sandbox policy this class truly keeps (:data:`sandboxer.policy.ENFORCEMENTS`).
    #: A manifest may declare fewer (its host lacks a tool), never more. Declare only what a
    #: determined process in the sandbox cannot get around: the router trusts it.
    enforces: ClassVar[frozenset[str]] = frozenset()
    #: The model of this backend's handles (a subclass of :class:`~sandboxer.contract.Handle`).
    Handle: ClassVar[type[Handle]] = Handle
    #: ``(module, pip extra)`` of an optional SDK this backend needs. The
    #: handler module must import that SDK lazily, so a core-only install
    #: still loads every built-in manifest; using the backend then raises
    #: MissingExtra naming the extra.
    requires: ClassVar[tuple[str, str] | None] = None

    #: Groups of inputs of which a sandbox takes one: an input the consumer sets
    #: replaces the profile's default for any other input of its group (e.g. an
    #: ``ssh_target`` given on the command line replaces a profile's default ``vm``).
    exclusive_inputs: ClassVar[tuple[frozenset[str], ...]] = ()

    #: Whether the backend ends a sandbox on its own at the ``ttl`` its provision was given:
    #: ``"none"`` (it does not: the manager's gc alone does), ``"settable"`` (it does, and
    #: :meth:`set_ttl` moves that end) or ``"fixed"`` (it does, and nothing can move it; the
    #: default, the safe assumption). A warm pool (docs/pools.md) provisions for a short life and
    #: moves the end at hand-out where it can; on a ``fixed`` backend it provisions for longer.
    own_ttl: ClassVar[str] = "fixed"

    _home: Path | None = None

    @property
    def home(self) -> Path:
        """Where a backend may keep local files (workspaces, snapshot stores, its own tables):
        the manager's home. The manager sets it after construction."""
        if self._home is None:
            from sandboxer.state import default_home  # the state store's module is heavy: only when needed

            return default_home()
        return self._home

    @home.setter
    def home(self, value: Path) -> None:
        self._home = Path(value)

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

    def resource_names(self, request: ProvisionRequest) -> list[str]:
        """Backend-side names the sandbox will take if placed on ``request.host`` (project names, directories...).

        Called before admission with the request :meth:`provision` would get. The state store
        claims them atomically among this backend's live sandboxes: two never share a name, so
        one's teardown can never destroy the other. A name must say where it lives (the machine,
        the engine: ``"workspace 10.0.0.5:22:/srv/sbx/x"``), since two router hosts may reach one
        machine; and be normalised the way the backend compares it (case-folded where it folds
        case). Pure: no I/O.

        Raises:
            InputError: an input is refused (nothing has been created yet).
        """
        return []

    @classmethod
    def unavailable(cls, config: BaseModel) -> dict[str, str]:
        """The parts of :attr:`enforces` this host cannot keep now, with ``config``, each with why.

        Asked once per catalog load, so keep it cheap (look for a tool, check the euid; never
        a network call). What it names is taken out of what the extension enforces, and the
        router, ``profiles explain`` and ``validate`` give the reason.

        Returns:
            enforcement -> why, e.g. ``{"network:cidr-allowlist": "needs root (running as uid 1000)"}``.
        """
        return {}

    @classmethod
    def policy_refusals(cls, profile: Profile, options: BaseModel, config: BaseModel) -> list[str]:
        """Combinations of ``profile``'s sandbox policy this backend cannot keep, though it keeps
        each part alone (an allow-list naming a domain beside a deny-list, say), each a sentence
        naming the fields. Asked once per profile at catalog load, with the profile's ``options``
        for this backend; the router then never places that profile's sandboxes here, giving
        these reasons. Default: none.
        """
        return []

    @classmethod
    def policy_conflicts(cls, profile: Profile, options: BaseModel) -> list[tuple[str, str]]:
        """Where this backend's profile ``options`` would widen the profile's policy.

        Options may narrow the policy (no network where the profile allows some), never widen it.

        Returns:
            ``(option field, policy field)`` pairs that conflict, e.g. ``("network", "network.egress")``;
            the loader refuses the profile naming both.
        """
        return []

    def names_resources(self) -> bool:
        """Whether this backend names resources (overrides :meth:`resource_names`): admission asks it."""
        return type(self).resource_names is not SandboxExtension.resource_names

    def deadline(self, profile: Profile) -> float:
        """Most seconds a create may take from :meth:`provision` to ready.

        gc in another process treats a ``provisioning`` record as abandoned only after this
        (plus a grace). A backend whose provision itself may run long (a clone, an image pull)
        adds those timeouts to the profile's ready timeout.
        """
        return float(profile.ready_timeout)

    def probe(self, handle: Handle) -> bool | None:
        """Whether the sandbox still exists at the backend: True, False (gone), or None (cannot tell).

        Must be cheap (one lookup) and must not raise for a sandbox that is gone; raise a
        BackendError only when the backend itself cannot be asked. The manager marks a ready
        sandbox ``lost`` when this says False.
        """
        return None

    def set_ttl(self, handle: Handle, ttl: float) -> None:
        """Make the sandbox end ``ttl`` seconds from now, where the backend ends it on its own
        (:attr:`own_ttl` ``"settable"``); called when a warm pool hands a sandbox out. Cheap: it is
        on the hand-out's path. Never called on other backends.

        Raises:
            BackendError: the end could not be moved (the manager then tears the sandbox down).
        """

    def handle_id(self, handle: Handle) -> str | None:
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
    def provision(self, request: ProvisionRequest) -> Handle:
        """Start creating a sandbox.

        Args:
            request: the effective profile, the merged inputs, the manager's reserved fields
                (``sandbox_id``, ``owner_labels``, ``tags``, ``ttl``) and the chosen host.

        Returns:
            The handle (an instance of :attr:`Handle`), with ``host`` when known.

        Raises:
            InputError: an input is missing or refused (before anything is created).
            CapacityUnavailable, QuotaExceeded, RateLimited, AuthError,
            ProvisionError: the backend could not create it. Partial work is
            cleaned up before raising.
        """

    @abc.abstractmethod
    def wait_ready(self, handle: Handle, timeout: float = 60.0) -> Reachability:
        """Block until the sandbox is reachable.

        Returns:
            How a consumer reaches the sandbox.

        Raises:
            ReadinessTimeout: not ready within ``timeout`` seconds.
        """

    @abc.abstractmethod
    def teardown(self, handle: Handle) -> TeardownReport:
        """Destroy the sandbox. Idempotent: a sandbox already gone is a success.

        Returns:
            What was removed; ``already_gone=True`` when the sandbox was gone before this call
            (billing then stops when the manager last saw it alive).

        Raises:
            TeardownError: the backend could not confirm the sandbox is gone.
        """

    # ------------------------------------------------------------ optional

    def exec(
        self,
        handle: Handle,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` inside the sandbox (feature ``exec``).

        ``on_output`` receives output as it arrives; the result holds all of it. Use
        :mod:`sandboxer.execution` for the convention (exit 124 on timeout, the output cap,
        incremental UTF-8 decoding).
        """
        raise NotImplementedError  # pragma: no cover - guarded by supports()

    # Feature ``files``. A path is absolute, or relative to the sandbox's working directory;
    # the backend resolves it inside the sandbox's own filesystem, never the host's (a symlink the
    # sandbox planted must not lead a host-side write or read out of it). Data is streamed:
    # never hold a whole file in memory. Errors: InputError for a bad path (empty, NUL byte),
    # SandboxFileNotFound for a missing path, ExecError for anything else the backend refused.
    # The manager hands ``source``/``sink`` over as file-like objects with ``read``/``write`` only (no
    # fileno, not seekable); a ``source`` may say ``length`` (bytes left) when the manager knows it.

    def write_file(self, handle: Handle, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        """Write everything read from ``source`` (to EOF) to ``path``, replacing a file there and
        creating missing parent directories; ``mode`` sets its permission bits (default 0o644).
        Returns the bytes written."""
        raise NotImplementedError  # pragma: no cover - guarded by supports()

    def read_file(self, handle: Handle, path: str, sink: BinaryIO) -> int:
        """Write the file at ``path`` into ``sink`` as it is read; returns the bytes read."""
        raise NotImplementedError  # pragma: no cover

    def list_files(self, handle: Handle, path: str) -> list[FileInfo]:
        """The entries of the directory at ``path`` (not recursive), sorted by name; a file's own entry
        when ``path`` is a file."""
        raise NotImplementedError  # pragma: no cover

    def remove_file(self, handle: Handle, path: str, *, recursive: bool = False) -> None:
        """Remove the file (or, with ``recursive``, the directory tree) at ``path``. A missing path
        raises SandboxFileNotFound; a non-empty directory without ``recursive`` raises InputError."""
        raise NotImplementedError  # pragma: no cover

    def snapshot(self, handle: Handle) -> SnapshotResult:
        """Capture the sandbox (feature ``snapshots``)."""
        raise NotImplementedError  # pragma: no cover

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> Handle:
        """Provision a new sandbox from ``snapshot`` (its ``data`` is what :meth:`snapshot` returned);
        returns a handle like :meth:`provision`."""
        raise NotImplementedError  # pragma: no cover

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        """Forget a snapshot's stored data. Idempotent."""

    def supports_snapshots(self) -> bool:
        return self.supports("snapshots")

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        """Every live sandbox carrying ``owner_labels`` (feature ``list_owned``), with its handle."""
        raise NotImplementedError  # pragma: no cover

    def estimate_cost(self, profile: Profile, duration: float | timedelta) -> MeterQuote:
        """Price ``duration`` of ``profile`` from the manifest's ``pricing`` (zero without one)."""
        from sandboxer.metering import price  # metering imports models only; kept lazy to stay acyclic

        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        return price(self.manifest, profile, seconds)

    def meter_actual(self, handle: Handle) -> dict[str, Any] | None:
        """What the backend itself reports of a sandbox's usage, if anything (feature ``metering``)."""
        return None
