"""``ext.docker``: one container per sandbox on a Docker engine, through the docker SDK.

The engine is local by default; the manifest's ``config.docker_host`` (or
``DOCKER_HOST``) may name another, ``ssh://`` included (the SDK then checks the
host key against the system known_hosts with paramiko's RejectPolicy).

Rules this module keeps:

* the docker SDK is imported lazily, so the manifest loads on a core-only install;
* every SDK exception is translated through one table, :func:`engine_errors`, by
  :meth:`DockerExtension._engine` (``contract.translated``; public SDK attributes only);
* a container carries labels naming its sandbox, its owner and the request's
  tags, and :meth:`DockerExtension.list_owned` finds containers by them;
* no network unless the profile asks for one, and never the host's network;
* a failed provision removes the container it created before raising.

An exec's output stream and its kill at the deadline are :mod:`sandboxer.extensions.docker_exec`'s.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sandboxer.contract import (ErrorTable, Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult,
                                TeardownReport, translated_with)
from sandboxer.errors import (
    AuthError,
    BackendError,
    ExecError,
    HostKeyError,
    InputError,
    ProvisionError,
    RateLimited,
    ReadinessTimeout,
    SnapshotError,
    TeardownError,
)
from sandboxer.execution import EXEC_MARKER, check_argv
from sandboxer.extensions import docker_net
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.extensions.docker_exec import FrameReader, kill_exec
from sandboxer.extensions.docker_files import DockerFilesMixin
from sandboxer.extensions.docker_gpu import gpu_create_kwargs, gpu_unavailable
from sandboxer.models import ExecResult, Profile, SnapshotMeta
from sandboxer.poll import poll

if TYPE_CHECKING:  # pragma: no cover
    import docker

T = TypeVar("T")

#: Label keys this backend sets on every container (besides the request's tags).
LABEL_SANDBOX = "sandboxer.sandbox_id"
LABEL_EXTENSION = "sandboxer.extension"
LABEL_SNAPSHOT_OF = "sandboxer.snapshot_of"

# fullmatch only: re.match(r"...$") would accept a trailing newline
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DockerConfig(BaseModel):
    """The manifest's ``config:`` for ``ext.docker``."""

    model_config = ConfigDict(extra="forbid")

    docker_host: str | None = Field(
        default=None, description="engine URL (unix://, tcp://, ssh://); default: DOCKER_HOST, else the local socket"
    )
    api_timeout: float = Field(default=60.0, gt=0, description="seconds for one engine API call")
    use_ssh_client: bool = Field(default=False, description="for ssh:// hosts, use the ssh binary instead of paramiko")
    name_prefix: str = Field(default="sandboxer-", pattern=r"^[a-z0-9][a-z0-9_.-]{0,30}$")
    snapshot_repository: str = Field(default="sandboxer-snapshot", pattern=r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*$")
    max_output_bytes: int = Field(default=10 * 1024 * 1024, gt=0,
                                  description="kept (and streamed) per stream of one exec")
    gpus: bool = Field(default=False, description="the engine has NVIDIA GPUs and their runtime (it then keeps gpu)")
    gpu_type: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                 description="the type of the engine's GPUs, kept for a resources.gpu.type")


