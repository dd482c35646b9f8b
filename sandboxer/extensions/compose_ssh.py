"""``ext.compose-ssh``: one docker compose project per sandbox, on a pool of SSH hosts.

A sandbox is ``<workspace_root>/<sandbox id>`` on one host: ``.sandboxer.json``
(the :class:`ComposeHandle` plus owner labels, read back by :meth:`ComposeSSH.list_owned`)
and ``repo/`` (the clone), brought up as project ``<prefix><sandbox id>``.

Rules it keeps: every remote step is a fixed script whose data arrive as
quoted positional parameters (see :mod:`sandboxer.ssh`); names are checked
before anything runs; a host slot is claimed under ``flock`` so concurrent
provisions cannot overfill a host; a failed provision tears down what it
started before raising; teardown sweeps by compose label, so a host that lost
the workspace still ends clean.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets as _secrets
import shlex
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandboxer.errors import (
    AuthError,
    BackendError,
    CapacityUnavailable,
    ExecError,
    HostKeyError,
    InputError,
    ProvisionError,
    ReadinessTimeout,
    SnapshotError,
    TeardownError,
)
from sandboxer.contract import OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult, TeardownReport
from sandboxer import forward
from sandboxer.execution import check_argv
from sandboxer.extensions.sftp_files import SFTPFiles, SFTPFilesMixin
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.models import ExecResult, Profile, SnapshotMeta
from sandboxer.poll import poll
from sandboxer.ssh import (
    ConnectionCache,
    SSHConnection,
    SSHHostConfig,
)
from sandboxer.workspace import (
    GIT_CLONE_SCRIPT,
    WorkspaceHandle,
    check_ref,
    check_repo,
    check_root,
    checked_archive,
    delete_archive,
    owned_from_meta,
    remote_path_ok,
    sha256_file,
    workspace_cwd,
)

log = logging.getLogger(__name__)

# Python patterns are used with fullmatch only (re.match(r"...$") accepts a trailing newline);
# the same text as a pydantic ``pattern`` is anchored by ^...$ under Rust regex, where $ is the end.
_NAME = r"[a-z0-9][a-z0-9_-]*"
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_COMPOSE_FILE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]{0,199}")
_INPUTS = {"repo", "ref", "compose_file", "services", "project"}
_PROJECT_LABEL = "com.docker.compose.project"

_EXIT_FULL, _EXIT_CLONE, _EXIT_REF, _EXIT_UP, _EXIT_NO_COMPOSE = 75, 81, 82, 83, 84
_CLAIM_TIMEOUT = 60.0  # seconds for the slot claim (flock wait included)

# docker compose v2 or docker-compose v1 with -p/-f; $v, $project, $file set by the caller.
_DC = r"""
dc() {
  if [ -n "$file" ]; then set -- -p "$project" -f "$file" "$@"; else set -- -p "$project" "$@"; fi
  if [ "$v" = v2 ]; then docker compose "$@"; else docker-compose "$@"; fi
}
"""

# $1 root, $2 sandbox id, $3 capacity, $4 compose (auto|v1|v2). Counts and claims under flock.
_CLAIM = r"""
set -u
root=$1; id=$2; cap=$3; v=$4
mkdir -p -- "$root" || exit 1
exec 9>>"$root/.sandboxer.lock"
command -v flock >/dev/null 2>&1 && flock -w 30 9
if [ "$v" = auto ]; then
  if docker compose version >/dev/null 2>&1; then v=v2
  elif command -v docker-compose >/dev/null 2>&1; then v=v1
  else echo "neither 'docker compose' nor 'docker-compose' works on this host" >&2; exit 84; fi
