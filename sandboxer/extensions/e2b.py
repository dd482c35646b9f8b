"""The E2B backend: cloud microVM sandboxes through the official ``e2b`` SDK.

What it owns: mapping the sand-boxer verbs onto E2B (create / info / kill /
commands.run / snapshots / list; files in e2b_files), bring-your-own-key resolution, and the
translation of the SDK's exceptions into the sand-boxer error tree.

Rules kept here:

* the SDK is imported lazily (``importlib.import_module("e2b")``): this module
  is named ``e2b`` too and must load on a core-only install;
* the API key is given only by reference (:class:`~sandboxer.secrets.SecretRef`),
  resolved at each call, and never stored in a handle, a log line, an
  exception message or a ``repr``; provider messages are redacted;
* every SDK call runs through :meth:`E2BExtension._call`, which maps the SDK's
  exceptions through this backend's one :class:`~sandboxer.contract.ErrorTable`
  (by exception type and HTTP status, never by message text) with
  :func:`~sandboxer.contract.translated`: ours is raised outside the SDK's
  ``except`` block, so the SDK's exception (which may echo the key) is not
  reachable from it, and no frame of ours holds the key;
* a timed-out command is exit 124 with ``timed_out``, and nothing it started
  outlives its deadline.
"""

from __future__ import annotations

import email.utils
import hashlib
import importlib
import logging
import math
import re
import secrets
import shlex
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sandboxer.contract import (ErrorTable, Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult,
                                TeardownReport, translated_with)
