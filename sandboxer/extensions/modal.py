"""The Modal backend (``ext.modal``): sandboxes on Modal with the operator's own token.

It owns the mapping of sand-boxer's verbs onto the official ``modal`` SDK
(pinned in the ``modal`` extra) and keeps three rules:

* the SDK is imported lazily (``importlib.import_module("modal")``): this module
  is named ``modal`` too and is loaded on core-only installs;
* credentials are references (:class:`~sandboxer.secrets.SecretRef`) resolved
  at call time; a handle holds only ids, never a token, and every provider
  message is passed through :func:`~sandboxer.secrets.redact`;
* the SDK's exceptions become sand-boxer errors in one place,
  :meth:`ModalExtension._call`, through this backend's one
  :class:`~sandboxer.contract.ErrorTable` (by exception type and gRPC status
  detail, never by message text) and :func:`~sandboxer.contract.translated`:
  ours is raised outside the SDK's ``except`` block, so the SDK's exception
  (which may echo the token) is not reachable from it, and no frame of ours
  holds a token.

Verbs: provision = ``App.lookup`` + ``Sandbox.create`` (image, timeout = TTL,
idle_timeout, cpu, memory, tags, readiness probe; network, ports and GPU from the profile's
policy: :mod:`sandboxer.extensions.modal_policy`); wait_ready = ``wait_until_ready`` (and
``tunnels`` for exposed ports); exec = ``Sandbox.exec``; teardown = ``terminate`` (a
sandbox Modal already ended, or no longer knows, is already gone); snapshot =
``snapshot_filesystem``; restore = ``Sandbox.create`` from the snapshot image;
reattach = ``Sandbox.from_id``; list_owned = ``Sandbox.list`` by tags; probe =
``poll``; meter_actual = the SDK's sandbox stats; files = ``Sandbox.filesystem`` (:mod:`.modal_files`). A timed-out
exec is exit 124 and leaves nothing it started running.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import secrets
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandboxer.contract import (ErrorTable, Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult,
                                TeardownReport, translated_with)
from sandboxer.errors import (
    AuthError,
    BackendError,
    CapacityUnavailable,
    ExecError,
    InputError,
    ProvisionError,
    RateLimited,
    ReadinessTimeout,
    SandboxFileNotFound,
    SnapshotError,
    TeardownError,
    TTLError,
)
from sandboxer.execution import (
    EXEC_MARKER,
    KILL_MARKED_TIMEOUT,
    OUTPUT_CAP,
    OutputCollector,
    check_argv,
    kill_marked_argv,
)
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.extensions.modal_files import ModalFiles
from sandboxer.extensions.modal_policy import check_gpu, cidrs, gpu_arg, network_args, port_urls
from sandboxer.models import Duration, ExecResult, Profile, SnapshotMeta, format_duration
from sandboxer.secrets import SecretRef, redact

log = logging.getLogger(__name__)

#: Modal bills and schedules CPU in physical cores; one physical core is two vCPUs.
VCPUS_PER_MODAL_CORE = 2.0
#: The smallest CPU request Modal accepts, in physical cores.
MIN_MODAL_CORES = 0.125
#: Loggers below the SDK that write request headers (the token pair among them) at DEBUG.
HEADER_LOGGERS = ("hpack", "h2")
#: The inputs this backend reads.
KNOWN_INPUTS = frozenset({"image", "env"})

T = TypeVar("T")


# ------------------------------------------------------------------ config

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModalCredentials(_Strict):
    """A Modal token pair, by reference."""

    token_id: SecretRef
    token_secret: SecretRef


class ModalConfig(_Strict):
    """The ``config:`` of ``ext.modal.yaml``."""

    token_id: SecretRef = SecretRef(env="MODAL_TOKEN_ID")
    token_secret: SecretRef = SecretRef(env="MODAL_TOKEN_SECRET")
    consumer_tokens: dict[str, ModalCredentials] = Field(
        default_factory=dict, description="per-consumer token pairs; others use the default pair"
    )
    server_url: str | None = Field(default=None, description="control-plane URL; default: Modal's own")
    app_name: str = Field(default="sandboxer", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    environment: str | None = None
    image: str = Field(default="python:3.12-slim", min_length=1, description="registry image tag")
    plan_max_ttl: Duration = Field(default=86400.0, gt=0, description="the plan's longest sandbox timeout")
    ttl_over_max: Literal["refuse", "clamp"] = "refuse"
    max_cpu: float | None = Field(default=None, gt=0, description="most vCPUs per sandbox on the plan")
    max_memory_mb: int | None = Field(default=None, gt=0)
    idle_timeout: Duration | None = None
    snapshot_ttl: Duration | None = Field(default=30 * 86400.0, description="how long Modal keeps a snapshot")
    max_throttle_wait: float = Field(
        default=10.0, ge=0, description="seconds the SDK may wait out a throttle before we report RateLimited"
    )
    op_timeout: Duration = Field(default=120.0, gt=0, description="deadline of a snapshot call")
    max_output_bytes: int = Field(default=OUTPUT_CAP, gt=0, description="kept (and streamed) per stream of one exec")

    @field_validator("server_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v


class ModalProbe(_Strict):
    """How Modal decides a sandbox is ready: a command that exits 0, or a TCP port that accepts."""

    exec: list[str] | None = Field(default=None, min_length=1)
    tcp_port: int | None = Field(default=None, ge=1, le=65535)
    interval_ms: int = Field(default=100, gt=0)

    @model_validator(mode="after")
    def _one(self) -> "ModalProbe":
        if (self.exec is None) == (self.tcp_port is None):
            raise ValueError("give exactly one of 'exec' or 'tcp_port'")
        return self


class ModalOptions(_Strict):
    """A profile's ``options:`` for ``ext.modal``."""

    image: str | None = Field(default=None, min_length=1)
    idle_timeout: Duration | None = None
    region: str | list[str] | None = None
    block_network: bool = False
    workdir: str | None = Field(default=None, pattern=r"^/")
    readiness_probe: ModalProbe = ModalProbe(exec=["true"])
    inbound_cidr_allowlist: list[str] | None = Field(
        default=None, description="who may connect to the tunnels of network.expose (default: anyone with the URL)")

    @field_validator("inbound_cidr_allowlist")
    @classmethod
    def _inbound(cls, v: list[str] | None) -> list[str] | None:
        return cidrs(v)


