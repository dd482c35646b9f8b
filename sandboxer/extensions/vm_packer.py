"""``ext.vm-packer`` (attach mode): workspaces on pre-built VMs, reached over SSH.

A sandbox is a directory ``<workspace_root>/<workspace_dir>`` on a VM named in
the extension's inventory (input ``vm``) or given as ``ssh_target``
(``user@host[:port]``), with ``<workspace_root>/.sandboxer-<name>.json`` next to
it (the :class:`VmHandle` and owner labels, read back by :meth:`VMPacker.list_owned`).
An optional ``tunnel_port`` keeps a local port forward open while the sandbox
lives (in this process).

Rules it keeps: the VM itself is never touched, only the workspace; the
workspace is one plain path component, created with ``mkdir`` (never reusing
an existing directory or symlink) and checked to resolve inside the root;
data reach remote scripts only as quoted positional parameters.
"""

from __future__ import annotations

import json
import os
import re
import secrets as _secrets
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandboxer.errors import (
    BackendError,
    ExecError,
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
from sandboxer.extensions.vm_packer_build import (
    KILL_GRACE_S,
    STALE_GRACE_S,
    PackerBuild,
    PackerBuilder,
    ProgressCallback,
    check_packer_command,
    ssh_variables,
)
from sandboxer.models import ExecResult, Profile, SnapshotMeta
from sandboxer.poll import poll
from sandboxer.ssh import (
    ConnectionCache,
    LocalForward,
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

# fullmatch only: re.match(r"...$") would accept a trailing newline
_WS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TARGET = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*)@([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:]+\])(?::(\d{1,5}))?")
_COMMAND = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_INPUTS = {"vm", "ssh_target", "repo", "ref", "tunnel_port", "ssh_port", "workspace_dir"}
_EXIT_SYMLINK, _EXIT_EXISTS, _EXIT_OUTSIDE, _EXIT_NO_WS, _EXIT_MISSING = 86, 87, 88, 90, 91

# $1 root, $2 name, $3 meta json, $4 repo ('' none), $5 ref ('' none)
_ATTACH = GIT_CLONE_SCRIPT + r"""
set -u
root=$1; name=$2; meta=$3; repo=$4; ref=$5
mkdir -p -- "$root" || exit 1
ws="$root/$name"
if [ -L "$ws" ]; then echo "$ws is a symlink; refusing to use it" >&2; exit 86; fi
mkdir -- "$ws" || { echo "$ws already exists" >&2; exit 87; }
real_root=$(cd -P -- "$root" && pwd) && real_ws=$(cd -P -- "$ws" && pwd) || exit 1
case "$real_ws" in "$real_root"/*) ;; *) rmdir -- "$ws"; echo "$ws resolves outside $root" >&2; exit 88;; esac
printf '%s\n' "$meta" > "$root/.sandboxer-$name.json" || exit 1
if [ -n "$repo" ]; then git_clone "$repo" "$ws" "$ref" || exit $?; fi
echo attached
"""

# $1 workspace; rest: commands that must be on PATH
_CHECK = r"""
[ -d "$1" ] && [ ! -L "$1" ] || { echo "workspace $1 is missing" >&2; exit 90; }
shift; missing=
for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing="$missing $c"; done
if [ -n "$missing" ]; then echo "missing:$missing"; exit 91; fi
"""

# $1 root, $2 name: "present" while the workspace (not a symlink) and its meta file exist
_PROBE = r"""
if [ -d "$1/$2" ] && [ ! -L "$1/$2" ] && [ -f "$1/.sandboxer-$2.json" ]; then echo present; else echo gone; fi
"""

# $1 root, $2 name: remove the workspace (a symlink only as a link) and its meta file
_DETACH = r"""
ws="$1/$2"
state=gone
if [ -e "$ws" ] || [ -L "$ws" ] || [ -e "$1/.sandboxer-$2.json" ]; then state=removed; fi
rm -rf -- "$ws" "$1/.sandboxer-$2.json"
if [ -e "$ws" ] || [ -L "$ws" ]; then echo "could not remove $ws" >&2; exit 1; fi
echo "$state"
"""


