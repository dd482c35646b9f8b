"""The lifecycle: create / exec / teardown / snapshot / restore / gc.

Rules kept here:

* the intent is recorded (state ``provisioning``, with id and owner labels)
  before the backend is called; the handle is stored the moment provision
  returns; a sandbox is ``ready`` only after ``wait_ready``;
* a failed readiness check tears the sandbox down before the error is raised;
* teardown writes ``tearing_down`` first and ``terminated`` only once the
  backend confirms; a failed teardown is ``teardown_failed`` and gc retries it;
* every sandbox has an ``expires_at``; gc reaps expired ones, retries failed
  teardowns and reconciles with each backend's ``list_owned``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pydantic import SecretStr, ValidationError

from sandboxer.contract import Handle, ProvisionRequest, bound, checked, dump
from sandboxer.deadline import Caller, CallLimits
from sandboxer.errors import (
    AuthError,
    BackendError,
    CapacityUnavailable,
    ConfigError,
    InputError,
    LifecycleError,
    ProfileNotFound,
    SandboxerError,
    SandboxNotFound,
    SandboxStateError,
    TTLError,
)
from sandboxer.extensions.base import RESERVED_INPUTS, SandboxExtension
from sandboxer.metering import Metering, price
from sandboxer.models import (
    POOL_CONSUMER,
    MeterQuote,
    Pricing,
    Profile,
    SandboxCreateRequest,
    SandboxStatus,
    format_duration,
)
from sandboxer.commands import CommandsMixin
from sandboxer.files import FilesMixin
from sandboxer.gc import GcMixin
from sandboxer.lifetime import LifetimeMixin
from sandboxer.pools import PoolReport, Pools
from sandboxer.records import STATUS_FIELDS, Progress, dt, reporter, same_request, short, status_of
from sandboxer.router import Action, Plan, Router
from sandboxer.sandbox import Sandbox
from sandboxer.secrets import SecretRef, sandbox_secrets, scrub
from sandboxer.snapshots import SnapshotsMixin
from sandboxer.teardown import TeardownMixin
from sandboxer.state import LIVE_STATES, NameTaken, OverCapacity, default_home

if TYPE_CHECKING:
    from sandboxer.loader import Catalog
    from sandboxer.state.reader import Reader
    from sandboxer.state.store import StateStore

log = logging.getLogger("sandboxer")

#: How long past its deadline a ``provisioning`` record may sit before gc treats it as abandoned.
STALE_GRACE_S = 30.0
#: How long after its teardown started a ``tearing_down`` record may sit before gc takes it over.
TEARDOWN_GRACE_S = 300.0


def _create_request(fields: dict[str, Any]) -> SandboxCreateRequest:
    """A request from keyword arguments; a bad one is an InputError of the one tree (naming the field and
    value, a secret-looking one redacted), never pydantic's own ValidationError."""
    try:
        return SandboxCreateRequest(**fields)
    except ValidationError as exc:
        from sandboxer.loader import describe_validation  # only on this error path

        raise InputError(describe_validation("create request", exc)) from None


class _OpenedOnUse:
    """A lazy manager's state store as an extension instance holds it: opened on first use."""

    def __init__(self, mgr: "Manager"):
        self._mgr = mgr

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mgr.state, name)


def _clash(ext_id: str, name: str, holder: str) -> str:
    return f"{name!r} on {ext_id} is already used by live sandbox {holder}; choose another (or tear {holder} down first)"


