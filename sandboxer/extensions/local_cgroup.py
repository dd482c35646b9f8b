"""ext.local's limits for a sandbox as a whole, and ending a whole process tree.

What this host offers is discovered once (:func:`discover`): a cgroup v2 hierarchy (for
``cgroup.kill`` and any of the memory/pids/cpu controllers enabled there) and, for each of
those controllers that v2 lacks, a cgroup v1 hierarchy (hybrid hosts mount memory, pids and
cpu as v1 and leave cgroup2 at ``/sys/fs/cgroup/unified`` with no controllers).

A sandbox gets one directory per hierarchy used (:func:`plan`, a :class:`CgroupPlan` the
sandbox's handle keeps; then :func:`apply`, which
writes the limits and returns an exact account of what is enforced). Every process of the
sandbox is started through :func:`join_argv`, a shell that moves itself into the sandbox's
cgroups before it execs the real command, so nothing runs outside them even for an instant.
Each exec gets a child cgroup of its own in the tracking hierarchy (:func:`exec_group`), so
its deadline ends every process it started, even one that called ``setsid`` or daemonised
(:func:`kill_group`). Without cgroups, :func:`kill_tree` stops and kills the process tree
(processes that left the tree by double-forking are then out of reach: they end at
teardown or at the TTL).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
BASE_NAME = "sandboxer"
# Moves this shell into each cgroup given before "--" (writing 0 means "me"), then execs the
# rest: the command starts inside its cgroups, and so does every child. In v1 it writes the
# `tasks` file: moving only the calling thread skips the kernel's global threadgroup lock,
# whose RCU grace period makes a `cgroup.procs` write cost 5-20 ms on a busy machine (this
# shell has one thread, so it moves whole). cgroup2 has no such file for domain cgroups.
_JOIN = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'


@dataclass(frozen=True)
class Hierarchies:
    """The cgroup hierarchies this host lets us use, and why a controller is missing."""

    v2: str | None = None
    """``<cgroup2 mount>/sandboxer``: where sandbox cgroups go in the v2 hierarchy."""
    v2_controllers: frozenset[str] = frozenset()
    v1: dict[str, str] = field(default_factory=dict)
    """controller -> ``<v1 mount>/<our own cgroup>/sandboxer``."""
    reasons: dict[str, str] = field(default_factory=dict)

    @classmethod
    def unavailable(cls, why: str) -> Hierarchies:
        return cls(reasons={c: why for c in (*CONTROLLERS, "kill")})

    def has(self, controller: str) -> bool:
        return controller in self.v2_controllers or controller in self.v1

    def why(self, controller: str) -> str:
        return self.reasons.get(controller, "unknown")

    @property
    def track(self) -> str | None:
        """Base of the hierarchy that holds one cgroup per exec (for deadlines).

        cgroup2 when it holds a limit anyway (or there is nothing better); else the v1 pids
        hierarchy, which a process joins without waiting for the kernel (see :data:`_JOIN`)."""
        if self.v2 and (self.v2_controllers or "pids" not in self.v1):
            return self.v2
        return self.v1.get("pids") or next(iter(self.v1.values()), None)


class CgroupPlan(BaseModel):
    """The cgroup directories of one sandbox (stored in its handle)."""

    model_config = ConfigDict(extra="ignore")

    dirs: list[str] = Field(default_factory=list, description="one directory per hierarchy used")
    track: str | None = Field(default=None, description="the one that holds a child cgroup per exec")
    v2: str | None = Field(default=None, description="the one in the cgroup2 hierarchy, if any")


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, super options) from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype, _source, opts = (right.split() + ["", "", ""])[:3]
            point = left.split()[4].replace("\\040", " ")
            out.append((point, fstype, opts.split(",")))
    return out


def _own_cgroups() -> dict[str, str]:
    """Hierarchy key (a v1 controller name, or "" for v2) -> our own cgroup path in it."""
    own = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                own[name] = path
    return own


def discover() -> Hierarchies:
    """Find writable hierarchies for sandbox cgroups. Creates (empty) base directories."""
    if os.geteuid() != 0:
        return Hierarchies.unavailable("creating cgroups needs root")
    mounts = _mounts()
    reasons: dict[str, str] = {}
    v2, v2c = None, frozenset()
    refused: dict[str, str] = {}
    v2_mount = next((p for p, t, _ in mounts if t == "cgroup2"), None)
    if v2_mount is None:
        reasons["kill"] = "no cgroup2 hierarchy is mounted"
    else:
        base = Path(v2_mount) / BASE_NAME
        try:
            base.mkdir(exist_ok=True)
            v2 = str(base)
            offered = set((Path(v2_mount) / "cgroup.subtree_control").read_text().split())
            for c in CONTROLLERS:
                if c in offered:
                    try:  # so each sandbox's directory below gets memory.max, pids.max, cpu.max
                        (base / "cgroup.subtree_control").write_text(f"+{c}")
                    except OSError as exc:
                        refused[c] = f"cgroup2 at {v2_mount} refused to delegate it: {exc.strerror}"
            v2c = frozenset(set((base / "cgroup.subtree_control").read_text().split()) & set(CONTROLLERS))
        except OSError as exc:
            reasons["kill"] = f"cannot use cgroup2 at {v2_mount}: {exc.strerror}"
    own = _own_cgroups()
    v1: dict[str, str] = {}
    for c in CONTROLLERS:
        if c in v2c:
            continue
        point = next((p for p, t, opts in mounts if t == "cgroup" and c in opts), None)
        where = refused.get(c) or (f"cgroup2 at {v2_mount} does not offer it" if v2_mount else "no cgroup2")
        if point is None:
            reasons[c] = f"no cgroup {c} controller ({where}, and no cgroup v1 {c} hierarchy)"
            continue
        # Under our own cgroup, so sandboxes stay inside whatever limits we are under.
        base = Path(point) / own.get(c, "/").lstrip("/") / BASE_NAME
        try:
            base.mkdir(parents=True, exist_ok=True)
            v1[c] = str(base)
        except OSError as exc:
            reasons[c] = f"cannot create cgroup v1 {base}: {exc.strerror}"
    return Hierarchies(v2=v2, v2_controllers=v2c, v1=v1, reasons=reasons)


def plan(hier: Hierarchies, sandbox_id: str) -> CgroupPlan:
    """The directories a sandbox's cgroups will take (pure: record it before :func:`apply`)."""
    track = hier.track
    v2 = f"{hier.v2}/{sandbox_id}" if hier.v2 and (hier.v2_controllers or track == hier.v2) else None
    dirs = [v2] if v2 else []
    for base in hier.v1.values():
        if f"{base}/{sandbox_id}" not in dirs:
            dirs.append(f"{base}/{sandbox_id}")
    return CgroupPlan(dirs=dirs, track=f"{track}/{sandbox_id}" if track else None, v2=v2)


