"""A real Docker engine for the tests, started by the tests themselves.

:func:`ensure_dockerd` reuses whatever daemon answers on the default socket
(``/var/run/docker.sock``) and otherwise starts Debian's ``dockerd`` there,
detached, so several test processes share one daemon and a daemon started by
someone else is never stopped. :func:`ensure_busybox_image` builds the test
image ``FROM scratch`` with Debian's busybox-static, because no registry is
reachable. Neither needs the docker SDK: they speak the engine's HTTP API
over the unix socket with the standard library.

Rules it keeps: every wait is bounded; start-up is serialised across
processes with an ``flock``; a failed start raises :class:`DockerdUnavailable`
with the tail of the daemon's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

SOCKET_PATH = "/var/run/docker.sock"
DOCKER_HOST = f"unix://{SOCKET_PATH}"
PIDFILE = "/var/run/docker.pid"
BUSYBOX = "/bin/busybox"
DEFAULT_IMAGE = "sandboxer-busybox:test"

_STATE_DIR = Path(tempfile.gettempdir()) / "sandboxer-dockerd"
LOG_FILE = _STATE_DIR / "dockerd.log"
_LOCK_FILE = _STATE_DIR / "lock"

# Tried in order until one daemon comes up. --iptables=false everywhere: the
# tests only need loopback port publishing (docker-proxy does that) and must
# not rewrite the host's firewall. The fallbacks cover VMs without a bridge
# module and filesystems where overlayfs cannot stack.
_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("--iptables=false",),
    ("--iptables=false", "--bridge=none"),
    ("--iptables=false", "--bridge=none", "--storage-driver=vfs"),
)

# Bump when the image recipe changes, so an image built by an older recipe is rebuilt.
_IMAGE_RECIPE = "2"

# Keeps the Popen objects of daemons this process started, so they are not
# garbage-collected (with a ResourceWarning) while the daemon runs on.
_STARTED: list[subprocess.Popen] = []


class DockerdUnavailable(RuntimeError):
    """No Docker engine answers and none could be started here."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def api(
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One request to the engine API on the default socket.

    Returns:
        ``(status, body bytes)``.

    Raises:
        OSError: the socket does not answer.
    """
    conn = _UnixHTTPConnection(SOCKET_PATH, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def ping(timeout: float = 2.0) -> bool:
    """Whether a daemon answers ``/_ping`` on the default socket."""
    try:
        status, body = api("GET", "/_ping", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200 and body.strip() == b"OK"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    _STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(_LOCK_FILE, "a+") as fh:
        # A blocking flock is bounded by the holder's own bounded waits.
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_of_running_dockerd() -> int | None:
    """The pid in the default pidfile if that process is a live dockerd."""
    try:
        pid = int(Path(PIDFILE).read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "dockerd" else None


def _log_tail(lines: int = 25) -> str:
    try:
        return "\n".join(LOG_FILE.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start(flags: tuple[str, ...], timeout: float) -> bool:
    """Start one dockerd with ``flags``; True once it answers, False if it died."""
    binary = shutil.which("dockerd") or "/usr/bin/dockerd"
    with open(LOG_FILE, "ab") as log:
        log.write(f"\n=== sandboxer tests: {binary} {' '.join(flags)} ===\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [binary, "-H", DOCKER_HOST, "--pidfile", PIDFILE, *flags],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
            # Its own session: the daemon outlives this test process and a
            # Ctrl-C of pytest does not reach it; other test processes share it.
            start_new_session=True,
        )
    _STARTED.append(proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    # Too slow rather than dead: stop it so the next flag set starts clean.
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    return False


def ensure_dockerd(timeout: float = 90.0) -> str:
    """Return the DOCKER_HOST of a running engine, starting one if none answers.

    Safe to call from many tests and processes at once: the first caller
    starts the daemon, the others wait for it and reuse it. A daemon that was
    already running (or that another process started) is reused as is and
    never stopped here.

    Args:
        timeout: overall seconds to wait for a daemon to answer.

    Returns:
        ``"unix:///var/run/docker.sock"``.

    Raises:
        DockerdUnavailable: not root and no daemon answers, or every attempt
            to start one failed (the message holds the daemon log's tail).
    """
    if ping():
        return DOCKER_HOST
    if os.geteuid() != 0:
        raise DockerdUnavailable(f"no Docker engine answers on {SOCKET_PATH} and starting dockerd needs root")
    if not (shutil.which("dockerd") or os.path.exists("/usr/bin/dockerd")):
        raise DockerdUnavailable("dockerd is not installed (Debian package docker.io)")
    deadline = time.monotonic() + timeout
    with _locked():
        # A daemon that is starting or stopping holds the pidfile: wait for it
        # to settle instead of racing it with a second one.
        while _pid_of_running_dockerd() is not None and time.monotonic() < deadline:
            if ping():
                return DOCKER_HOST
            time.sleep(0.2)
        if _pid_of_running_dockerd() is not None:
            raise DockerdUnavailable(
                f"a dockerd (pid {_pid_of_running_dockerd()}) runs but does not answer on {SOCKET_PATH} "
                f"within {timeout:g}s"
            )
        tried = []
        for flags in _FLAG_SETS:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if _start(flags, left):
                return DOCKER_HOST
            tried.append(" ".join(flags))
            # The failed daemon may take a moment to release its pidfile.
            settle = time.monotonic() + 10
            while _pid_of_running_dockerd() is not None and time.monotonic() < settle:
                time.sleep(0.2)
        raise DockerdUnavailable(
            f"dockerd did not come up within {timeout:g}s (tried: {'; '.join(tried) or 'nothing'}); "
            f"log {LOG_FILE}:\n{_log_tail()}"
        )


# ---------------------------------------------------------------- the image


def _busybox_applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, timeout=10, check=True).stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _build_context(busybox: bytes, label: str) -> bytes:
    """A build context: a Dockerfile and a rootfs with busybox and its applet links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dockerfile = (
            "FROM scratch\n"
            "COPY rootfs/ /\n"
            f'LABEL sandboxer.test-image="{label}"\n'
            "ENV PATH=/bin\n"
            'CMD ["sh"]\n'
        )
        _add_file(tar, "Dockerfile", dockerfile.encode())
        for d in ("rootfs", "rootfs/bin", "rootfs/etc", "rootfs/root", "rootfs/home", "rootfs/work"):
            _add_dir(tar, d)
        _add_dir(tar, "rootfs/tmp", 0o1777)
        _add_file(tar, "rootfs/bin/busybox", busybox, 0o755)
        for applet in _busybox_applets():
            link = tarfile.TarInfo(f"rootfs/bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        _add_file(tar, "rootfs/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        _add_file(tar, "rootfs/etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def _image_label(tag: str) -> str | None:
    status, body = api("GET", f"/images/{urllib.parse.quote(tag, safe='')}/json")
    if status != 200:
        return None
    labels = (json.loads(body).get("Config") or {}).get("Labels") or {}
    return labels.get("sandboxer.test-image")


def _image_id(tag: str) -> str:
    status, body = api("GET", f"/images/{urllib.parse.quote(tag, safe='')}/json")
    if status != 200:
        raise DockerdUnavailable(f"image {tag} not found after building it: {body[:300]!r}")
    return json.loads(body)["Id"]


def ensure_busybox_image(tag: str = DEFAULT_IMAGE, timeout: float = 120.0) -> str:
    """Build (once) a ``FROM scratch`` busybox image tagged ``tag``; return its id.

    The image holds ``/bin/busybox`` from Debian's busybox-static, a symlink
    per applet (sh, sleep, echo, cat, tar, ls, ...), ``/tmp``, ``/work`` and a
    minimal ``/etc/passwd``. An image already tagged ``tag`` from the same
    busybox binary and recipe is reused.

    Raises:
        DockerdUnavailable: no daemon, no busybox, or the build failed.
    """
    ensure_dockerd()
    if not os.path.exists(BUSYBOX):
        raise DockerdUnavailable(f"{BUSYBOX} is missing (Debian package busybox-static)")
    busybox = Path(BUSYBOX).read_bytes()
    label = f"{_IMAGE_RECIPE}-{hashlib.sha256(busybox).hexdigest()[:16]}"
    if _image_label(tag) == label:
        return _image_id(tag)
    with _locked():
        if _image_label(tag) == label:  # another process built it meanwhile
            return _image_id(tag)
        query = urllib.parse.urlencode({"t": tag, "rm": "1", "forcerm": "1"})
        status, body = api(
            "POST",
            f"/build?{query}",
            body=_build_context(busybox, label),
            headers={"Content-Type": "application/x-tar"},
            timeout=timeout,
        )
        errors = []
        for line in body.decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                msg: dict[str, Any] = json.loads(line)
                if "error" in msg:
                    errors.append(str(msg["error"]))
        if status != 200 or errors:
            raise DockerdUnavailable(f"building {tag} failed (HTTP {status}): {'; '.join(errors) or body[:500]!r}")
        return _image_id(tag)
