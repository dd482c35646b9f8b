"""``ext.docker``: one container per sandbox on a Docker engine, through the docker SDK.

The engine is local by default; the manifest's ``config.docker_host`` (or
``DOCKER_HOST``) may name another, ``ssh://`` included (the SDK then checks the
host key against the system known_hosts with paramiko's RejectPolicy).

Rules this module keeps:

* the docker SDK is imported lazily, so the manifest loads on a core-only install;
* every SDK exception is translated in one place, :func:`_translate`;
* a container carries labels naming its sandbox, its owner and the request's
  tags, and :meth:`DockerExtension.list_owned` finds containers by them;
* no network unless the profile asks for one, and never the host's network;
* a failed provision removes the container it created before raising.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
from sandboxer.execution import OutputCollector, check_argv
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.models import ExecResult, Profile, SnapshotMeta
from sandboxer.poll import poll

if TYPE_CHECKING:  # pragma: no cover
    import docker

#: Label keys this backend sets on every container (besides the request's tags).
LABEL_SANDBOX = "sandboxer.sandbox_id"
LABEL_EXTENSION = "sandboxer.extension"
LABEL_SNAPSHOT_OF = "sandboxer.snapshot_of"

# fullmatch only: re.match(r"...$") would accept a trailing newline
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Environment marker of one exec (``SANDBOXER_EXEC=<token>``): how its processes are found at its deadline.
EXEC_MARKER = "SANDBOXER_EXEC"
# $1 the marker: KILL every process inside the container carrying it (for engines on other machines).
# One file at a time through tr: busybox grep stops reading a line at its first NUL.
_SWEEP = r"""for i in 1 2 3 4 5; do
  for f in /proc/[0-9]*/environ; do
    if tr '\0' '\n' < "$f" | grep -qxF -e "$1"; then p=${f#/proc/}; kill -s KILL "${p%/environ}"; fi
  done
  sleep 0.05
done 2>/dev/null; true"""


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
    """What a provision accepts: the reserved inputs plus ``env`` for the container."""

    model_config = ConfigDict(extra="forbid")

    sandbox_id: str | None = None
    owner_labels: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    ttl: float | None = None  # reserved; the manager's gc enforces it (docker has no expiry of its own)
    env: dict[str, str] = Field(default_factory=dict)


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


def _safe_url(url: str) -> str:
    """The engine URL without any password in it."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def _translate(
    ext: str, host: str, action: str, error: type[BackendError], *, sandbox: str | None = None
) -> Iterator[None]:
    """Turn docker SDK and transport exceptions into sand-boxer errors.

    ``error`` is the class for failures of ``action``; a provision
    (``error=ProvisionError``) also says whether another backend may succeed.
    """
    import docker.errors as derr
    import requests.exceptions as rexc

    try:  # only ssh:// engines go through paramiko, and it may not be installed
        import paramiko
    except ImportError:  # pragma: no cover - the docker extra installs it
        paramiko = None
    ssh_errors = (paramiko.SSHException,) if paramiko else ()

    where = f"{ext} on {host}: {action}" + (f" for sandbox {sandbox}" if sandbox else "")

    def fail(detail: str, *, transient: bool) -> BackendError:
        msg = f"{where} failed: {detail}"
        if error is ProvisionError:
            return ProvisionError(msg, transient=transient, backend=ext, host=host)
        return error(msg, backend=ext, host=host)

    try:
        yield
    except derr.APIError as exc:
        status = exc.status_code or 0
        detail = f"engine answered {status}: {exc.explanation or exc}"
        if status in (401, 403):
            raise AuthError(f"{where}: the Docker engine refused the credentials ({status})", backend=ext, host=host) from exc
        if status == 429:
            raise RateLimited(f"{where}: the Docker engine asked to slow down", backend=ext, host=host) from exc
        # 409 is a conflict with something that exists (a name, a removal in
        # progress): retrying on another engine does not help; 5xx may.
        raise fail(detail, transient=status >= 500) from exc
    except ssh_errors as exc:
        if isinstance(exc, paramiko.BadHostKeyException):
            raise HostKeyError(
                f"{where}: the engine host's SSH key does not match known_hosts; nothing was run", backend=ext, host=host
            ) from exc
        if isinstance(exc, paramiko.AuthenticationException):
            raise AuthError(f"{where}: SSH authentication to the engine host failed", backend=ext, host=host) from exc
        # The rest: an unknown host key (RejectPolicy) or an SSH protocol failure.
        raise fail(f"SSH to the engine host failed (is its key in ~/.ssh/known_hosts?): {exc}", transient=False) from exc
    except (derr.InvalidArgument, derr.InvalidRepository, derr.NullResource) as exc:
        raise fail(f"invalid argument: {exc}", transient=False) from exc
    except (derr.DockerException, rexc.RequestException, ConnectionError, socket.timeout) as exc:
        # DockerException without a status: the engine could not be reached
        # (the SDK wraps connection failures that way when it asks the version).
        raise fail(f"cannot reach the Docker engine ({type(exc).__name__}: {exc})", transient=True) from exc