def apply(hier: Hierarchies, cg: CgroupPlan, *, memory_mb: int, pids: int, cpu: float) -> dict[str, str]:
    """Create a sandbox's cgroups and write its limits; return what is enforced, by limit.

    Raises:
        OSError: a directory or a limit could not be written (the caller tears down).
    """
    for d in cg.dirs:
        Path(d).mkdir()
    sid = Path(cg.dirs[0]).name if cg.dirs else ""
    done: dict[str, str] = {}

    def where(c: str) -> tuple[str, Path] | None:
        if c in hier.v2_controllers:
            return "v2", Path(hier.v2 or "") / sid
        if c in hier.v1:
            return "v1", Path(hier.v1[c]) / sid
        return None

    if (w := where("memory")) is not None:
        ver, d = w
        limit = str(memory_mb * 1024 * 1024)
        if ver == "v2":
            (d / "memory.max").write_text(limit)
            swap = d / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")  # RAM only: no escaping the limit into swap
            done["memory"] = f"cgroup v2 memory.max={memory_mb}M"
        else:
            (d / "memory.limit_in_bytes").write_text(limit)
            memsw = d / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(limit)
            done["memory"] = f"cgroup v1 memory.limit_in_bytes={memory_mb}M" + ("" if memsw.exists() else " (swap not counted)")
    if (w := where("pids")) is not None:
        ver, d = w
        (d / "pids.max").write_text(str(pids))
        done["pids"] = f"cgroup {ver} pids.max={pids}"
    if (w := where("cpu")) is not None:
        ver, d = w
        quota = max(1000, round(cpu * CPU_PERIOD_US))
        if ver == "v2":
            (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            done["cpu"] = f"cgroup v2 cpu.max={quota}/{CPU_PERIOD_US}"
        else:
            (d / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
            done["cpu"] = f"cgroup v1 cpu.cfs_quota_us={quota}/{CPU_PERIOD_US}"
    return done


def join_argv(procs_files: list[str]) -> list[str]:
    """argv prefix that starts the command inside the cgroups whose membership files are given."""
    return ["sh", "-c", _JOIN, "join", *procs_files, "--"] if procs_files else []


def procs_files(cg: CgroupPlan | None, exec_dir: str | None = None) -> list[str]:
    """Membership files to join: every sandbox cgroup, the exec's own in the tracking one
    (``tasks`` in v1, ``cgroup.procs`` in v2)."""
    if not cg:
        return []
    return [f"{exec_dir if exec_dir and d == cg.track else d}/{'cgroup.procs' if d == cg.v2 else 'tasks'}"
            for d in cg.dirs]


def exec_group(cg: CgroupPlan | None) -> str | None:
    """Create a child cgroup for one exec in the tracking hierarchy; None without cgroups."""
    if not cg or not cg.track:
        return None
    d = f"{cg.track}/e-{uuid.uuid4().hex[:12]}"
    try:
        os.mkdir(d)
    except OSError:
        return None  # the sandbox's cgroup is gone (torn down): the exec fails on its own
    _prune(cg.track)
    return d


def _prune(track: str, keep: int = 32) -> None:
    """Remove exec cgroups whose background processes have all ended, once there are many."""
    try:
        names = [n for n in os.listdir(track) if n.startswith("e-")]
    except OSError:
        return
    if len(names) > keep:
        for n in names:
            drop_group(f"{track}/{n}")


def drop_group(d: str | None) -> None:
    """Remove an exec's cgroup if nothing of it runs any more (background processes keep it)."""
    if d:
        try:
            os.rmdir(d)
        except OSError:
            pass


def _all_procs(d: Path) -> list[int]:
    pids = []
    for dirpath, _dirs, _files in os.walk(d):
        try:
            pids += [int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def kill_group(d: str, timeout: float = 5.0) -> bool:
    """SIGKILL every process in cgroup ``d`` and below; True once none is left (bounded)."""
    path = Path(d)
    if not path.is_dir():
        return True
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        try:
            kill_file.write_text("1")
        except OSError:
            pass
    else:
        try:  # v1: no cgroup.kill; forbid forks first so the kill loop cannot be outrun
            (path / "pids.max").write_text("0")
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        left = _all_procs(path)
        if not left:
            return True
        if time.monotonic() >= deadline:
            return False
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def remove(cg: CgroupPlan | None) -> list[str]:
    """Kill everything in a sandbox's cgroups and remove them; returns what could not be removed."""
    failed = []
    for d in cg.dirs if cg else []:
        path = Path(d)
        if not path.exists():
            continue
        kill_group(d)
        for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError as exc:
                failed.append(f"{dirpath}: {exc.strerror}")
    return failed


def _children(pid: int) -> list[int]:
    kids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
        except OSError:
            continue
    return kids


def kill_tree(root: int, rounds: int = 100) -> None:
    """Stop, then SIGKILL, ``root`` and every descendant (also those that called setsid).

    Stopping first means no process can fork behind the walk; a process that already left
    the tree (a double fork, reparented to the namespace's init) is out of its reach.
    """
    stopped: list[int] = []
    seen: set[int] = set()
    frontier = [root]
    for _ in range(rounds):
        new = [p for p in frontier if p not in seen]
        if not new:
            break
        for pid in new:
            seen.add(pid)
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                continue
        frontier = [c for p in seen for c in _children(p)]
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
