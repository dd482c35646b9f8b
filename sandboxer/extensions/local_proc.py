"""ext.local's process plumbing: the init scripts, the sandbox uid registry, and an exec's output loop.

Split from local.py (which owns the sandbox's lifecycle) so each stays readable: what runs as a
sandbox's pid 1 under bubblewrap or ``unshare``, how a sandbox gets a uid of its own (shared with
other extensions that give sandboxes uids, through :data:`sandboxer.extensions.local.UID_REGISTRY`),
and how a command's output is streamed and collected by the exec convention.
"""

from __future__ import annotations

import os
import random
import selectors
import subprocess
import time
from pathlib import Path
from typing import Callable

from sandboxer.errors import ProvisionError
from sandboxer.execution import OUTPUT_CAP, OutputCollector
from sandboxer.extensions.base import OutputCallback
from sandboxer.models import ExecResult

UID_BASE = 2_000_000
UID_SPAN = 1_000_000

# Holds the namespaces until the sandbox's end: ``life`` seconds from now, or the epoch second
# written since in the file open as ``$hold`` (a /proc/self/fd link: the file itself is out of the
# sandbox's sight). The file is rewritten in place when the end moves (set_ttl); it is read every
# 10 s at most, and a value that is not a number is ignored.
_HOLD = r"""
end=$(( $(date +%s) + life ))
while now=$(date +%s); [ "$now" -lt "$end" ]; do
  left=$((end - now)); [ "$left" -le 10 ] || left=10
  sleep "$left"
  e=$(cat "$hold" 2>/dev/null) || e=
  case "$e" in ''|*[!0-9]*) ;; *) end=$e ;; esac
done
"""

# Under bwrap, pid 1 is bwrap's own init, which waits for every process in the namespace;
# so at the TTL the holder kills them all (kill -1 spares only itself and pid 1).
_BWRAP_INIT = 'life="$0"; hold="$1"; echo ready' + _HOLD + 'kill -KILL -1'



def alloc_uid(registry: Path, backend: str) -> int:
    """Take an unprivileged uid of the sandbox range for one sandbox: a marker file in
    ``registry`` made with O_EXCL, so no two sandboxes (of any process) get one uid at once.

    Extensions that give sandboxes uids share :data:`UID_REGISTRY` by default, so a sandbox of
    one never shares a uid with a sandbox of another.

    Raises:
        ProvisionError: no free uid was found.
    """
    registry.mkdir(parents=True, exist_ok=True)
    for _ in range(200):
        uid = UID_BASE + random.randrange(UID_SPAN - 1)
        try:
            os.close(os.open(registry / str(uid), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return uid
        except FileExistsError:
            continue
    raise ProvisionError(f"{backend}: could not allocate a sandbox uid in {registry}", backend=backend)


def free_uid(registry: Path, uid: int | None) -> None:
    """Give back a uid taken by :func:`alloc_uid` (None: nothing was taken)."""
    if uid is not None:
        (registry / str(uid)).unlink(missing_ok=True)


def chown_tree(path: str | os.PathLike[str], uid: int) -> None:
    """Make ``path`` and everything under it (symlinks themselves, not their targets) ``uid``'s."""
    for dirpath, dirs, files in os.walk(path):
        for n in [dirpath, *(os.path.join(dirpath, f) for f in dirs + files)]:
            os.lchown(n, uid, uid)


_DROP_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]

# Runs as the sandbox's pid 1 under `unshare`: give it a private /tmp (the workspace's .tmp),
# /run and /dev/shm, make every other mount read-only, say "ready", then hold the namespaces
# until the TTL runs out.
_UNSHARE_INIT = r"""
set -e
ws="$1"
life="$2"
shm="$3"
mount --bind "$ws" "$ws"
mount --bind "$ws/.tmp" /tmp
[ -z "$7" ] || mount --bind "$ws/.tmp" /var/tmp
[ -z "$6" ] || exec 3< "$6"  # held open: the file stays reachable once /run is covered
mount -t tmpfs -o "$4" tmpfs /run
[ -z "$5" ] || mount -t tmpfs -o "$4" tmpfs /var/run
if [ -n "$6" ]; then
  mkdir -p "${6%/*}"
  : > "$6"
  mount --no-canonicalize --bind /proc/self/fd/3 "$6"
  exec 3<&-
fi
# A /dev of its own like bwrap's: of the host's device nodes only null, zero, full, random,
# urandom and tty (no host socket or device that happens to be world-accessible).
mkdir /run/.hostdev
mount --rbind /dev /run/.hostdev
mount -t tmpfs -o size=1m,mode=755,nosuid tmpfs /dev
for d in null zero full random urandom tty; do
  : > "/dev/$d"
  mount --bind "/run/.hostdev/$d" "/dev/$d"
done
umount -l /run/.hostdev
rmdir /run/.hostdev
# The manager's home (and, without root, the user's): an empty tmpfs, read-only by the loop
# below; a workspace inside it is moved back on top.
printf '%s\n' "$8" | while IFS= read -r h; do
  [ -n "$h" ] || continue
  under=
  case "$ws/" in "$h"/*) under=1; mkdir /run/.ws; mount --bind "$ws" /run/.ws ;; esac
  mount -t tmpfs -o size=64k,mode=555,nosuid,nodev tmpfs "$h"
  if [ -n "$under" ]; then mkdir -p "$ws"; mount --move /run/.ws "$ws"; rmdir /run/.ws; fi
done
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o "size=$shm,mode=1777,nosuid,nodev" tmpfs /dev/shm
awk '{print $2}' /proc/self/mounts | sort -r | while read -r m; do
  case "$m" in "$ws"|/tmp|/var/tmp|/run|/var/run|/dev/shm|/dev/pts) continue ;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
hold="$9"
echo ready
""" + _HOLD


def _collect(proc: subprocess.Popen, stdin: bytes | None, timeout: float | None,
             on_output: OutputCallback | None, kill: Callable[[], None], cap: int = OUTPUT_CAP) -> ExecResult:
    """Stream a process's output to ``on_output`` and collect it (the exec convention of
    sandboxer/execution.py); at ``timeout`` call ``kill``, which ends the whole process tree."""
    if stdin:
        try:
            proc.stdin.write(stdin)  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
    out = OutputCollector(on_output, cap)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")  # type: ignore[arg-type]
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout if timeout else None
    timed_out = False
    open_streams = 2
    while open_streams:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        events = sel.select(wait)
        if not events and deadline is not None and time.monotonic() >= deadline:
            timed_out = True
            kill()
            break
        for key, _ in events:
            chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            out.feed(key.data, chunk)
    sel.close()
    code = proc.wait()
    for s in (proc.stdout, proc.stderr):
        s.close()  # type: ignore[union-attr]
    return out.result(code, timed_out=timed_out)
