"""The parent of every ``packer build`` (vm-packer's build mode): Packer dies with the process that started it.

Run as a script (``python -I packer_watchdog.py FD GRACE packer build ...``, standard library only,
as the leader of the build's own process group). It starts Packer as its child, waits for it, and
exits with its status. ``FD`` is the read end of a pipe whose write end only the manager's process
holds: when that process goes away, however it ends (SIGKILL included), the pipe reads EOF and the
watchdog ends the whole group, SIGTERM first (Packer cleans up what it made), SIGKILL after
``GRACE`` seconds. A SIGTERM sent to the group by the manager reaches Packer directly; the
watchdog waits for it to exit rather than dying first. What the dead manager left in the state
store and its home is cleaned up the next time (:meth:`PackerBuilder.reap_dead`).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    fd, grace, command = int(argv[1]), float(argv[2]), argv[3:]
    # a handler, not SIG_IGN: an ignored signal would stay ignored in Packer across exec
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    orphaned = False
    while child.poll() is None:
        try:
            readable, _, _ = select.select([fd], [], [], 0.25)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select
            continue
        if readable and not os.read(fd, 64):
            orphaned = True
            break
    if orphaned:
        os.killpg(0, signal.SIGTERM)
        end = time.monotonic() + grace
        while child.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        os.killpg(0, signal.SIGKILL)  # the provisioners' processes too; this process last
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