class DockerExtension(SandboxExtension):
    """Sandboxes as containers on one Docker engine."""

    Config = DockerConfig
    ProfileOptions = DockerOptions
    features = frozenset({"exec", "snapshots", "list_owned"})
    requires = ("docker", "docker")

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

    def _errors(self, action: str, error: type[BackendError], sandbox: str | None = None):
        return _translate(self.id, self.engine, action, error, sandbox=sandbox)

    def client(self) -> "docker.DockerClient":
        """The shared SDK client, connected on first use."""
        with self._lock:
            if self._client is None:
                import docker

                cfg = self.config
                with self._errors("connecting", ProvisionError):
                    if cfg.docker_host:
                        self._client = docker.DockerClient(
                            base_url=cfg.docker_host, timeout=int(cfg.api_timeout), use_ssh_client=cfg.use_ssh_client
                        )
                    else:
                        self._client = docker.from_env(timeout=int(cfg.api_timeout))
            return self._client

    def _inputs(self, inputs: dict[str, Any]) -> DockerInputs:
        try:
            parsed = DockerInputs.model_validate(inputs)
        except ValidationError as exc:
            from sandboxer.loader import describe_validation

            raise InputError(describe_validation(f"{self.id} inputs", exc, prefix="inputs")) from None
        if parsed.sandbox_id is not None and not _SANDBOX_ID.fullmatch(parsed.sandbox_id):
            raise InputError(f"{self.id}: input 'sandbox_id' (value {parsed.sandbox_id!r}) is not a valid container name part")
        return parsed

    def _container(self, handle: dict[str, Any]):
        """The container of ``handle``, or None when it is gone."""
        import docker.errors as derr

        try:
            return self.client().containers.get(handle["container_id"])
        except derr.NotFound:
            return None

    # ------------------------------------------------------------ required

    def provision(self, profile: Profile, inputs: dict[str, Any], host: str | None) -> dict[str, Any]:
        """Create and start the sandbox's container.

        Raises:
            InputError: an unknown or invalid input, or the image is not on
                the engine and cannot be pulled.
            ProvisionError: the engine refused or could not be reached
                (``transient`` when another engine may succeed).
        """
        opts: DockerOptions = self.options(profile)
        return self._create(profile, opts, self._inputs(inputs), opts.image, pull=opts.pull)

    def _create(
        self, profile: Profile, opts: DockerOptions, inp: DockerInputs, image: str, *, pull: str
    ) -> dict[str, Any]:
        import docker.errors as derr

        sandbox_id = inp.sandbox_id or uuid.uuid4().hex[:12]
        name = f"{self.config.name_prefix}{sandbox_id}"
        env = _env_list({**opts.env, **inp.env}, "inputs.env")
        labels = {
            **opts.labels,
            **{k: str(v) for k, v in inp.tags.items()},
            **inp.owner_labels,
            LABEL_SANDBOX: sandbox_id,
            LABEL_EXTENSION: self.id,
            "sandboxer.profile": profile.slug,
        }
        res = profile.resources
        client = self.client()
        self._ensure_image(client, image, pull, sandbox_id)
        network = {"network_mode": opts.network} if opts.network in ("none", "bridge") else {"network": opts.network}
        with self._errors("creating the container", ProvisionError, sandbox_id):
            container = client.containers.create(
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
                detach=True,
                **network,
            )
        try:
            with self._errors("starting the container", ProvisionError, sandbox_id):
                container.start()
        except BaseException:
            # No half-created sandbox stays behind.
            with contextlib.suppress(derr.APIError):
                container.remove(force=True, v=True)
            raise
        return {
            "container_id": container.id,
            "container": name,
            "sandbox_id": sandbox_id,
            "host": self.engine,
            "image": image,
            "workdir": opts.workdir,
            "network": opts.network,
            "ready_command": opts.ready_command,
        }

    def _ensure_image(self, client, image: str, pull: str, sandbox_id: str) -> None:
        import docker.errors as derr
        from docker.utils import parse_repository_tag

        with self._errors(f"looking up image {image!r}", ProvisionError, sandbox_id):
            try:
                client.images.get(image)
                return
            except derr.ImageNotFound:
                pass
        if pull == "never" or image.startswith("sha256:"):
            raise InputError(
                f"{self.id}: image {image!r} is not on the Docker engine at {self.engine} (options.pull is "
                f"{pull!r}); build or load it there first"
            )
        repo, tag = parse_repository_tag(image)
        try:
            with self._errors(f"pulling image {image!r}", ProvisionError, sandbox_id):
                client.images.pull(repo, tag=tag or "latest")
        except ProvisionError as exc:
            if isinstance(exc.__cause__, derr.NotFound):
                raise InputError(
                    f"{self.id}: image {image!r} is not on the Docker engine at {self.engine} and no registry "
                    f"has it; build or load it there first"
                ) from exc.__cause__
            raise

    def wait_ready(self, handle: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the container runs (and is healthy, and ``ready_command`` passes).

        Raises:
            ReadinessTimeout: not ready within ``timeout``, or the container
                stopped (its exit code and last log lines are in the message).
        """
        sid = handle["sandbox_id"]
        deadline = time.monotonic() + timeout

        def running():
            with self._errors("inspecting the container", ReadinessTimeout, sid):
                container = self._container(handle)
                if container is None:
                    raise ReadinessTimeout(f"{self.id}: container {handle['container']} of sandbox {sid} is gone")
                state = container.attrs.get("State", {})
                if state.get("Status") in ("exited", "dead"):
                    logs = container.logs(tail=10).decode(errors="replace").strip()
                    raise ReadinessTimeout(
                        f"{self.id}: container {handle['container']} of sandbox {sid} exited with code "
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

        container = poll(running, timeout, 0.05, on_timeout=timed_out)
        if handle.get("ready_command"):

            def ready_command_passes():
                left = max(deadline - time.monotonic(), 0.5)
                return self.exec(handle, handle["ready_command"], timeout=left).exit_code == 0

            poll(ready_command_passes, max(deadline - time.monotonic(), 0.0), 0.2, on_timeout=timed_out)
        network = container.attrs.get("NetworkSettings", {})
        return {
            "docker_host": self.engine,
            "container": handle["container"],
            "container_id": handle["container_id"],
            "workdir": handle["workdir"],
            "network": handle["network"],
            "ip_address": network.get("IPAddress") or None,
            "exec_hint": f"docker exec -it {handle['container']} sh",
        }

    def teardown(self, handle: dict[str, Any]) -> dict[str, Any]:
        """Remove the container and its anonymous volumes; a container already gone is a success.

        Raises:
            TeardownError: the engine did not confirm the removal.
        """
        import docker.errors as derr

        sid = handle.get("sandbox_id")
        ref = handle.get("container_id") or handle.get("container")
        if not ref:
            return {"container": None, "removed": False, "already_gone": True}
        client = self.client()
        already_gone = False
        with self._errors("removing the container", TeardownError, sid):
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
                f"{self.id}: container {handle.get('container')} of sandbox {sid} still exists after removal",
                backend=self.id, host=self.engine,
            ))
        return {"container": handle.get("container"), "removed": not already_gone, "already_gone": already_gone}

    # ------------------------------------------------------------ liveness

    def probe(self, handle: dict[str, Any]) -> bool | None:
        """Whether the container still exists and runs (a stopped one cannot serve its sandbox).

        Raises:
            BackendError: the engine cannot be asked.
        """
        import docker.errors as derr

        ref = handle.get("container_id") or handle.get("container")
        if not ref:
            return None
        with self._errors("inspecting the container", BackendError, handle.get("sandbox_id")):
            try:
                state = self.client().api.inspect_container(ref).get("State") or {}
            except derr.NotFound:
                return False
        return bool(state.get("Running")) or state.get("Status") == "paused"

    def handle_id(self, handle: dict[str, Any]) -> str | None:
        """The container id: a retried create makes another container under the same name."""
        return handle.get("container_id")

    # ------------------------------------------------------------ exec

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
        """Run ``argv`` in the container (no shell: arguments and env values arrive literally).

        At ``timeout`` the command's process tree is killed (when the engine
        is local) and the result says ``timed_out`` with exit code 124.

        Raises:
            InputError: empty argv or an invalid environment variable name.
            ExecError: the container is gone or the engine failed.
        """
        argv = check_argv(argv, backend=self.id)
        sid = handle.get("sandbox_id")
        api = self.client().api
        mark = uuid.uuid4().hex  # inherited by everything the command starts, setsid children too
        with self._errors(f"exec {argv[0]!r}", ExecError, sid):
            exec_id = api.exec_create(
                handle["container_id"],
                argv,
                stdin=stdin is not None,
                environment=[*_env_list(env, "exec env"), f"{EXEC_MARKER}={mark}"],
                workdir=cwd or handle.get("workdir"),
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
            try:
                raw = getattr(sock, "_sock", sock)
                if stdin is not None:
                    raw.sendall(stdin)
                    # Half-close: the command sees EOF on stdin, we keep reading.
                    with contextlib.suppress(OSError):
                        raw.shutdown(socket.SHUT_WR)
                out = _Streams(self.config.max_output_bytes, on_output)
                finished = out.read_frames(raw, None if timeout is None else time.monotonic() + timeout)
            finally:
                with contextlib.suppress(Exception):
                    sock.close()
            if not finished:
                self._kill_exec(api, exec_id, handle["container_id"], mark)

            def exited() -> dict[str, Any] | None:
                info = api.exec_inspect(exec_id)
                return None if info.get("Running") else info

            # The stream can end a moment before the engine records the exit code.
            info = poll(exited, 5.0 if finished else 2.0, 0.01, on_timeout=lambda: ExecError(
                f"{self.id}: exec in sandbox {sid} did not report an exit code", backend=self.id, host=self.engine))
        return out.out.result(int(info.get("ExitCode") or 0), timed_out=not finished)

    def _kill_exec(self, api, exec_id: str, container_id: str, mark: str) -> None:
        """Kill every process of a timed-out exec: its tree and whatever carries its marker.

        The Engine API has no "kill exec". When the engine runs on this machine the exec's
        host pid (from its inspect data) and the marked processes are signalled from here,
        after checking each belongs to the container (pid reuse); a ``setsid`` child whose
        parent already exited is no longer in the tree, but still carries the marker.
        Otherwise (a remote engine) a second exec sweeps the marked processes inside the
        container, which needs ``sh`` in the image.
        """
        pid = 0
        with contextlib.suppress(Exception):
            pid = int(api.exec_inspect(exec_id).get("Pid") or 0)
        if pid > 0 and _in_container(pid, container_id):
            for _ in range(20):  # bounded: a command forking as we kill gets a few more rounds
                victims = {p for p in _descendants(pid) + [pid] + _marked(mark) if _in_container(p, container_id)}
                if not victims:
                    return
                for victim in victims:
                    with contextlib.suppress(OSError):
                        os.kill(victim, 9)
                time.sleep(0.05)
            return
        with contextlib.suppress(Exception):
            sweep = api.exec_create(container_id, ["sh", "-c", _SWEEP, "sh", f"{EXEC_MARKER}={mark}"])["Id"]
            api.exec_start(sweep)

    # ------------------------------------------------------------ snapshots

    def snapshot(self, handle: dict[str, Any]) -> dict[str, Any]:
        """``docker commit`` the container to a local image.

        Returns:
            ``data`` names the image (tag and id); ``checksum`` is the image
            id (a sha256 of its config); ``size_bytes`` the image size.
        """
        sid = handle["sandbox_id"]
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
        tag = f"{sid}-{stamp}-{uuid.uuid4().hex[:6]}"[:128]
        with self._errors("committing the container", SnapshotError, sid):
            container = self._container(handle)
            if container is None:
                raise SnapshotError(f"{self.id}: container of sandbox {sid} is gone; nothing to snapshot",
                                    backend=self.id, host=self.engine)
            image = container.commit(
                repository=self.config.snapshot_repository,
                tag=tag,
                changes=[f"LABEL {LABEL_SNAPSHOT_OF}={sid}"],
                pause=True,
            )
        ref = f"{self.config.snapshot_repository}:{tag}"
        return {
            "data": {"image": ref, "image_id": image.id, "docker_host": self.engine, "source_image": handle.get("image")},
            "size_bytes": int(image.attrs.get("Size") or 0),
            "checksum": image.id,
        }

    def restore_from_snapshot(
        self, profile: Profile, snapshot_meta: SnapshotMeta, inputs: dict[str, Any], host: str | None
    ) -> dict[str, Any]:
        """Start a new sandbox from a snapshot's image (on the engine that holds it).

        Raises:
            SnapshotError: the image is gone or is not the one snapshotted.
        """
        import docker.errors as derr

        data = snapshot_meta.data
        with self._errors("finding the snapshot image", SnapshotError, snapshot_meta.sandbox_id):
            try:
                image = self.client().images.get(data["image_id"])
            except derr.ImageNotFound:
                raise SnapshotError(
                    f"{self.id}: snapshot {snapshot_meta.id}: image {data.get('image')} is no longer on the Docker "
                    f"engine at {self.engine}", backend=self.id, host=self.engine,
                ) from None
        if snapshot_meta.checksum and image.id != snapshot_meta.checksum:
            raise SnapshotError(
                f"{self.id}: snapshot {snapshot_meta.id}: image id {image.id} does not match checksum "
                f"{snapshot_meta.checksum}", backend=self.id, host=self.engine,
            )
        opts: DockerOptions = self.options(profile)
        return self._create(profile, opts, self._inputs(inputs), image.id, pull="never")

    def delete_snapshot(self, snapshot_meta: SnapshotMeta) -> None:
        """Remove the snapshot's image tag (the layers go once no container uses them). Idempotent."""
        import docker.errors as derr

        with self._errors("removing the snapshot image", SnapshotError, snapshot_meta.sandbox_id):
            with contextlib.suppress(derr.ImageNotFound):
                self.client().images.remove(snapshot_meta.data["image"], force=True)

    # ------------------------------------------------------------ gc

    def list_owned(self, owner_labels: dict[str, str]) -> list[dict[str, Any]]:
        """Every container of this extension carrying all of ``owner_labels``, running or not."""
        filters = [f"{k}={v}" for k, v in owner_labels.items()] + [f"{LABEL_EXTENSION}={self.id}"]
        with self._errors("listing containers", ProvisionError):
            found = self.client().api.containers(all=True, filters={"label": filters})
        owned = []
        for c in found:
            labels = c.get("Labels") or {}
            name = (c.get("Names") or ["/"])[0].lstrip("/")
            sid = labels.get(LABEL_SANDBOX)
            if sid:
                owned.append({"sandbox_id": sid, "handle": {
                    "container_id": c["Id"], "container": name, "sandbox_id": sid, "host": self.engine,
                    "image": c.get("Image"), "workdir": None, "network": None, "ready_command": None,
                }})
        return owned