class Manager(SnapshotsMixin, GcMixin, FilesMixin, LifetimeMixin, TeardownMixin, CommandsMixin):
    """The Python API: one object per state store, safe to share between threads.

    Args:
        config_dirs: extra config directories (default: ``SANDBOXER_CONFIG``).
        home: directory of the SQLite state store (default: ``SANDBOXER_HOME``
            or the platform's state directory).
        state_url: a SQLAlchemy URL for a server database instead of SQLite
            (default: ``SANDBOXER_STATE_URL``).
        catalog: an already loaded catalog (skips loading).
        stale_grace: seconds past a create's deadline after which gc treats a
            ``provisioning`` record as abandoned by a crashed process.
        teardown_grace: seconds after a teardown started after which gc treats a
            ``tearing_down`` record as abandoned by a crashed process.
        call_limits: deadlines of the extension calls a profile does not bound (teardown,
            snapshot, list_owned, probe, exec...); a call past its deadline is abandoned.
        lazy: load the catalog on first use instead of here, and for a call about one existing
            sandbox (exec, teardown, status with refresh) only that sandbox's extension: what a
            short-lived process such as the CLI wants. A config error then surfaces at that first
            use. By default everything is loaded and checked here.
        refill: keep the warm pools of pooled profiles filled from a background thread
            (docs/pools.md; stopped by :meth:`close`; a lazy manager starts it when its catalog
            loads). Off, pools are filled only by :meth:`fill_pools`.
    """

    def __init__(
        self,
        config_dirs: list[str | Path] | None = None,
        home: str | Path | None = None,
        *,
        state_url: str | None = None,
        catalog: Catalog | None = None,
        stale_grace: float = STALE_GRACE_S,
        teardown_grace: float = TEARDOWN_GRACE_S,
        call_limits: CallLimits | None = None,
        lazy: bool = False,
        refill: bool = True,
    ):
        self._owns_catalog = catalog is None
        self.home = Path(home) if home else default_home()
        self._config_dirs = [Path(d) for d in config_dirs] if config_dirs is not None else None
        self._catalog = catalog
        self._partial: dict[str, Catalog] = {}  # lazy: one extension's catalog, by extension id
        self._catalog_lock = threading.Lock()
        if catalog is None and not lazy:
            self._catalog = self._load()
        self._state_url = state_url or os.environ.get("SANDBOXER_STATE_URL") or None
        self._state: StateStore | None = None
        self._reader: Reader | None = None
        self._lazy = lazy
        self._state_lock = threading.Lock()
        if not lazy:
            self._open_state()
        self._metering: Metering | None = None
        self.router = Router()
        self.stale_grace = stale_grace
        self.teardown_grace = teardown_grace
        self.limits = call_limits or CallLimits()
        self._caller = Caller()
        self._inflight: set[str] = set()  # creates running in this process
        self._tearing: set[str] = set()  # teardowns running in this process
        self._lock = threading.Lock()
        self._effective: dict[tuple[str, int], Profile] = {}
        self.pools = Pools(self)
        self._refill = refill
        if refill and self._catalog is not None:  # a lazy manager starts it when its catalog loads
            self.pools.start()

    def _call(self, ext: SandboxExtension, method: str, *args: Any, timeout: float | None, what: str,
              late: Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
        """``ext.<method>(*args, **kwargs)`` under a deadline (see :mod:`sandboxer.deadline`).

        Raises:
            ExtensionTimeout: it did not return within ``timeout`` seconds and was abandoned.
        """
        return self._caller.call(bound(ext, method, what), *args, timeout=timeout, what=what,
                                 backend=ext.id, late=late, **kwargs)

    def _open_state(self) -> StateStore:
        with self._state_lock:
            if self._state is None:
                from sandboxer.state.store import StateStore  # SQLAlchemy: only where a store is opened

                self._state = StateStore(self._state_url, home=self.home)
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
        return self._state

    @property
    def state(self) -> StateStore:
        """The state store (opened on first use by a lazy manager)."""
        return self._state if self._state is not None else self._open_state()

    @property
    def metering(self) -> Metering:
        """Usage, budgets and export, over this manager's state store."""
        if self._metering is None:
            self._metering = Metering(self.state, lambda: self.catalog.settings, self._pricing)
        return self._metering

    @property
    def owner_labels(self) -> dict[str, str]:
        """The labels every sandbox of this state store carries at its backend (gc finds orphans by them)."""
        return {"sandboxer.owner": self.state.owner_id}

    def _read(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A read of the state store: a lazy manager whose store is not open yet answers it with
        ``sqlite3`` alone (:mod:`sandboxer.state.reader`); anything it cannot read opens the store."""
        if self._state is None and self._lazy and self._state_url is None:
            if self._reader is None:
                from sandboxer.state.reader import open_reader

                self._reader = open_reader(self.home / "state.db")
            if self._reader is not None:
                try:
                    return getattr(self._reader, method)(*args, **kwargs)
                except sqlite3.Error:  # damaged, or changed under us: the store says what is wrong
                    pass
        return getattr(self.state, method)(*args, **kwargs)

    def _load(self, only: frozenset[str] | None = None) -> Catalog:
        from sandboxer.loader import load_catalog  # YAML and the manifests' models: only when loading

        # signed bundles installed in this home load too (sandboxer.trust.installer), out of process
        return load_catalog(self._config_dirs, installed=self.home, only=only)

    @property
    def catalog(self) -> Catalog:
        """Every extension and profile of this manager's configuration, validated."""
        if self._catalog is None:
            with self._catalog_lock:
                if self._catalog is None:
                    full = self._load()
                    for ext_id, part in self._partial.items():  # keep the instances (workers) already made
                        if ext_id in full.extensions:
                            full.extensions[ext_id] = part.extensions[ext_id]
                    self._catalog = full
            if self._refill:
                self.pools.start()
        return self._catalog

    def _extensions(self, ext_id: str) -> Catalog:
        """The catalog that holds ``ext_id``: the whole one, or (lazy, not loaded yet) that extension's own."""
        if self._catalog is not None or not self._owns_catalog:
            return self.catalog
        with self._catalog_lock:
            if self._catalog is not None:
                return self._catalog
            part = self._partial.get(ext_id)
            if part is None:
                part = self._partial[ext_id] = self._load(frozenset({ext_id}))
            return part

    def _pricing(self, ext_id: str) -> Pricing | None:
        loaded = self._extensions(ext_id).extensions.get(ext_id)
        return loaded.manifest.pricing if loaded else None

    def __repr__(self) -> str:
        if self._state is None:
            return f"<Manager home={str(self.home)!r} (state store not opened yet)>"
        return f"<Manager state={self._state.url!r} owner={self._state.owner_id}>"

    def close(self) -> None:
        """Close the state store and, for a catalog this manager loaded itself, stop its
        out-of-process extensions' workers (a catalog passed in may serve other managers)."""
        self.pools.stop()
        if self._owns_catalog:
            loaded_ones = [*(self._catalog.extensions.values() if self._catalog else ()),
                           *(x for part in self._partial.values() for x in part.extensions.values())]
            for loaded in {id(x): x for x in loaded_ones}.values():
                inst = loaded._instance
                if inst is not None and loaded.runtime == "process":
                    inst.close()  # type: ignore[attr-defined]
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._state is not None:
            self._state.close()

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ lookups

    def profile(self, slug: str) -> Profile:
        try:
            return self.catalog.profiles[slug]
        except KeyError:
            known = ", ".join(sorted(self.catalog.profiles)) or "none"
            raise ProfileNotFound(f"unknown profile {slug!r}; known profiles: {known}") from None

    def extension(self, ext_id: str, *, sandbox_id: str | None = None) -> SandboxExtension:
        """The loaded handler of ``ext_id``.

        Raises:
            ConfigError: no loaded config defines it (the message names the sandbox, if given).
            MissingExtra: its optional SDK is not installed.
        """
        cat = self._extensions(ext_id)
        try:
            loaded = cat.extensions[ext_id]
        except KeyError:
            whose = f"sandbox {sandbox_id} runs on extension {ext_id!r}, which" if sandbox_id else f"extension {ext_id!r}"
            dirs = ", ".join(str(d) for d in [*cat.package_dirs, *cat.dirs]) or "the built-ins only"
            raise ConfigError(
                f"{whose} is not defined in this configuration (config dirs: {dirs}); run with the "
                f"--config (or SANDBOXER_CONFIG) that defines it. Nothing was changed."
            ) from None
        return loaded.instance(self.home, limits=self.limits, state=self.state if self._state else _OpenedOnUse(self))

    def effective_profile(self, profile: Profile, index: int) -> Profile:
        """The profile as backend ``index`` sees it: that entry's options."""
        key = (profile.slug, index)
        eff = self._effective.get(key)
        if eff is None:
            choice = profile.candidates[index]
            eff = profile.model_copy(update={"options": choice.options, "backends": None, "extension": choice.extension})
            self._effective[key] = eff
        return eff

    def _row(self, sandbox_id: str) -> dict[str, Any]:
        row = self._read("get", sandbox_id)
        if row is None:
            raise SandboxNotFound(f"no sandbox with id {sandbox_id!r}")
        return row

    def get(self, sandbox_id: str, *, refresh: bool = False) -> SandboxStatus:
        """The status of one sandbox.

        Args:
            refresh: ask the backend (one cheap probe) whether a ready sandbox still exists;
                one that is gone becomes ``lost``.

        Raises:
            SandboxNotFound.
        """
        row = self._row(sandbox_id)
        if refresh and row["state"] == "ready" and row["handle"]:
            row = self._refresh(row, self.extension(row["extension"], sandbox_id=sandbox_id)) or self._row(sandbox_id)
        return status_of(row)

    def _refresh(self, row: dict[str, Any], ext: SandboxExtension) -> dict[str, Any] | None:
        """Probe a ready sandbox; mark it ``lost`` if the backend no longer has it.

        Returns:
            The updated row if it was found lost, else None.
        """
        alive = self._call(ext, "probe", row["handle"], timeout=self.limits.probe, what=f"probe of sandbox {row['id']}")
        now = time.time()
        if alive is None:
            return None
        if alive:
            self.state.touch([row["id"]], now)
            return None
        seen = max(row["last_seen_at"] or 0.0, row["ready_at"] or row["created_at"])
        lost = self.state.transition(
            row["id"], "lost", expect=("ready",), state="lost", terminated_at=now,
            last_error=f"{ext.id} no longer has this sandbox (last seen alive {dt(seen):%Y-%m-%d %H:%M:%S}Z)",
            detail={"last_seen_at": seen},
            also=lambda conn, r: self.metering.stopped(conn, r["id"], min(seen, r["expires_at"])))
        if lost is not None:
            self._sweep_lost(ext, lost)
        return lost

    def _sweep_lost(self, ext: SandboxExtension, row: dict[str, Any]) -> None:
        """What a lost sandbox left at its backend (a workspace, volumes, a network namespace) goes
        too: its teardown, which takes a sandbox already gone as a success, sweeps it. A failure is
        an event (``lost_sweep_failed``) and a warning; gc's list_owned still finds what is left."""
        try:
            report = self._teardown_call(ext, row["id"], row["handle"])
        except Exception as exc:  # noqa: BLE001 - the sandbox stays lost; the leftovers are gc's
            log.warning("sweeping lost sandbox %s failed: %s", row["id"], exc)
            self.state.record_event(row["id"], "lost_sweep_failed", extension=ext.id, detail={"error": short(exc)})
            return
        self.state.record_event(row["id"], "lost_swept", extension=ext.id, detail={"removed": report.removed})

    def list(self, *, all: bool = False, pooled: bool = False) -> list[SandboxStatus]:  # noqa: A002 - the CLI flag
        """Live sandboxes, or every one ever recorded with ``all=True``; the idle ones of warm pools
        (not yet handed out) only with ``pooled=True``."""
        return [status_of(r) for r in self._read("list", states=None if all else LIVE_STATES, fields=STATUS_FIELDS)
                if pooled or r["consumer"] != POOL_CONSUMER]

    def fill_pools(self, profile: str | None = None) -> PoolReport:
        """Fill every warm pool (or ``profile``'s) up to its size once, now (docs/pools.md)."""
        return self.pools.fill(profile)

    def events(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        return self.state.events(sandbox_id)

    # ------------------------------------------------------------- create

    def _check_inputs(self, profile: Profile, inputs: dict[str, Any]) -> dict[str, Any]:
        """The profile's defaults merged with the consumer's ``inputs``, checked.

        An input the consumer sets replaces the default of any input exclusive with it
        (a backend's :attr:`~SandboxExtension.exclusive_inputs`).
        """
        reserved = sorted(RESERVED_INPUTS & set(inputs))
        if reserved:
            raise InputError(f"input {reserved[0]!r} is reserved for the manager and cannot be set")
        merged = self._merge_inputs(profile, profile.inputs.defaults, inputs)
        missing = [k for k in profile.inputs.required if merged.get(k) in (None, "")]
        if missing:
            raise InputError(
                f"profile {profile.slug!r} requires input {missing[0]!r}; pass it with --input {missing[0]}=VALUE"
            )
        return merged

    def _merge_inputs(self, profile: Profile, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """``defaults`` under ``given``, minus the defaults that an input in ``given`` excludes."""
        if not defaults:
            return dict(given)
        dropped: set[str] = set()
        for choice in profile.candidates:
            loaded = self.catalog.extensions.get(choice.extension)
            for group in loaded.exclusive_inputs if loaded else ():
                if group & given.keys():
                    dropped |= group - given.keys()
        return {**{k: v for k, v in defaults.items() if k not in dropped}, **given}

    def _ttl(self, profile: Profile, ttl: float | None) -> float:
        if ttl is None:
            return profile.ttl.default
        if ttl <= 0:
            raise TTLError(f"TTL must be positive, got {ttl:g}s")
        if ttl > profile.ttl.max:
            raise TTLError(
                f"TTL {format_duration(ttl)} is over profile {profile.slug!r}'s maximum of "
                f"{format_duration(profile.ttl.max)}"
            )
        return ttl

    def create(self, request: SandboxCreateRequest | None = None, /, *,
               secrets: dict[str, SecretRef | dict[str, str]] | None = None,
               on_progress: Progress | None = None, **kwargs: Any) -> Sandbox:
        """Create a sandbox and wait until it is ready.

        Args:
            request: the request, or its fields as keyword arguments.
            secrets: the consumer's references (``SecretRef`` or ``{"env": NAME}``/``{"file": PATH}``) for
                secrets the profile declares, replacing the operator's; resolved here, once (docs/policy.md).
            on_progress: called as ``on_progress(stage, detail)`` at each stage: ``routing`` (profile),
                ``provisioning`` (sandbox_id, backend, host), ``waiting-ready`` (likewise), ``fallback``
                (backend, host, reason, next) and ``ready``. An exception it raises is logged, not raised.

        Returns:
            The ready sandbox: a :class:`~sandboxer.sandbox.Sandbox` (its status, with reachability, and its verbs).

        Raises:
            ProfileNotFound, InputError, TTLError, BudgetExceeded: the request is wrong; nothing was created.
            CapacityUnavailable, RateLimited, AuthError, ProvisionError, ReadinessTimeout: the backend failed
                (single-backend profile); nothing is left behind.
            RoutingError: every backend of a multi-backend profile failed; ``.attempts`` says how.
            NameConflict: a live sandbox has ``name`` but other parameters (the message says which).
        """
        report = reporter(on_progress)
        req = request if request is not None else _create_request(kwargs)
        profile = self.profile(req.profile)
        inputs = self._check_inputs(profile, req.inputs)
        ttl = self._ttl(profile, req.ttl)
        values = sandbox_secrets(profile.slug, profile.secrets, secrets)  # before anything is recorded
        pooled = self.pools.take(req, profile, inputs, ttl, secrets) if profile.pool else None
        if pooled is not None:  # a warm pool's sandbox, now this consumer's (docs/pools.md)
            report("ready", {"sandbox_id": pooled.id, "backend": pooled.extension, "host": pooled.host, "pooled": True})
            return Sandbox.attach(self, pooled)
        return Sandbox.attach(self, self._create(req, profile, inputs, ttl, values, report))

    def _create(self, req: SandboxCreateRequest, profile: Profile, inputs: dict[str, Any], ttl: float,
                values: dict[str, SecretStr], report: Progress) -> SandboxStatus:
        for _ in range(3):  # bounded: a named create may find its twin failed, then tries itself
            if req.name:
                existing = self.state.get_by_name(req.name)
                if existing is not None:
                    same_request(existing, req, profile.slug, ttl)
                    status = self._await_named(existing["id"], profile)
                    if status is not None:
                        return status
                    continue
            try:
                return self._route(req, profile, inputs, ttl, values, report)
            except NameTaken as taken:
                same_request(self._row(taken.existing_id), req, profile.slug, ttl)
                status = self._await_named(taken.existing_id, profile)
                if status is not None:
                    return status
        raise SandboxStateError(f"sandbox name {req.name!r} kept failing to create; see `sandboxer list --all`")

    def _route(self, req: SandboxCreateRequest, profile: Profile, inputs: dict[str, Any], ttl: float,
               secrets: dict[str, SecretStr], report: Progress = lambda stage, detail: None) -> SandboxStatus:
        """Create on the first placement of the router's plan that can take it.

        Raises:
            RequestError subclasses at once; the single backend's own error for a
            one-backend profile; RoutingError listing every attempt otherwise.
        """
        started = time.perf_counter()
        report("routing", {"profile": profile.slug})
        budgeted = self.metering.has_budget(req.consumer)
        plan = self.router.plan(
            profile, ttl, hosts=lambda i: self._hosts(profile, i),
            missing_extra=lambda i: self.catalog.extensions[profile.candidates[i].extension].missing_extra,
            quote=lambda i: self._quote(profile, i, ttl),
            check_budget=(lambda q: self.metering.check_budget(req.consumer, q)) if budgeted else None,
            credential_key=lambda i: self._credential_key(profile.candidates[i].extension, req.consumer),
            enforces=lambda i: self.catalog.extensions[profile.candidates[i].extension].enforces,
            why_not=lambda i: self.catalog.extensions[profile.candidates[i].extension].unavailable,
            refusals=lambda i: self.catalog.extensions[profile.candidates[i].extension].refusals.get(
                (profile.slug, i), []),
        )
        self._skip_disabled(profile, plan)
        placements = plan.placements
        pos = 0
        while pos < len(placements):
            sandbox_id = "sb-" + uuid.uuid4().hex[:12]
            row: dict[str, Any] = {}
            try:
                chosen, refused, row = self.admit(
                    sandbox_id=sandbox_id, profile=profile, placements=placements[pos:], ttl=ttl,
                    consumer=req.consumer, labels=req.labels, name=req.name,
                    detail={"route": {"policy": profile.routing, "tried_before": list(plan.attempts)}},
                    inputs=inputs, given=req.inputs,
                )
            except OverCapacity as exc:
                refused, chosen = exc.refusals, None
                self._note_clashes(profile, plan, pos, exc)
            for p, scope, limit in refused:
                index, host = placements[pos + p]
                ext_id = profile.candidates[index].extension
                plan.skip(ext_id, host, CapacityUnavailable(f"{scope} is full ({limit} live sandboxes)",
                                                            backend=ext_id, host=host))
            if chosen is None:
                break
            self.router.decision_times.append(time.perf_counter() - started)
            index, host = placements[pos + chosen]
            ext_id = profile.candidates[index].extension
            pos += chosen + 1
            report("provisioning", {"sandbox_id": sandbox_id, "backend": ext_id, "host": host})
            try:
                return self.launch(sandbox_id=sandbox_id, profile=profile, index=index, host=host, inputs=inputs,
                                   ttl=ttl, consumer=req.consumer, labels=req.labels, row=row, secrets=secrets,
                                   on_progress=report)
            except BackendError as exc:
                plan.failed(ext_id, host, exc, sandbox_id)
                action = self.router.on_failure(exc, ext_id, self._credential_key(ext_id, req.consumer)
                                                if isinstance(exc, AuthError) else None)
                if action is Action.COOL_DOWN:
                    self.state.record_event(None, "backend_blocked", extension=ext_id,
                                            detail=self.router.cooldown_event(exc))
                if action is Action.STOP:
                    self._route_failed(profile, plan)
                    raise self.router.stopped(profile, plan) from exc
                if action is Action.FAIL:
                    self._route_failed(profile, plan)
                    raise self.router.final_error(profile, plan, exc)
                if action is not Action.NEXT_HOST:
                    pos = plan.next_backend(pos)
                if pos < len(placements):
                    report("fallback", {"sandbox_id": sandbox_id, "backend": ext_id, "host": host, "reason": str(exc),
                                        "next": profile.candidates[placements[pos][0]].extension})
        self._route_failed(profile, plan)
        raise self.router.final_error(profile, plan)

    def _skip_disabled(self, profile: Profile, plan: Plan) -> None:
        """Take installed bundles that are not active out of the plan, the reason in its attempts.

        Raises:
            LifecycleError: the one backend of a one-backend profile is disabled (named).
        """
        for index, choice in enumerate(profile.candidates):
            loaded = self.catalog.extensions[choice.extension]
            if loaded.import_path is None:  # not an installed bundle: no lifecycle
                continue
            row = self.state.installed_extension(choice.extension)
            state = row["state"] if row else "not installed"
            if state == "active":
                continue
            exc = LifecycleError(f"{choice.extension} is {state}: it takes no new sandboxes (`sandboxer extensions "
                                 f"enable {choice.extension}` makes it active again)")
            if len(profile.candidates) == 1:
                raise exc
            if any(i == index for i, _ in plan.placements):
                plan.placements[:] = [p for p in plan.placements if p[0] != index]
                plan.skip(choice.extension, None, exc, f"LifecycleError: {exc}")

    def _route_failed(self, profile: Profile, plan: Plan) -> None:
        self.state.record_event(None, "route_failed", detail={"profile": profile.slug, "attempts": plan.attempts})

    @staticmethod
    def _note_clashes(profile: Profile, plan: Plan, pos: int, exc: OverCapacity) -> None:
        for p, scope, taken, holder in exc.clashes:
            index, host = plan.placements[pos + p]
            plan.skip(profile.candidates[index].extension, host, InputError(_clash(scope, taken, holder)))

    def _credential_key(self, ext_id: str, consumer: str) -> str | None:
        try:
            return self.extension(ext_id).credential_key(consumer)
        except Exception:  # noqa: BLE001 - no key to tell apart: a cooldown then covers the backend
            return None

    def _hosts(self, profile: Profile, index: int) -> list[str | None]:
        choice = profile.candidates[index]
        hosts = list(choice.hosts) or list(self.extension(choice.extension).hosts())
        return hosts or [None]

    def _limits(self, profile: Profile, index: int, host: str | None) -> list[tuple[str, int, dict[str, Any]]]:
        """Admission limits of a placement: ``(scope, most live sandboxes, what they match)``."""
        choice = profile.candidates[index]
        out: list[tuple[str, int, dict[str, Any]]] = []
        if choice.capacity is not None:
            out.append((choice.extension, choice.capacity, {"extension": choice.extension}))
        if host is not None:
            per_host = choice.capacity_per_host
            if per_host is None:
                per_host = self.extension(choice.extension).hosts().get(host)
            if per_host is not None:
                out.append((f"{choice.extension} host {host}", per_host, {"extension": choice.extension, "host": host}))
        return out

    def _await_named(self, sandbox_id: str, profile: Profile) -> SandboxStatus | None:
        """Wait for a racing create of the same name; None if it failed."""
        deadline = time.monotonic() + profile.ready_timeout + self.stale_grace
        while time.monotonic() < deadline:
            row = self._row(sandbox_id)
            if row["state"] == "ready":
                return status_of(row)
            if row["state"] in ("failed", "terminated"):
                return None
            if row["state"] in ("tearing_down", "teardown_failed"):
                raise SandboxStateError(f"sandbox {sandbox_id!r} with that name is being torn down")
            time.sleep(0.01)
        raise SandboxStateError(f"sandbox {sandbox_id!r} with that name did not become ready in time")

    def _tags(self, sandbox_id: str, req_labels: dict[str, str], consumer: str, profile: Profile) -> dict[str, str]:
        return {
            **profile.labels, **req_labels, **self.owner_labels,
            "sandboxer.sandbox_id": sandbox_id, "sandboxer.consumer": consumer, "sandboxer.profile": profile.slug,
        }

    def _request(self, profile: Profile, index: int, sandbox_id: str, inputs: dict[str, Any], ttl: float,
                 consumer: str, labels: dict[str, str], host: str | None,
                 secrets: dict[str, SecretStr] | None = None) -> ProvisionRequest:
        """What backend ``index``'s provision gets: its own inputs and the request's, the reserved fields, secrets."""
        return ProvisionRequest(
            profile=self.effective_profile(profile, index),
            inputs=self._merge_inputs(profile, profile.candidates[index].inputs, inputs), sandbox_id=sandbox_id,
            owner_labels=dict(self.owner_labels), tags=self._tags(sandbox_id, labels, consumer, profile), ttl=ttl,
            host=host, secrets=secrets or {},
        )

    def admit(
        self,
        *,
        sandbox_id: str,
        profile: Profile,
        placements: list[tuple[int, str | None]],
        ttl: float,
        consumer: str,
        labels: dict[str, str],
        name: str | None,
        detail: dict[str, Any],
        inputs: dict[str, Any] | None = None,
        given: dict[str, Any] | None = None,
    ) -> tuple[int, list[tuple[int, str, int]], dict[str, Any]]:
        """Record the intent on the first placement ``(backend index, host)`` with room.

        Args:
            inputs: the merged inputs (the backends' :meth:`~SandboxExtension.resource_names`
                are claimed from them); given: the ones the consumer set (recorded).

        Returns:
            The position admitted in ``placements``, the refusals before it, and the row recorded.

        Raises:
            InputError: a backend refused an input, or every placement clashes with a live
                sandbox's backend-side name (nothing recorded).
            state.OverCapacity: every placement is full (nothing recorded).
            state.NameTaken: a live sandbox has ``name``.
        """
        now = time.time()
        candidates = []
        for index, host in placements:
            eff = self.effective_profile(profile, index)
            ext = self.extension(eff.extension or "")
            claims: list[tuple[str, str]] = []
            if ext.names_resources():
                req = self._request(profile, index, sandbox_id, inputs or {}, ttl, consumer, labels, host)
                names = checked("resource_names", ext.resource_names(req), backend=ext.id)
                claims = [(ext.id, n) for n in dict.fromkeys(names)]
            candidates.append(({
                "id": sandbox_id, "name": name, "profile": profile.slug, "extension": eff.extension, "host": host,
                "state": "provisioning", "handle": None, "reachability": None, "consumer": consumer,
                "labels": labels, "resources": eff.resources.model_dump(), "created_at": now,
                "expires_at": now + ttl, "attempts": 0, "last_error": None,
                "ready_at": None, "terminated_at": None, "last_seen_at": None, "inputs": given or {},
                "deadline_at": now + ext.deadline(eff), "teardown_started_at": None, "policy": eff.policy(),
            }, self._limits(profile, index, host), claims))
        try:
            pos, refusals = self.state.admit(candidates, detail=detail)
        except OverCapacity as exc:
            if exc.clashes and not exc.refusals:
                _, scope, taken, holder = exc.clashes[0]
                raise InputError(_clash(scope, taken, holder)) from None
            raise
        return pos, refusals, candidates[pos][0]

    def launch(
        self,
        *,
        sandbox_id: str,
        profile: Profile,
        index: int,
        host: str | None,
        inputs: dict[str, Any],
        ttl: float,
        consumer: str,
        labels: dict[str, str],
        row: dict[str, Any],
        start: Callable[[SandboxExtension, ProvisionRequest], Handle] | None = None,
        secrets: dict[str, SecretStr] | None = None,
        on_progress: Progress | None = None,
    ) -> SandboxStatus:
        """Provision an admitted sandbox (``secrets`` in its request alone: an error that echoes one is
        scrubbed before it is recorded or raised), record its handle, wait until ready; clean up on failure.

        Raises:
            TeardownError: a failed attempt could not be cleaned up (the router must stop).
            The backend's error otherwise, after cleanup.
        """
        eff = self.effective_profile(profile, index)
        ext = self.extension(eff.extension or "")
        req = self._request(profile, index, sandbox_id, inputs, ttl, consumer, labels, host, secrets)
        values = [v.get_secret_value() for v in (secrets or {}).values()]
        with self._lock:
            self._inflight.add(sandbox_id)
        try:
            try:
                begin = start or (lambda e, r: e.provision(r))
                handle = self._caller.call(
                    lambda: checked("provision", begin(ext, req), backend=ext.id, handle_cls=ext.Handle),
                    timeout=ext.deadline(eff), backend=ext.id, what=f"provision of sandbox {sandbox_id}",
                    late=lambda h: self._late_handle(ext, sandbox_id, h))
            except BaseException as exc:
                self._after_failed_provision(ext, sandbox_id, scrub(exc, values))
                raise
            row = self.state.transition(sandbox_id, "provisioned", expect=("provisioning",), known=row,
                                        handle=dump(handle), host=handle.host or host)
            if row is None:
                self._abandon(ext, sandbox_id, handle)
            where = {"sandbox_id": sandbox_id, "backend": ext.id, "host": handle.host or host}
            if on_progress is not None:
                on_progress("waiting-ready", where)
            try:
                # the handler's own timeout is positional: ``timeout=`` is the deadline here
                reach = self._call(ext, "wait_ready", handle, eff.ready_timeout,
                                   timeout=eff.ready_timeout + self.limits.ready_grace,
                                   what=f"wait_ready of sandbox {sandbox_id}")
            except BaseException as exc:
                self._teardown_after_failure(ext, sandbox_id, handle, scrub(exc, values))
                raise
            row = self.state.transition(sandbox_id, "ready", expect=("provisioning",), known=row, state="ready",
                                        reachability=dump(reach), ready_at=time.time(), also=self.metering.started)
            if row is None:
                self._abandon(ext, sandbox_id, handle)
            if on_progress is not None:
                on_progress("ready", where)
            return status_of(row)
        finally:
            with self._lock:
                self._inflight.discard(sandbox_id)

    @contextmanager
    def sandbox(self, profile: str, *, secrets: dict[str, SecretRef | dict[str, str]] | None = None,
                **kwargs: Any) -> Iterator[Sandbox]:
        """Create a sandbox for a ``with`` block; it is torn down on any exit (``secrets`` as :meth:`create`)."""
        sb = self.create(_create_request({"profile": profile, **kwargs}), secrets=secrets)
        try:
            yield sb
        finally:
            try:
                self.teardown(sb.id)
            except SandboxerError as exc:
                log.error("teardown of %s failed on exit: %s (gc will retry)", sb.id, exc)

    # ---------------------------------------------------------------- cost

    def quote(self, profile: str, duration: float) -> list[MeterQuote]:
        """A price for ``duration`` seconds of ``profile`` on each of its backends."""
        prof = self.profile(profile)
        return [self._quote(prof, i, duration) for i in range(len(prof.candidates))]

    def _quote(self, profile: Profile, index: int, duration: float) -> MeterQuote:
        loaded = self.catalog.extensions[profile.candidates[index].extension]
        eff = self.effective_profile(profile, index)
        if loaded.missing_extra:
            return price(loaded.manifest, eff, duration)
        return self.extension(loaded.manifest.id).estimate_cost(eff, duration)