from sandboxer.errors import (
    AuthError,
    BackendError,
    CapacityUnavailable,
    ExecError,
    MissingExtra,
    ProvisionError,
    QuotaExceeded,
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
from sandboxer.extensions import e2b_network
from sandboxer.extensions.e2b_files import E2BFiles
from sandboxer.extensions.e2b_network import network_args, port_urls
from sandboxer.models import Duration, ExecResult, Profile, SnapshotMeta, format_duration
from sandboxer.poll import poll
from sandboxer.secrets import SecretRef, redact, refuse_literal_keys

#: Tries of an E2B kill before teardown is reported failed (gc retries later).
KILL_ATTEMPTS = 3

log = logging.getLogger("sandboxer.e2b")

#: Most pages ``list_owned`` reads, so a misbehaving API cannot keep it looping.
MAX_LIST_PAGES = 1000
T = TypeVar("T")


def _sdk() -> Any:
    """The ``e2b`` SDK module, imported on first use."""
    try:
        return importlib.import_module("e2b")
    except ImportError as exc:
        raise MissingExtra(
            "ext.e2b needs the Python package 'e2b'; install it with: pip install 'sand-boxer[e2b]'"
        ) from exc


class E2BConfig(BaseModel):
    """The manifest's ``config:`` for an E2B backend."""

    model_config = ConfigDict(extra="forbid")

    api_key: SecretRef = Field(
        default_factory=lambda: SecretRef(env="E2B_API_KEY"),
        description="where the operator's E2B API key lives: {env: NAME} or {file: PATH}",
    )
    consumer_keys: dict[str, SecretRef] = Field(
        default_factory=dict, description="a consumer's own key, used instead of api_key for that consumer"
    )
    api_url: str | None = Field(default=None, description="E2B API base URL (default: the SDK's, https://api.e2b.app)")
    sandbox_url: str | None = Field(default=None, description="envd base URL for every sandbox (tests, proxies)")
    domain: str | None = Field(default=None, description="E2B domain (self-hosted / BYOC)")
    template: str = Field(default="base", min_length=1, description="template a sandbox starts from")
    plan_max_ttl: Duration = Field(default=3600.0, gt=0, description="the plan's longest sandbox timeout")
    ttl_over_max: Literal["refuse", "clamp"] = Field(
        default="refuse", description="a TTL over plan_max_ttl is refused, or clamped with a logged warning"
    )
    request_timeout: Duration = Field(default=30.0, gt=0, description="seconds for one API request")
    exec_timeout: Duration = Field(default=600.0, gt=0, description="command timeout when exec gives none")
    max_output_bytes: int = Field(default=OUTPUT_CAP, gt=0, description="kept (and streamed) per stream of one exec")
    retries: int = Field(
        default=0, ge=0, le=10,
        description="the SDK's own retries of 429/5xx; 0 reports them at once so the router can fall back",
    )
    rate_limit_retry_after: float = Field(
        default=5.0, ge=0,
        description="retry_after reported on a 429 that carries no Retry-After header",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_literal_keys(cls, data: Any) -> Any:
        return refuse_literal_keys(data)


class E2BOptions(BaseModel):
    """A profile's ``options:`` for an E2B backend."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(default=None, min_length=1, description="overrides the manifest's template")
    envs: dict[str, str] = Field(default_factory=dict, description="environment of every command in the sandbox")
    allow_internet_access: bool | None = None
    user: str | None = Field(default=None, description="user commands run as (the template's default if unset)")
    cwd: str | None = Field(default=None, description="working directory of commands when exec gives none")


class E2BExecDefaults(BaseModel):
    """What a sandbox's commands run with when exec gives none (from the profile's options)."""

    model_config = ConfigDict(extra="ignore")

    user: str | None = None
    cwd: str | None = None


class E2BHandle(Handle):
    """An E2B sandbox, as the state store keeps it: ids and times, never the key or envd's token.

    ``consumer`` names whose key the sandbox was made with (so every later call uses that key),
    by the consumer's name only.
    """

    model_config = ConfigDict(extra="ignore")

    e2b_sandbox_id: str = Field(min_length=1)
    template: str | None = None
    consumer: str | None = None
    timeout_s: int | None = Field(default=None, description="the E2B timeout it was created with")
    started_at: float | None = None
    exec: E2BExecDefaults = Field(default_factory=E2BExecDefaults)
    ttl_clamped: bool = False
    restored_from: str | None = Field(default=None, description="the snapshot it was restored from")
    expose: list[int] = Field(default_factory=list, description="the ports of network.expose, given URLs when ready")


class E2BReachability(Reachability):
    """How a ready E2B sandbox is reached (through the SDK, with the key: never a URL alone)."""

    provider: Literal["e2b"] = "e2b"
    e2b_sandbox_id: str
    template: str | None = None
    envd_url: str


@dataclass(frozen=True)
class _Call:
    """The SDK call being made, which the error table's makers name in their messages."""

    op: str
    consumer: str | None
    fallback: type[BackendError]
    sandbox: str | None
    gone: type[BackendError] | None
    path: str | None = None  # the file a files call names (feature files)

    @property
    def where(self) -> str:
        return f"E2B {self.op}" + (f" of sandbox {self.sandbox}" if self.sandbox else "")


#: The call :meth:`E2BExtension._call` is making in this thread (read by the error table's makers).
_CALL: ContextVar[_Call] = ContextVar("sandboxer_e2b_call")


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return None


def _idempotency_key(sandbox_id: str) -> str:
    # E2B accepts only [a-z0-9-]{1,255}; a digest of our id keeps retries of one create a single sandbox.
    return "sbx-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:40]


class E2BExtension(E2BFiles, SandboxExtension):
    """Sandboxes on E2B, with the operator's (or a consumer's) own API key.

    Handles carry the E2B sandbox id, the template, the consumer the key was
    chosen for and the start time; never the key or envd's access token.
    """

    Config: ClassVar[type[BaseModel]] = E2BConfig
    ProfileOptions: ClassVar[type[BaseModel]] = E2BOptions
    features: ClassVar[frozenset[str]] = frozenset({"exec", "snapshots", "metering", "list_owned", "files"})
    # What e2b 2.63 sends and E2B documents: see e2b_network (network:*, and expose: each port's URL
    # is Sandbox.get_host's, reachable only with the sandbox's traffic access token). E2B has no GPUs.
    # secrets: Sandbox.create(envs=...) (the create body's envVars), "Custom environment variables for
    #   the sandbox", which every command in it inherits.
    enforces: ClassVar[frozenset[str]] = frozenset({
        "network:none", "network:internet", "network:cidr-allowlist", "network:domain-allowlist",
        "network:cidr-denylist", "expose", "secrets"})
    requires: ClassVar[tuple[str, str] | None] = ("e2b", "e2b")
    Handle = E2BHandle
    #: E2B ends a sandbox at its own timeout, which Sandbox.set_timeout moves (set_ttl).
    own_ttl: ClassVar[str] = "settable"

    config: E2BConfig

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

    def _opts(self, consumer: str | None) -> dict[str, Any]:
        """SDK connection options for ``consumer``'s key, resolved now."""
        opts: dict[str, Any] = {
            "api_key": self._key_ref(consumer).resolve(backend=self.id),
            "request_timeout": self.config.request_timeout,
            "retries": self.config.retries,
        }
        for name in ("api_url", "sandbox_url", "domain"):
            value = getattr(self.config, name)
            if value:
                opts[name] = value
        return opts

    # ------------------------------------------------------------ errors

    def _call(
        self,
        op: str,
        fn: Callable[[dict[str, Any]], T],
        *,
        consumer: str | None,
        fallback: type[BackendError],
        sandbox: str | None = None,
        gone: type[BackendError] | None = None,
        path: str | None = None,
    ) -> T:
        """Run ``fn(sdk_opts)`` with ``consumer``'s key; SDK exceptions become ours through :attr:`errors`.

        The key is resolved here and lives only in ``fn``'s frames, which belong to the
        SDK exception's traceback, never to ours. Ours is raised after the ``except``
        block has ended, so the SDK exception (whose text may echo the key) is neither
        its ``__cause__`` nor its ``__context__``.

        Args:
            op: what was being done, for messages ("create", "kill", ...).
            fn: the SDK calls, given the connection options (the key among them).
            consumer: whose key to use (named by reference in an AuthError).
            fallback: the class for anything not more specific.
            sandbox: the E2B sandbox id, named in messages when known.
            gone: the class a "sandbox not found" becomes (default: ``fallback``).
            path: the file inside the sandbox a files call names (a missing one is SandboxFileNotFound).
        """
        return translated_with(_CALL, _Call(op, consumer, fallback, sandbox, gone, path),
                               lambda: fn(self._opts(consumer)), self.errors)

    @property
    def errors(self) -> ErrorTable:
        """This backend's one map from the SDK's exceptions to ours, by type and HTTP status only.

        Built on first use, since the SDK is imported lazily. Each maker reads the call being
        made (what, whose key, which sandbox, the fallback class) from :meth:`_call`.
        """
        if self._table is None:
            sdk = _sdk()
            httpx = importlib.import_module("httpx")  # the SDK's own HTTP client, present whenever the SDK is
            self._table = ErrorTable({
                sdk.AuthenticationException: self._refused,
                sdk.RateLimitException: lambda e: RateLimited(
                    f"{_CALL.get().where}: rate limited by E2B (HTTP 429): {self._detail(e)}",
                    retry_after=self._retry_after(e), backend=self.id),
                sdk.ServiceBusyException: lambda e: CapacityUnavailable(
                    f"{_CALL.get().where}: E2B has no capacity right now (HTTP 503): {self._detail(e)}",
                    backend=self.id),
                sdk.SandboxNotFoundException: self._gone,
                sdk.SandboxNotRunningException: self._gone,
                sdk.FileNotFoundException: self._file_missing,
                sdk.TimeoutException: self._timed_out,
                sdk.SandboxException: self._by_status,
                httpx.TimeoutException: self._timed_out,
                # REST calls surface httpx's errors; envd RPCs the builtin ConnectionError/TimeoutError (pyqwest)
                httpx.TransportError: self._unreachable,
                OSError: self._unreachable,
            })
        return self._table

    def _refused(self, exc: BaseException) -> AuthError:
        call = _CALL.get()
        return AuthError(
            f"{call.where}: E2B refused the API key from {self._key_ref(call.consumer).describe()} (HTTP 401); "
            "check the key or rotate it (see docs/byok.md)",
            backend=self.id, credential=self.credential(call.consumer),
        )

    def _gone(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return self._make(call.gone or call.fallback, f"{call.where}: the sandbox is gone at E2B: {self._detail(exc)}")

    def _file_missing(self, exc: BaseException) -> SandboxFileNotFound | None:
        """envd's 404 / NOT_FOUND for a path (None for a call that names no file: its base class's row)."""
        call = _CALL.get()
        if call.path is None:
            return None
        return SandboxFileNotFound(f"{call.where}: no file or directory at {call.path!r} in the sandbox")

    def _timed_out(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return self._make(call.fallback, f"{call.where}: timed out: {self._detail(exc)}", transient=True)

    def _unreachable(self, exc: BaseException) -> BackendError:
        call = _CALL.get()
        return self._make(call.fallback, f"{call.where}: cannot reach E2B: {type(exc).__name__}: {self._detail(exc)}",
                          transient=True)

    def _by_status(self, exc: BaseException) -> BackendError:
        """Any other API error, by its HTTP status (the SDK's public ``status_code``)."""
        call = _CALL.get()
        status = getattr(exc, "status_code", None)
        msg = f"{call.where} failed (HTTP {status or '-'}): {self._detail(exc)}"
        if status == 429:
            return RateLimited(msg, retry_after=self._retry_after(exc), backend=self.id)
        if status == 403:
            return QuotaExceeded(msg, backend=self.id)
        if status == 503:
            return CapacityUnavailable(msg, backend=self.id)
        return self._make(call.fallback, msg, transient=status is None or status >= 500)

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
        """The 429's ``Retry-After`` in seconds, or the configured ``rate_limit_retry_after``.

        e2b 2.63 raises ``RateLimitException`` without the response, but raises it as
        ``raise handle_api_exception(res)`` in the frame that holds the response: read its
        headers there (by duck type: a 429 with ``headers``). An SDK that stops doing so
        falls back to the configured value (tests/cloud pin the header being honoured).
        """
        value = None
        tb = exc.__traceback__
        while tb is not None:
            for local in tb.tb_frame.f_locals.values():
                headers = getattr(local, "headers", None)
                if getattr(local, "status_code", None) == 429 and hasattr(headers, "get"):
                    value = headers.get("retry-after") or headers.get("Retry-After") or value
            tb = tb.tb_next
        seconds = parse_retry_after(value)
        return seconds if seconds is not None else self.config.rate_limit_retry_after

    # ------------------------------------------------------------ lifecycle

    def _ttl(self, request: ProvisionRequest) -> tuple[int, bool]:
        """The E2B timeout for a new sandbox (the request's TTL), and whether it was clamped."""
        ttl, sandbox_id = request.ttl, request.sandbox_id
        limit = self.config.plan_max_ttl
        if ttl > limit:
            if self.config.ttl_over_max == "refuse":
                raise TTLError(
                    f"sandbox {sandbox_id}: TTL {format_duration(ttl)} is over the E2B plan maximum of "
                    f"{format_duration(limit)} ({self.id} config 'plan_max_ttl'); ask for less, or set "
                    "'ttl_over_max: clamp'"
                )
            log.warning(
                "sandbox %s: TTL %s is over the E2B plan maximum %s; clamped to %s",
                sandbox_id, format_duration(ttl), format_duration(limit), format_duration(limit),
            )
            return max(1, int(limit)), True
        return max(1, int(round(ttl))), False

    def options(self, profile: Profile) -> E2BOptions:
        """The profile's options with the network its policy allows: ``allow_internet_access`` is
        True only for ``network.egress: internet``, False for ``none`` or when the option narrows the
        policy to none, and None (left to the allow-list) for an allow-list."""
        opts = super().options(profile)
        egress = profile.network.egress
        if egress == "none" or opts.allow_internet_access is False:
            access: bool | None = False
        else:
            access = True if egress == "internet" else None
        return opts.model_copy(update={"allow_internet_access": access})

    @classmethod
    def policy_refusals(cls, profile: Profile, options: BaseModel, config: BaseModel) -> list[str]:
        return e2b_network.refusals(profile)

    @classmethod
    def policy_conflicts(cls, profile: Profile, options: BaseModel) -> list[tuple[str, str]]:
        if getattr(options, "allow_internet_access", None) and profile.network.egress != "internet":
            return [("allow_internet_access", "network.egress")]
        return []

    def provision(self, request: ProvisionRequest) -> E2BHandle:
        """Create an E2B sandbox from the profile's template (see the base class)."""
        opts: E2BOptions = self.options(request.profile)
        return self._create(request, template=opts.template or self.config.template, restored_from=None)

    def _create(self, request: ProvisionRequest, *, template: str, restored_from: str | None) -> E2BHandle:
        opts: E2BOptions = self.options(request.profile)
        sandbox_id = request.sandbox_id
        tags = {str(k): str(v) for k, v in request.tags.items()}
        for k, v in request.owner_labels.items():
            tags.setdefault(str(k), str(v))
        tags["sandboxer.sandbox_id"] = sandbox_id
        consumer = tags.get("sandboxer.consumer")
        timeout, clamped = self._ttl(request)
        network = network_args(self.id, request.profile, opts.allow_internet_access)
        sdk = _sdk()
        started = time.time()
        e2b_id = self._call("create", lambda sdk_opts: sdk.Sandbox.create(
            template=template,
            timeout=timeout,
            metadata=tags,
            envs={**opts.envs, **request.secret_env()} or None,  # the values go to E2B alone
            **network,
            idempotency_key=_idempotency_key(sandbox_id),
            **sdk_opts,
        ).sandbox_id, consumer=consumer, fallback=ProvisionError)
        return E2BHandle(
            e2b_sandbox_id=e2b_id, template=template, consumer=consumer, timeout_s=timeout, started_at=started,
            exec=E2BExecDefaults(user=opts.user, cwd=opts.cwd), ttl_clamped=clamped, restored_from=restored_from,
            expose=list(request.profile.network.expose),
        )

    def wait_ready(self, handle: E2BHandle, timeout: float = 60.0) -> E2BReachability:
        """Wait until E2B reports the sandbox running and its envd answers its health check.

        The reachability has a URL for each exposed port; a request to it needs the sandbox's
        traffic access token, which is not in it (see :mod:`sandboxer.extensions.e2b_network`).
        """
        sid = handle.e2b_sandbox_id
        sdk = _sdk()
        deadline = time.monotonic() + timeout

        def ready(sdk_opts: dict[str, Any]) -> tuple[str, dict[str, str]]:
            sbx = sdk.Sandbox.connect(sid, **{**sdk_opts, "request_timeout": min(self.config.request_timeout, timeout)})
            poll(
                lambda: sbx.is_running(request_timeout=max(0.1, min(5.0, deadline - time.monotonic()))),
                timeout=max(0.0, deadline - time.monotonic()),
                interval=0.05,
                on_timeout=lambda: ReadinessTimeout(
                    f"E2B sandbox {sid}: envd did not answer its health check within {timeout:g}s", backend=self.id
                ),
            )
            return str(sbx.envd_api_url), port_urls(sbx, handle.expose)

        envd_url, urls = self._call("readiness check", ready, consumer=handle.consumer, fallback=ReadinessTimeout,
                                    sandbox=sid)
        return E2BReachability(e2b_sandbox_id=sid, template=handle.template, envd_url=envd_url, urls=urls)

    def teardown(self, handle: E2BHandle) -> TeardownReport:
        """Kill the sandbox; one already gone (404: killed, or past its timeout) counts as torn down."""
        sid = handle.e2b_sandbox_id
        failure: str | None = None
        killed = False
        for attempt in range(KILL_ATTEMPTS):
            failure = None
            try:
                # ProvisionError as the fallback only to learn whether the failure was transient
                killed = bool(self._call("kill", lambda sdk_opts: _sdk().Sandbox.kill(sid, **sdk_opts),
                                         consumer=handle.consumer, fallback=ProvisionError, sandbox=sid))
            except ProvisionError as exc:
                failure = str(exc)
                if not exc.transient:
                    break
            except BackendError as exc:
                failure = f"E2B sandbox {sid}: not confirmed gone: {exc}"
                break
            if failure is None:
                break
            if attempt + 1 < KILL_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))  # kill is idempotent: a dropped connection is worth another try
        if failure is not None:
            raise TeardownError(failure, backend=self.id)
        return TeardownReport(already_gone=not killed, removed=[sid] if killed else [],
                              detail={"e2b_sandbox_id": sid, "killed": killed})

    def set_ttl(self, handle: E2BHandle, ttl: float) -> None:
        """Move E2B's own timeout to ``ttl`` seconds from now (``Sandbox.set_timeout``).

        Raises:
            TTLError: over the plan's maximum (never clamped here: the manager would record an end
                E2B does not keep).
        """
        sid, limit = handle.e2b_sandbox_id, self.config.plan_max_ttl
        if ttl > limit:
            raise TTLError(f"E2B sandbox {sid}: a TTL of {format_duration(ttl)} from now is over the E2B "
                           f"plan maximum of {format_duration(limit)} ({self.id} config 'plan_max_ttl')")
        seconds = max(1, math.ceil(ttl))
        self._call("set_timeout", lambda sdk_opts: _sdk().Sandbox.set_timeout(sid, seconds, **sdk_opts),
                   consumer=handle.consumer, fallback=BackendError, sandbox=sid)

    def probe(self, handle: E2BHandle) -> bool | None:
        """Whether E2B still has the sandbox (running or paused): one ``get_info``."""
        sid = handle.e2b_sandbox_id
        sdk = _sdk()

        def look(sdk_opts: dict[str, Any]) -> bool:
            try:
                info = sdk.Sandbox.get_info(sid, **sdk_opts)
            except (sdk.NotFoundException, sdk.SandboxNotFoundException):
                return False
            return str(getattr(info.state, "value", info.state)) in ("running", "paused")

        return self._call("probe", look, consumer=handle.consumer, fallback=BackendError, sandbox=sid)

    def handle_id(self, handle: E2BHandle) -> str | None:
        """The E2B sandbox id: a create retried past a lost response may have made another."""
        return handle.e2b_sandbox_id

    # ------------------------------------------------------------ exec

    def exec(
        self,
        handle: E2BHandle,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` with ``commands.run`` (quoted with :func:`shlex.join`; envd runs it under bash).

        At the deadline envd kills the process it started and nothing else; what that
        process forked carries the exec's marker variable, and is killed by it.
        """
        argv = check_argv(argv, backend=self.id)
        sid = handle.e2b_sandbox_id
        defaults = handle.exec
        sdk = _sdk()
        limit = float(timeout) if timeout is not None else self.config.exec_timeout
        marker = secrets.token_hex(12)
        # The SDK decodes each stream incrementally itself; the collector caps and streams what it
        # hands over, so the SDK is told not to keep a second, uncapped copy.
        run_kw = {"envs": {**(env or {}), EXEC_MARKER: marker}, "cwd": cwd or defaults.cwd,
                  "user": defaults.user, "timeout": limit}

        def run(sdk_opts: dict[str, Any]) -> ExecResult:
            # a fresh collector per attempt: a retried call must not repeat output
            out = OutputCollector(on_output, self.config.max_output_bytes)
            streams = {"on_stdout": lambda text: out.feed_text("stdout", text),
                       "on_stderr": lambda text: out.feed_text("stderr", text)}
            sbx = sdk.Sandbox.connect(sid, **sdk_opts)
            timed_out = False
            try:
                if stdin is None:
                    res = sbx.commands.run(shlex.join(argv), retain_output=False, **streams, **run_kw)
                else:
                    proc = sbx.commands.run(shlex.join(argv), background=True, stdin=True, retain_output=False,
                                            **run_kw)
                    if stdin:
                        proc.send_stdin(stdin)
                    proc.close_stdin()
                    res = proc.wait(**streams)
            except sdk.CommandExitException as exc:
                return out.result(exc.exit_code)
            except sdk.TimeoutException as exc:
                if isinstance(exc, (sdk.SandboxNotRunningException, sdk.SandboxUnreachableException)):
                    raise
                timed_out = True
            if timed_out:
                self._kill_marked(sbx, marker, defaults.user)
                return out.result(None, timed_out=True)
            return out.result(res.exit_code)

        return self._call("exec", run, consumer=handle.consumer, fallback=ExecError, sandbox=sid)

    def _kill_marked(self, sbx: Any, marker: str, user: str | None) -> None:
        """Kill what a timed-out command left (its group, ``setsid`` children) by the exec's marker."""
        sdk = _sdk()
        failed: str | None = None
        try:
            sbx.commands.run(shlex.join(kill_marked_argv(marker)), user=user, timeout=KILL_MARKED_TIMEOUT)
        except sdk.CommandExitException as exc:
            failed = f"exit {exc.exit_code}"
        except (sdk.SandboxException, OSError) as exc:
            failed = type(exc).__name__
        if failed:
            log.warning("E2B sandbox %s: could not kill what a timed-out command left running (%s)",
                        sbx.sandbox_id, failed)

    # ------------------------------------------------------------ snapshots

    def snapshot(self, handle: E2BHandle) -> SnapshotResult:
        """Take an E2B snapshot (the SDK's snapshot API: the sandbox pauses while it is taken, then runs on)."""
        sid = handle.e2b_sandbox_id
        consumer = handle.consumer
        snapshot_id, names = self._call(
            "snapshot",
            lambda sdk_opts: (lambda info: (info.snapshot_id, list(info.names)))(
                _sdk().Sandbox.create_snapshot(sid, **sdk_opts)),
            consumer=consumer, fallback=SnapshotError, sandbox=sid,
        )
        return SnapshotResult(data={"snapshot_id": snapshot_id, "names": names, "source": sid, "consumer": consumer})

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> E2BHandle:
        """Create a new sandbox from the snapshot (E2B starts it from the snapshot's template id)."""
        snap = snapshot.data.get("snapshot_id")
        if not snap:
            raise SnapshotError(f"snapshot {snapshot.id} has no E2B snapshot id", backend=self.id)
        failure: str | None = None
        try:
            return self._create(request, template=str(snap), restored_from=snapshot.id)
        except ProvisionError as exc:
            failure = str(exc)
        raise SnapshotError(f"restore of snapshot {snapshot.id}: {failure}", backend=self.id)

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        """Delete the E2B snapshot; one already gone is fine."""
        snap = snapshot.data.get("snapshot_id")
        if not snap:
            return
        self._call("snapshot delete", lambda sdk_opts: _sdk().Sandbox.delete_snapshot(str(snap), **sdk_opts),
                   consumer=snapshot.data.get("consumer"), fallback=SnapshotError)

    # ------------------------------------------------------------ gc

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        """Every E2B sandbox (running or paused) whose metadata carries ``owner_labels``.

        Asks with each configured key (the operator's and each consumer's), so
        sandboxes made with a consumer's key are found too; pages through
        ``x-next-token``, at most :data:`MAX_LIST_PAGES` pages per key. A key that
        is unset or refused is skipped with a warning naming its reference, so
        one revoked key does not hide the other keys' orphans from gc; when every
        key is refused, the operator's key's AuthError is raised.
        """
        found: dict[str, OwnedSandbox] = {}
        refused: list[AuthError] = []
        listed = 0
        seen_refs: set[SecretRef] = set()
        for consumer in [None, *sorted(self.config.consumer_keys)]:
            ref = self._key_ref(consumer)
            if ref in seen_refs:
                continue
            seen_refs.add(ref)
            try:
                self._call("list", lambda sdk_opts: self._list_pages(sdk_opts, owner_labels, found),
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

    def _list_pages(self, sdk_opts: dict[str, Any], owner_labels: dict[str, str],
                    found: dict[str, OwnedSandbox]) -> None:
        sdk = _sdk()
        pager = sdk.Sandbox.list(query=sdk.SandboxQuery(metadata=dict(owner_labels)), limit=100, **sdk_opts)
        for _ in range(MAX_LIST_PAGES):
            if not pager.has_next:
                break
            for info in pager.next_items():
                meta = dict(info.metadata or {})
                if any(meta.get(k) != v for k, v in owner_labels.items()):
                    continue  # the API filtered already; this guards an API that ignores the filter
                ours = meta.get("sandboxer.sandbox_id")
                if not ours:
                    continue
                found[info.sandbox_id] = OwnedSandbox(sandbox_id=ours, handle=E2BHandle(
                    e2b_sandbox_id=info.sandbox_id,
                    template=info.template_id,
                    consumer=meta.get("sandboxer.consumer"),
                    started_at=info.started_at.timestamp() if info.started_at else None,
                ))

    # ------------------------------------------------------------ metering

    def meter_actual(self, handle: E2BHandle) -> dict[str, Any] | None:
        """What E2B reports of the sandbox: its size and times (None once it is gone).

        The manager prices the recorded start and stop; this refines them with
        the vCPUs and memory E2B actually gave the sandbox, as
        ``rate_per_second`` (the manifest's prices applied to that size).
        """
        sid = handle.e2b_sandbox_id
        sdk = _sdk()

        def info_of(sdk_opts: dict[str, Any]) -> Any:
            try:
                return sdk.Sandbox.get_info(sid, **sdk_opts)
            except sdk.NotFoundException:
                return None

        try:
            info = self._call("info", info_of, consumer=handle.consumer, fallback=ProvisionError, sandbox=sid)
        except BackendError as exc:
            log.warning("meter_actual: %s", exc)
            return None
        if info is None:
            return None
        cpu = float(info.cpu_count)
        gib = float(info.memory_mb) / 1024
        p = self.manifest.pricing
        rate = (p.per_second + p.per_vcpu_second * cpu + p.per_gib_second * gib) if p else 0.0
        return {
            "source": "e2b",
            "e2b_sandbox_id": sid,
            "vcpus": cpu,
            "memory_gib": gib,
            "rate_per_second": rate,
            "started_at": _iso(info.started_at),
            "end_at": _iso(info.end_at),
            "state": str(getattr(info.state, "value", info.state)),
        }


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date (None if absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
