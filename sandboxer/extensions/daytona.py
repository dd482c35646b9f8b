"""The Daytona backend: cloud sandboxes through the official ``daytona`` SDK.

What it owns: mapping the sand-boxer verbs onto Daytona (create / get / delete / list by labels /
sandbox snapshots), the TTL onto Daytona's ``ttl_minutes`` with auto-stop and auto-delete, the
profile's network policy and GPUs onto the create's parameters, bring-your-own-key resolution,
and the translation of the SDK's exceptions into the sand-boxer error tree. How a command runs
(a toolbox session, its logs followed over a WebSocket) is :mod:`sandboxer.extensions.daytona_exec`.

Rules kept here:

* the SDK is imported lazily (``importlib.import_module("daytona")``): this module is named
  ``daytona`` too and must load on a core-only install;
* the API key is given only by reference (:class:`~sandboxer.secrets.SecretRef`), resolved at
  each call into a client made for that call, and never stored in a handle, a log line, an
  exception message or a ``repr``; provider messages are redacted;
* every SDK call runs through :meth:`DaytonaExtension._call`, which maps the SDK's exceptions
  through this backend's one :class:`~sandboxer.contract.ErrorTable` (by exception type and HTTP
  status, never by message text) with :func:`~sandboxer.contract.translated_with`: ours is
  raised outside the SDK's ``except`` block, so the SDK's exception is not reachable from it;
* a sandbox is named after our sandbox id, so a create retried past a lost response finds the
  sandbox its first try made (Daytona refuses a second sandbox of one name) instead of making two.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import secrets
import threading
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sandboxer.contract import (ErrorTable, FileInfo, Handle, OwnedSandbox, ProvisionRequest, Reachability,
                                SnapshotResult, TeardownReport, translated_with)
from sandboxer.errors import (
    AuthError,
    BackendError,
    CapacityUnavailable,
    MissingExtra,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    SandboxerError,
    SnapshotError,
    TeardownError,
)
from sandboxer.execution import OUTPUT_CAP
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.extensions.e2b import parse_retry_after
from sandboxer.models import Duration, ExecResult, Profile, SnapshotMeta
from sandboxer.policy import is_domain
from sandboxer.poll import poll
from sandboxer.secrets import SecretRef, redact, refuse_literal_keys

log = logging.getLogger("sandboxer.daytona")

#: Most sandboxes ``list_owned`` reads per key, so a misbehaving API cannot keep it looping.
MAX_LISTED = 100_000
#: States in which a Daytona sandbox is gone, or going, for good.
GONE_STATES = frozenset({"destroyed", "destroying"})
#: GPU models Daytona's API takes (daytona 0.226's ``GpuType``), upper-case.
GPU_TYPES = ("H100", "H200", "B200", "B300", "RTX-PRO-6000", "RTX-4090", "RTX-5090", "MI355X")
T = TypeVar("T")


def _sdk() -> Any:
    """The ``daytona`` SDK module, imported on first use."""
    try:
        return importlib.import_module("daytona")
    except ImportError as exc:
        raise MissingExtra(
            "ext.daytona needs the Python package 'daytona'; install it with: pip install 'sand-boxer[daytona]'"
        ) from exc


class DaytonaBackendConfig(BaseModel):
    """The manifest's ``config:`` for a Daytona backend."""

    model_config = ConfigDict(extra="forbid")

    api_key: SecretRef = Field(
        default_factory=lambda: SecretRef(env="DAYTONA_API_KEY"),
        description="where the operator's Daytona API key lives: {env: NAME} or {file: PATH}",
    )
    consumer_keys: dict[str, SecretRef] = Field(
        default_factory=dict, description="a consumer's own key, used instead of api_key for that consumer"
    )
    api_url: str | None = Field(default=None, description="Daytona API base URL (default: the SDK's)")
    target: str | None = Field(default=None, description="the region sandboxes go to (the organization's default)")
    snapshot: str | None = Field(default=None, min_length=1,
                                 description="snapshot a sandbox starts from (Daytona's default if unset)")
    image: str | None = Field(default=None, min_length=1,
                              description="start from this image instead (Daytona builds it); needed for GPUs")
    request_timeout: Duration = Field(default=30.0, gt=0, description="seconds for one API request")
    exec_timeout: Duration = Field(default=600.0, gt=0, description="command timeout when exec gives none")
    max_output_bytes: int = Field(default=OUTPUT_CAP, gt=0, description="kept (and streamed) per stream of one exec")
    rate_limit_retry_after: float = Field(
        default=5.0, ge=0, description="retry_after reported on a 429 that carries no Retry-After header")
    snapshot_timeout: Duration = Field(default=600.0, gt=0, description="seconds a snapshot may take to be usable")

    @model_validator(mode="before")
    @classmethod
    def _no_literal_keys(cls, data: Any) -> Any:
        return refuse_literal_keys(data)