class DockerOptions(BaseModel):
    """A profile's ``options:`` for ``ext.docker``."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(default="sandboxer-busybox:test", min_length=1)
    pull: Literal["missing", "never"] = "missing"
    command: list[str] = Field(default_factory=lambda: ["sleep", "2147483647"], min_length=1)
    workdir: str = Field(default="/work", pattern=r"^/")
    env: dict[str, str] = Field(default_factory=dict)
    network: str = Field(
        default="none", description="'none' (default), 'bridge', or a named network; the host's network is refused"
    )
    init: bool = Field(default=True, description="run docker-init as PID 1 so signals and zombies are handled")
    user: str | None = None
    read_only: bool = False
    cap_drop: list[str] = Field(default_factory=lambda: ["ALL"])
    cap_add: list[str] = Field(default_factory=list)
    no_new_privileges: bool = True
    ready_command: list[str] | None = Field(default=None, description="exec'd until it exits 0 before ready")
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("network")
    @classmethod
    def _no_host_network(cls, v: str) -> str:
        if v == "host" or v.startswith("container:"):
            raise ValueError(f"network {v!r} would share another namespace; use 'none', 'bridge' or a named network")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"not a network name: {v!r}")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        _check_env(v, "options.env")
        return v


class DockerInputs(BaseModel):
    """What a provision accepts (besides the request's reserved fields): ``env`` for the container.

    The request's ``ttl`` is not used: docker has no expiry of its own, the manager's gc enforces it.
    """

    model_config = ConfigDict(extra="forbid")

    env: dict[str, str] = Field(default_factory=dict)


class DockerHandle(Handle):
    """One sandbox's container; ``host`` is the engine URL (without any password)."""

    model_config = ConfigDict(extra="ignore")  # a record with a key a later version dropped still loads

    container_id: str = Field(min_length=1, description="the engine's id of the container")
    container: str = Field(min_length=1, description="the container's name")
    sandbox_id: str = Field(min_length=1)
    image: str | None = Field(default=None, description="the image it was created from (None: not known)")
    workdir: str | None = Field(default=None, description="where exec runs by default (None: the image's)")
    network: str | None = None
    ready_command: list[str] | None = None
    #: the sandbox's own network and its rules (an allow-list, or exposed ports without the internet)
    own_network: docker_net.OwnNetwork | None = None
    #: ports it serves (``network.expose``), published on the engine host's 127.0.0.1
    expose: list[int] = Field(default_factory=list)
    secrets: list[str] = Field(default_factory=list, description="names of the secrets in its environment (never values)")


class DockerReachability(Reachability):
    """How to reach a ready container: ``host`` is the engine, ``address`` its IP (None without a network)."""

    docker_host: str
    container: str
    container_id: str
    workdir: str | None = None
    network: str | None = None
    ip_address: str | None = None
    exec_hint: str


class DockerSnapshot(BaseModel):
    """A snapshot's ``data``: the committed image, on the engine that holds it."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(min_length=1, description="repository:tag of the committed image")
    image_id: str = Field(min_length=1)
    docker_host: str | None = None
    source_image: str | None = None


def _check_env(env: dict[str, str], where: str) -> None:
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{where}: environment variable name {name!r} is not valid")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"{where}: value of {name!r} must be a string without NUL bytes")


def _env_list(env: dict[str, str] | None, where: str) -> list[str]:
    """``KEY=value`` strings for the engine; values travel literally, no shell sees them."""
    try:
        _check_env(env or {}, where)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return [f"{k}={v}" for k, v in (env or {}).items()]


def _holds_secrets(attrs: dict[str, Any], names: list[str]) -> bool:
    """Whether an image's inspect data holds a non-empty value for one of ``names`` in an env list."""
    for block in (attrs.get("Config"), attrs.get("ContainerConfig")):
        for entry in (block or {}).get("Env") or ():
            name, _, value = str(entry).partition("=")
            if name in names and value:
                return True
    return False


def _safe_url(url: str) -> str:
    """The engine URL without any password in it."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class _At:
    """Where an engine call is made: what :func:`engine_errors`' rows name in their messages."""

    ext: str
    host: str
    action: str
    error: type[BackendError]
    sandbox: str | None

    @property
    def where(self) -> str:
        return f"{self.ext} on {self.host}: {self.action}" + (f" for sandbox {self.sandbox}" if self.sandbox else "")

    def fail(self, detail: str, *, transient: bool) -> BackendError:
        """The action's own error class (``ProvisionError`` for a provision: ``transient`` tells the router
        whether another engine may succeed)."""
        return self.error(f"{self.where} failed: {detail}", backend=self.ext, host=self.host, transient=transient)

    def refused(self, cls: type[BackendError], what: str) -> BackendError:
        return cls(f"{self.where}: {what}", backend=self.ext, host=self.host)


#: The call :func:`engine_errors`' rows are translating for (set by :meth:`DockerExtension._engine`,
#: per thread: the manager calls one extension from several).
_AT: ContextVar[_At] = ContextVar("sandboxer_docker_call")


def _api_error(exc: Any) -> BackendError:
    at = _AT.get()
    status = exc.status_code or 0  # None when the SDK raised it without a response
    if status in (401, 403):
        return at.refused(AuthError, f"the Docker engine refused the credentials ({status})")
    if status == 429:
        return at.refused(RateLimited, "the Docker engine asked to slow down")
    # 409 is a conflict with something that exists (a name, a removal in progress):
    # retrying on another engine does not help; 5xx may.
    return at.fail(f"engine answered {status}: {exc.explanation or exc}", transient=status >= 500)


def _invalid(exc: Any) -> BackendError:
    return _AT.get().fail(f"invalid argument: {exc}", transient=False)


def _unreachable(exc: Any) -> BackendError:
    # DockerException without a status: the engine could not be reached (the SDK wraps
    # connection failures that way when it asks the version).
    return _AT.get().fail(f"cannot reach the Docker engine ({type(exc).__name__}: {exc})", transient=True)


def _host_key(exc: Any) -> BackendError:
    return _AT.get().refused(HostKeyError, "the engine host's SSH key does not match known_hosts; nothing was run")


def _ssh_auth(exc: Any) -> BackendError:
    return _AT.get().refused(AuthError, "SSH authentication to the engine host failed")


def _ssh_failed(exc: Any) -> BackendError:
    # An unknown host key (RejectPolicy) or an SSH protocol failure.
    return _AT.get().fail(f"SSH to the engine host failed (is its key in ~/.ssh/known_hosts?): {exc}", transient=False)


@functools.cache
def engine_errors() -> ErrorTable:
    """This backend's one table: the docker SDK's exceptions and its transports' (requests,
    paramiko for ``ssh://`` engines, sockets) as ours. Looked up along an exception's MRO, so
    ``NotFound`` and ``ImageNotFound`` (``APIError`` subclasses) are read by their public
    ``status_code`` and ``explanation``. Built on first use: the SDK is imported lazily."""
    import docker.errors as derr
    import requests.exceptions as rexc

    rows: dict[type[BaseException], Callable[[Any], BackendError]] = {
        derr.APIError: _api_error,
        derr.InvalidArgument: _invalid,
        derr.InvalidRepository: _invalid,
        derr.NullResource: _invalid,
        derr.DockerException: _unreachable,
        rexc.RequestException: _unreachable,
        ConnectionError: _unreachable,
        TimeoutError: _unreachable,  # socket.timeout
    }
    try:  # only ssh:// engines go through paramiko, and it may not be installed
        import paramiko
    except ImportError:  # pragma: no cover - the docker extra installs it
        return ErrorTable(rows)
    rows[paramiko.BadHostKeyException] = _host_key
    rows[paramiko.AuthenticationException] = _ssh_auth
    rows[paramiko.SSHException] = _ssh_failed
    return ErrorTable(rows)


class DockerExtension(DockerFilesMixin, SandboxExtension):
    """Sandboxes as containers on one Docker engine."""

    Config = DockerConfig
    ProfileOptions = DockerOptions
    Handle = DockerHandle
    features = frozenset({"exec", "snapshots", "list_owned", "files"})
    own_ttl = "none"  # nothing here ends a sandbox on its own: the manager's gc does
    requires = ("docker", "docker")
    # none is network_mode none (loopback only); the internet is a bridge (or the operator's named network);
    # an allow-list, a deny-list or exposed ports: a network of its own, kept by nftables rules on the
    # host (sandboxer/extensions/docker_net.py); gpu is NVIDIA device requests (docker_gpu), where
    # config.gpus says the engine has them; secrets: the container's environment (each docker exec
    # inherits it); a snapshot blanks them
    enforces = frozenset({"network:none", "network:internet", "network:cidr-allowlist", "network:cidr-denylist",
                          "expose", "gpu", "secrets"})

    def __init__(self, manifest, config):
        super().__init__(manifest, config)
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ plumbing

    @property
    def engine(self) -> str:
        """The engine this backend talks to, as shown in handles and messages."""
        url = self.config.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return _safe_url(url)

    def _engine(self, action: str, error: type[BackendError], call: Callable[[], T], *,
                sandbox: str | None = None) -> T:
        """``call()`` (docker SDK calls), its SDK exceptions translated by :func:`engine_errors`.

        ``error`` is the class for failures of ``action`` (a provision's ``ProvisionError`` also
        says whether another engine may succeed); ours raised inside ``call`` pass untouched.
        """
        return translated_with(_AT, _At(self.id, self.engine, action, error, sandbox), call, engine_errors())

    def client(self) -> "docker.DockerClient":
        """The shared SDK client, connected on first use."""
        with self._lock:
            if self._client is None:
                import docker

                cfg = self.config
                if cfg.docker_host:
                    connect = functools.partial(docker.DockerClient, base_url=cfg.docker_host,
                                                timeout=int(cfg.api_timeout), use_ssh_client=cfg.use_ssh_client)
                else:
                    connect = functools.partial(docker.from_env, timeout=int(cfg.api_timeout))
                self._client = self._engine("connecting", ProvisionError, connect)
            return self._client

    def _inputs(self, request: ProvisionRequest) -> DockerInputs:
        if not _SANDBOX_ID.fullmatch(request.sandbox_id):
            raise InputError(f"{self.id}: sandbox_id {request.sandbox_id!r} is not a valid container name part "
                             "(a letter or digit, then letters, digits, '_', '.', '-'; at most 100)")
        try:
            return DockerInputs.model_validate(request.inputs)
        except ValidationError as exc:
            from sandboxer.loader import describe_validation

            raise InputError(describe_validation(f"{self.id} inputs", exc, prefix="inputs")) from None

    def _container(self, handle: DockerHandle):
        """The container of ``handle``, or None when it is gone (call it inside :meth:`_engine`)."""
        import docker.errors as derr

        try:
            return self.client().containers.get(handle.container_id)
        except derr.NotFound:
            return None

    # ------------------------------------------------------------ required

    def options(self, profile: Profile) -> DockerOptions:
        """The profile's options with the network its policy allows: ``none`` unless
        ``network.egress: internet``, then ``options.network`` (default ``bridge``)."""
        opts = super().options(profile)
        if profile.network.egress != "internet":
            return opts.model_copy(update={"network": "none"})
        return opts if "network" in opts.model_fields_set else opts.model_copy(update={"network": "bridge"})

    @classmethod
    @classmethod
    def policy_conflicts(cls, profile: Profile, options: BaseModel) -> list[tuple[str, str]]:
        if getattr(options, "network", "none") != "none" and profile.network.egress != "internet":
            return [("network", "network.egress")]
        return []

    @classmethod
    def unavailable(cls, config: BaseModel) -> dict[str, str]:
        """Allow-lists and exposed ports without a local engine, root and nftables; ``gpu`` unless
        ``config.gpus`` says the engine has NVIDIA GPUs (no daemon is asked)."""
        why = docker_net.unavailable(getattr(config, "docker_host", None))
        net = {e: why for e in ("network:cidr-allowlist", "network:cidr-denylist", "expose")} if why else {}
        return {**net, **gpu_unavailable(config)}

    def provision(self, request: ProvisionRequest) -> DockerHandle:
        """Create and start the sandbox's container, named ``name_prefix`` + ``request.sandbox_id``.

        Raises:
            InputError: an unknown or invalid input, or the image is not on
                the engine and cannot be pulled.
            ProvisionError: the engine refused or could not be reached
                (``transient`` when another engine may succeed).
        """
        opts: DockerOptions = self.options(request.profile)
        return self._create(request, opts, self._inputs(request), opts.image, pull=opts.pull)

    def _create(self, request: ProvisionRequest, opts: DockerOptions, inp: DockerInputs, image: str, *,
                pull: str) -> DockerHandle:
        import docker.errors as derr

        sandbox_id = request.sandbox_id
        name = f"{self.config.name_prefix}{sandbox_id}"
        env = _env_list({**opts.env, **inp.env, **request.secret_env()}, "inputs.env")
        labels = {
            **opts.labels,
            **{k: str(v) for k, v in request.tags.items()},
            **request.owner_labels,
            LABEL_SANDBOX: sandbox_id,
            LABEL_EXTENSION: self.id,
            "sandboxer.profile": request.profile.slug,
        }
        res = request.profile.resources
        gpus = gpu_create_kwargs(res.gpu, self.config, backend=self.id)  # refused before anything is made
        client = self.client()
        self._ensure_image(client, image, pull, sandbox_id)
        profile = request.profile
        own = None
        given = super().options(profile)  # options.network: none narrows any policy to no network
        narrowed = "network" in given.model_fields_set and given.network == "none"
        if not narrowed and docker_net.wants_own_network(profile, opts.network):
            own = docker_net.create(client, self._engine_for(sandbox_id), name, sandbox_id, labels, profile,
                                    backend=self.id)
        network = ({"network": own.name} if own else {"network_mode": opts.network}
                   if opts.network in ("none", "bridge") else {"network": opts.network})
        expose = list(profile.network.expose) if own or opts.network != "none" else []
        try:
            container = self._created(client, image, opts, name, labels, env, res, {**network, **gpus}, expose,
                                      sandbox_id)
        except BaseException:
            if own is not None:
                docker_net.remove(client, self._engine_for(sandbox_id), own)
            raise
        try:
            self._engine("starting the container", ProvisionError, container.start, sandbox=sandbox_id)
        except BaseException:
            # No half-created sandbox stays behind.
            with contextlib.suppress(derr.APIError):
                container.remove(force=True, v=True)
            if own is not None:
                docker_net.remove(client, self._engine_for(sandbox_id), own)
            raise
        return DockerHandle(container_id=container.id, container=name, sandbox_id=sandbox_id, host=self.engine,
                            image=image, workdir=opts.workdir, network=own.name if own else opts.network,
                            ready_command=opts.ready_command, own_network=own, expose=expose,
                            secrets=sorted(request.secrets))

    def _engine_for(self, sandbox_id: str) -> Callable[[str, Callable[[], T]], T]:
        return lambda action, call: self._engine(action, ProvisionError, call, sandbox=sandbox_id)

    def _created(self, client, image: str, opts: DockerOptions, name: str, labels: dict[str, str], env: list[str],
                 res, extra: dict[str, Any], expose: list[int], sandbox_id: str):
        """The container, created (not started); ``extra``: its network and GPU arguments."""
        return self._engine("creating the container", ProvisionError, lambda: client.containers.create(
            image,
            command=opts.command,
            name=name,
            labels=labels,
            environment=env,
            working_dir=opts.workdir,
            nano_cpus=int(res.cpu * 1e9),
            mem_limit=f"{res.memory_mb}m",
            memswap_limit=f"{res.memory_mb}m",  # the same value: no swap beyond the limit
            pids_limit=res.pids,
            init=opts.init,
            user=opts.user,
            read_only=opts.read_only,
            cap_drop=opts.cap_drop or None,
            cap_add=opts.cap_add or None,
            security_opt=["no-new-privileges"] if opts.no_new_privileges else None,
            ports=docker_net.port_bindings(expose),
            detach=True,
            **extra,
        ), sandbox=sandbox_id)

    def _ensure_image(self, client, image: str, pull: str, sandbox_id: str) -> None:
        import docker.errors as derr
        from docker.utils import parse_repository_tag

        def present() -> bool:
            try:
                client.images.get(image)
            except derr.ImageNotFound:
                return False
            return True

        if self._engine(f"looking up image {image!r}", ProvisionError, present, sandbox=sandbox_id):
            return
        if pull == "never" or image.startswith("sha256:"):
            raise InputError(
                f"{self.id}: image {image!r} is not on the Docker engine at {self.engine} (options.pull is "
                f"{pull!r}); build or load it there first"
            )
        repo, tag = parse_repository_tag(image)

        def pulled() -> bool:
            try:
                client.images.pull(repo, tag=tag or "latest")
            except derr.NotFound:  # no registry has it (or the engine cannot see one that does)
                return False
            return True

        if not self._engine(f"pulling image {image!r}", ProvisionError, pulled, sandbox=sandbox_id):
            raise InputError(
                f"{self.id}: image {image!r} is not on the Docker engine at {self.engine} and no registry "
                f"has it; build or load it there first"
            )

    def wait_ready(self, handle: DockerHandle, timeout: float = 60.0) -> DockerReachability:
        """Wait until the container runs (and is healthy, and ``ready_command`` passes).

        Raises:
            ReadinessTimeout: not ready within ``timeout``, or the container
                stopped (its exit code and last log lines are in the message).
        """
        sid = handle.sandbox_id
        deadline = time.monotonic() + timeout

        def inspect():
            container = self._container(handle)
            if container is None:
                raise ReadinessTimeout(f"{self.id}: container {handle.container} of sandbox {sid} is gone",
                                       backend=self.id, host=self.engine)
            state = container.attrs.get("State", {})
            if state.get("Status") in ("exited", "dead"):
                logs = container.logs(tail=10).decode(errors="replace").strip()
                raise ReadinessTimeout(
                    f"{self.id}: container {handle.container} of sandbox {sid} exited with code "
                    f"{state.get('ExitCode')} before it was ready; last output: {logs or '(none)'}",
                    backend=self.id,
                    host=self.engine,
                )
            health = (state.get("Health") or {}).get("Status")
            return container if state.get("Running") and health in (None, "healthy") else None

        def timed_out() -> ReadinessTimeout:
            return ReadinessTimeout(
                f"{self.id}: sandbox {sid} was not ready within {timeout:g}s", backend=self.id, host=self.engine
            )

        container = poll(lambda: self._engine("inspecting the container", ReadinessTimeout, inspect, sandbox=sid),
                         timeout, 0.05, on_timeout=timed_out)
        if handle.ready_command:

            def ready_command_passes():
                left = max(deadline - time.monotonic(), 0.5)
                try:
                    return self.exec(handle, handle.ready_command, timeout=left).exit_code == 0
                except ExecError:
                    # Stopped between two probes: say how it ended (inspect raises) rather than
                    # "exec failed"; an engine fault while it still runs stays an ExecError.
                    self._engine("inspecting the container", ReadinessTimeout, inspect, sandbox=sid)
                    raise

            poll(ready_command_passes, max(deadline - time.monotonic(), 0.0), 0.2, on_timeout=timed_out)
        settings = container.attrs.get("NetworkSettings", {})
        ip = settings.get("IPAddress") or ((settings.get("Networks") or {}).get(handle.network) or {}).get(
            "IPAddress") or None
        return DockerReachability(
            host=self.engine, address=ip, docker_host=self.engine, container=handle.container,
            container_id=handle.container_id, workdir=handle.workdir, network=handle.network, ip_address=ip,
            exec_hint=f"docker exec -it {handle.container} sh", urls=docker_net.urls(container.attrs, handle.expose),
        )

    def teardown(self, handle: DockerHandle) -> TeardownReport:
        """Remove the container and its anonymous volumes; a container already gone is a success.

        Returns:
            ``removed`` holds the container id (empty when it was already gone); ``detail``
            its name.

        Raises:
            TeardownError: the engine did not confirm the removal.
        """
        import docker.errors as derr

        sid, ref = handle.sandbox_id, handle.container_id
        client = self.client()

        def remove() -> bool:
            """Whether the container was gone already."""
            already_gone = False
            try:
                client.api.remove_container(ref, v=True, force=True)
            except derr.NotFound:
                already_gone = True
            except derr.APIError as exc:
                # 409: a removal is already in progress; wait for it below.
                if exc.status_code != 409:
                    raise

            def gone() -> bool:
                try:
                    client.api.inspect_container(ref)
                except derr.NotFound:
                    return True
                return False

            poll(gone, 30.0, 0.05, on_timeout=lambda: TeardownError(
                f"{self.id}: container {handle.container} of sandbox {sid} still exists after removal",
                backend=self.id, host=self.engine,
            ))
            return already_gone

        already_gone = self._engine("removing the container", TeardownError, remove, sandbox=sid)
        unlinked = docker_net.remove(client, lambda action, call: self._engine(action, TeardownError, call, sandbox=sid),
                                     handle.own_network) if handle.own_network else []
        return TeardownReport(already_gone=already_gone, removed=([] if already_gone else [ref]) + unlinked,
                              detail={"container": handle.container})

    # ------------------------------------------------------------ liveness

    def probe(self, handle: DockerHandle) -> bool | None:
        """Whether the container still exists and runs (a stopped one cannot serve its sandbox).

        Raises:
            BackendError: the engine cannot be asked.
        """
        import docker.errors as derr

        def state() -> dict[str, Any] | None:
            try:
                return self.client().api.inspect_container(handle.container_id).get("State") or {}
            except derr.NotFound:
                return None

        found = self._engine("inspecting the container", BackendError, state, sandbox=handle.sandbox_id)
        if found is None:
            return False
        return bool(found.get("Running")) or found.get("Status") == "paused"

    def handle_id(self, handle: DockerHandle) -> str | None:
        """The container id: a retried create makes another container under the same name."""
        return handle.container_id

    # ------------------------------------------------------------ exec

    def exec(
        self,
        handle: DockerHandle,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the container (no shell: arguments and env values arrive literally).

        At ``timeout`` the command's process tree is killed (when the engine
        is local) and the result says ``timed_out`` with exit code 124.

        Raises:
            InputError: empty argv or an invalid environment variable name.
            ExecError: the container is gone or the engine failed.
        """
        argv = check_argv(argv, backend=self.id)
        environment = _env_list(env, "exec env")
        return self._engine(f"exec {argv[0]!r}", ExecError, lambda: self._run(
            handle, argv, environment, cwd=cwd, timeout=timeout, stdin=stdin, on_output=on_output),
            sandbox=handle.sandbox_id)

    def _run(self, handle: DockerHandle, argv: list[str], environment: list[str], *, cwd: str | None,
             timeout: float | None, stdin: bytes | None, on_output: OutputCallback | None) -> ExecResult:
        """:meth:`exec`'s engine calls (inside :meth:`_engine`)."""
        api = self.client().api
        # inherited by everything the command starts, setsid children too; the caller's own marker
        # (Manager.kill_exec) is kept, so a Ctrl-C can find the exec's processes by it
        given = [e for e in environment if e.startswith(f"{EXEC_MARKER}=")]
        mark = given[-1].partition("=")[2] if given else uuid.uuid4().hex
        exec_id = api.exec_create(
            handle.container_id,
            argv,
            stdin=stdin is not None,
            environment=[*(e for e in environment if not e.startswith(f"{EXEC_MARKER}=")), f"{EXEC_MARKER}={mark}"],
            workdir=cwd or handle.workdir,
        )["Id"]
        sock = api.exec_start(exec_id, socket=True)
        try:
            # The SDK hands a socket.SocketIO for unix:// and tcp:// engines: select and
            # half-close need the socket under it (a paramiko channel or TLS socket is one already).
            raw = getattr(sock, "_sock", sock)
            if stdin is not None:
                raw.sendall(stdin)
                # Half-close: the command sees EOF on stdin, we keep reading.
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_WR)
            out = FrameReader(self.config.max_output_bytes, on_output)
            finished = out.read_frames(raw, None if timeout is None else time.monotonic() + timeout)
        finally:
            with contextlib.suppress(Exception):
                sock.close()
        if not finished:
            kill_exec(api, exec_id, handle.container_id, mark)

        def exited() -> dict[str, Any] | None:
            info = api.exec_inspect(exec_id)
            return None if info.get("Running") else info

        # The stream can end a moment before the engine records the exit code.
        info = poll(exited, 5.0 if finished else 2.0, 0.01, on_timeout=lambda: ExecError(
            f"{self.id}: exec in sandbox {handle.sandbox_id} did not report an exit code",
            backend=self.id, host=self.engine))
        return out.out.result(int(info.get("ExitCode") or 0), timed_out=not finished)

    # ------------------------------------------------------------ snapshots

    def snapshot(self, handle: DockerHandle) -> SnapshotResult:
        """``docker commit`` the container to a local image.

        Returns:
            ``data`` names the image (:class:`DockerSnapshot`); ``checksum`` is the image
            id (a sha256 of its config); ``size_bytes`` the image size.
        """
        sid = handle.sandbox_id
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
        tag = f"{sid}-{stamp}-{uuid.uuid4().hex[:6]}"[:128]

        def commit():
            container = self._container(handle)
            if container is None:
                raise SnapshotError(f"{self.id}: container of sandbox {sid} is gone; nothing to snapshot",
                                    backend=self.id, host=self.engine)
            return container.commit(
                repository=self.config.snapshot_repository,
                tag=tag,
                # the image takes the container's environment: its secrets are blanked (the engine
                # merges the container's env back under any name not given, so each is given empty)
                changes=[f"LABEL {LABEL_SNAPSHOT_OF}={sid}", *(f"ENV {name}=" for name in handle.secrets)],
                pause=True,
            )

        image = self._engine("committing the container", SnapshotError, commit, sandbox=sid)
        if handle.secrets and _holds_secrets(image.attrs, handle.secrets):
            # Engines before 25 copy the container's whole config into a committed image (its
            # ContainerConfig), whatever the changes say: such an image would hand the values to
            # anyone who runs or pulls it. It is removed, and the snapshot refused.
            with contextlib.suppress(Exception):
                self._engine("removing the refused snapshot image", SnapshotError,
                             lambda: self.client().images.remove(image.id, force=True), sandbox=sid)
            raise SnapshotError(
                f"{self.id}: cannot snapshot sandbox {sid}: the Docker engine at {self.engine} writes the "
                f"container's environment, which holds its secrets ({', '.join(handle.secrets)}), into a committed "
                f"image (its ContainerConfig; Docker 25 and later do not); the image was removed. Snapshot it on a "
                f"newer engine, or use a profile without secrets", backend=self.id, host=self.engine)
        data = DockerSnapshot(image=f"{self.config.snapshot_repository}:{tag}", image_id=image.id,
                              docker_host=self.engine, source_image=handle.image)
        return SnapshotResult(data=data.model_dump(mode="json"), size_bytes=int(image.attrs.get("Size") or 0),
                              checksum=image.id)

    def _snapshot_data(self, snapshot: SnapshotMeta) -> DockerSnapshot:
        try:
            return DockerSnapshot.model_validate(snapshot.data)
        except ValidationError as exc:
            raise SnapshotError(
                f"{self.id}: snapshot {snapshot.id}: its data does not name a Docker image "
                f"({exc.errors()[0].get('loc', ('?',))[0]}: {exc.errors()[0].get('msg')})",
                backend=self.id, host=self.engine,
            ) from None

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> DockerHandle:
        """Start a new sandbox from a snapshot's image (on the engine that holds it).

        Raises:
            SnapshotError: the image is gone or is not the one snapshotted.
        """
        import docker.errors as derr

        data = self._snapshot_data(snapshot)

        def find():
            try:
                return self.client().images.get(data.image_id)
            except derr.ImageNotFound:
                return None

        image = self._engine("finding the snapshot image", SnapshotError, find, sandbox=snapshot.sandbox_id)
        if image is None:
            raise SnapshotError(
                f"{self.id}: snapshot {snapshot.id}: image {data.image} is no longer on the Docker "
                f"engine at {self.engine}", backend=self.id, host=self.engine,
            )
        if snapshot.checksum and image.id != snapshot.checksum:
            raise SnapshotError(
                f"{self.id}: snapshot {snapshot.id}: image id {image.id} does not match checksum "
                f"{snapshot.checksum}", backend=self.id, host=self.engine,
            )
        opts: DockerOptions = self.options(request.profile)
        return self._create(request, opts, self._inputs(request), image.id, pull="never")

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        """Remove the snapshot's image tag (the layers go once no container uses them). Idempotent."""
        import docker.errors as derr

        data = self._snapshot_data(snapshot)

        def remove() -> None:
            with contextlib.suppress(derr.ImageNotFound):
                self.client().images.remove(data.image, force=True)

        self._engine("removing the snapshot image", SnapshotError, remove, sandbox=snapshot.sandbox_id)

    # ------------------------------------------------------------ gc

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        """Every container of this extension carrying all of ``owner_labels``, running or not, with
        its own network; and every such network whose container was never made."""
        filters = [f"{k}={v}" for k, v in owner_labels.items()] + [f"{LABEL_EXTENSION}={self.id}"]
        found = self._engine("listing containers", ProvisionError,
                             lambda: self.client().api.containers(all=True, filters={"label": filters}))
        nets = docker_net.owned(self.client(), lambda action, call: self._engine(action, ProvisionError, call),
                                filters, LABEL_SANDBOX)
        owned = []
        for c in found:
            labels = c.get("Labels") or {}
            name = (c.get("Names") or ["/"])[0].lstrip("/")
            sid = labels.get(LABEL_SANDBOX)
            if sid and name:
                owned.append(OwnedSandbox(sandbox_id=sid, handle=DockerHandle(
                    container_id=c["Id"], container=name, sandbox_id=sid, host=self.engine, image=c.get("Image"),
                    own_network=nets.pop(sid, None))))
        for sid, own in nets.items():  # teardown finds no container and removes the network
            owned.append(OwnedSandbox(sandbox_id=sid, handle=DockerHandle(
                container_id=own.name, container=own.name, sandbox_id=sid, host=self.engine, own_network=own)))
        return owned
