"""Finding the local processes a stand-in sandbox started, by the marker in their environment.

A stand-in runs a sandbox's commands as real local processes and puts a marker
variable in each one's environment. Every descendant inherits it, whatever
process group or session it moves to, so the marker finds a whole sandbox's
processes the way a real provider's VM or container boundary holds them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def marked(name: str, value: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment has ``name=value``."""
    want = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if want not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if state != "Z":
            found.append(int(entry.name))
    return found


def kill_marked(name: str, value: str, rounds: int = 5) -> None:
    """SIGKILL every process carrying the marker (a VM or container going away), a bounded few rounds."""
    for _ in range(rounds):
        pids = marked(name, value)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