class DaytonaOptions(BaseModel):
    """A profile's ``options:`` for a Daytona backend."""

    model_config = ConfigDict(extra="forbid")

    snapshot: str | None = Field(default=None, min_length=1, description="overrides the manifest's snapshot")
    image: str | None = Field(default=None, min_length=1, description="overrides the manifest's image")
    env: dict[str, str] = Field(default_factory=dict, description="environment of the sandbox")
    user: str | None = Field(default=None, description="the OS user of the sandbox (the snapshot's if unset)")
    cwd: str | None = Field(default=None, description="working directory of commands when exec gives none")
    network_block_all: bool | None = Field(
        default=None, description="true narrows any network policy to none; false cannot widen it")


class DaytonaHandle(Handle):
    """A Daytona sandbox, as the state store keeps it: ids and times, never the key.

    ``consumer`` names whose key the sandbox was made with (so every later call uses that key),
    by the consumer's name only.
    """

    model_config = ConfigDict(extra="ignore")

    daytona_sandbox_id: str = Field(min_length=1)
    name: str | None = None
    consumer: str | None = None
    ttl_minutes: int | None = None
    started_at: float | None = None
    cwd: str | None = Field(default=None, description="commands' working directory when exec gives none")
    expose: list[int] = Field(default_factory=list, description="the ports of network.expose")
    restored_from: str | None = Field(default=None, description="the snapshot it was restored from")


class DaytonaReachability(Reachability):
    """How a ready Daytona sandbox is reached (through the SDK, with the key: never a URL alone)."""

    provider: Literal["daytona"] = "daytona"
    daytona_sandbox_id: str
    name: str | None = None
    work_dir: str | None = None


@dataclass(frozen=True)
class _Call:
    """The SDK call being made, which the error table's makers name in their messages."""

    op: str
    consumer: str | None
    fallback: type[BackendError]
    sandbox: str | None

    @property
    def where(self) -> str:
        return f"Daytona {self.op}" + (f" of sandbox {self.sandbox}" if self.sandbox else "")


#: The call :meth:`DaytonaExtension._call` is making in this thread (read by the error table's makers).
_CALL: ContextVar[_Call] = ContextVar("sandboxer_daytona_call")


def sandbox_name(sandbox_id: str) -> str:
    """The Daytona name of our sandbox: one per sandbox id, so a retried create cannot make a second."""
    return "sandboxer-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:24]


def _state(sbx: Any) -> str:
    return str(getattr(sbx.state, "value", sbx.state) or "unknown")


def _off_main_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a thread of its own, its result or exception handed back (the SDK bounds its time)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box.pop("error")
    return box["value"]


def _ttl_minutes(ttl: float) -> int:
    """A TTL in seconds as Daytona's whole minutes, rounded up (never shorter than asked)."""
    return max(1, math.ceil(ttl / 60))


def _gib(mb: int) -> int:
    return max(1, math.ceil(mb / 1024))


