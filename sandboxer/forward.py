"""Port forwards that outlive the process that asked for them: one small process per sandbox.

An SSH backend's exposed ports (``network.expose``) are reached at local URLs, and a sandbox
created by ``sandboxer create`` outlives that command. So the forward is not a thread of the
manager: :func:`start` runs ``python -m sandboxer.forward`` detached (a session of its own, a
minimal environment, its config on stdin, never on its command line). It opens one SSH
connection with the SSH layer (host key verified, as every connection is), listens on
127.0.0.1 for each port, prints one JSON line ``{"ports": {"<remote>": <local>}}``, and carries
connections until it is stopped (:func:`stop`, from teardown, in any process), until its SSH
connection is lost, or until its deadline (the sandbox's TTL plus a grace), whichever is first.

Where it runs is recorded in the sandbox's handle (:class:`Forwarder`: pid, start time, ports),
so teardown and gc in another process find it; a reused pid is told apart by its start time.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sandboxer.errors import BackendError, ProvisionError

#: Seconds a forwarder stays after the sandbox's TTL, so gc tears the sandbox down first.
GRACE_S = 60
START_TIMEOUT_S = 30.0


class Forwarder(BaseModel):
    """A running forwarder (stored in a handle; never a secret)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pid: int
    starttime: str | None = None
    #: remote port (as a string) -> the local port on 127.0.0.1 that reaches it
    ports: dict[str, int] = Field(default_factory=dict)

    def urls(self) -> dict[str, str]:
        return {remote: f"http://127.0.0.1:{local}" for remote, local in self.ports.items()}


def _starttime(pid: int) -> str | None:
    """The process's start time (``/proc/<pid>/stat``), or None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().decode().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(fwd: Forwarder | None) -> bool:
    return fwd is not None and fwd.starttime is not None and _starttime(fwd.pid) == fwd.starttime


def start(cfg: Any, ports: list[int], life_s: float, *, backend: str, host: str,
          secrets: dict[str, str] | None = None) -> Forwarder:
    """Start a forwarder to ``ports`` on the SSH host of ``cfg`` (an :class:`~sandboxer.ssh.SSHHostConfig`).

    Args:
        life_s: seconds it may run (the sandbox's TTL; :data:`GRACE_S` is added).
        secrets: the environment variables its config's secret references name (a key's
            passphrase), by name: they alone of the manager's environment reach it.

    Raises:
        ProvisionError: it did not come up (what it said is in the message); nothing is left running.
    """
    from sandboxer.ssh import SSHHostConfig

    # a backend's host entry may carry fields of its own (a VM's workspace root): only the SSH ones travel
    ssh_fields = set(SSHHostConfig.model_fields)
    payload = {"cfg": cfg.model_dump(mode="json", include=ssh_fields), "ports": list(ports), "life": float(life_s) + GRACE_S,
               "backend": backend, "host": host}
    env = {"PATH": os.environ.get("PATH") or os.defpath, "LANG": "C.UTF-8", "HOME": tempfile.gettempdir(),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **(secrets or {})}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "sandboxer.forward"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env, cwd="/", close_fds=True,
                                start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(payload).encode())
        proc.stdin.close()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if sel.select(START_TIMEOUT_S) else b""
        sel.close()
        proc.stdout.close()
        try:
            answer = json.loads(line) if line else {}
        except ValueError:
            answer = {}
        if "ports" not in answer:
            proc.kill()
            proc.wait(10)
            err.seek(0)
            why = answer.get("error") or err.read().decode("utf-8", "replace").strip()[-600:] or "no answer"
            raise ProvisionError(f"{backend}: forwarding ports {', '.join(map(str, ports))} from {host}: {why}",
                                 backend=backend, host=host)
    return Forwarder(pid=proc.pid, starttime=_starttime(proc.pid), ports={str(k): int(v) for k, v in
                                                                          answer["ports"].items()})


def stop(fwd: Forwarder | None) -> bool:
    """End a forwarder (SIGTERM, then SIGKILL); True if it was running. Never raises for one gone."""
    if not alive(fwd):
        return False
    assert fwd is not None
    try:
        os.kill(fwd.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 5
    while alive(fwd) and time.monotonic() < deadline:
        time.sleep(0.02)
    if alive(fwd):
        try:
            os.kill(fwd.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def _serve(payload: dict[str, Any]) -> int:
    from sandboxer.ssh import LocalForward, SSHConnection, SSHHostConfig

    backend, host = payload.get("backend"), payload.get("host")
    stop_at = time.monotonic() + float(payload["life"])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    try:
        cfg = SSHHostConfig.model_validate(payload["cfg"])
        forwards = []
        for port in payload["ports"]:
            conn = SSHConnection(cfg, backend=backend, host=host).open(ProvisionError)
            forwards.append((port, LocalForward(conn, int(port))))
    except BackendError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bad config: say so to the starter, which raises
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"ports": {str(p): f.local_port for p, f in forwards}}), flush=True)
    while not done.is_set() and time.monotonic() < stop_at and all(f.open for _, f in forwards):
        done.wait(0.5)
    for _, f in forwards:
        f.close()
    return 0


def main() -> int:
    """``python -m sandboxer.forward``: read the config on stdin, forward until stopped."""
    os.chdir("/")
    return _serve(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Forwarder", "alive", "start", "stop"]
