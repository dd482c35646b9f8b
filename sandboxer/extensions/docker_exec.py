"""How ``ext.docker`` runs one exec over the engine's socket: its output stream and its deadline.

The Engine API multiplexes stdout and stderr into frames on one socket; :class:`FrameReader`
feeds them to the exec convention's :class:`~sandboxer.execution.OutputCollector`. The API has
no "kill exec": :func:`kill_exec` kills every process of an exec past its deadline, found by
the :data:`~sandboxer.execution.EXEC_MARKER` its environment carries. Only
:mod:`sandboxer.extensions.docker` uses this module.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from typing import Any

from sandboxer.execution import EXEC_MARKER, OutputCollector, kill_marked_argv
from sandboxer.extensions.base import OutputCallback

__all__ = ["FrameReader", "kill_exec", "in_container"]


class FrameReader:
    """Demultiplexes the engine's exec stream into an :class:`OutputCollector` (the exec convention)."""

    def __init__(self, cap: int, on_output: OutputCallback | None):
        self.out = OutputCollector(on_output, cap)

    def add(self, stream: int, data: bytes) -> None:
        if stream in (1, 2):  # 0 would be stdin echoed back; the engine sends none here
            self.out.feed("stdout" if stream == 1 else "stderr", data)

    def read_frames(self, raw: Any, deadline: float | None) -> bool:
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


def kill_exec(api: Any, exec_id: str, container_id: str, marker: str) -> None:
    """Kill every process of a timed-out exec: its tree and whatever carries its marker.

    When the engine runs on this machine the exec's host pid (from its inspect data) and the
    marked processes are signalled from here, after checking each belongs to the container
    (pid reuse); a ``setsid`` child whose parent already exited is no longer in the tree, but
    still carries the marker. Otherwise (a remote engine) a second exec sweeps the marked
    processes inside the container (:func:`~sandboxer.execution.kill_marked_argv`), which
    needs ``sh`` in the image. Best effort: it never raises.

    Args:
        api: the SDK's low-level ``APIClient``.
        exec_id: the engine's id of the exec.
        container_id: the container it runs in.
        marker: the value of ``EXEC_MARKER`` in the exec's environment.
    """
    pid = 0
    with contextlib.suppress(Exception):
        pid = int(api.exec_inspect(exec_id).get("Pid") or 0)
    if pid > 0 and in_container(pid, container_id):
        for _ in range(20):  # bounded: a command forking as we kill gets a few more rounds
            victims = {p for p in _descendants(pid) + [pid] + _marked(marker) if in_container(p, container_id)}
            if not victims:
                return
            for victim in victims:
                with contextlib.suppress(OSError):
                    os.kill(victim, 9)
            time.sleep(0.05)
        return
    with contextlib.suppress(Exception):
        sweep = api.exec_create(container_id, kill_marked_argv(marker))["Id"]
        api.exec_start(sweep)


def in_container(pid: int, container_id: str) -> bool:
    """Whether host pid ``pid`` runs in that container (its cgroup path names the container id)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return container_id in fh.read()
    except OSError:
        return False


def _marked(marker: str) -> list[int]:
    """Host pids whose environment carries this exec's marker."""
    needle = f"{EXEC_MARKER}={marker}".encode()
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