class ModalHandle(Handle):
    """A Modal sandbox, as the state store keeps it: ids, never a token.

    ``credentials`` names the consumer whose token pair made it (None: the default pair),
    by the consumer's name only.
    """

    model_config = ConfigDict(extra="ignore")

    object_id: str = Field(min_length=1, description="the Modal sandbox id (sb-...)")
    app_id: str | None = None
    credentials: str | None = None
    started_at: float | None = None
    ttl_s: float | None = None
    cpu: float | None = None
    memory_mb: int | None = None
    image: str | None = Field(default=None, description="the image id or registry tag it started from")
    expose: list[int] = Field(default_factory=list, description="the ports of network.expose, given URLs when ready")
    workdir: str | None = Field(default=None, description="the profile's workdir (None: the image's)")


class ModalReachability(Reachability):
    """How a ready Modal sandbox is reached (through the SDK, with the token pair)."""

    provider: Literal["modal"] = "modal"
    sandbox_id: str = Field(description="the Modal sandbox id")
    app_id: str | None = None


@dataclass(frozen=True)
class _Call:
    """The SDK call being made, which the error table's makers name in their messages."""

    where: str
    consumer: str | None
    error: type[BackendError]
    timeout_error: type[BackendError] | None
    path: str | None = None  # the file a files call names (feature files)


#: The call :meth:`ModalExtension._call` is making in this thread (read by the error table's makers).
_CALL: ContextVar[_Call] = ContextVar("sandboxer_modal_call")


# ------------------------------------------------------------------ backend

