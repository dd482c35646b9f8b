"""What a test could leak: a secret through an exception (everything an operator's logging could
render), and Docker resources of compose projects (containers, volumes, networks) left on the engine.

:class:`ComposeWatch` tells this run's compose projects from those of other runs sharing the engine
by the working directory compose labels every container with: it is under this run's base temp
directory. It learns the projects from the engine's container ``create`` events, so a project whose
containers are all gone (a removed or lost stack that left its network and volume) is still known.
A project that never got a container cannot be told apart and is not covered.
"""

from __future__ import annotations

import os
import json
import shutil
import subprocess
import threading
import traceback
from pathlib import Path
from typing import Any, Callable


def caught(call: Callable[[], Any]) -> BaseException:
    """The exception ``call`` raises, caught in a frame that holds no secret (its locals are rendered)."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever it is
        return exc
    raise AssertionError("no error was raised")


def reachable_text(err: BaseException) -> str:
    """Everything an operator's logging or error reporter could render from ``err``."""
    return "\n".join([
        str(err), repr(err), repr(err.__cause__), repr(err.__context__),
        "".join(traceback.TracebackException.from_exception(err, capture_locals=True).format()),
    ])


_PROJECT = "com.docker.compose.project"
_WORKDIR = "com.docker.compose.project.working_dir"


def _docker(*args: str) -> list[str]:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    return res.stdout.split() if res.returncode == 0 else []


class ComposeWatch:
    """The compose projects this test run brought up, and what each one left on the Docker engine."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self._projects: dict[str, str] = {}  # project -> its working dir (under root)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> bool:
        """Start following the engine's events (again, if it was not up before). False: no engine to watch."""
        if self._proc is not None and self._proc.poll() is None:
            return True
        from tests.support.dockerd import ping

        if shutil.which("docker") is None or not ping():
            return False
        self._proc = subprocess.Popen(
            ["docker", "events", "--filter", "type=container", "--filter", "event=create",
             "--format", "{{json .Actor.Attributes}}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, args=(self._proc,), daemon=True,
                                        name="compose-leak-watch")
        self._reader.start()
        return True

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process is stopped
            try:
                attrs = json.loads(line)
            except ValueError:
                continue
            project, workdir = attrs.get(_PROJECT), attrs.get(_WORKDIR) or ""
            if project and self._ours(Path(workdir)):
                with self._lock:
                    self._projects.setdefault(project, workdir)

    def _ours(self, workdir: Path, under: Path | None = None) -> bool:
        return workdir.is_relative_to((under or self.root).resolve()) if workdir.is_absolute() else False

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._proc = None

    def projects(self, under: Path | None = None) -> list[str]:
        """This run's projects, or those whose working dir is under ``under``."""
        with self._lock:
            return sorted(p for p, wd in self._projects.items() if under is None or self._ours(Path(wd), under))

    @staticmethod
    def leftovers(project: str) -> list[str]:
        """What of ``project`` is still on the engine: ``container <id>``, ``volume <name>``, ``network <name>``."""
        f = f"label={_PROJECT}={project}"
        return ([f"container {c}" for c in _docker("ps", "-aq", "--filter", f)]
                + [f"volume {v}" for v in _docker("volume", "ls", "-q", "--filter", f)]
                + [f"network {n}" for n in _docker("network", "ls", "--filter", f, "--format", "{{.Name}}")])

    @staticmethod
    def remove(project: str) -> None:
        """Remove what is left of ``project`` (containers first: a network in use cannot go)."""
        f = f"label={_PROJECT}={project}"
        for kind, rm in (("ps", ["rm", "-f", "-v"]), ("volume", ["volume", "rm", "-f"]), ("network", ["network", "rm"])):
            names = _docker("ps", "-aq", "--filter", f) if kind == "ps" else _docker(kind, "ls", "-q", "--filter", f)
            if names:
                subprocess.run(["docker", *rm, *names], capture_output=True, timeout=120)

    def check(self, under: Path | None = None) -> dict[str, list[str]]:
        """Per project of this run (under ``under``) that left anything: what it left. All of it is removed."""
        leaked = {}
        for project in self.projects(under):
            left = self.leftovers(project)
            if left:
                leaked[project] = left
                self.remove(project)
            with self._lock:  # checked clean (or cleaned): a later check need not ask again
                self._projects.pop(project, None)
        return leaked


def describe_leaks(leaked: dict[str, list[str]]) -> str:
    return "; ".join(f"{p}: {', '.join(left)}" for p, left in sorted(leaked.items()))


def host_network_leftovers(checkout: str | None = None) -> set[str]:
    """What sandboxes make on this host for a network policy or exposed ports, now present: their
    network namespaces, nftables tables, interfaces, and port forwarder processes (with
    ``checkout``, only forwarders started from that source tree: another run's are not ours)."""
    import shutil
    import subprocess

    found: set[str] = set()
    if shutil.which("ip"):
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        found |= {f"netns {w.split()[0]}" for w in out.splitlines() if w.startswith("sandboxer-")}
        out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
        found |= {f"link {ln.split(':')[1].strip().split('@')[0]}" for ln in out.splitlines()
                  if ln.split(":")[1].strip().startswith(("sbx", "sbd")) and not ln.split(":")[1].strip().startswith("sbxt")}
    if shutil.which("nft"):
        out = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True, timeout=30).stdout
        found |= {f"nft table {ln.split()[2]}" for ln in out.splitlines() if len(ln.split()) > 2
                  and ln.split()[2].startswith("sandboxer_")}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"sandboxer.forward" in cmd and b"-m" in cmd:
                if checkout is not None:
                    try:
                        env = open(f"/proc/{pid}/environ", "rb").read()
                    except OSError:
                        continue
                    if checkout.encode() not in env:
                        continue
                found.add(f"forwarder pid {pid}")
    return found
