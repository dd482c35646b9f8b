"""ext.local: an isolated process sandbox on this machine, no daemon needed.

Each sandbox is a workspace directory plus a long-lived "init" process that
holds its namespaces (user, pid, mount, ipc, uts and, unless the profile
allows network, net). The init is started by bubblewrap when installed, else
by util-linux ``unshare``; inside it the whole filesystem is read-only but the
workspace, and /tmp (the workspace's ``.tmp``), /run and /dev/shm are private
and empty, so no host unix socket there is reachable. ``exec`` enters the same
namespaces with ``nsenter``, under the profile's rlimits. Teardown SIGKILLs
the init, which kills every process of the pid namespace, then removes the
workspace.

Nothing of the manager reaches a sandbox: every process we start (the init,
bwrap/unshare, nsenter, setpriv, prlimit, the startup probe) gets an explicit,
minimal environment (:func:`_base_env`) plus what the profile and the exec ask.

Limits for the sandbox as a whole (memory, pids, cpu) come from cgroups where the
host has them (:mod:`sandboxer.extensions.local_cgroup`); the workspace is a
size-limited tmpfs when root; /dev/shm is a size-limited tmpfs inside the mount
namespace. What is not enforced is said so in the reachability's ``limits``.

When run as root, each sandbox runs as its own unprivileged uid (mapped to
root inside its user namespace), so rlimits on processes count per sandbox
and sandboxes cannot touch each other's workspaces.

Isolation level ``none`` (an explicit insecure-dev tier) skips namespaces.

What a sandbox is, for the manager, is a :class:`LocalHandle` (workspace, tool, uid, the init's
pid and start time, cgroups, the limits account); it is also written to ``<root>/.meta`` before
anything is made, so ``list_owned`` finds even a half-made sandbox.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import json
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sandboxer.contract import Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult, TeardownReport
from sandboxer.errors import (
    ExecError,
    InputError,
    ProvisionError,
    ReadinessTimeout,
    SnapshotError,
    TeardownError,
)
from sandboxer.extensions import egress, local_cgroup
from sandboxer.extensions.local_proc import (  # noqa: F401 - alloc_uid, free_uid, chown_tree are ext.local's API
    _BWRAP_INIT,
    _DROP_CAPS,
    _UNSHARE_INIT,
    UID_BASE,
    UID_SPAN,
    _collect,
    alloc_uid,
    chown_tree,
    free_uid,
)
from sandboxer.extensions.local_files import LocalFilesMixin
from sandboxer.extensions.local_secrets import init_secrets
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.execution import OUTPUT_CAP as DEFAULT_OUTPUT_CAP
from sandboxer.execution import check_argv
from sandboxer.models import ExecResult, Profile, Resources, SnapshotMeta

#: Bytes kept (and streamed) per stream of one exec.
OUTPUT_CAP = DEFAULT_OUTPUT_CAP
SYSTEM_ROOT = Path("/var/lib/sandboxer/local")
#: ext.local's default uid registry (see :func:`alloc_uid`).
UID_REGISTRY = SYSTEM_ROOT / ".uids"
TTL_GRACE_S = 60
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUN_TMPFS = "size=8m,mode=755,nosuid,nodev"
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2
RESOLV_CONF = "/etc/resolv.conf"
_NEVER_HIDE = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root", "/run",
               "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib"}
_PRIVATE_PREFIXES = ("/tmp/", "/var/tmp/", "/run/", "/var/run/", "/dev/", "/proc/", "/sys/")
class LocalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(default=None, description="workspace root; default <home>/local")
    tool: Literal["auto", "bwrap", "unshare"] = "auto"
    start_timeout_s: float = Field(default=10.0, gt=0)
    max_output_bytes: int = Field(default=OUTPUT_CAP, gt=0, description="kept (and streamed) per stream of one exec")
    egress_pool: str = Field(default="10.213.0.0/16", description="IPv4 network whose /30s sandboxes with an "
                             "allow-list or exposed ports take (one each; as root)")

    @field_validator("egress_pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        try:
            net = ipaddress.ip_network(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 network like 10.213.0.0/16") from None
        if net.version != 4 or net.prefixlen > 28:
            raise ValueError(f"{v!r}: give an IPv4 network of /28 or wider (each sandbox takes a /30)")
        return str(net)


class LocalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: bool = Field(default=False, description="share the host network (off: no network at all)")
    cpu_time_s: int = Field(default=3600, gt=0, description="RLIMIT_CPU per process")
    shm_mb: int = Field(default=64, gt=0, description="size of the sandbox's private /dev/shm")
    env: dict[str, str] = Field(default_factory=dict)


class LocalHandle(Handle):
    """One local sandbox: where it lives and what holds it (stored; never a secret).

    Attributes:
        sandbox_id: the manager's id, also the workspace's name.
        workspace: the workspace directory on this machine.
        tool: what started the init: ``bwrap``, ``unshare``, or ``none`` (no namespaces).
        uid: the sandbox's own unprivileged uid (when run as root), else None.
        resources: the profile's resources (its rlimits come from them).
        options: the profile's ``ext.local`` options.
        cgroup: the sandbox's cgroup directories, or None without cgroups.
        ws_mount: the workspace is a size-limited tmpfs mounted on the host (root only).
        limits: what is enforced for each limit, and how (shown in the reachability).
        pid: the init's pid on the host (None until started, and with isolation ``none``).
        starttime: the init's start time (``/proc/<pid>/stat``), so a reused pid is not ours.
        outer_pid: bwrap's or unshare's pid on the host side.
    """

    model_config = ConfigDict(extra="ignore")

    host: str | None = "localhost"
    sandbox_id: str
    workspace: str
    tool: Literal["bwrap", "unshare", "none"]
    uid: int | None = None
    resources: Resources = Field(default_factory=Resources)
    options: LocalOptions = Field(default_factory=LocalOptions)
    cgroup: local_cgroup.CgroupPlan | None = None
    ws_mount: bool = False
    limits: dict[str, str] = Field(default_factory=dict)
    pid: int | None = None
    starttime: str | None = None
    outer_pid: int | None = None
    #: the network namespace of its own, joined to the host, of a sandbox with an allow-list or
    #: exposed ports (its nftables rules keep the policy)
    link: egress.Link | None = None
    #: ports the sandbox serves (``network.expose``)
    expose: list[int] = Field(default_factory=list)
    secrets: list[str] = Field(default_factory=list, description="names of the secrets its init holds (never values)")
    #: when its init exits (the TTL plus a grace, as the epoch); None without an init
    life_until: float | None = None


class LocalReachability(Reachability):
    """Where a local sandbox is and how it is confined."""

    workspace: str
    isolation: str = Field(description="bwrap, unshare or none")
    network: bool = False
    address: str | None = Field(default=None, description="the sandbox's own address (with an allow-list or "
                                "exposed ports), reachable from this machine only")
    limits: dict[str, str] = Field(default_factory=dict, description="per limit: how it is enforced, or why not")


def _starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None, start: str | None) -> bool:
    return bool(pid) and start is not None and _starttime(pid) == start  # type: ignore[arg-type]


def _write_end(path: Path, end: float, *, create: bool = True) -> None:
    """Write a sandbox's end (epoch seconds: ten digits until 2286) over the file in place, in one
    write: the init reads the same inode through its descriptor, and never sees it empty."""
    flags = os.O_WRONLY | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)  # readable by the sandbox's uid (its init reads it), writable by us only
    try:
        os.pwrite(fd, f"{int(end)}\n".encode(), 0)
    finally:
        os.close(fd)


def _base_env(home: str, tmpdir: str | None = None) -> dict[str, str]:
    """The whole environment a helper or sandbox process starts from: nothing of ours."""
    env = {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", "TERM": "dumb"}
    return {**env, "TMPDIR": tmpdir} if tmpdir else env


_libc = ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(path: Path, options: str) -> None:
    if _libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def _unmount(path: Path) -> bool:
    """Unmount ``path`` if it is a mount point; True if something was unmounted."""
    p = str(path).encode()
    if _libc.umount2(p, 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(p, MNT_DETACH) == 0:
        return True
    if err in (errno.EINVAL, errno.ENOENT):
        return False  # not a mount point (any more)
    raise OSError(err, os.strerror(err), str(path))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


class LocalExtension(LocalFilesMixin, SandboxExtension):
    Config = LocalConfig
    ProfileOptions = LocalOptions
    Handle = LocalHandle
    features = frozenset({"exec", "snapshots", "list_owned", "files"})
    own_ttl = "settable"  # the init ends the sandbox at its end; set_ttl moves it
    # no network is a network namespace of its own (loopback only); the internet is the host's network;
    # an allow-list, a deny-list or exposed ports: a namespace of its own joined to the host by a veth
    # pair, kept by nftables rules on the host (sandboxer/extensions/egress.py); secrets are the init's
    # environment, read back by each exec (local_secrets)
    enforces = frozenset({"network:none", "network:internet", "network:cidr-allowlist", "network:cidr-denylist",
                          "expose", "secrets"})
    _NEEDS_LINK = ("network:cidr-allowlist", "network:cidr-denylist", "expose")

    def __init__(self, manifest, config):  # type: ignore[no-untyped-def]
        super().__init__(manifest, config)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._tool: str | None = None
        self._tool_error: str | None = None
        self._cgroups: local_cgroup.Hierarchies | None = None

    # ------------------------------------------------------------ helpers

    @property
    def root(self) -> Path:
        """Workspace root. As root, sandboxes run as their own uids, which must be able to
        reach their workspace, so the default is a system directory rather than a home
        under /root; otherwise it is ``<home>/local``."""
        if self.config.root:
            return Path(self.config.root)
        return SYSTEM_ROOT if os.geteuid() == 0 else self.home / "local"

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(self.root, 0o755)  # sandbox uids must reach (and getcwd) their workspace

    def _tool_for(self, isolation: str | None) -> str:
        if isolation == "none":
            return "none"
        with self._lock:
            if self._tool is None and self._tool_error is None:
                self._tool, self._tool_error = self._probe()
        if self._tool is None:
            raise ProvisionError(
                f"{self.id}: no namespace isolation is available here ({self._tool_error}). Install bubblewrap "
                "or enable unprivileged user namespaces, or use a profile with 'isolation: none' and "
                "'network: {egress: internet}' (insecure: no isolation, the host's network)",
                backend=self.id,
            )
        return self._tool

    def _hierarchies(self) -> local_cgroup.Hierarchies:
        """The cgroup hierarchies this host offers (discovered once)."""
        with self._lock:
            if self._cgroups is None:
                try:
                    self._cgroups = local_cgroup.discover()
                except OSError as exc:
                    self._cgroups = local_cgroup.Hierarchies.unavailable(f"cannot inspect cgroups: {exc}")
            return self._cgroups

    def _probe(self) -> tuple[str | None, str | None]:
        tools = ["bwrap", "unshare"] if self.config.tool == "auto" else [self.config.tool]
        errors = []
        for tool in tools:
            if shutil.which(tool) is None or shutil.which("nsenter") is None:
                errors.append(f"{tool} not found")
                continue
            argv = (["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"] if tool == "bwrap"
                    else ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--net", "true"])
            uid = self._probe_uid()
            try:
                subprocess.run(self._as_user(uid) + argv, check=True, capture_output=True, timeout=10,
                               env=_base_env("/"), cwd="/")
                return tool, None
            except (subprocess.SubprocessError, OSError) as exc:
                err = getattr(exc, "stderr", b"") or b""
                errors.append(f"{tool} failed: {err.decode(errors='replace').strip() or exc}")
        return None, "; ".join(errors)

    @staticmethod
    def _probe_uid() -> int | None:
        return UID_BASE + UID_SPAN - 1 if os.geteuid() == 0 else None

    @staticmethod
    def _as_user(uid: int | None) -> list[str]:
        """argv prefix that drops to ``uid`` (done by setpriv, so Python can spawn with vfork)."""
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []

    def _alloc_uid(self) -> int | None:
        return alloc_uid(self.root / ".uids", self.id) if os.geteuid() == 0 else None

    @property
    def _link_registry(self) -> Path:
        """Where the /30s of the egress pool taken by sandboxes are marked."""
        return self.root / ".nets"

    def _free_uid(self, uid: int | None) -> None:
        free_uid(self.root / ".uids", uid)

    def _workspace(self, sandbox_id: str) -> Path:
        if not sandbox_id or "/" in sandbox_id or sandbox_id.startswith("."):
            raise InputError(f"{self.id}: bad sandbox id {sandbox_id!r}")
        return self.root / sandbox_id

    @staticmethod
    def _rlimits(res: Resources, opts: LocalOptions, uid: int | None) -> list[str]:
        lim = [f"--cpu={opts.cpu_time_s}", f"--as={res.memory_mb * 1024 * 1024}"]
        if uid is not None:  # RLIMIT_NPROC counts per real uid: only meaningful with a uid of its own
            lim.append(f"--nproc={res.pids}")
        return ["prlimit", *lim, "--"]

    # ----------------------------------------------------------- provision

    def options(self, profile: Profile) -> LocalOptions:
        """The profile's options with the network its policy allows: the host's network only for
        ``network.egress: internet``, and only if ``options.network`` (when given) does not narrow it."""
        opts = super().options(profile)
        allowed = profile.network.egress == "internet"
        wanted = opts.network if "network" in opts.model_fields_set else allowed
        return opts.model_copy(update={"network": allowed and wanted})

    @classmethod
    def policy_conflicts(cls, profile: Profile, options: BaseModel) -> list[tuple[str, str]]:
        if getattr(options, "network", False) and profile.network.egress != "internet":
            return [("network", "network.egress")]
        return []

    @classmethod
    def unavailable(cls, config: BaseModel) -> dict[str, str]:
        why = egress.unavailable()
        return {e: why for e in cls._NEEDS_LINK} if why else {}

    @classmethod
    def policy_refusals(cls, profile: Profile, options: BaseModel, config: BaseModel) -> list[str]:
        if profile.isolation != "none":
            return []
        out = []
        if profile.network.egress != "internet":
            out.append(f"'isolation: none' runs commands on the host, with its network, so it cannot keep "
                       f"network.egress {profile.network.egress!r}; say `network: {{egress: internet}}` in the profile "
                       f"or drop 'isolation: none'")
        if profile.secrets:
            out.append("'isolation: none' has no init process to hold secrets apart from the host (every process "
                       "of this user would see them); drop 'isolation: none' for a profile with secrets")
        return out

    @staticmethod
    def _wants_link(profile: Profile, opts: LocalOptions, narrowed: bool) -> bool:
        """A namespace of its own joined to the host: for an allow-list, or exposed ports without
        the host's network (``options.network: false`` narrowing an allow-list leaves none)."""
        net = profile.network
        if opts.network or narrowed:
            return False
        return isinstance(net.egress, list) or bool(net.expose)

    def provision(self, request: ProvisionRequest) -> LocalHandle:
        """Make the workspace, its cgroups and mounts, and start the init that holds its namespaces.

        Raises:
            ProvisionError: no isolation tool works here, a limit cannot be set up, or the
                init did not start (what it said is in the message); nothing is left behind.
        """
        profile = request.profile
        sandbox_id = request.sandbox_id
        opts = self.options(profile)
        given = super().options(profile)
        narrowed = "network" in given.model_fields_set and not given.network
        tool = self._tool_for(profile.isolation)
        if request.secrets and tool == "none":
            raise ProvisionError(f"{self.id}: isolation none has no init process to hold secrets apart from the host "
                                 "(they would be visible to every process of this user); use isolation 'process' "
                                 "for a profile with secrets", backend=self.id)
        ws = self._workspace(sandbox_id)
        self._ensure_root()
        meta_dir = self.root / ".meta"
        meta_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        uid = self._alloc_uid() if tool != "none" else None
        hier = self._hierarchies() if tool != "none" else None
        handle = LocalHandle(
            workspace=str(ws), tool=tool, uid=uid, sandbox_id=sandbox_id, resources=profile.resources,
            options=opts, cgroup=local_cgroup.plan(hier, sandbox_id) if hier else None,
            ws_mount=tool != "none" and os.geteuid() == 0, expose=list(profile.network.expose),
            secrets=sorted(request.secrets),
        )
        if tool != "none" and self._wants_link(profile, opts, narrowed):
            why = egress.unavailable()
            if why:
                raise ProvisionError(f"{self.id}: sandbox {sandbox_id}: its policy "
                                     f"({profile.network.describe()}) {why}", backend=self.id)
            handle.link = egress.plan_link(sandbox_id, self.config.egress_pool, self._link_registry, backend=self.id)
        if handle.link is None and tool != "none" and not opts.network:
            handle.expose = []  # options narrowed the network away: nothing is served beyond the sandbox
        meta_path = meta_dir / f"{sandbox_id}.json"

        def record() -> None:
            meta_path.write_text(json.dumps({"sandbox_id": sandbox_id, "owner_labels": request.owner_labels,
                                             "handle": handle.model_dump(mode="json")}))

        record()  # first, so list_owned finds even a half-made sandbox
        try:
            ws.mkdir(parents=True, mode=0o700)
            res = profile.resources
            try:
                if handle.ws_mount:
                    # The disk quota: the workspace (and /tmp, its .tmp) is a tmpfs of disk_mb, mounted
                    # on the host so snapshots read it where it always was.
                    _mount_tmpfs(ws, f"size={res.disk_mb}m,mode=0700,uid={uid},gid={uid}")
                enforced = {}
                if hier is not None and handle.cgroup is not None and handle.cgroup.dirs:
                    enforced = local_cgroup.apply(hier, handle.cgroup, memory_mb=res.memory_mb,
                                                  pids=res.pids, cpu=res.cpu)
            except OSError as exc:
                raise ProvisionError(f"{self.id}: sandbox {sandbox_id}: cannot set up its limits: {exc}",
                                     backend=self.id) from exc
            if handle.link is not None:  # the rules are in place before anything runs in the namespace
                handle.link = egress.make_link(handle.link, profile.network.allow, profile.network.deny,
                                               self._link_registry, backend=self.id)
            (ws / ".tmp").mkdir()
            if uid is not None:
                os.chown(ws, uid, uid)
                os.chown(ws / ".tmp", uid, uid)
            handle.limits = self._limits_account(tool, res, opts, uid, hier, enforced, handle.ws_mount)
            if tool != "none":
                # The init exits at the TTL (plus a grace for gc to tear down first), so a sandbox's
                # processes end on time even if no manager is left to run gc.
                life = int(float(request.ttl)) + TTL_GRACE_S
                handle.life_until = time.time() + life
                handle.pid, handle.starttime, handle.outer_pid = self._start_init(
                    tool, ws, uid, opts, sandbox_id, life, handle.cgroup, handle.link, request.secret_env())
            record()
            return handle
        except BaseException:
            self.teardown(handle)
            raise

    @staticmethod
    def _limits_account(tool: str, res: Resources, opts: LocalOptions, uid: int | None,
                        hier: local_cgroup.Hierarchies | None, enforced: dict[str, str],
                        ws_mount: bool) -> dict[str, str]:
        """Exactly what is enforced for each limit, and how; "not enforced: <why>" otherwise."""
        if tool == "none":
            why = "not enforced: isolation none (no namespaces, no cgroups)"
            return {"memory": f"{why}; only RLIMIT_AS={res.memory_mb}M per process",
                    "pids": why, "cpu": f"{why}; only RLIMIT_CPU={opts.cpu_time_s}s per process",
                    "disk": why, "shm": why + "; /dev/shm is the host's"}
        assert hier is not None
        out = {
            "memory": enforced.get("memory") or
            f"not enforced: {hier.why('memory')}; only RLIMIT_AS={res.memory_mb}M per process",
            "pids": enforced.get("pids") or (f"RLIMIT_NPROC={res.pids} for the sandbox's own uid" if uid is not None
                                             else f"not enforced: {hier.why('pids')}"),
            "cpu": enforced.get("cpu") or
            f"not enforced: {hier.why('cpu')}; only RLIMIT_CPU={opts.cpu_time_s}s per process",
            "disk": f"tmpfs size={res.disk_mb}M on the workspace (and /tmp)" if ws_mount
            else "not enforced: a size-limited workspace mount needs root",
            "shm": f"tmpfs size={opts.shm_mb}M",
        }
        return out

    def _hidden_dirs(self) -> list[str]:
        """Directories a sandbox must not see, covered by an empty read-only tmpfs: the
        manager's home (state store, snapshots) and, without root (the sandbox then has our
        uid), the user's home. Never a system directory or one already private."""
        dirs = {os.path.realpath(self.home)}
        if os.geteuid() != 0:
            try:
                dirs.add(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
            except KeyError:  # a uid without a passwd entry has no home to protect
                pass
        out: list[str] = []
        for d in sorted(dirs, key=len):
            if (d in _NEVER_HIDE or d.startswith(_PRIVATE_PREFIXES) or not os.path.isdir(d)
                    or any(d.startswith(o + "/") for o in out)):
                continue
            out.append(d)
        return out

    def _start_init(self, tool: str, ws: Path, uid: int | None, opts: LocalOptions, sandbox_id: str,
                    life: int, cg: local_cgroup.CgroupPlan | None,
                    link: egress.Link | None = None,
                    secrets: dict[str, str] | None = None) -> tuple[int, str | None, int]:
        """Start the init (in ``link``'s network namespace when given; its environment holding
        ``secrets``); (its pid on the host, its start time, bwrap's or unshare's pid)."""
        # In a namespace of its own the init keeps the network it is started in (the link's);
        # else it makes an empty one, unless it has the host's.
        keep_net = opts.network or link is not None
        shm = f"{opts.shm_mb}m"
        # With the host's network, name resolution must keep working even when /etc/resolv.conf
        # points into /run (systemd-resolved): that one file is bound into the private /run.
        resolv = os.path.realpath(RESOLV_CONF) if opts.network else ""
        resolv = resolv if resolv.startswith(("/run/", "/var/run/")) and os.path.isfile(resolv) else ""
        own_var_run = os.path.isdir("/var/run") and not os.path.islink("/var/run")
        var_tmp = os.path.isdir("/var/tmp") and not os.path.islink("/var/tmp")
        hidden = self._hidden_dirs()
        # the sandbox's end, movable by set_ttl: the init reads it through an inherited descriptor
        end_path = self._end_path(sandbox_id)
        _write_end(end_path, time.time() + life)
        end_fd = os.open(end_path, os.O_RDONLY | os.O_CLOEXEC)
        hold = f"/proc/self/fd/{end_fd}"
        if tool == "bwrap":
            var_run = ["--size", str(8 << 20), "--tmpfs", "/var/run"] if own_var_run else []
            var_run += ["--ro-bind", resolv, resolv] if resolv else []
            var_run += ["--bind", f"{ws}/.tmp", "/var/tmp"] if var_tmp else []
            cover = [a for h in hidden for a in ("--perms", "0555", "--size", "65536", "--tmpfs", h)]
            argv = ["bwrap", "--unshare-all", *(["--share-net"] if keep_net else []), "--uid", "0", "--gid", "0",
                    "--ro-bind", "/", "/", *cover, "--bind", str(ws), str(ws), "--bind", f"{ws}/.tmp", "/tmp",
                    "--dev", "/dev", "--perms", "1777", "--size", str(opts.shm_mb << 20), "--tmpfs", "/dev/shm",
                    "--proc", "/proc", "--size", str(8 << 20), "--tmpfs", "/run", *var_run,
                    *[a for h in hidden for a in ("--remount-ro", h)],
                    "--chdir", str(ws), "--", "sh", "-c", _BWRAP_INIT, str(life), hold]
        else:
            argv = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--ipc", "--uts",
                    "--cgroup", "--propagation", "slave", *([] if keep_net else ["--net"]), "--mount-proc",
                    "sh", "-c", _UNSHARE_INIT, "init", str(ws), str(life), shm, RUN_TMPFS,
                    "1" if own_var_run else "", resolv, "1" if var_tmp else "", "\n".join(hidden), hold]
        err_path = self.root / ".meta" / f"{sandbox_id}.err"
        join_net = ["nsenter", f"--net={link.netns_path}", "--"] if link is not None else []
        cmd = local_cgroup.join_argv(local_cgroup.procs_files(cg)) + join_net + self._as_user(uid) + argv
        try:
            with open(err_path, "wb") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                        start_new_session=True, close_fds=True, pass_fds=(end_fd,), cwd="/",
                                        env={**_base_env(str(ws), "/tmp"), **(secrets or {})})
        finally:
            os.close(end_fd)
        with self._lock:
            self._procs[sandbox_id] = proc
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        ok = bool(sel.select(self.config.start_timeout_s)) and proc.stdout.readline().strip() == b"ready"  # type: ignore[union-attr]
        sel.close()
        proc.stdout.close()  # type: ignore[union-attr]
        if not ok:
            proc.kill()
            proc.wait(5)
            why = err_path.read_text(errors="replace").strip()[-500:]
            raise ProvisionError(f"{self.id}: {tool} sandbox did not start: {why or 'no output'}", backend=self.id)
        deadline = time.monotonic() + self.config.start_timeout_s
        child: list[int] = []
        while not child and time.monotonic() < deadline:
            child = _children(proc.pid)
            if not child:
                time.sleep(0.001)
        if not child:
            raise ProvisionError(f"{self.id}: cannot find the sandbox's init process", backend=self.id)
        return child[0], _starttime(child[0]), proc.pid

    def wait_ready(self, handle: LocalHandle, timeout: float = 60.0) -> LocalReachability:
        if handle.tool != "none" and not _alive(handle.pid, handle.starttime):
            raise ReadinessTimeout(f"{self.id}: sandbox {handle.sandbox_id} init process is gone", backend=self.id)
        if not Path(handle.workspace).is_dir():
            raise ReadinessTimeout(f"{self.id}: workspace {handle.workspace} is missing", backend=self.id)
        # An exposed port: at the sandbox's own address (reachable from this machine only), or on
        # this machine's loopback when the sandbox has the host's network.
        where = handle.link.sandbox_addr if handle.link is not None else "127.0.0.1"
        return LocalReachability(host="localhost", workspace=handle.workspace, isolation=handle.tool,
                                 network=handle.options.network, limits=handle.limits,
                                 address=handle.link.sandbox_addr if handle.link is not None else None,
                                 urls={str(p): f"http://{where}:{p}" for p in handle.expose})

    def _end_path(self, sandbox_id: str) -> Path:
        return self.root / ".meta" / f"{sandbox_id}.end"

    def set_ttl(self, handle: LocalHandle, ttl: float) -> None:
        """Move the end the init keeps (the TTL plus the usual grace) to ``ttl`` seconds from now."""
        if handle.tool == "none":  # no init: nothing of the backend's own ends it
            return
        try:
            _write_end(self._end_path(handle.sandbox_id), time.time() + int(float(ttl)) + TTL_GRACE_S, create=False)
        except OSError as exc:
            raise ProvisionError(f"{self.id}: sandbox {handle.sandbox_id}: cannot move its end: {exc.strerror}",
                                 backend=self.id) from exc

    def probe(self, handle: LocalHandle) -> bool | None:
        """True while the sandbox's init (same pid, same start time) runs; False once it is gone.
        With isolation ``none`` there is no init: the workspace existing is the sandbox."""
        if handle.tool == "none":
            return Path(handle.workspace).is_dir()
        return _alive(handle.pid, handle.starttime)

    # ---------------------------------------------------------------- exec

    def exec(self, handle: LocalHandle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        argv = check_argv(argv, backend=self.id)
        ws = handle.workspace
        wd = str(Path(ws) / cwd) if cwd else ws
        if cwd and not os.path.realpath(wd).startswith(os.path.realpath(ws)):
            raise InputError(f"{self.id}: cwd {cwd!r} is outside the workspace")
        opts = handle.options
        # /tmp is private (the workspace's .tmp) in a namespace; without one it is the host's.
        tmpdir = f"{ws}/.tmp" if handle.tool == "none" else "/tmp"
        full_env = {**_base_env(ws, tmpdir), **opts.env, **(env or {})}
        uid = handle.uid
        prefix = self._rlimits(handle.resources, opts, uid)
        group = None
        if handle.tool == "none":
            cmd = self._as_user(uid) + prefix + list(argv)
            kw: dict[str, Any] = {"cwd": wd}
        else:
            if not _alive(handle.pid, handle.starttime):
                raise ExecError(f"{self.id}: sandbox {handle.sandbox_id} is not running", backend=self.id)
            held = init_secrets(self.id, handle.sandbox_id, handle.pid, handle.secrets)
            if held and not _alive(handle.pid, handle.starttime):  # read from a reused pid: not ours
                raise ExecError(f"{self.id}: sandbox {handle.sandbox_id} is not running", backend=self.id)
            full_env = {**_base_env(ws, tmpdir), **opts.env, **held, **(env or {})}
            ns = ["--user", "--pid", "--mount", "--ipc", "--uts", "--cgroup", *([] if opts.network else ["--net"])]
            # Root enters the sandbox's user namespace and becomes its root (= the sandbox uid
            # outside); anyone else enters as the namespace's owner. Either way the command then
            # loses every capability, so it cannot undo the read-only mounts from inside.
            who = ["-S", "0", "-G", "0"] if uid is not None else ["--preserve-credentials"]
            # The exec's own cgroup (when there are cgroups): its deadline ends all it started.
            group = local_cgroup.exec_group(handle.cgroup)
            cmd = (local_cgroup.join_argv(local_cgroup.procs_files(handle.cgroup, group)) + prefix
                   + ["nsenter", f"--target={handle.pid}", *ns, *who, f"--wd={wd}", "--", *_DROP_CAPS, *argv])
            kw = {"cwd": "/"}
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                                    start_new_session=True, close_fds=True, **kw)
        except OSError as exc:
            local_cgroup.drop_group(group)
            raise ExecError(f"{self.id}: cannot start {argv[0]!r}: {exc.strerror}", backend=self.id) from exc

        def kill() -> None:
            if group is None or not local_cgroup.kill_group(group):
                local_cgroup.kill_tree(proc.pid)

        try:
            return _collect(proc, stdin, timeout, on_output, kill, self.config.max_output_bytes)
        finally:
            local_cgroup.drop_group(group)

    # ------------------------------------------------------------ teardown

    def teardown(self, handle: LocalHandle) -> TeardownReport:
        """Kill every process of the sandbox, remove its cgroups, mounts and workspace.

        The report's ``removed`` lists the cgroup directories and the workspace removed;
        ``detail`` says whether any process was still running (``killed``).

        Raises:
            TeardownError: a process survived SIGKILL, or a cgroup or the workspace cannot be removed.
        """
        sandbox_id = handle.sandbox_id
        ws = Path(handle.workspace)
        killed = False
        if handle.pid and _alive(handle.pid, handle.starttime):
            try:
                os.kill(handle.pid, signal.SIGKILL)  # pid 1 of the namespace: the kernel kills the rest
                killed = True
            except ProcessLookupError:
                pass
        for pg in self._session_pids(ws) if handle.tool == "none" else []:
            try:
                os.killpg(pg, signal.SIGKILL)
                killed = True
            except (ProcessLookupError, PermissionError):
                pass
        with self._lock:
            proc = self._procs.pop(sandbox_id, None)
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        # Whatever is left in the sandbox's cgroups (an exec's helpers outside the pid
        # namespace, say) dies with them; then the cgroups go.
        cgroups = [d for d in handle.cgroup.dirs if os.path.isdir(d)] if handle.cgroup else []
        left = local_cgroup.remove(handle.cgroup)
        if handle.pid:
            deadline = time.monotonic() + 5
            while _alive(handle.pid, handle.starttime) and time.monotonic() < deadline:
                time.sleep(0.005)
            if _alive(handle.pid, handle.starttime):
                raise TeardownError(f"{self.id}: sandbox {sandbox_id} init {handle.pid} survived SIGKILL", backend=self.id)
        if left:
            left = local_cgroup.remove(handle.cgroup)  # once the init is surely gone
        if left:
            raise TeardownError(f"{self.id}: sandbox {sandbox_id}: cannot remove cgroups: {'; '.join(left)}",
                                backend=self.id)
        existed = ws.exists()
        try:
            if existed and handle.ws_mount:
                _unmount(ws)
            shutil.rmtree(ws, ignore_errors=False) if existed else None
        except OSError as exc:
            raise TeardownError(f"{self.id}: cannot remove workspace {ws}: {exc.strerror}", backend=self.id) from exc
        # The network goes once no process of the sandbox is left in it.
        unlinked = egress.remove_link(handle.link, self._link_registry) if handle.link is not None else []
        for suffix in (".json", ".err", ".end"):
            (self.root / ".meta" / f"{sandbox_id}{suffix}").unlink(missing_ok=True)
        self._free_uid(handle.uid)
        return TeardownReport(already_gone=not (killed or existed),
                              removed=[*cgroups, *([str(ws)] if existed else []), *unlinked],
                              detail={"killed": killed, "workspace_removed": existed})

    @staticmethod
    def _session_pids(ws: Path) -> list[int]:
        """Process groups started by exec for isolation ``none`` (recorded nowhere else)."""
        if not ws.exists():
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/cwd").startswith(str(ws)):
                        found.append(os.getpgid(int(entry)))
                except OSError:
                    continue
        return sorted(set(found))

    # ----------------------------------------------------------- list_owned

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        """Every sandbox recorded under this root whose owner labels include ``owner_labels``
        (a record that cannot be read is skipped)."""
        out: list[OwnedSandbox] = []
        meta_dir = self.root / ".meta"
        if not meta_dir.is_dir():
            return out
        for path in sorted(meta_dir.glob("*.json")):
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            labels = meta.get("owner_labels", {}) if isinstance(meta, dict) else {}
            if isinstance(meta, dict) and all(labels.get(k) == v for k, v in owner_labels.items()):
                try:
                    out.append(OwnedSandbox(sandbox_id=meta["sandbox_id"],
                                            handle=LocalHandle.model_validate(meta["handle"])))
                except (KeyError, ValidationError):
                    continue
        return out

    # ------------------------------------------------------------ snapshots

    def snapshot(self, handle: LocalHandle) -> SnapshotResult:
        """Archive the workspace (but its ``.tmp``) as a tar.gz under ``<home>/snapshots/local``."""
        store = self.home / "snapshots" / "local"
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{handle.sandbox_id}-{int(time.time() * 1000)}.tar.gz"
        path = store / name
        try:
            with tarfile.open(path, "w:gz") as tar:
                tar.add(handle.workspace, arcname=".", filter=lambda ti: None if ti.name.startswith("./.tmp/") else ti)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise SnapshotError(f"{self.id}: cannot archive {handle.workspace}: {exc}", backend=self.id) from exc
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return SnapshotResult(data={"path": str(path)}, size_bytes=path.stat().st_size, checksum=f"sha256:{digest}")

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> LocalHandle:
        """A new sandbox for ``request`` whose workspace is the snapshot's.

        Raises:
            SnapshotError: the archive is missing, its checksum differs, or it cannot be
                unpacked (over the workspace's disk quota, say); the new sandbox is then torn down.
        """
        path = Path(snapshot.data["path"])
        if not path.is_file():
            raise SnapshotError(f"{self.id}: snapshot file {path} is missing", backend=self.id)
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        if snapshot.checksum and digest != snapshot.checksum:
            raise SnapshotError(f"{self.id}: snapshot {snapshot.id} checksum mismatch", backend=self.id)
        handle = self.provision(request)
        try:
            with tarfile.open(path, "r:gz") as tar:
                tar.extractall(handle.workspace, filter="data")
            if handle.uid is not None:
                chown_tree(handle.workspace, handle.uid)
        except (OSError, tarfile.TarError) as exc:
            self.teardown(handle)
            raise SnapshotError(f"{self.id}: cannot restore snapshot {snapshot.id}: {exc}", backend=self.id) from exc
        return handle

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        Path(snapshot.data.get("path", "")).unlink(missing_ok=True)