class ModalExtension(ModalFiles, SandboxExtension):
    """Sandboxes on Modal through the official SDK, with the operator's own token."""

    Config: ClassVar[type[BaseModel]] = ModalConfig
    ProfileOptions: ClassVar[type[BaseModel]] = ModalOptions
    features: ClassVar[frozenset[str]] = frozenset({"exec", "snapshots", "metering", "list_owned", "files"})
    # What modal 1.6.4's Sandbox.create sends and Modal documents, for each: see modal_policy.
    # Modal has no deny-list: network:cidr-denylist is not kept. secrets: secrets=[Secret.from_dict(...)],
    # which modal 1.6 sends inline with the create (the create's secret_sources).
    enforces: ClassVar[frozenset[str]] = frozenset({
        "network:none", "network:internet", "network:cidr-allowlist", "network:domain-allowlist", "expose", "gpu",
        "secrets"})
    requires: ClassVar[tuple[str, str] | None] = ("modal", "modal")
    Handle = ModalHandle

    config: ModalConfig

    def __init__(self, manifest: Any, config: BaseModel):
        super().__init__(manifest, config)
        self._lock = threading.Lock()
        # Clients are keyed by a digest of (server, token pair): a rotated token gets a
        # new client, and no plain secret is kept as a dictionary key.
        self._clients: dict[str, Any] = {}
        self._sandboxes: dict[tuple[int, str], Any] = {}
        self._table: ErrorTable | None = None

    # -------------------------------------------------------------- plumbing

    @staticmethod
    def _sdk() -> Any:
        return importlib.import_module("modal")

    def _credentials(self, consumer: str | None) -> ModalCredentials:
        override = self.config.consumer_tokens.get(consumer or "")
        return override or ModalCredentials(token_id=self.config.token_id, token_secret=self.config.token_secret)

    def credential(self, consumer: str | None) -> str:
        """The reference of the token pair ``consumer``'s calls use (``AuthError.credential``)."""
        creds = self._credentials(consumer)
        return f"{creds.token_id.reference()} + {creds.token_secret.reference()}"

    def credential_key(self, consumer: str | None) -> str | None:
        creds = self._credentials(consumer)
        return f"{creds.token_id.fingerprint()} + {creds.token_secret.fingerprint()}"

    def _server_url(self) -> str:
        if self.config.server_url:
            return self.config.server_url
        return importlib.import_module("modal.config").config.get("server_url")

    def _client(self, consumer: str | None) -> Any:
        """The SDK client for ``consumer``'s token pair, resolved now.

        Raises:
            AuthError: a reference of the pair is unset or unreadable; ``credential`` names the pair.
        """
        creds = self._credentials(consumer)
        refused: str | None = None
        try:
            token_id = creds.token_id.resolve(backend=self.id)
            token_secret = creds.token_secret.resolve(backend=self.id)
        except AuthError as exc:
            refused = str(exc)
        if refused is not None:
            token_id = token_secret = ""  # a traceback rendered with locals must not show the half resolved
            raise AuthError(refused, backend=self.id, credential=self.credential(consumer))
        url = self._server_url()
        key = hashlib.sha256(f"{url}\0{token_id}\0{token_secret}".encode()).hexdigest()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                # The SDK reads its throttle budget from the environment only; without a
                # bound it waits out RESOURCE_EXHAUSTED forever instead of letting the
                # router fall back. An operator's own setting wins.
                os.environ.setdefault("MODAL_MAX_THROTTLE_WAIT", str(int(self.config.max_throttle_wait)))
                _quiet_header_loggers()
                modal = self._sdk()
                api_pb2 = importlib.import_module("modal_proto.api_pb2")
                # Constructed directly (not Client.from_credentials) so that server_url is
                # ours, not the process-wide MODAL_SERVER_URL; opened like `with client:`.
                client = modal.Client(url, api_pb2.CLIENT_TYPE_CLIENT, (token_id, token_secret))
                client.__enter__()
                self._clients[key] = client
        return client

    def _secrets(self) -> list[str]:
        """Every configured token value that resolves now, to scrub from provider text."""
        values: list[str] = []
        for creds in [self._credentials(None), *self.config.consumer_tokens.values()]:
            for ref in (creds.token_id, creds.token_secret):
                try:
                    values.append(ref.resolve())
                except AuthError:
                    continue
        return values

    def _call(
        self,
        op: str,
        fn: Callable[[Any], T],
        *,
        consumer: str | None,
        sandbox: str | None,
        error: type[BackendError],
        timeout_error: type[BackendError] | None = None,
        path: str | None = None,
    ) -> T:
        """Run ``fn(client)`` with ``consumer``'s token pair; SDK exceptions become ours through :attr:`errors`.

        The tokens are resolved here and live only in frames of the SDK exception's
        traceback, never of ours. Ours is raised after the ``except`` block has ended,
        so the SDK exception (whose text may echo the token) is neither its
        ``__cause__`` nor its ``__context__``.

        Args:
            op: what was being done, for the message.
            fn: the SDK calls, given the client.
            consumer: whose token pair (None: the manifest's own; see :meth:`_credentials`).
            sandbox: the Modal sandbox id, when there is one.
            error: the error for failures with no more specific meaning.
            timeout_error: the error for deadlines (default: ``error``).
            path: the file inside the sandbox a files call names (a missing one is SandboxFileNotFound).
        """
        where = f"{self.id}: {op}" + (f" {sandbox}" if sandbox else "")
        return translated_with(_CALL, _Call(where, consumer, error, timeout_error, path),
                               lambda: fn(self._client(consumer)), self.errors)

    @property
    def errors(self) -> ErrorTable:
        """This backend's one map from the SDK's exceptions to ours, by type and gRPC status detail only.

        Built on first use, since the SDK is imported lazily. Each maker reads the call being
        made (what, whose token pair, the fallback classes) from :meth:`_call`.
        """
        if self._table is None:
            modal_exc = importlib.import_module("modal.exception")
            self._table = ErrorTable({
                modal_exc.Error: lambda e: self._failed(e, transient=False),
                modal_exc.AuthError: self._refused,
                modal_exc.PermissionDeniedError: self._refused,
                modal_exc.ResourceExhaustedError: self._exhausted,
                modal_exc.TimeoutError: self._timed_out,
                modal_exc.ServiceError: lambda e: (self._timed_out(e) if _grpc(e)[0] == _deadline()
                                                   else self._failed(e, transient=True)),
                modal_exc.InternalError: lambda e: self._failed(e, transient=True),
                modal_exc.ConnectionError: lambda e: self._failed(e, transient=True),
                modal_exc.NotFoundError: self._not_found,
                modal_exc.InvalidError: lambda e: InputError(f"{_CALL.get().where}: Modal refused the request: "
                                                             f"{self._text(e)}"),
                modal_exc.ConflictError: lambda e: self._failed(e, transient=False),  # not a bad request
                modal_exc.SandboxFilesystemNotFoundError: lambda e: SandboxFileNotFound(
                    f"{_CALL.get().where}: no file or directory at {_CALL.get().path!r} in the sandbox"),
                modal_exc.SandboxFilesystemDirectoryNotEmptyError: lambda e: InputError(
                    f"{_CALL.get().where}: the directory {_CALL.get().path!r} is not empty; remove it with "
                    "recursive=True"),
                OSError: self._unreachable,  # the builtin ConnectionError among them
            })
        return self._table

    def _text(self, exc: BaseException) -> str:
        """The provider's text of ``exc``, every configured token scrubbed from it."""
        return redact(f"{type(exc).__name__}: {exc}", self._secrets())

    def _failed(self, exc: BaseException, *, transient: bool) -> BackendError:
        call = _CALL.get()
        return _make(call.error, f"{call.where}: {self._text(exc)}", self.id, transient=transient)

    def _timed_out(self, exc: BaseException) -> BackendError | None:
        final = getattr(exc, "final_exception", None)
        if isinstance(final, Exception):
            # the SDK's retry budget ran out (its RetryTimeoutError): what the last attempt met decides
            return self.errors.translate(final)
        call = _CALL.get()
        return _make(call.timeout_error or call.error, f"{call.where}: timed out: {self._text(exc)}", self.id,
                     transient=True)

    def _not_found(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return _make(call.error, f"{call.where}: not found (gone from Modal): {self._text(exc)}", self.id,
                     transient=False)

    def _unreachable(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return _make(call.error, f"{call.where}: cannot reach Modal: {self._text(exc)}", self.id, transient=True)

    def _refused(self, exc: BaseException) -> AuthError:
        call = _CALL.get()
        creds = self._credentials(call.consumer)
        return AuthError(
            f"{call.where}: Modal refused the token pair in {creds.token_id.describe()} and "
            f"{creds.token_secret.describe()} ({type(exc).__name__}); check it or rotate it "
            "(see docs/byok.md)",
            backend=self.id, credential=self.credential(call.consumer),
        )

    def _exhausted(self, exc: BaseException) -> BackendError:
        """RESOURCE_EXHAUSTED: a throttle (retry policy / rate limit detail) or a full account.

        Modal sends its wait as a status detail (``RPCRetryPolicy.retry_after_secs``, or
        a ``RateLimit`` interval), never as a header or trailing metadata.
        """
        api_pb2 = importlib.import_module("modal_proto.api_pb2")
        where, text = _CALL.get().where, self._text(exc)
        for d in _grpc(exc)[1]:
            if isinstance(d, api_pb2.RPCRetryPolicy):
                return RateLimited(f"{where}: rate limited by Modal: {text}",
                                   retry_after=max(d.retry_after_secs, 0.1), backend=self.id)
            if isinstance(d, api_pb2.RateLimit):
                return RateLimited(f"{where}: rate limited by Modal ({d.limit} per interval): {text}",
                                   retry_after=_interval_seconds(d.interval, api_pb2), backend=self.id)
        # No throttle instruction: the workspace is at its concurrent-sandbox or plan limit,
        # which another backend may well not be.
        return CapacityUnavailable(f"{where}: Modal has no room for this sandbox (quota/concurrency limit): {text}",
                                   backend=self.id)

    def _sandbox(self, client: Any, object_id: str) -> Any:
        """The SDK Sandbox ``object_id`` under ``client``, reattached with ``from_id`` when not cached."""
        key = (id(client), object_id)
        with self._lock:
            sb = self._sandboxes.get(key)
        if sb is None:
            sb = self._sdk().Sandbox.from_id(object_id, client=client)
            with self._lock:
                self._sandboxes[key] = sb
        return sb

    def _forget(self, object_id: str) -> None:
        with self._lock:
            for key in [k for k in self._sandboxes if k[1] == object_id]:
                del self._sandboxes[key]

    # -------------------------------------------------------------- required

    def options(self, profile: Profile) -> ModalOptions:
        """The profile's options, the network blocked for ``network.egress: none`` (for any egress if
        ``block_network`` says so); an allow-list is :func:`modal_policy.network_args`'s."""
        opts = super().options(profile)
        if profile.network.egress == "none":
            return opts.model_copy(update={"block_network": True})
        return opts

    @classmethod
    def policy_conflicts(cls, profile: Profile, options: BaseModel) -> list[tuple[str, str]]:
        """Also refuses a ``resources.gpu.type`` Modal does not know (:func:`modal_policy.check_gpu`)."""
        check_gpu(profile)
        # block_network: false beside an allow-list widens nothing: the allow-list still applies
        if "block_network" in options.model_fields_set and not getattr(options, "block_network", True) \
                and profile.network.egress == "none":
            return [("block_network", "network.egress")]
        return []

    def provision(self, request: ProvisionRequest) -> ModalHandle:
        """Create a Modal sandbox: ``App.lookup``, then ``Sandbox.create`` (see module docstring)."""
        return self._create(request, image_id=None)

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> ModalHandle:
        """Create a new sandbox whose image is the snapshot's filesystem image."""
        image_id = snapshot.data.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise SnapshotError(
                f"{self.id}: snapshot {snapshot.id} has no Modal image id in its data", backend=self.id
            )
        return self._create(request, image_id=image_id)

    def _create(self, request: ProvisionRequest, *, image_id: str | None) -> ModalHandle:
        profile, inputs = request.profile, request.inputs
        opts: ModalOptions = self.options(profile)
        unknown = sorted(set(inputs) - KNOWN_INPUTS)
        if unknown:
            raise InputError(
                f"{self.id}: profile {profile.slug!r}: unknown input(s) {unknown}; "
                f"this backend reads {sorted(KNOWN_INPUTS)}"
            )
        tags = {str(k): str(v) for k, v in request.tags.items()}
        consumer = tags.get("sandboxer.consumer")
        ttl = self._ttl(request)
        cpu, memory = self._resources(profile)
        env = inputs.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise InputError(f"{self.id}: input 'env' must map names to strings, got {type(env).__name__}")
        image_ref = inputs.get("image") or opts.image or self.config.image
        if not isinstance(image_ref, str):
            raise InputError(f"{self.id}: input 'image' must be a string, got {image_ref!r}")
        idle = opts.idle_timeout if opts.idle_timeout is not None else self.config.idle_timeout
        network = network_args(profile, opts.block_network, opts.inbound_cidr_allowlist)

        modal = self._sdk()
        probe = opts.readiness_probe
        readiness = (
            modal.Probe.with_exec(*probe.exec, interval_ms=probe.interval_ms)
            if probe.exec else modal.Probe.with_tcp(probe.tcp_port, interval_ms=probe.interval_ms)
        )
        started = time.time()

        def create(client: Any) -> tuple[str, str]:
            app = modal.App.lookup(self.config.app_name, create_if_missing=True, client=client,
                                   environment_name=self.config.environment)
            image = (modal.Image.from_id(image_id, client=client) if image_id
                     else modal.Image.from_registry(image_ref))
            sb = modal.Sandbox.create(
                app=app, image=image, timeout=int(math.ceil(ttl)),
                idle_timeout=int(math.ceil(idle)) if idle else None,
                cpu=cpu, memory=memory, gpu=gpu_arg(profile.resources.gpu), tags=tags or None, env=env or None,
                secrets=[modal.Secret.from_dict(request.secret_env())] if request.secrets else None,
                region=opts.region, workdir=opts.workdir, **network,
                readiness_probe=readiness, client=client,
            )
            with self._lock:
                self._sandboxes[(id(client), sb.object_id)] = sb
            return sb.object_id, app.app_id

        object_id, app_id = self._call("create", create, consumer=consumer, sandbox=None, error=ProvisionError)
        log.info("%s: created Modal sandbox %s for %s (ttl %s)", self.id, object_id,
                 request.sandbox_id, format_duration(ttl))
        return ModalHandle(
            object_id=object_id, app_id=app_id,
            credentials=consumer if consumer in self.config.consumer_tokens else None,
            started_at=started, ttl_s=ttl, cpu=profile.resources.cpu, memory_mb=profile.resources.memory_mb,
            image=image_id or image_ref, expose=list(profile.network.expose), workdir=opts.workdir,
        )

    def _ttl(self, request: ProvisionRequest) -> float:
        """The sandbox timeout: the request's TTL (the manager's effective TTL), within the plan's maximum."""
        sandbox, ttl = request.sandbox_id, request.ttl
        plan_max = self.config.plan_max_ttl
        if ttl > plan_max:
            if self.config.ttl_over_max == "refuse":
                raise TTLError(
                    f"sandbox {sandbox}: TTL {format_duration(ttl)} is over the Modal plan's maximum sandbox "
                    f"timeout {format_duration(plan_max)} ({self.id} config 'plan_max_ttl'); ask for less, or "
                    "set 'ttl_over_max: clamp'"
                )
            log.warning("%s: sandbox %s: TTL %s is over the Modal plan maximum %s; clamped to %s", self.id,
                        sandbox, format_duration(ttl), format_duration(plan_max), format_duration(plan_max))
            ttl = plan_max
        return ttl

    def _resources(self, profile: Profile) -> tuple[float, int]:
        res = profile.resources
        if self.config.max_cpu is not None and res.cpu > self.config.max_cpu:
            raise InputError(f"{self.id}: profile {profile.slug!r}: resources.cpu {res.cpu:g} vCPU is over the "
                             f"plan maximum {self.config.max_cpu:g} (config 'max_cpu')")
        if self.config.max_memory_mb is not None and res.memory_mb > self.config.max_memory_mb:
            raise InputError(f"{self.id}: profile {profile.slug!r}: resources.memory_mb {res.memory_mb} is over "
                             f"the plan maximum {self.config.max_memory_mb} (config 'max_memory_mb')")
        return max(res.cpu / VCPUS_PER_MODAL_CORE, MIN_MODAL_CORES), res.memory_mb

    def wait_ready(self, handle: ModalHandle, timeout: float = 60.0) -> ModalReachability:
        """Block on Modal's readiness probe (the sandbox is scheduled and the probe passed); then
        the URL of each exposed port is its tunnel's."""
        object_id = handle.object_id
        deadline = time.monotonic() + timeout

        def ready(client: Any) -> dict[str, str]:
            sb = self._sandbox(client, object_id)
            sb.wait_until_ready(timeout=max(1, int(math.ceil(timeout))))
            if not handle.expose:
                return {}
            left = max(1, int(math.ceil(deadline - time.monotonic())))
            return port_urls(sb.tunnels(timeout=left), handle.expose, where=f"{self.id}: wait_ready {object_id}",
                             backend=self.id)

        urls = self._call("wait_ready", ready, consumer=handle.credentials, sandbox=object_id, error=ProvisionError,
                          timeout_error=ReadinessTimeout)
        return ModalReachability(sandbox_id=object_id, app_id=handle.app_id, urls=urls)

    def teardown(self, handle: ModalHandle) -> TeardownReport:
        """Terminate the sandbox. One Modal already ended (its timeout passed, it was terminated
        elsewhere) or no longer knows is already gone: billing stops when it was last seen.

        ``Sandbox.from_id`` reads the sandbox's result (``SandboxWaitV2``); its ``returncode`` is
        None while it runs, else what it ended with (124 at its timeout, 137 when terminated),
        kept in the report. Modal's terminate of an ended sandbox is a no-op, so it is not sent.
        """
        object_id = handle.object_id
        modal_exc = importlib.import_module("modal.exception")

        def terminate(client: Any) -> tuple[bool, int | None]:
            try:
                sb = self._sdk().Sandbox.from_id(object_id, client=client)
                if sb.returncode is not None:
                    return True, sb.returncode
                sb.terminate()
            except modal_exc.NotFoundError:
                return True, None
            return False, None

        gone, returncode = self._call("teardown", terminate, consumer=handle.credentials, sandbox=object_id,
                                      error=TeardownError)
        self._forget(object_id)
        detail: dict[str, Any] = {"object_id": object_id}
        if returncode is not None:
            detail["returncode"] = returncode
        return TeardownReport(already_gone=gone, removed=[] if gone else [object_id], detail=detail)

    def probe(self, handle: ModalHandle) -> bool | None:
        """Whether Modal still runs the sandbox: one ``poll`` (False once it finished or is unknown)."""
        object_id = handle.object_id
        modal_exc = importlib.import_module("modal.exception")

        def look(client: Any) -> bool:
            try:
                return self._sandbox(client, object_id).poll() is None
            except modal_exc.NotFoundError:
                return False

        return self._call("probe", look, consumer=handle.credentials, sandbox=object_id, error=BackendError)

    def handle_id(self, handle: ModalHandle) -> str | None:
        """The Modal sandbox id: Modal's create has no idempotency key, so a retried create makes another."""
        return handle.object_id

    # -------------------------------------------------------------- optional

    def exec(
        self,
        handle: ModalHandle,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` with ``Sandbox.exec``; output streams to ``on_output`` as it arrives.

        A command past its deadline is exit 124 with ``timed_out`` (the SDK says -1, or
        the kill's signal); Modal kills the process it started, and what that process
        forked is killed by the exec's marker variable.
        """
        argv = check_argv(argv, backend=self.id)
        if cwd is not None and not cwd.startswith("/"):
            raise InputError(f"{self.id}: exec cwd must be an absolute path, got {cwd!r}")
        object_id = handle.object_id
        modal_exc = importlib.import_module("modal.exception")
        marker = secrets.token_hex(12)
        full_env = {**(env or {}), EXEC_MARKER: marker}

        def drain(stream: Any, name: str, out: OutputCollector) -> bool:
            """Feed one stream's raw chunks to the collector; True when the SDK says the deadline passed."""
            try:
                for chunk in stream:
                    out.feed(name, chunk)
            except modal_exc.ExecTimeoutError:
                return True
            return False

        def run(client: Any) -> ExecResult:
            # a fresh collector per attempt: a retried call must not repeat output
            out = OutputCollector(on_output, self.config.max_output_bytes)
            sb = self._sandbox(client, object_id)
            started = time.monotonic()
            proc = sb.exec(*argv, workdir=cwd, env=full_env, text=False,
                           timeout=int(math.ceil(timeout)) if timeout else None)
            if stdin is not None:
                proc.stdin.write(stdin)
                proc.stdin.write_eof()
                proc.stdin.drain()
            # one thread per stream (each stream has its own decoder in the collector)
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="modal-exec") as pool:
                out_f = pool.submit(drain, proc.stdout, "stdout", out)
                err_f = pool.submit(drain, proc.stderr, "stderr", out)
                out_to, err_to = out_f.result(), err_f.result()
            code = proc.wait()
            elapsed = time.monotonic() - started
            # The SDK reports a passed deadline as returncode -1; the worker kills at the
            # same deadline, so a late kill signal counts as a timeout too.
            if out_to or err_to or code == -1 or bool(timeout and elapsed >= timeout):
                self._kill_marked(sb, object_id, marker)
                return out.result(None, timed_out=True)
            return out.result(code)

        return self._call("exec", run, consumer=handle.credentials, sandbox=object_id, error=ExecError)

    def _kill_marked(self, sb: Any, object_id: str, marker: str) -> None:
        """Kill what a timed-out command left (its group, ``setsid`` children) by the exec's marker."""
        modal_exc = importlib.import_module("modal.exception")
        failed: str | None = None
        try:
            code = sb.exec(*kill_marked_argv(marker), timeout=int(KILL_MARKED_TIMEOUT)).wait()
            failed = f"exit {code}" if code else None
        except (modal_exc.Error, OSError) as exc:
            failed = type(exc).__name__
        if failed:
            log.warning("%s: sandbox %s: could not kill what a timed-out command left running (%s)",
                        self.id, object_id, failed)

    def snapshot(self, handle: ModalHandle) -> SnapshotResult:
        """Capture the filesystem with ``snapshot_filesystem``; the data is the image id."""
        object_id = handle.object_id
        ttl = self.config.snapshot_ttl
        image_id = self._call(
            "snapshot",
            lambda client: self._sandbox(client, object_id).snapshot_filesystem(
                timeout=int(math.ceil(self.config.op_timeout)), ttl=int(ttl) if ttl else None).object_id,
            consumer=handle.credentials, sandbox=object_id, error=SnapshotError,
        )
        return SnapshotResult(data={"image_id": image_id, "source": object_id, "credentials": handle.credentials})

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        """Nothing to call: the pinned SDK has no image delete; Modal drops it after ``snapshot_ttl``."""
        log.info("%s: snapshot %s (image %s) expires on Modal after its TTL", self.id, snapshot.id,
                 snapshot.data.get("image_id"))

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        """Live sandboxes in this backend's app carrying ``owner_labels`` as tags, under every configured token.

        A token pair that is unset or refused is skipped with a warning naming its
        references, so that one revoked token does not hide the other tokens'
        orphans from gc; when every pair is refused, the default pair's AuthError
        is raised.
        """
        found: dict[str, OwnedSandbox] = {}
        refused: list[AuthError] = []
        listed = 0
        for credentials in [None, *sorted(self.config.consumer_tokens)]:
            try:
                self._call("list_owned", lambda client: self._list_with(client, credentials, owner_labels, found),
                           consumer=credentials, sandbox=None, error=ProvisionError)
            except AuthError as exc:
                refused.append(exc)
                log.warning("%s: list_owned skips %s (%s): %s", self.id,
                            f"consumer {credentials}" if credentials else "the default token pair",
                            self.credential(credentials), exc)
                continue
            listed += 1
        if refused and not listed:
            raise refused[0]
        return list(found.values())

    def _list_with(self, client: Any, credentials: str | None, owner_labels: dict[str, str],
                   found: dict[str, OwnedSandbox]) -> None:
        modal = self._sdk()
        modal_exc = importlib.import_module("modal.exception")
        try:
            app = modal.App.lookup(self.config.app_name, client=client, environment_name=self.config.environment)
        except modal_exc.NotFoundError:
            return
        for sb in modal.Sandbox.list(app_id=app.app_id, tags=dict(owner_labels), client=client):
            if sb.object_id in found:
                continue
            tags = sb.get_tags()
            found[sb.object_id] = OwnedSandbox(
                sandbox_id=tags.get("sandboxer.sandbox_id") or None,
                handle=ModalHandle(object_id=sb.object_id, app_id=app.app_id, credentials=credentials),
            )

    def meter_actual(self, handle: ModalHandle) -> dict[str, Any] | None:
        """Modal's own usage figures for the sandbox (billed core- and GiB-seconds, cost), if it has any."""
        object_id = handle.object_id
        modal_exc = importlib.import_module("modal.exception")

        def stats_of(client: Any) -> Any:
            try:
                # the SDK's only usage API: documented, but named experimental (no public equivalent yet)
                return self._sdk().Sandbox.from_id(object_id, client=client)._experimental_stats()
            except (modal_exc.NotFoundError, modal_exc.UnimplementedError):
                return None

        try:
            stats = self._call("meter_actual", stats_of, consumer=handle.credentials, sandbox=object_id,
                               error=ProvisionError)
        except (ProvisionError, CapacityUnavailable, RateLimited) as exc:
            # Metering refines the recorded start/stop; its failure must not fail a teardown.
            log.warning("%s: no usage figures for %s: %s", self.id, object_id, exc)
            return None
        if stats is None:
            return None
        return {
            "source": "modal sandbox stats",
            "duration_s": stats.duration.total_seconds(),
            "vcpu_seconds": stats.billed_cpu_core_seconds * VCPUS_PER_MODAL_CORE,
            "gib_seconds": stats.billed_memory_gib_seconds,
            "cost": float(stats.cost) if stats.cost is not None else None,
            "currency": "USD",
        }


# ------------------------------------------------------------------ helpers

def _quiet_header_loggers() -> None:
    """Keep HTTP/2 header dumps (which carry the token secret) out of DEBUG logs.

    An operator who set one of these loggers' level on purpose keeps it.
    """
    for name in HEADER_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def _grpc(exc: BaseException) -> tuple[Any, list[Any]]:
    """The gRPC status and status details of a Modal error: the public ``status`` and ``details``
    it keeps from ``grpclib.GRPCError`` (None and [] on an error that did not come from a status).

    Modal warns at each read of them that it means to stop deriving its errors from grpclib's;
    that warning (which blames this caller) is kept out of an operator's terminal here.
    """
    if not isinstance(exc, importlib.import_module("grpclib").GRPCError):
        return None, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", importlib.import_module("modal.exception").DeprecationError)
        return getattr(exc, "status", None), list(getattr(exc, "details", None) or [])


def _deadline() -> Any:
    return importlib.import_module("grpclib").Status.DEADLINE_EXCEEDED


def _interval_seconds(interval: int, api_pb2: Any) -> float | None:
    names = {v: k for k, v in api_pb2.RateLimitInterval.items()}
    return {"RATE_LIMIT_INTERVAL_SECOND": 1.0, "RATE_LIMIT_INTERVAL_MINUTE": 60.0}.get(names.get(interval, ""))


def _make(error: type[BackendError], message: str, backend: str, *, transient: bool) -> BackendError:
    if error is ProvisionError:
        return ProvisionError(message, transient=transient, backend=backend)
    return error(message, backend=backend)