fi
n=0
for d in "$root"/*/; do [ -d "$d" ] && n=$((n+1)); done
if [ "$n" -ge "$cap" ]; then echo "full $n/$cap"; exit 75; fi
# not -p: an existing directory or symlink of that name is refused, never reused
mkdir -- "$root/$id" || exit 1
echo "compose $v"
"""

# $1 dir, $2 repo ('' = already there), $3 ref, $4 compose file, $5 project, $6 meta json, $7 v; rest: services
_UP = GIT_CLONE_SCRIPT + _DC + r"""
set -u
dir=$1; repo=$2; ref=$3; file=$4; project=$5; meta=$6; v=$7; shift 7
printf '%s\n' "$meta" > "$dir/.sandboxer.json" || exit 1
if [ -n "$repo" ]; then git_clone "$repo" "$dir/repo" "$ref" || exit $?; fi
cd "$dir/repo" || exit 1
dc up -d "$@" || exit 83
echo "@@services"
dc config --services || exit 83
"""

# $1 dir, $2 project: "present" while the workspace exists and a container of the project runs.
_PROBE = r"""
[ -d "$1" ] || { echo gone; exit 0; }
ids=$(docker ps -q --filter "label=com.docker.compose.project=$2") || exit 1
if [ -n "$ids" ]; then echo present; else echo gone; fi
"""

# $1 project. One JSON document of every container of the project.
_INSPECT = r"""
ids=$(docker ps -aq --filter "label=com.docker.compose.project=$1") || exit 1
if [ -z "$ids" ]; then echo '[]'; else docker inspect $ids; fi
"""

# $1 dir, $2 project, $3 v, $4 compose file. Compose down, then sweep by label, then verify.
# Networks count like containers and volumes: a stack that left only its network was not
# "gone", and a network that survives the sweep fails the teardown (naming it) instead of leaking.
_DOWN = _DC + r"""
dir=$1; project=$2; v=$3; file=$4
f="label=com.docker.compose.project=$project"
state=gone
if [ -e "$dir" ] || [ -n "$(docker ps -aq --filter "$f")$(docker volume ls -q --filter "$f")$(docker network ls -q --filter "$f")" ]; then
  state=removed
fi
why=""
if [ -f "$dir/repo/${file:-docker-compose.yml}" ] || [ -f "$dir/repo/compose.yaml" ]; then
  (cd "$dir/repo" && dc down -v --remove-orphans -t 5) >/dev/null 2>&1 || why="compose down failed"
fi
ids=$(docker ps -aq --filter "$f"); [ -z "$ids" ] || docker rm -f -v $ids >/dev/null
vols=$(docker volume ls -q --filter "$f"); [ -z "$vols" ] || docker volume rm -f $vols >/dev/null
nets=$(docker network ls -q --filter "$f")
if [ -n "$nets" ]; then err=$(docker network rm $nets 2>&1 >/dev/null) || why="${why:+$why; }$(printf '%s' "$err" | tr '\n' ' ')"; fi
rm -rf -- "$dir"
left=""
for x in $(docker ps -aq --filter "$f"); do left="$left, container $x"; done
for x in $(docker volume ls -q --filter "$f"); do left="$left, volume $x"; done
for x in $(docker network ls --filter "$f" --format '{{.Name}}'); do left="$left, network $x"; done
[ ! -e "$dir" ] || left="$left, workspace $dir"
if [ -n "$left" ]; then echo "left behind: ${left#, }${why:+ ($why)}" >&2; exit 1; fi
echo "$state"
"""

# $1 project. "<volume name> <compose short name>" per named volume of the project.
_VOLUMES = r"""docker volume ls -q --filter "label=com.docker.compose.project=$1" | while read -r name; do
  printf '%s %s\n' "$name" "$(docker volume inspect -f '{{index .Labels "com.docker.compose.volume"}}' "$name")"
done"""

# $1 volume, $2 project, $3 short name, $4 helper image: create the volume and fill it from stdin.
_VOLUME_RESTORE = r"""
docker volume create --label "com.docker.compose.project=$2" --label "com.docker.compose.volume=$3" "$1" >/dev/null &&
docker run --rm -i --network none -v "$1:/v" "$4" tar -C /v -xf -
"""


class ComposeHost(SSHHostConfig):
    """One host of the pool."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    capacity: int = Field(default=4, ge=0, description="most sandboxes at once on this host")
    docker_host: str | None = Field(default=None, pattern=r"^(unix|tcp|ssh)://[A-Za-z0-9_./:@-]+$",
                                    description="DOCKER_HOST for commands on the host")
    workspace_root: str | None = Field(default=None, description="overrides the pool's workspace_root")

    @field_validator("workspace_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        return None if v is None else check_root(v)


class ComposeSSHConfig(BaseModel):
    """``config:`` of ``ext.compose-ssh``."""

    model_config = ConfigDict(extra="forbid")

    hosts: list[ComposeHost] = Field(min_length=1)
    workspace_root: str = "/var/lib/sandboxer/compose"
    snapshot_dir: Path = Path("~/.local/share/sandboxer/snapshots/compose-ssh")
    helper_image: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./:@-]*$",
                                     description="image with tar, for volume snapshots")
    compose_command: Literal["auto", "v1", "v2"] = "auto"
    poll_interval: float = Field(default=0.25, gt=0)

    @field_validator("workspace_root")
    @classmethod
    def _root(cls, v: str) -> str:
        return check_root(v)

    @field_validator("snapshot_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @model_validator(mode="after")
    def _unique_names(self) -> "ComposeSSHConfig":
        names = [h.name for h in self.hosts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"host names must be unique; repeated: {', '.join(dup)}")
        return self


class ComposeProfileOptions(BaseModel):
    """``options:`` of a profile served by ``ext.compose-ssh``."""

    model_config = ConfigDict(extra="forbid")

    project_prefix: str = Field(default="sbx-", pattern=f"^{_NAME}$")
    exec_service: str | None = Field(default=None, pattern=f"^{_SERVICE.pattern}$",
                                     description="exec runs in this service; None: a shell in the workspace")
    command_timeout: float = Field(default=600.0, gt=0, description="deadline of clone and compose up")


class ComposeHandle(WorkspaceHandle):
    """One compose stack in its workspace (``repo_dir`` is the clone, brought up as ``project``)."""

    address: str | None = Field(default=None, description="the host's SSH address, for operators")
    port: int | None = None
    user: str | None = None
    repo_dir: str = Field(min_length=1)
    project: str = Field(min_length=1, description="the compose project, lower case as compose compares it")
    compose: Literal["v1", "v2"] = Field(description="docker-compose (v1) or docker compose (v2) on the host")
    compose_file: str = Field(default="", description="relative to repo_dir; '' compose's default")
    services: list[str] = Field(default_factory=list, description="what readiness waits for")
    exec_service: str | None = Field(default=None, description="exec runs there; None: a shell in the workspace")
    #: the process forwarding ``network.expose`` ports of the host to 127.0.0.1 here (sandboxer/forward.py)
    forwarder: forward.Forwarder | None = None


class ServicePort(BaseModel):
    """One published port of a service's container."""

    host_ip: str | None = None
    host_port: int


class ServiceStatus(BaseModel):
    """One service as ``docker inspect`` saw it at readiness."""

    state: str | None = None
    health: str | None = None
    ports: dict[str, list[ServicePort]] = Field(default_factory=dict, description="by container port ('8080/tcp')")
    container: str = ""
    exit_code: int | None = None
    restarts: bool = False


class ComposeReachability(Reachability):
    """How to reach a ready stack: its host over SSH, and each service's published ports."""

    remote_dir: str
    compose_project: str
    services: dict[str, ServiceStatus] = Field(default_factory=dict)


def _input_error(sandbox: str, msg: str) -> InputError:
    return InputError(f"sandbox {sandbox}: {msg}")


class ComposeSSH(SFTPFilesMixin, SandboxExtension):
    """Docker compose stacks over SSH (see the module docstring)."""

    Config = ComposeSSHConfig
    ProfileOptions = ComposeProfileOptions
    Handle = ComposeHandle
    features = frozenset({"exec", "snapshots", "list_owned", "files"})
    # the remote host's network is the sandbox's: nothing narrower can be promised; exposed ports
    # (published by the stack on its host) are forwarded to 127.0.0.1 here by a process of their own
    enforces = frozenset({"network:internet", "expose"})
    requires = ("paramiko", "ssh")

    def __init__(self, manifest: Any, config: ComposeSSHConfig):
        super().__init__(manifest, config)
        self.cfg: ComposeSSHConfig = config
        self._cache = ConnectionCache(backend=manifest.id)

    # ------------------------------------------------------------ helpers

    def hosts(self) -> dict[str, int | None]:
        return {h.name: h.capacity for h in self.cfg.hosts}

    def _host(self, name: str) -> ComposeHost:
        for h in self.cfg.hosts:
            if h.name == name:
                return h
        raise ProvisionError(f"{self.id}: no host named {name!r}; configured: "
                             f"{', '.join(h.name for h in self.cfg.hosts)}", backend=self.id)

    def _root(self, h: ComposeHost) -> str:
        return h.workspace_root or self.cfg.workspace_root

    def _conn(self, host: ComposeHost, fail: type[BackendError] = ProvisionError) -> SSHConnection:
        return self._cache.get(host, host=host.name, fail=fail)

    @staticmethod
    def _argv(host: ComposeHost, script: str, *args: str) -> list[str]:
        env = ["env", f"DOCKER_HOST={host.docker_host}"] if host.docker_host else []
        return [*env, "sh", "-c", script, "sh", *args]

    def _check_inputs(self, request: ProvisionRequest, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The request's inputs (or ``inputs`` in their place) checked and normalised."""
        inputs = request.inputs if inputs is None else inputs
        profile = request.profile
        sid = request.sandbox_id
        if not _SANDBOX_ID.fullmatch(sid):
            raise InputError(f"{self.id}: sandbox_id {sid!r} must match {_SANDBOX_ID.pattern}")
        unknown = sorted(set(inputs) - _INPUTS)
        if unknown:
            raise _input_error(sid, f"unknown input(s) {', '.join(unknown)}; "
                                    f"{self.id} takes repo, ref, compose_file, services, project")
        if "repo" not in inputs:
            raise _input_error(sid, "input 'repo' is required (an https/ssh git URL or a path on the host)")
        opts = self.options(profile)
        try:
            repo = check_repo(inputs["repo"])
            ref = check_ref(inputs["ref"]) if inputs.get("ref") else ""
        except InputError as exc:
            raise _input_error(sid, str(exc)) from None
        cfile = inputs.get("compose_file") or ""
        if cfile and (not isinstance(cfile, str) or not _COMPOSE_FILE.fullmatch(cfile)
                      or ".." in cfile.split("/") or cfile.startswith("/")):
            raise _input_error(sid, f"input compose_file {cfile!r} must be a relative path inside the repo")
        services = inputs.get("services") or []
        if isinstance(services, str):
            services = [services]
        for s in services:
            if not isinstance(s, str) or not _SERVICE.fullmatch(s):
                raise _input_error(sid, f"input services: {s!r} is not a service name")
        project = inputs.get("project") or opts.project_prefix + re.sub(r"[^a-z0-9_-]", "-", sid.lower())
        # compose folds project names to lower case, so "Proj" and "proj" are one project
        if not isinstance(project, str) or not re.fullmatch(_NAME, project.lower()) or len(project) > 63:
            raise _input_error(sid, f"project name {project!r} must match {_NAME} (case is ignored)")
        project = project.lower()
        return {"sandbox_id": sid, "repo": repo, "ref": ref, "compose_file": cfile, "services": list(services),
                "project": project, "exec_service": opts.exec_service, "timeout": opts.command_timeout,
                "owner_labels": dict(request.owner_labels)}

    def _claim(self, want: dict[str, Any], host: str | None) -> tuple[ComposeHost, SSHConnection, str]:
        """Connect to the first host with room and create the workspace there."""
        candidates = [self._host(host)] if host else list(self.cfg.hosts)
        seen: list[str] = []
        full = 0
        for h in candidates:
            try:
                conn = self._conn(h)
            except (HostKeyError, AuthError):
                raise
            except ProvisionError as exc:
                seen.append(f"{h.name}: {exc}")
                continue
            ws = remote_path_ok(self._root(h), want["sandbox_id"])
            res = conn.run(self._argv(h, _CLAIM, self._root(h), want["sandbox_id"],
                                      str(h.capacity), self.cfg.compose_command), timeout=_CLAIM_TIMEOUT,
                           fail=ProvisionError)
            if res.exit_code == _EXIT_FULL:
                full += 1
                seen.append(f"{h.name}: full ({res.stdout.split()[-1]})")
                continue
            if res.exit_code != 0:  # nothing was created: the claim fails before or at mkdir
                raise ProvisionError(f"{self.id}: cannot create workspace {ws} on {h.name}: "
                                     f"{res.stderr.strip() or res.stdout.strip()}", backend=self.id, host=h.name,
                                     transient=res.exit_code != 1)
            return h, conn, res.stdout.split()[-1]
        if full == len(candidates):
            raise CapacityUnavailable(f"{self.id}: every host is at capacity: {'; '.join(seen)}", backend=self.id)
        raise ProvisionError(f"{self.id}: no host could take sandbox {want['sandbox_id']}: {'; '.join(seen)}",
                             backend=self.id, transient=True)

    def _handle(self, h: ComposeHost, want: dict[str, Any], v: str) -> ComposeHandle:
        ws = remote_path_ok(self._root(h), want["sandbox_id"])
        return ComposeHandle(host=h.name, address=h.address, port=h.port, user=h.user,
                             sandbox_id=want["sandbox_id"], remote_dir=ws, repo_dir=ws + "/repo",
                             project=want["project"], compose=v, compose_file=want["compose_file"],
                             services=want["services"], exec_service=want["exec_service"], repo=want["repo"],
                             ref=want["ref"])

    def _up(self, h: ComposeHost, conn: SSHConnection, handle: ComposeHandle, want: dict[str, Any],
            clone: bool, fail: type[BackendError]) -> ComposeHandle:
        meta = json.dumps({"handle": handle.model_dump(mode="json"), "owner_labels": want["owner_labels"]},
                          separators=(",", ":"))
        res = conn.run(self._argv(h, _UP, handle.remote_dir, want["repo"] if clone else "", want["ref"],
                                  handle.compose_file, handle.project, meta, handle.compose,
                                  *handle.services), timeout=want["timeout"], fail=fail)
        if res.exit_code != 0:
            self._cleanup(h, conn, handle.remote_dir, handle.project, handle.compose, handle.compose_file)
            what = {_EXIT_CLONE: f"git clone of {want['repo']!r} failed",
                    _EXIT_REF: f"ref {want['ref']!r} not found in the repo",
                    _EXIT_UP: f"docker compose up of project {handle.project} failed"}.get(
                        res.exit_code, f"setup exited {res.exit_code}")
            detail = res.stderr.strip()[-1500:]
            if res.timed_out:
                what += f" (killed at its {want['timeout']:g}s deadline)"
            kw: dict[str, Any] = {"backend": self.id, "host": h.name}
            if fail is ProvisionError:
                kw["transient"] = res.exit_code == _EXIT_UP
            raise fail(f"{self.id}: sandbox {handle.sandbox_id} on {h.name}: {what}: {detail}", **kw)
        if not handle.services:
            handle.services = res.stdout.split("@@services", 1)[-1].split()
        return handle

    def _cleanup(self, h: ComposeHost, conn: SSHConnection, ws: str, project: str, v: str, cfile: str) -> None:
        """Best effort removal after a failed start; the original error is what matters."""
        with contextlib.suppress(BackendError):
            conn.run(self._argv(h, _DOWN, ws, project, v, cfile), timeout=120, fail=ProvisionError)

    # ------------------------------------------------------------ contract

    def resource_names(self, request: ProvisionRequest) -> list[str]:
        """The compose project (lower case, as compose compares it) and the workspace directory.

        Raises:
            InputError: an input is refused (checked here, before any connection).
        """
        want = self._check_inputs(request)
        h = {h.name: h for h in self.cfg.hosts}.get(request.host or "")
        if h is None:
            return []  # no host chosen yet: provision picks one and checks there
        machine = f"{h.address}:{h.port}"
        # Two pool entries may share one engine (a remote DOCKER_HOST): projects are named per engine.
        engine = h.docker_host if h.docker_host and not h.docker_host.startswith("unix://") else \
            f"{machine}{(h.docker_host or '').removeprefix('unix://')}"
        return [f"compose project {engine} {want['project']}",
                f"workspace {machine}:{remote_path_ok(self._root(h), want['sandbox_id'])}"]

    def deadline(self, profile: Profile) -> float:
        """Connecting (each host of the pool in turn, at worst), the claim, clone and ``up``, then ready."""
        connect = sum(h.connect_timeout + h.banner_timeout + h.auth_timeout for h in self.cfg.hosts)
        return connect + _CLAIM_TIMEOUT + self.options(profile).command_timeout + float(profile.ready_timeout)

    def probe(self, handle: ComposeHandle) -> bool | None:
        """True while the workspace exists and the project has a running container (one SSH command).

        Raises:
            BackendError: the host or its Docker engine cannot be asked.
        """
        h = self._host(handle.host)
        res = self._conn(h, BackendError).run(
            self._argv(h, _PROBE, handle.remote_dir, handle.project), timeout=60, fail=BackendError)
        if res.exit_code != 0 or res.stdout.strip() not in ("present", "gone"):
            raise BackendError(f"{self.id}: cannot ask {h.name} about sandbox {handle.sandbox_id}: "
                               f"{(res.stderr or res.stdout).strip()[-500:]}", backend=self.id, host=h.name)
        return res.stdout.strip() == "present"

    def handle_id(self, handle: ComposeHandle) -> str | None:
        """``<host>/<project>``: a retried create on another host is another stack."""
        return f"{handle.host}/{handle.project}"

    def provision(self, request: ProvisionRequest) -> ComposeHandle:
        want = self._check_inputs(request)
        h, conn, v = self._claim(want, request.host)
        handle = self._handle(h, want, v)
        return self._forwarded(h, self._up(h, conn, handle, want, clone=True, fail=ProvisionError), request,
                               ProvisionError)

    def _forwarded(self, h: ComposeHost, handle: ComposeHandle, request: ProvisionRequest,
                   fail: type[BackendError]) -> ComposeHandle:
        """The stack's exposed ports forwarded here (``network.expose``: ports it publishes on its
        host); if the forward cannot start, the stack is torn down before the error is raised."""
        ports = request.profile.network.expose
        if not ports:
            return handle
        try:
            from sandboxer.secrets import secret_env_names

            secrets = {n: os.environ[n] for n in secret_env_names(h) if n in os.environ}
            handle.forwarder = forward.start(h, ports, float(request.ttl), backend=self.id, host=h.name,
                                             secrets=secrets)
        except BaseException as exc:
            try:
                self.teardown(handle)
            except BackendError as cleanup:
                log.warning("%s: tearing down %s after a failed forward: %s", self.id, handle.sandbox_id, cleanup)
            if isinstance(exc, ProvisionError) and fail is not ProvisionError:
                raise fail(str(exc), backend=self.id, host=h.name) from None
            raise
        return handle

    def _containers(self, h: ComposeHost, handle: ComposeHandle, fail: type[BackendError]) -> list[dict]:
        conn = self._conn(h, fail)
        res = conn.run(self._argv(h, _INSPECT, handle.project), timeout=60, fail=fail, check=True)
        try:
            return json.loads(res.stdout or "[]")
        except ValueError as exc:
            raise fail(f"{self.id}: unreadable docker inspect output on {h.name}: {exc}",
                       backend=self.id, host=h.name) from None

    @staticmethod
    def _services(containers: list[dict]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for c in containers:
            labels = (c.get("Config") or {}).get("Labels") or {}
            state = c.get("State") or {}
            ports = {}
            for port, binds in ((c.get("NetworkSettings") or {}).get("Ports") or {}).items():
                ports[port] = [{"host_ip": b.get("HostIp"), "host_port": int(b["HostPort"])}
                               for b in binds or [] if b.get("HostPort")]
            restart = (((c.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name")) or "no"
            out[labels.get("com.docker.compose.service", c.get("Name", "?"))] = {
                "state": state.get("Status"), "health": (state.get("Health") or {}).get("Status"),
                "ports": ports, "container": (c.get("Id") or "")[:12],
                "exit_code": state.get("ExitCode"), "restarts": restart != "no"}
        return out

    def wait_ready(self, handle: ComposeHandle, timeout: float = 60.0) -> ComposeReachability:
        h = self._host(handle.host)
        waiting: list[str] = []

        def check() -> dict[str, Any] | None:
            services = self._services(self._containers(h, handle, ProvisionError))
            dead = [f"{s} exited with code {v['exit_code']}" for s, v in services.items()
                    if v["state"] in ("exited", "dead") and not v["restarts"]]
            if dead:  # no restart policy: it will not come back by waiting
                raise ReadinessTimeout(f"{self.id}: sandbox {handle.sandbox_id} on {h.name} will not become "
                                       f"ready: {', '.join(dead)}", backend=self.id, host=h.name)
            waiting[:] = [
                f"{s}: {services[s]['state']}{'/' + services[s]['health'] if services[s]['health'] else ''}"
                if s in services else f"{s}: no container"
                for s in handle.services
                if s not in services or services[s]["state"] != "running"
                or services[s]["health"] not in (None, "healthy")]
            return None if waiting else services

        services = poll(check, timeout, self.cfg.poll_interval, transient=(ProvisionError,), max_interval=0.5,
                        on_timeout=lambda: ReadinessTimeout(
                            f"{self.id}: sandbox {handle.sandbox_id} on {h.name} not ready within {timeout:g}s; "
                            f"waiting for {', '.join(waiting) or 'the host to answer'}",
                            backend=self.id, host=h.name))
        return ComposeReachability(ssh=h.ssh_command(), host=h.name, address=h.address, remote_dir=handle.remote_dir,
                                   compose_project=handle.project, services=services,
                                   urls=handle.forwarder.urls() if handle.forwarder else {})

    def teardown(self, handle: ComposeHandle) -> TeardownReport:
        forward.stop(handle.forwarder)
        h = self._host(handle.host)
        ws = remote_path_ok(self._root(h), handle.sandbox_id)
        conn = self._conn(h, TeardownError)
        res = conn.run(self._argv(h, _DOWN, ws, handle.project, handle.compose, handle.compose_file),
                       timeout=180, fail=TeardownError)
        if res.exit_code != 0:
            raise TeardownError(f"{self.id}: sandbox {handle.sandbox_id} on {h.name}: teardown incomplete: "
                                f"{res.stderr.strip()[-800:]}", backend=self.id, host=h.name)
        gone = res.stdout.strip().endswith("gone")
        return TeardownReport(already_gone=gone, removed=[] if gone else [ws],
                              detail={"host": h.name, "compose_project": handle.project})

    # ------------------------------------------------------------ exec

    def exec(self, handle: ComposeHandle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        """Run ``argv`` in the profile's ``exec_service``, or on the host in the workspace
        (the exec convention of sandboxer/execution.py, through :meth:`SSHConnection.run`)."""
        argv = check_argv(argv, backend=self.id)
        service = handle.exec_service
        if service:
            return self.exec_in_service(handle, service, argv, env=env, cwd=cwd, timeout=timeout, stdin=stdin,
                                        on_output=on_output)
        h = self._host(handle.host)
        where = workspace_cwd(handle.remote_dir, handle.repo_dir, cwd, handle.sandbox_id)
        return self._conn(h, ExecError).run(list(argv), cwd=where, env=env, stdin=stdin, timeout=timeout,
                                            on_output=on_output, fail=ExecError)

    def exec_in_service(self, handle: ComposeHandle, service: str, argv: list[str], *,
                        env: dict[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
                        stdin: bytes | None = None, on_output: OutputCallback | None = None) -> ExecResult:
        """``docker exec`` into the first running container of ``service``.

        Env values reach the container through the docker CLI's environment
        (``-e NAME``), so they never appear on a command line. So does the
        deadline marker of :data:`sandboxer.ssh.DEADLINE_WRAPPER`: at the deadline
        the processes in the container are killed from the host, which needs the
        SSH user to be allowed to signal them (root, or a rootless engine of its own).
        """
        if not _SERVICE.fullmatch(service):
            raise InputError(f"sandbox {handle.sandbox_id}: {service!r} is not a service name")
        h = self._host(handle.host)
        opts = ["-i"] if stdin is not None else []
        opts += ["-w", cwd] if cwd else []
        # the deadline marker: the host's sweep finds the container's processes by it (killing the
        # docker CLI alone would leave them running)
        opts += ["-e", "SANDBOXER_EXEC"]
        for name in env or {}:
            opts += ["-e", name]
        script = ('cid=$(docker ps -q --filter "label=com.docker.compose.project=$1" '
                  '--filter "label=com.docker.compose.service=$2" | head -n 1)\n'
                  '[ -n "$cid" ] || { echo "no running container for service $2" >&2; exit 125; }\n'
                  'shift 2\nexec docker exec ' + " ".join(shlex.quote(o) for o in opts) + ' "$cid" "$@"')
        return self._conn(h, ExecError).run(self._argv(h, script, handle.project, service, *argv), env=env,
                                            stdin=stdin, timeout=timeout, on_output=on_output, fail=ExecError)

    def _sftp_files(self, handle) -> SFTPFiles:  # type: ignore[no-untyped-def]
        """Its files over SFTP (sandboxer/extensions/sftp_files.py): the workspace, from where exec runs."""
        return SFTPFiles(self._conn(self._host(handle.host), ExecError), ext_id=self.id, sandbox_id=handle.sandbox_id,
                         root=handle.remote_dir, base=handle.repo_dir)

    # ------------------------------------------------------------ list_owned

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        found = []
        script = 'for f in "$1"/*/.sandboxer.json; do [ -f "$f" ] && head -n 1 "$f"; done; true'
        for h in self.cfg.hosts:
            try:
                res = self._conn(h).run(["sh", "-c", script, "sh", self._root(h)], timeout=60, fail=ProvisionError)
            except ProvisionError:
                continue  # an unreachable host cannot tell; gc asks again next time
            found += owned_from_meta(res.stdout, owner_labels, ComposeHandle)
        return found

    # ------------------------------------------------------------ snapshots

    def snapshot(self, handle: ComposeHandle) -> SnapshotResult:
        """Tar the workspace and each named volume of the project into one local archive."""
        h = self._host(handle.host)
        conn = self._conn(h, SnapshotError)
        key = f"{handle.sandbox_id}-{time.strftime('%Y%m%dT%H%M%S')}-{_secrets.token_hex(4)}"
        self.cfg.snapshot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        archive = self.cfg.snapshot_dir / f"{key}.tar"
        res = conn.run(self._argv(h, _VOLUMES, handle.project), timeout=60, fail=SnapshotError, check=True)
        volumes = [line.split() for line in res.stdout.splitlines() if len(line.split()) == 2]
        if volumes and not self.cfg.helper_image:
            raise SnapshotError(f"{self.id}: project {handle.project} has named volumes; set config "
                                f"'helper_image' (an image with tar) to snapshot them", backend=self.id, host=h.name)
        with tempfile.TemporaryDirectory(prefix="sbx-snap-") as tmp:
            parts = [("workspace.tar", ["tar", "-C", handle.remote_dir, "-cf", "-", "."])]
            for name, short in volumes:
                parts.append((f"volumes/{short}.tar", self._argv(
                    h, 'docker run --rm --network none -v "$1:/v:ro" "$2" tar -C /v -cf - .',
                    name, self.cfg.helper_image or "")))
            meta = {"format": 1, "handle": handle.model_dump(mode="json"), "volumes": [s for _, s in volumes]}
            try:
                with tarfile.open(archive, "w") as out:
                    _add_bytes(out, "meta.json", json.dumps(meta).encode())
                    for member, argv in parts:
                        spool = Path(tmp) / "part"
                        with open(spool, "wb") as fh:
                            conn.run(argv, stdout_sink=fh, timeout=600, fail=SnapshotError, check=True)
                        out.add(spool, arcname=member)
            except BaseException:
                archive.unlink(missing_ok=True)
                raise
        digest = sha256_file(archive)
        return SnapshotResult(data={"archive": str(archive), "source_host": h.name, "project": handle.project,
                                    "volumes": meta["volumes"]},
                              size_bytes=archive.stat().st_size, checksum=f"sha256:{digest}")

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> ComposeHandle:
        """Recreate a sandbox from a snapshot archive, on ``request.host`` or any host with room."""
        archive = checked_archive(snapshot, self.id)
        with tarfile.open(archive) as tar:
            meta = json.loads(tar.extractfile("meta.json").read())  # type: ignore[union-attr]
            try:
                old = ComposeHandle.model_validate(meta["handle"])
            except (KeyError, TypeError, ValueError):
                raise SnapshotError(f"{self.id}: snapshot {snapshot.id}: archive {archive} does not record the "
                                    "stack it was taken of (meta.json has no valid handle)", backend=self.id) from None
            merged = {"repo": old.repo, "ref": old.ref or None, "compose_file": old.compose_file,
                      "services": old.services, **request.inputs}
            want = self._check_inputs(request, merged)
            if (meta.get("volumes") and not self.cfg.helper_image):
                raise SnapshotError(f"{self.id}: snapshot has volumes; set config 'helper_image'", backend=self.id)
            h, conn, v = self._claim(want, request.host)
            handle = self._handle(h, want, v)
            try:
                self._restore_parts(h, conn, tar, handle, meta)
            except BaseException:
                self._cleanup(h, conn, handle.remote_dir, handle.project, v, handle.compose_file)
                raise
        return self._forwarded(h, self._up(h, conn, handle, want, clone=False, fail=SnapshotError), request,
                               SnapshotError)

    def _restore_parts(self, h: ComposeHost, conn: SSHConnection, tar: tarfile.TarFile, handle: ComposeHandle,
                       meta: dict[str, Any]) -> None:
        ws_tar = tar.extractfile("workspace.tar")
        conn.run(["tar", "-C", handle.remote_dir, "-xf", "-"], stdin=ws_tar, timeout=600, fail=SnapshotError,
                 check=True)
        for short in meta.get("volumes", []):
            if not _SERVICE.fullmatch(short):
                raise SnapshotError(f"{self.id}: snapshot names a bad volume {short!r}", backend=self.id)
            conn.run(self._argv(h, _VOLUME_RESTORE, f"{handle.project}_{short}", handle.project, short,
                                self.cfg.helper_image or ""),
                     stdin=tar.extractfile(f"volumes/{short}.tar"), timeout=600, fail=SnapshotError, check=True)

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        delete_archive(snapshot, self.cfg.snapshot_dir)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))