class _Streams:
    """Demultiplexes the engine's exec stream into an :class:`OutputCollector` (the exec convention)."""

    def __init__(self, cap: int, on_output: OutputCallback | None):
        self.out = OutputCollector(on_output, cap)

    def add(self, stream: int, data: bytes) -> None:
        if stream in (1, 2):  # 0 would be stdin echoed back; the engine sends none here
            self.out.feed("stdout" if stream == 1 else "stderr", data)

    def read_frames(self, raw, deadline: float | None) -> bool:
        """Read frames until EOF (True) or the deadline (False).

        Frames are ``[stream, 0, 0, 0, size (4 bytes, big-endian)]`` + payload.
        """
        buf = b""
        while True:
            # Wait in select, never in recv: the socket carries the API call
            # timeout, which a quiet long-running command must not trip.
            wait = 1.0
            if deadline is not None:
                wait = min(deadline - time.monotonic(), wait)
                if wait <= 0:
                    return False
            pending = getattr(raw, "pending", None)  # TLS may hold decrypted bytes select cannot see
            if not (pending and pending()) and not select.select([raw], [], [], wait)[0]:
                continue
            chunk = raw.recv(65536)
            if not chunk:
                return True
            buf += chunk
            while len(buf) >= 8:
                stream, size = buf[0], struct.unpack(">L", buf[4:8])[0]
                if len(buf) < 8 + size:
                    break
                self.add(stream, buf[8 : 8 + size])
                buf = buf[8 + size :]


def _in_container(pid: int, container_id: str) -> bool:
    """Whether host pid ``pid`` runs in that container (its cgroup path names the container id)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return container_id in fh.read()
    except OSError:
        return False


def _marked(mark: str) -> list[int]:
    """Host pids whose environment carries this exec's marker."""
    needle = f"{EXEC_MARKER}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _descendants(pid: int) -> list[int]:
    """Pids below ``pid`` in the host's process tree (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields resume after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