class VMEntry(SSHHostConfig):
    """One pre-built VM of the inventory."""

    workspace_root: str | None = Field(default=None, description="overrides the extension's workspace_root")

    @field_validator("workspace_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        return None if v is None else check_root(v)



def _secret_env(cfg: SSHHostConfig) -> dict[str, str]:
    """The variables the SSH config's secret references name (a key's passphrase), for a forwarder."""
    from sandboxer.secrets import secret_env_names

    return {n: os.environ[n] for n in secret_env_names(cfg) if n in os.environ}

class VMPackerConfig(BaseModel):
    """``config:`` of ``ext.vm-packer``."""

    model_config = ConfigDict(extra="forbid")

    vms: dict[str, VMEntry] = Field(default_factory=dict)
    workspace_root: str = "/var/lib/sandboxer/workspaces"
    allow_ssh_target: bool = Field(default=True, description="accept ad-hoc user@host[:port] targets")
    target_defaults: dict[str, Any] = Field(
        default_factory=dict, description="SSH settings (key, known_hosts, timeouts) for ssh_target inputs")
    snapshot_dir: Path = Path("~/.local/share/sandboxer/snapshots/vm-packer")
    poll_interval: float = Field(default=0.25, gt=0)
    packer: str = Field(default="packer", description="the packer executable of build mode (name or absolute path)")

    @field_validator("packer")
    @classmethod
    def _packer(cls, v: str) -> str:
        return check_packer_command(v)

    @field_validator("workspace_root")
    @classmethod
    def _root(cls, v: str) -> str:
        return check_root(v)

    @field_validator("vms")
    @classmethod
    def _names(cls, v: dict[str, VMEntry]) -> dict[str, VMEntry]:
        for name in v:
            if not _WS_NAME.fullmatch(name):
                raise ValueError(f"VM name {name!r} must match {_WS_NAME.pattern}")
        return v

    @field_validator("target_defaults")
    @classmethod
    def _defaults(cls, v: dict[str, Any]) -> dict[str, Any]:
        fixed = {"address", "port", "user"} & set(v)
        if fixed:
            raise ValueError(f"target_defaults may not set {sorted(fixed)}; they come from ssh_target")
        SSHHostConfig(address="check", user="check", **v)
        return v

    @field_validator("snapshot_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()


class VMReadiness(BaseModel):
    """What makes a workspace ready: the profile's readiness options, kept in the handle."""

    model_config = ConfigDict(extra="ignore")

    require_commands: list[str] = Field(default_factory=list, description="must be on PATH; checked once")
    readiness_command: list[str] | None = Field(default=None, description="retried until it exits 0")

    @field_validator("require_commands")
    @classmethod
    def _commands(cls, v: list[str]) -> list[str]:
        for c in v:
            if not _COMMAND.fullmatch(c):
                raise ValueError(f"{c!r} is not a command name")
        return v


class VMProfileOptions(VMReadiness):
    """``options:`` of a profile served by ``ext.vm-packer``."""

    model_config = ConfigDict(extra="forbid")

    command_timeout: float = Field(default=600.0, gt=0, description="deadline of the clone")
    packer: PackerBuild | None = Field(default=None, description="build mode: the Packer template to build first")


class VmHandle(WorkspaceHandle):
    """One workspace ``root/name`` on a VM of the inventory (``vm``) or an ad-hoc ``ssh_target``.

    ``host`` is the vm's name or ``user@address``; how to reach it is looked up again from
    ``vm``/``ssh_target``/``ssh_port`` (the inventory holds the keys), never stored here.
    """

    vm: str | None = None
    ssh_target: str | None = Field(default=None, description="user@host[:port], when not an inventory VM")
    ssh_port: int | None = Field(default=None, description="overrides the VM's or target's port")
    root: str = Field(min_length=1, description="the workspace root on the VM")
    name: str = Field(min_length=1, description="the workspace's directory name under root")
    tunnel_port: int | None = Field(default=None, description="remote port forwarded while the sandbox lives")
    tunnel_local_port: int | None = Field(default=None, description="the local end, once the tunnel is open")
    #: the process forwarding ``network.expose`` ports to 127.0.0.1 (it outlives the creating process)
    forwarder: forward.Forwarder | None = None
    readiness: VMReadiness = Field(default_factory=VMReadiness)
    image: str | None = Field(default=None, description="build mode: the image record the VM was provisioned by")


class VmTunnel(BaseModel):
    """The local end of a sandbox's port forward."""

    local: str = Field(description="127.0.0.1:<port>")
    local_port: int
    remote_port: int


class VmReachability(Reachability):
    """How to reach a ready workspace: SSH to its VM, and its tunnel when it has one."""

    remote_dir: str
    tunnel: VmTunnel | None = None


class VMPacker(SFTPFilesMixin, SandboxExtension):
    """Workspaces attached to pre-built VMs (see the module docstring)."""

    Config = VMPackerConfig
    ProfileOptions = VMProfileOptions
    Handle = VmHandle
    features = frozenset({"exec", "snapshots", "list_owned", "files"})
    # the remote host's network is the sandbox's: nothing narrower can be promised; exposed ports
    # are forwarded to this machine's 127.0.0.1 by a process of their own (sandboxer/forward.py)
    enforces = frozenset({"network:internet", "expose"})
    requires = ("paramiko", "ssh")
    #: a sandbox is on one VM of the inventory or on one ad-hoc target: an ssh_target given
    #: by the consumer replaces a profile's default vm (and vice versa)
    exclusive_inputs = (frozenset({"vm", "ssh_target"}),)

    def __init__(self, manifest: Any, config: VMPackerConfig):
        super().__init__(manifest, config)
        self.cfg: VMPackerConfig = config
        self._cache = ConnectionCache(backend=manifest.id)
        self._tunnels: dict[str, LocalForward] = {}
        self._lock = threading.Lock()
        #: build mode's state store: the manager's, once it hands it over; until then one opened on
        #: ``SANDBOXER_STATE_URL`` or the home's SQLite file (what a Manager uses by default)
        self.state_store: Any = None

    def hosts(self) -> dict[str, int | None]:
        return {name: None for name in self.cfg.vms}

    # ------------------------------------------------------------ targets

    def _target(self, vm: Any, target: Any, port: Any, sid: str) -> tuple[SSHHostConfig, str, str]:
        """``(ssh config, host label, workspace root)`` for a ``vm`` or ``ssh_target`` (inputs or a handle's)."""
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
            raise InputError(f"sandbox {sid}: ssh_port {port!r} must be a port number")
        if vm and target:
            raise InputError(f"sandbox {sid}: inputs 'vm' ({vm!r}) and 'ssh_target' ({target!r}) are exclusive; "
                             "give one (a consumer's ssh_target replaces a profile's default vm)")
        if not vm and not target:
            raise InputError(f"sandbox {sid}: give exactly one of inputs 'vm' (one of: "
                             f"{', '.join(self.cfg.vms) or 'none configured'}) or 'ssh_target' (user@host[:port])")
        if vm:
            entry = self.cfg.vms.get(vm) if isinstance(vm, str) else None
            if entry is None:
                raise InputError(f"sandbox {sid}: input vm {vm!r} is not in the inventory of {self.id}; "
                                 f"known: {', '.join(self.cfg.vms) or 'none'}")
            cfg = entry.model_copy(update={"port": port}) if port else entry
            return cfg, vm, entry.workspace_root or self.cfg.workspace_root
        if not self.cfg.allow_ssh_target:
            raise InputError(f"sandbox {sid}: {self.id} does not accept ssh_target (allow_ssh_target is off)")
        m = _TARGET.fullmatch(target) if isinstance(target, str) else None
        if m is None:
            raise InputError(f"sandbox {sid}: input ssh_target {target!r} must look like user@host[:port]")
        user, host, tport = m.group(1), m.group(2).strip("[]"), int(m.group(3) or 22)
        if not 0 < tport < 65536:
            raise InputError(f"sandbox {sid}: input ssh_target {target!r} has a bad port")
        cfg = SSHHostConfig(address=host, user=user, port=port or tport, **self.cfg.target_defaults)
        return cfg, f"{user}@{host}", self.cfg.workspace_root

    def _check_inputs(self, request: ProvisionRequest, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` (the request's, placed on its host) checked and normalised."""
        sid = request.sandbox_id
        if not _WS_NAME.fullmatch(sid):
            raise InputError(f"{self.id}: sandbox_id {sid!r} must match {_WS_NAME.pattern}")
        unknown = sorted(set(inputs) - _INPUTS)
        if unknown:
            raise InputError(f"sandbox {sid}: unknown input(s) {', '.join(unknown)}; {self.id} takes vm, ssh_target, "
                             "repo, ref, tunnel_port, ssh_port, workspace_dir")
        name = inputs.get("workspace_dir") or sid
        if not isinstance(name, str) or not _WS_NAME.fullmatch(name):
            raise InputError(f"sandbox {sid}: input workspace_dir {name!r} must be one plain directory name "
                             f"under the workspace root (matching {_WS_NAME.pattern})")
        try:
            repo = check_repo(inputs["repo"]) if inputs.get("repo") else ""
            ref = check_ref(inputs["ref"]) if inputs.get("ref") else ""
        except InputError as exc:
            raise InputError(f"sandbox {sid}: {exc}") from None
        tunnel = inputs.get("tunnel_port")
        if tunnel is not None and (not isinstance(tunnel, int) or isinstance(tunnel, bool) or not 0 < tunnel < 65536):
            raise InputError(f"sandbox {sid}: input tunnel_port {tunnel!r} must be a port number")
        self._target(inputs.get("vm"), inputs.get("ssh_target"), inputs.get("ssh_port"), sid)
        return {"sandbox_id": sid, "name": name, "repo": repo, "ref": ref, "tunnel_port": tunnel,
                "vm": inputs.get("vm"), "ssh_target": inputs.get("ssh_target"), "ssh_port": inputs.get("ssh_port"),
                "owner_labels": dict(request.owner_labels)}

    def _handle_target(self, handle: VmHandle) -> tuple[SSHHostConfig, str, str]:
        return self._target(handle.vm, handle.ssh_target, handle.ssh_port, handle.sandbox_id)

    def _conn(self, handle: VmHandle, fail: type[BackendError]) -> tuple[SSHConnection, SSHHostConfig]:
        cfg, label, _ = self._handle_target(handle)
        return self._cache.get(cfg, host=label, fail=fail), cfg

    # ------------------------------------------------------------ contract

    @staticmethod
    def _placed(inputs: dict[str, Any], host: str | None) -> dict[str, Any]:
        """The inputs with the router's host as ``vm`` when they name neither a vm nor a target."""
        if host and not inputs.get("ssh_target") and not inputs.get("vm"):
            return {"vm": host, **inputs}
        return inputs

    def resource_names(self, request: ProvisionRequest) -> list[str]:
        """The workspace directory, named by the target's address and port (a vm and an ssh_target
        reaching the same machine name the same directory the same way).

        Raises:
            InputError: an input is refused (checked here, before any connection).
        """
        want = self._check_inputs(request, self._placed(request.inputs, request.host))
        cfg, _, root = self._target(want["vm"], want["ssh_target"], want["ssh_port"], want["sandbox_id"])
        return [f"workspace {cfg.address}:{cfg.port}:{remote_path_ok(root, want['name'])}"]

    def deadline(self, profile: Profile) -> float:
        """Connecting, the clone (``command_timeout``), then ready."""
        hosts = [*self.cfg.vms.values(), SSHHostConfig(address="x", user="x", **self.cfg.target_defaults)]
        connect = max(h.connect_timeout + h.banner_timeout + h.auth_timeout for h in hosts)
        opts = self.options(profile)
        # build mode: waiting for another process's build of the template, then our own
        build = 2 * (opts.packer.timeout + KILL_GRACE_S) + STALE_GRACE_S if opts.packer else 0.0
        return connect + opts.command_timeout + float(profile.ready_timeout) + build

    def probe(self, handle: VmHandle) -> bool | None:
        """Whether the workspace and its meta file are still on the VM (one SSH command).

        Raises:
            BackendError: the VM cannot be asked.
        """
        conn, _ = self._conn(handle, BackendError)
        res = conn.run(["sh", "-c", _PROBE, "sh", handle.root, handle.name], timeout=60, fail=BackendError)
        if res.exit_code != 0 or res.stdout.strip() not in ("present", "gone"):
            raise BackendError(f"{self.id}: cannot ask {handle.host} about sandbox {handle.sandbox_id}: "
                               f"{(res.stderr or res.stdout).strip()[-500:]}", backend=self.id, host=handle.host)
        return res.stdout.strip() == "present"

    def handle_id(self, handle: VmHandle) -> str | None:
        """``<vm or target>:<workspace>``: a retried create on another VM is another workspace."""
        return f"{handle.host}:{handle.remote_dir}"

    def provision(self, request: ProvisionRequest) -> VmHandle:
        want = self._check_inputs(request, self._placed(request.inputs, request.host))
        image = (self._ensure_image(request.profile, want, sandbox_id=request.sandbox_id)
                 if self.options(request.profile).packer else None)
        return self._attach(request.profile, want, None, float(request.ttl), image=image)

    # ------------------------------------------------------------ build mode

    def _state(self, state: Any = None) -> Any:
        if state is not None:
            return state
        with self._lock:
            if self.state_store is None:
                from sandboxer.state import StateStore  # heavy: only in build mode

                self.state_store = StateStore(os.environ.get("SANDBOXER_STATE_URL") or None, home=self.home)
            return self.state_store

    def _ensure_image(self, profile: Profile, want: dict[str, Any], *, sandbox_id: str | None = None,
                      state: Any = None, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """The profile's image record for the VM ``want`` names: reused, or built there now."""
        cfg, label, _ = self._target(want["vm"], want["ssh_target"], want["ssh_port"], want["sandbox_id"])
        # the VM's host key is verified here, before Packer (whose SSH communicator checks none) connects
        self._cache.get(cfg, host=label, fail=ProvisionError)
        builder = PackerBuilder(self._state(state), self.home, self.cfg.packer, self.id)
        return builder.ensure(profile=profile.slug, build=self.options(profile).packer, ssh=ssh_variables(cfg),
                              sandbox_id=sandbox_id, on_progress=on_progress)

    def build_image(self, profile: Profile, inputs: dict[str, Any], *, state: Any = None,
                    on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """``sandboxer images build``: build (or reuse) ``profile``'s image for the VM its inputs name.

        Args:
            profile: a profile of this backend with ``options.packer``.
            inputs: ``vm``/``ssh_target``/``ssh_port`` over the profile's defaults.
            state: the state store to record in (default: see :attr:`state_store`).
            on_progress: called with each line Packer prints.

        Returns:
            The image record, with ``reused``.

        Raises:
            InputError: the profile has no ``options.packer``, or an input is refused.
        """
        if self.options(profile).packer is None:
            raise InputError(f"profile {profile.slug!r} names no Packer template (options.packer.template); "
                             "nothing to build")
        given = {k: v for k, v in inputs.items() if k in ("vm", "ssh_target", "ssh_port")}
        merged = {k: v for k, v in profile.inputs.defaults.items() if k in ("vm", "ssh_target", "ssh_port")}
        if given.get("vm") or given.get("ssh_target"):
            merged.pop("vm", None), merged.pop("ssh_target", None)
        req = ProvisionRequest(profile=profile, inputs={**merged, **given}, sandbox_id="image-build",
                               owner_labels={}, ttl=1)
        want = self._check_inputs(req, req.inputs)
        return self._ensure_image(profile, want, state=state, on_progress=on_progress)

    def reap_images(self, *, state: Any = None) -> list[dict[str, Any]]:
        """gc of build mode: stale ``building`` records and private directories no build holds."""
        return PackerBuilder(self._state(state), self.home, self.cfg.packer, self.id).reap()

    def _attach(self, profile: Profile, want: dict[str, Any], archive: Path | None, ttl: float,
                image: dict[str, Any] | None = None) -> VmHandle:
        cfg, label, root = self._target(want["vm"], want["ssh_target"], want["ssh_port"], want["sandbox_id"])
        ws = remote_path_ok(root, want["name"])
        opts = self.options(profile)
        handle = VmHandle(host=label, vm=want["vm"], ssh_target=want["ssh_target"], ssh_port=want["ssh_port"],
                          sandbox_id=want["sandbox_id"], root=root, name=want["name"], remote_dir=ws,
                          repo=want["repo"], ref=want["ref"], tunnel_port=want["tunnel_port"],
                          readiness=VMReadiness(require_commands=opts.require_commands,
                                                readiness_command=opts.readiness_command),
                          image=image["id"] if image else None)
        fail = SnapshotError if archive else ProvisionError
        conn = self._cache.get(cfg, host=label, fail=fail)
        meta = json.dumps({"handle": handle.model_dump(mode="json"), "owner_labels": want["owner_labels"]},
                          separators=(",", ":"))
        res = conn.run(["sh", "-c", _ATTACH, "sh", root, want["name"], meta, "" if archive else want["repo"],
                        want["ref"]], timeout=self.options(profile).command_timeout, fail=fail)
        if res.exit_code in (_EXIT_SYMLINK, _EXIT_EXISTS, _EXIT_OUTSIDE):
            raise InputError(f"sandbox {want['sandbox_id']}: workspace_dir {want['name']!r} refused on {label}: "
                             f"{res.stderr.strip()}")
        try:
            if res.exit_code != 0:
                what = "git clone of %r failed" % want["repo"] if res.exit_code in (81, 82) else "attach failed"
                raise fail(f"{self.id}: sandbox {want['sandbox_id']} on {label}: {what}: {res.stderr.strip()[-1500:]}",
                           backend=self.id, host=label)
            if archive is not None:
                conn.run(["tar", "-C", ws, "-xzf", "-"], stdin=open(archive, "rb"), timeout=600, fail=SnapshotError,
                         check=True)
            if want["tunnel_port"]:
                self._open_tunnel(handle, cfg, fail)
            if profile.network.expose:
                handle.forwarder = forward.start(cfg, profile.network.expose, ttl, backend=self.id, host=label,
                                                 secrets=_secret_env(cfg))
        except BaseException:
            forward.stop(handle.forwarder)
            self._detach(conn, handle, fail=fail, quiet=True)
            raise
        return handle

    def _open_tunnel(self, handle: VmHandle, cfg: SSHHostConfig, fail: type[BackendError],
                     local_port: int = 0) -> LocalForward:
        if handle.tunnel_port is None:
            raise fail(f"{self.id}: sandbox {handle.sandbox_id} has no tunnel_port", backend=self.id, host=handle.host)
        with self._lock:
            fwd = self._tunnels.get(handle.sandbox_id)
            if fwd is not None and fwd.open:
                return fwd
            # its own connection: the cache may close idle ones, a tunnel must outlive them
            conn = SSHConnection(cfg, backend=self.id, host=handle.host).open(fail)
            try:
                fwd = LocalForward(conn, handle.tunnel_port, local_port=local_port)
            except OSError:
                conn.close()
                fwd = LocalForward(SSHConnection(cfg, backend=self.id, host=handle.host).open(fail),
                                   handle.tunnel_port)
            self._tunnels[handle.sandbox_id] = fwd
            handle.tunnel_local_port = fwd.local_port
            return fwd

    def wait_ready(self, handle: VmHandle, timeout: float = 60.0) -> VmReachability:
        """SSH answers and the workspace exists; then the profile's ``require_commands`` (at once)
        and ``readiness_command`` (retried until the deadline)."""
        sid, label = handle.sandbox_id, handle.host
        opts = handle.readiness
        deadline = time.monotonic() + timeout
        seen: list[str] = [f"waiting for SSH to {label}"]

        def reachable() -> bool:
            conn, _ = self._conn(handle, ProvisionError)
            res = conn.run(["sh", "-c", _CHECK, "sh", handle.remote_dir, *opts.require_commands],
                           timeout=30, fail=ProvisionError)
            if res.exit_code == _EXIT_MISSING:
                missing = res.stdout.split(":", 1)[1].split()
                raise ReadinessTimeout(f"{self.id}: sandbox {sid} on {label}: required command(s) missing on "
                                       f"PATH: {', '.join(missing)}", backend=self.id, host=label)
            if res.exit_code != 0:
                seen[:] = [res.stderr.strip() or f"check exited {res.exit_code}"]
                return False
            return True

        def timeout_error() -> ReadinessTimeout:
            return ReadinessTimeout(f"{self.id}: sandbox {sid} on {label} not ready within {timeout:g}s: {seen[0]}",
                                    backend=self.id, host=label)

        poll(reachable, timeout, self.cfg.poll_interval, transient=(ProvisionError,), max_interval=1.0,
             on_timeout=timeout_error)
        if opts.readiness_command:
            def command_ok() -> bool:
                conn, _ = self._conn(handle, ProvisionError)
                res = conn.run(list(opts.readiness_command), cwd=handle.remote_dir,
                               timeout=max(deadline - time.monotonic(), 1), fail=ProvisionError)
                seen[:] = [f"readiness command {opts.readiness_command} exited {res.exit_code}: "
                           f"{(res.stderr or res.stdout).strip()[-500:]}"]
                return res.exit_code == 0

            poll(command_ok, max(deadline - time.monotonic(), 0.1), self.cfg.poll_interval,
                 transient=(ProvisionError,), max_interval=1.0, on_timeout=timeout_error)
        cfg, _, _ = self._handle_target(handle)
        tunnel = None
        if handle.tunnel_port:
            fwd = self._open_tunnel(handle, cfg, ProvisionError, handle.tunnel_local_port or 0)
            tunnel = VmTunnel(local=f"127.0.0.1:{fwd.local_port}", local_port=fwd.local_port,
                              remote_port=handle.tunnel_port)
        return VmReachability(ssh=cfg.ssh_command(), host=label, address=cfg.address, remote_dir=handle.remote_dir,
                              tunnel=tunnel, urls=handle.forwarder.urls() if handle.forwarder else {})

    def teardown(self, handle: VmHandle) -> TeardownReport:
        closed = self._close_tunnel(handle.sandbox_id)
        forwarded = forward.stop(handle.forwarder)
        conn, _ = self._conn(handle, TeardownError)
        removed = self._detach(conn, handle, fail=TeardownError)
        return TeardownReport(already_gone=not removed, removed=[handle.remote_dir] if removed else [],
                              detail={"host": handle.host, "tunnel_closed": closed, "forwarder_stopped": forwarded})

    def _close_tunnel(self, sid: str) -> bool:
        with self._lock:
            fwd = self._tunnels.pop(sid, None)
        if fwd is not None:
            fwd.close()
        return fwd is not None

    def _detach(self, conn: SSHConnection, handle: VmHandle, *, fail: type[BackendError],
                quiet: bool = False) -> bool:
        """Remove the workspace; True if there was one to remove."""
        name = handle.name
        if not _WS_NAME.fullmatch(name):
            raise fail(f"{self.id}: refusing to remove workspace {name!r}", backend=self.id, host=handle.host)
        try:
            res = conn.run(["sh", "-c", _DETACH, "sh", handle.root, name], timeout=120, fail=fail)
        except BackendError:
            if quiet:
                return False
            raise
        if res.exit_code != 0 and not quiet:
            raise fail(f"{self.id}: sandbox {handle.sandbox_id} on {handle.host}: {res.stderr.strip()}",
                       backend=self.id, host=handle.host)
        return res.stdout.strip().endswith("removed")

    # ------------------------------------------------------------ exec

    def exec(self, handle: VmHandle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        """Run ``argv`` over SSH in the workspace (``cwd`` is relative to it), by the exec
        convention of sandboxer/execution.py (:meth:`SSHConnection.run`)."""
        argv = check_argv(argv, backend=self.id)
        where = workspace_cwd(handle.remote_dir, handle.remote_dir, cwd, handle.sandbox_id)
        conn, _ = self._conn(handle, ExecError)
        return conn.run(list(argv), cwd=where, env=env, stdin=stdin, timeout=timeout, on_output=on_output,
                        fail=ExecError)

    def _sftp_files(self, handle) -> SFTPFiles:  # type: ignore[no-untyped-def]
        """Its files over SFTP (sandboxer/extensions/sftp_files.py): the workspace, from where exec runs."""
        return SFTPFiles(self._conn(handle, ExecError)[0], ext_id=self.id, sandbox_id=handle.sandbox_id,
                         root=handle.remote_dir, base=handle.remote_dir)

    # ------------------------------------------------------------ list_owned

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        found = []
        script = 'for f in "$1"/.sandboxer-*.json; do [ -f "$f" ] && head -n 1 "$f"; done; true'
        for name, entry in self.cfg.vms.items():
            try:
                res = self._cache.get(entry, host=name).run(
                    ["sh", "-c", script, "sh", entry.workspace_root or self.cfg.workspace_root], timeout=60,
                    fail=ProvisionError)
            except ProvisionError:
                continue  # unreachable now; gc asks again next time
            found += owned_from_meta(res.stdout, owner_labels, VmHandle)
        return found

    # ------------------------------------------------------------ snapshots

    def snapshot(self, handle: VmHandle) -> SnapshotResult:
        """A gzip'd tar of the workspace, stored locally with its sha256."""
        conn, _ = self._conn(handle, SnapshotError)
        self.cfg.snapshot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        archive = self.cfg.snapshot_dir / (f"{handle.sandbox_id}-{time.strftime('%Y%m%dT%H%M%S')}-"
                                           f"{_secrets.token_hex(4)}.tar.gz")
        try:
            with open(archive, "wb") as fh:
                conn.run(["tar", "-C", handle.remote_dir, "-czf", "-", "."], stdout_sink=fh, timeout=600,
                         fail=SnapshotError, check=True)
        except BaseException:
            archive.unlink(missing_ok=True)
            raise
        source = handle.model_dump(mode="json", include={"vm", "ssh_target", "ssh_port", "repo", "ref", "tunnel_port"})
        return SnapshotResult(data={"archive": str(archive), "source": source}, size_bytes=archive.stat().st_size,
                              checksum=f"sha256:{sha256_file(archive)}")

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> VmHandle:
        """Attach a new workspace (same VM unless ``vm``/``ssh_target`` or ``request.host`` say otherwise)
        and unpack the archive."""
        archive = checked_archive(snapshot, self.id)
        inputs, host = request.inputs, request.host
        source = {k: v for k, v in (snapshot.data.get("source") or {}).items() if v is not None}
        if inputs.get("vm") or inputs.get("ssh_target") or host:
            source.pop("vm", None), source.pop("ssh_target", None), source.pop("ssh_port", None)
        if host and not inputs.get("vm") and not inputs.get("ssh_target"):
            source["vm"] = host
        want = self._check_inputs(request, {**source, **inputs})
        return self._attach(request.profile, want, archive, float(request.ttl))

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        delete_archive(snapshot, self.cfg.snapshot_dir)