class DaytonaExtension(SandboxExtension):
    """Sandboxes on Daytona, with the operator's (or a consumer's) own API key."""

    Config: ClassVar[type[BaseModel]] = DaytonaBackendConfig
    ProfileOptions: ClassVar[type[BaseModel]] = DaytonaOptions
    features: ClassVar[frozenset[str]] = frozenset({"exec", "snapshots", "list_owned", "files"})
    # What daytona 0.226 sends and Daytona documents (see _network_args for the mapping):
    # none: network_block_all ("Whether to block all network access for the Sandbox");
    # CIDR allow-lists: network_allow_list ("Comma-separated list of allowed CIDR network addresses");
    # domain allow-lists: domain_allow_list ("Comma-separated list of allowed domains", the
    #   "unbypassable network-layer enforcement" the SDK names). Daytona has no deny-list.
    # expose: each port's preview URL (get_preview_link); every sandbox is created with
    #   public=False, so a preview answers only a request with the sandbox's preview token;
    # gpu: Resources(gpu=, gpu_type=) on a create from an image;
    # secrets: the create's env_vars ("Environment variables to set in the Sandbox"), which every
    #   command of the sandbox inherits.
    enforces: ClassVar[frozenset[str]] = frozenset({
        "network:none", "network:internet", "network:cidr-allowlist", "network:domain-allowlist", "expose", "gpu",
        "secrets"})
    requires: ClassVar[tuple[str, str] | None] = ("daytona", "daytona")
    Handle = DaytonaHandle

    config: DaytonaBackendConfig

    def __init__(self, manifest: Any, config: BaseModel):
        super().__init__(manifest, config)
        self._table: ErrorTable | None = None

    # ------------------------------------------------------------ credentials

    def _key_ref(self, consumer: str | None) -> SecretRef:
        if consumer is not None and consumer in self.config.consumer_keys:
            return self.config.consumer_keys[consumer]
        return self.config.api_key

    def credential(self, consumer: str | None) -> str:
        """The reference of the key ``consumer``'s calls use, as ``AuthError.credential`` names it."""
        return self._key_ref(consumer).reference()

    def credential_key(self, consumer: str | None) -> str | None:
        return self._key_ref(consumer).fingerprint()

    def _client(self, consumer: str | None) -> Any:
        """A Daytona client for ``consumer``'s key, resolved now (one per call: the key is kept nowhere).

        State is polled (``use_deprecated_polling``) rather than streamed: a client lives for one
        call, and sand-boxer does its own waiting, so a Socket.IO connection per call would buy nothing.
        """
        sdk = _sdk()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return sdk.Daytona(sdk.DaytonaConfig(
                api_key=self._key_ref(consumer).resolve(backend=self.id), api_url=self.config.api_url,
                target=self.config.target, use_deprecated_polling=True))

    # ------------------------------------------------------------ errors

    def _call(self, op: str, fn: Callable[[Any], T], *, consumer: str | None, fallback: type[BackendError],
              sandbox: str | None = None) -> T:
        """Run ``fn(client)`` with a client for ``consumer``'s key; SDK exceptions become ours.

        Args:
            op: what was being done, for messages ("create", "delete", ...).
            fn: the SDK calls, given the client (which holds the key).
            consumer: whose key to use (named by reference in an AuthError).
            fallback: the class for anything not more specific.
            sandbox: the Daytona sandbox id, named in messages when known.
        """
        def work() -> T:
            return translated_with(_CALL, _Call(op, consumer, fallback, sandbox),
                                   lambda: fn(self._client(consumer)), self.errors)

        try:
            if threading.current_thread() is threading.main_thread():
                # On the main thread the SDK times its waits with SIGALRM, which replaces the
                # application's own alarm handler and cancels its alarm: run the call elsewhere.
                return _off_main_thread(work, f"daytona-{op}")
            return work()
        except SandboxerError as exc:
            # One of ours raised inside ``fn`` (a sandbox found destroyed, say) has ``fn``'s frames
            # in its traceback, and their locals hold the client (with the key) and the SDK's
            # sandbox (with its env, the secrets): a traceback rendered with locals would show them.
            raise exc.with_traceback(None) from None

    @property
    def errors(self) -> ErrorTable:
        """This backend's one map from the SDK's exceptions to ours, by type and HTTP status only."""
        if self._table is None:
            sdk = _sdk()
            httpx = importlib.import_module("httpx")  # the SDK's own HTTP client, present whenever the SDK is
            urllib3 = importlib.import_module("urllib3")
            self._table = ErrorTable({
                sdk.DaytonaAuthenticationError: self._refused,
                sdk.DaytonaRateLimitError: lambda e: RateLimited(
                    f"{_CALL.get().where}: rate limited by Daytona (HTTP 429): {self._detail(e)}",
                    retry_after=self._retry_after(e), backend=self.id),
                sdk.DaytonaForbiddenError: lambda e: QuotaExceeded(
                    f"{_CALL.get().where}: refused by Daytona (HTTP 403: a quota of the organization is used up, "
                    f"or the key lacks the permission): {self._detail(e)}", backend=self.id),
                sdk.DaytonaServiceUnavailableError: lambda e: CapacityUnavailable(
                    f"{_CALL.get().where}: Daytona has no capacity right now (HTTP 503): {self._detail(e)}",
                    backend=self.id),
                importlib.import_module("daytona.common.errors").DaytonaQueueTimeoutError: lambda e: (
                    CapacityUnavailable(f"{_CALL.get().where}: no Daytona runner took the sandbox in time: "
                                        f"{self._detail(e)}", backend=self.id)),
                sdk.DaytonaNotFoundError: self._gone,
                sdk.DaytonaGoneError: self._gone,
                sdk.DaytonaTimeoutError: self._timed_out,
                sdk.DaytonaConnectionError: self._unreachable,
                sdk.DaytonaError: self._by_status,
                httpx.TimeoutException: self._timed_out,
                httpx.TransportError: self._unreachable,
                urllib3.exceptions.HTTPError: self._unreachable,
                OSError: self._unreachable,
            })
        return self._table

    def _refused(self, exc: BaseException) -> AuthError:
        call = _CALL.get()
        return AuthError(
            f"{call.where}: Daytona refused the API key from {self._key_ref(call.consumer).describe()} (HTTP 401); "
            "check the key or rotate it (see docs/byok.md)",
            backend=self.id, credential=self.credential(call.consumer),
        )

    def _gone(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return self._make(call.fallback, f"{call.where}: the sandbox is gone at Daytona: {self._detail(exc)}")

    def _timed_out(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return self._make(call.fallback, f"{call.where}: timed out: {self._detail(exc)}", transient=True)

    def _unreachable(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return self._make(call.fallback, f"{call.where}: cannot reach Daytona: {type(exc).__name__}: "
                          f"{self._detail(exc)}", transient=True)

    def _by_status(self, exc: BaseException) -> BackendError:
        """Any other SDK error, by its HTTP status (the SDK's public ``status_code``)."""
        call = _CALL.get()
        status = getattr(exc, "status_code", None)
        if status is None and isinstance(exc.__cause__, self._transport_errors()):
            return self._unreachable(exc)  # the SDK wraps urllib3's MaxRetryError in a bare DaytonaError
        msg = f"{call.where} failed (HTTP {status or '-'}): {self._detail(exc)}"
        if status == 429:
            return RateLimited(msg, retry_after=self._retry_after(exc), backend=self.id)
        if status == 503:
            return CapacityUnavailable(msg, backend=self.id)
        return self._make(call.fallback, msg, transient=status is None or status >= 500)

    @staticmethod
    def _transport_errors() -> tuple[type[BaseException], ...]:
        return (importlib.import_module("urllib3").exceptions.HTTPError,
                importlib.import_module("httpx").TransportError, OSError)

    def _make(self, cls: type[BackendError], message: str, *, transient: bool = False) -> BackendError:
        if cls is ProvisionError:
            return ProvisionError(message, transient=transient, backend=self.id)
        return cls(message, backend=self.id)

    def _detail(self, exc: BaseException) -> str:
        """The provider's text of ``exc`` with every configured key scrubbed from it."""
        keys: list[str | None] = []
        for ref in {self._key_ref(_CALL.get().consumer), self.config.api_key, *self.config.consumer_keys.values()}:
            try:
                keys.append(ref.resolve())
            except AuthError:
                continue
        return redact(str(exc), keys) or type(exc).__name__

    def _retry_after(self, exc: BaseException) -> float:
        """The 429's ``Retry-After`` (the SDK's public ``headers``), or ``rate_limit_retry_after``."""
        headers = {str(k).lower(): v for k, v in (getattr(exc, "headers", None) or {}).items()}
        seconds = parse_retry_after(headers.get("retry-after"))
        return seconds if seconds is not None else self.config.rate_limit_retry_after

    # ------------------------------------------------------------ policy

    def options(self, profile: Profile) -> DaytonaOptions:
        """The profile's options with the network its policy allows: ``network_block_all`` is True for
        ``egress: none`` or when the option narrows the policy to none, else False."""
        opts = super().options(profile)
        block = profile.network.egress == "none" or opts.network_block_all is True
        return opts.model_copy(update={"network_block_all": block})

    @classmethod
    def policy_conflicts(cls, profile: Profile, options: BaseModel) -> list[tuple[str, str]]:
        if getattr(options, "network_block_all", None) is False and profile.network.egress == "none":
            return [("network_block_all", "network.egress")]
        return []

    @classmethod
    def policy_refusals(cls, profile: Profile, options: BaseModel, config: BaseModel) -> list[str]:
        gpu = profile.resources.gpu
        if gpu is None:
            return []
        out = []
        if not (getattr(options, "image", None) or getattr(config, "image", None)):
            out.append(f"Daytona gives GPUs (resources.gpu) only to a sandbox created from an image: set "
                       f"options.image in profile {profile.slug!r}, or config.image")
        if gpu.type is not None and gpu.type.upper() not in GPU_TYPES:
            out.append(f"field 'resources.gpu.type' (value {gpu.type!r}): Daytona has no such GPU; it accepts "
                       f"{', '.join(GPU_TYPES)}")
        return out

    def _network_args(self, profile: Profile, opts: DaytonaOptions) -> dict[str, Any]:
        """``network_block_all``, ``network_allow_list`` and ``domain_allow_list`` for the profile's policy."""
        if opts.network_block_all:
            return {"network_block_all": True}
        allow = profile.network.allow
        cidrs = [e for e in allow if not is_domain(e)]
        domains = [e for e in allow if is_domain(e)]
        out: dict[str, Any] = {"network_block_all": False}
        if cidrs:
            out["network_allow_list"] = ",".join(cidrs)
        if domains:
            out["domain_allow_list"] = ",".join(domains)
        return out

    # ------------------------------------------------------------ lifecycle

    def deadline(self, profile: Profile) -> float:
        # provision waits for the sandbox to start (an image may be built first), then wait_ready again
        return 2 * float(profile.ready_timeout) + 2 * self.config.request_timeout

    def provision(self, request: ProvisionRequest) -> DaytonaHandle:
        """Create a Daytona sandbox and wait until Daytona reports it started (see the base class)."""
        return self._create(request, snapshot=None, restored_from=None)

    def _params(self, request: ProvisionRequest, opts: DaytonaOptions, snapshot: str | None) -> Any:
        sdk = _sdk()
        profile = request.profile
        labels = {str(k): str(v) for k, v in request.tags.items()}
        for k, v in request.owner_labels.items():
            labels.setdefault(str(k), str(v))
        labels["sandboxer.sandbox_id"] = request.sandbox_id
        minutes = _ttl_minutes(request.ttl)
        common: dict[str, Any] = dict(
            # the secrets' values go to Daytona alone (the create's env), never into the handle
            name=sandbox_name(request.sandbox_id), labels=labels,
            env_vars={**opts.env, **request.secret_env()} or None,
            os_user=opts.user, public=False,
            # The TTL is Daytona's own wall-clock limit; idle, it stops at the same mark, and a
            # stopped sandbox is deleted at once, so nothing of it outlives its TTL.
            ttl_minutes=minutes, auto_stop_interval=minutes, auto_delete_interval=0,
            **self._network_args(profile, opts))
        image = None if snapshot else (opts.image or self.config.image)
        if image is None:
            return sdk.CreateSandboxFromSnapshotParams(snapshot=snapshot or opts.snapshot or self.config.snapshot,
                                                       **common)
        res = profile.resources
        gpu = res.gpu
        resources = sdk.Resources(cpu=max(1, math.ceil(res.cpu)), memory=_gib(res.memory_mb), disk=_gib(res.disk_mb),
                                  gpu=gpu.count if gpu else None,
                                  gpu_type=sdk.GpuType(gpu.type.upper()) if gpu and gpu.type else None)
        return sdk.CreateSandboxFromImageParams(image=image, resources=resources, **common)

    def _create(self, request: ProvisionRequest, *, snapshot: str | None, restored_from: str | None) -> DaytonaHandle:
        opts: DaytonaOptions = self.options(request.profile)
        sandbox_id = request.sandbox_id
        name = sandbox_name(sandbox_id)
        consumer = request.tags.get("sandboxer.consumer")
        wait = max(1.0, float(request.profile.ready_timeout))
        sdk = _sdk()

        def create(client: Any) -> str:
            # built here, so the parameters (the secrets among them) live in this frame only,
            # which no error of ours carries (see _call)
            params = self._params(request, opts, snapshot)
            try:
                return client.create(params, timeout=wait).id
            except sdk.DaytonaConflictError:
                # a create retried past a lost response: the sandbox its first try made, if it is ours
                found = client.get(name)
                if (found.labels or {}).get("sandboxer.sandbox_id") != sandbox_id:
                    raise
                found.wait_for_sandbox_start(timeout=wait)
                return found.id

        started = time.time()
        try:
            daytona_id = self._call("create", create, consumer=consumer, fallback=ProvisionError)
        except BackendError as exc:
            refused = isinstance(exc, (AuthError, RateLimited, QuotaExceeded)) or (
                isinstance(exc, ProvisionError) and not exc.transient)
            if not refused:  # a create that may have failed after Daytona made the sandbox
                self._remove_named(name, consumer)
            raise
        return DaytonaHandle(daytona_sandbox_id=daytona_id, name=name, consumer=consumer,
                             ttl_minutes=_ttl_minutes(request.ttl), started_at=started, cwd=opts.cwd,
                             expose=list(request.profile.network.expose), restored_from=restored_from)

    def _remove_named(self, name: str, consumer: str | None) -> None:
        """Delete the sandbox called ``name`` if Daytona has one: the leftover of a failed create."""
        def remove(client: Any) -> None:
            try:
                sbx = client.get(name)
            except _sdk().DaytonaNotFoundError:
                return
            if _state(sbx) not in GONE_STATES:
                sbx.delete()

        try:
            self._call("cleanup of a failed create", remove, consumer=consumer, fallback=ProvisionError)
        except BackendError as exc:
            log.warning("sandbox %s: could not remove what a failed create left (gc will): %s", name, exc)

    def wait_ready(self, handle: DaytonaHandle, timeout: float = 60.0) -> DaytonaReachability:
        """Wait until Daytona reports the sandbox started and its toolbox answers."""
        sid = handle.daytona_sandbox_id
        deadline = time.monotonic() + timeout

        def ready(client: Any) -> tuple[str, dict[str, str]]:
            def check() -> tuple[str, Any] | None:
                sbx = client.get(sid)
                state = _state(sbx)
                if state in GONE_STATES or state in ("error", "build_failed"):
                    raise ReadinessTimeout(f"Daytona sandbox {sid} will not get ready: it is {state}"
                                           + (f" ({sbx.error_reason})" if sbx.error_reason else ""), backend=self.id)
                return (sbx.get_work_dir(), sbx) if state == "started" else None

            work_dir, sbx = poll(check, timeout=max(0.0, deadline - time.monotonic()), interval=0.1,
                                 on_timeout=lambda: ReadinessTimeout(
                                     f"Daytona sandbox {sid} did not start within {timeout:g}s", backend=self.id))
            # the URL only: its token is the consumer's to fetch with the key, never recorded
            return work_dir, {str(port): str(sbx.get_preview_link(port).url) for port in handle.expose}

        work_dir, urls = self._call("readiness check", ready, consumer=handle.consumer, fallback=ReadinessTimeout,
                                    sandbox=sid)
        return DaytonaReachability(daytona_sandbox_id=sid, name=handle.name, work_dir=work_dir, urls=urls)

    def teardown(self, handle: DaytonaHandle) -> TeardownReport:
        """Delete the sandbox; one already gone (deleted, or past its TTL) counts as torn down."""
        sid = handle.daytona_sandbox_id
        sdk = _sdk()

        def delete(client: Any) -> bool:
            try:
                sbx = client.get(sid)
                if _state(sbx) in GONE_STATES:
                    return False
                sbx.delete()
            except sdk.DaytonaNotFoundError:
                return False
            return True

        try:
            deleted = self._call("delete", delete, consumer=handle.consumer, fallback=TeardownError, sandbox=sid)
        except BackendError as exc:
            raise TeardownError(f"Daytona sandbox {sid}: not confirmed gone: {exc}", backend=self.id) from None
        return TeardownReport(already_gone=not deleted, removed=[sid] if deleted else [],
                              detail={"daytona_sandbox_id": sid, "deleted": deleted})

    def probe(self, handle: DaytonaHandle) -> bool | None:
        """Whether Daytona still has the sandbox (in any state but destroyed): one ``get``."""
        sid = handle.daytona_sandbox_id
        sdk = _sdk()

        def look(client: Any) -> bool:
            try:
                return _state(client.get(sid)) not in GONE_STATES
            except sdk.DaytonaNotFoundError:
                return False

        return self._call("probe", look, consumer=handle.consumer, fallback=BackendError, sandbox=sid)

    def handle_id(self, handle: DaytonaHandle) -> str | None:
        """The Daytona sandbox id."""
        return handle.daytona_sandbox_id

    # ------------------------------------------------------------ exec

    def exec(
        self,
        handle: DaytonaHandle,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` in a toolbox session of its own (see :mod:`sandboxer.extensions.daytona_exec`)."""
        from sandboxer.extensions.daytona_exec import run_in_session

        return run_in_session(self, handle, argv, env=env, cwd=cwd, timeout=timeout, stdin=stdin,
                              on_output=on_output)

    # ------------------------------------------------------------ files (sandboxer/extensions/daytona_files.py)

    def write_file(self, handle: DaytonaHandle, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        from sandboxer.extensions import daytona_files

        return daytona_files.write_file(self, handle, path, source, mode=mode)

    def read_file(self, handle: DaytonaHandle, path: str, sink: BinaryIO) -> int:
        from sandboxer.extensions import daytona_files

        return daytona_files.read_file(self, handle, path, sink)

    def list_files(self, handle: DaytonaHandle, path: str) -> list[FileInfo]:
        from sandboxer.extensions import daytona_files

        return daytona_files.list_files(self, handle, path)

    def remove_file(self, handle: DaytonaHandle, path: str, *, recursive: bool = False) -> None:
        from sandboxer.extensions import daytona_files

        daytona_files.remove_file(self, handle, path, recursive=recursive)

    # ------------------------------------------------------------ snapshots

    def snapshot(self, handle: DaytonaHandle) -> SnapshotResult:
        """Take a Daytona snapshot of the sandbox's filesystem, and wait until it is usable."""
        sid = handle.daytona_sandbox_id
        name = f"sandboxer-{sid[:12]}-{secrets.token_hex(4)}"
        limit = self.config.snapshot_timeout

        def take(client: Any) -> str:
            client.get(sid).create_snapshot(name, timeout=limit)

            def active() -> str | None:
                snap = client.snapshot.get(name)
                state = str(getattr(snap.state, "value", snap.state))
                if state in ("error", "build_failed"):
                    raise SnapshotError(f"Daytona snapshot {name} of sandbox {sid} failed: {snap.error_reason}",
                                        backend=self.id)
                return snap.id if state == "active" else None

            return poll(active, timeout=limit, interval=0.5, on_timeout=lambda: SnapshotError(
                f"Daytona snapshot {name} of sandbox {sid} was not usable within {limit:g}s", backend=self.id))

        snap_id = self._call("snapshot", take, consumer=handle.consumer, fallback=SnapshotError, sandbox=sid)
        return SnapshotResult(data={"snapshot": name, "snapshot_id": snap_id, "source": sid,
                                    "consumer": handle.consumer})

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> DaytonaHandle:
        """Create a new sandbox from the snapshot."""
        name = snapshot.data.get("snapshot")
        if not name:
            raise SnapshotError(f"snapshot {snapshot.id} has no Daytona snapshot name", backend=self.id)
        failure: str | None = None
        try:
            return self._create(request, snapshot=str(name), restored_from=snapshot.id)
        except ProvisionError as exc:
            failure = str(exc)
        raise SnapshotError(f"restore of snapshot {snapshot.id}: {failure}", backend=self.id)

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        """Delete the Daytona snapshot; one already gone is fine."""
        name = snapshot.data.get("snapshot")
        if not name:
            return
        sdk = _sdk()

        def delete(client: Any) -> None:
            try:
                client.snapshot.delete(str(name))
            except sdk.DaytonaNotFoundError:
                pass

        self._call("snapshot delete", delete, consumer=snapshot.data.get("consumer"), fallback=SnapshotError)

    # ------------------------------------------------------------ gc

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        """Every Daytona sandbox not destroyed whose labels carry ``owner_labels``.

        Asks with each configured key (the operator's and each consumer's), so sandboxes made
        with a consumer's key are found too. A key that is unset or refused is skipped with a
        warning naming its reference; when every key is refused, the operator's key's AuthError
        is raised.
        """
        found: dict[str, OwnedSandbox] = {}
        refused: list[AuthError] = []
        listed = 0
        seen: set[SecretRef] = set()
        for consumer in [None, *sorted(self.config.consumer_keys)]:
            ref = self._key_ref(consumer)
            if ref in seen:
                continue
            seen.add(ref)
            try:
                self._call("list", lambda client: self._list_into(client, owner_labels, found),
                           consumer=consumer, fallback=BackendError)
            except AuthError as exc:
                refused.append(exc)
                log.warning("list_owned: skipping the key in %s (%s): %s", ref.reference(),
                            f"consumer {consumer}" if consumer else "the operator's", exc)
                continue
            listed += 1
        if refused and not listed:
            raise refused[0]
        return list(found.values())

    def _list_into(self, client: Any, owner_labels: dict[str, str], found: dict[str, OwnedSandbox]) -> None:
        sdk = _sdk()
        for i, sbx in enumerate(client.list(sdk.ListSandboxesQuery(labels=dict(owner_labels), limit=100))):
            if i >= MAX_LISTED:
                log.warning("list_owned: stopped after %d sandboxes", MAX_LISTED)
                break
            labels = dict(sbx.labels or {})
            if any(labels.get(k) != v for k, v in owner_labels.items()) or _state(sbx) in GONE_STATES:
                continue  # the API filtered already; this guards an API that ignores the filter
            ours = labels.get("sandboxer.sandbox_id")
            if ours:
                found[sbx.id] = OwnedSandbox(sandbox_id=ours, handle=DaytonaHandle(
                    daytona_sandbox_id=sbx.id, name=sbx.name, consumer=labels.get("sandboxer.consumer")))
