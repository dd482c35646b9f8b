"""Real OpenSSH servers on 127.0.0.1 for the tests, started by the tests themselves.

Each :class:`SSHD` is one ``/usr/sbin/sshd -D`` with its own generated host
key, listening on its own free port: several of them stand for several hosts.
They share one generated user key (the test user is whoever runs the tests;
as root, ``PermitRootLogin prohibit-password``). Every wait is bounded and
:meth:`SSHD.stop` kills the server and waits for it.

Running as root, an sshd that cannot start is a test ERROR (raise); not root
and no sshd installed is a skip (see :func:`sshd_or_skip`).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD_BIN = "/usr/sbin/sshd"


class SSHDUnavailable(RuntimeError):
    """sshd is missing or did not come up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)


def user_key(workdir: Path) -> Path:
    """The test user's private key in ``workdir`` (generated once)."""
    key = workdir / "id_ed25519"
    if not key.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        _keygen(key, "sandboxer-test-user")
    return key


@dataclass
class SSHD:
    """One running sshd. ``host_pub`` is its host public key line (``type base64``)."""

    workdir: Path
    port: int
    user: str
    user_key: Path
    host_pub: str
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-lf", str(self.workdir / "host_key.pub"), "-E", "sha256"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return out.split()[1]

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_pub}\n"

    def host_config(self, known_hosts: Path | None = None, **extra: object) -> dict:
        """An SSHHostConfig-shaped dict for this server."""
        cfg: dict = {"address": "127.0.0.1", "port": self.port, "user": self.user,
                     "key_file": str(self.user_key), "use_agent": False,
                     "connect_timeout": 5, "banner_timeout": 5, "auth_timeout": 5}
        if known_hosts is not None:
            cfg["known_hosts"] = str(known_hosts)
        cfg.update(extra)
        return cfg

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def start_sshd(workdir: Path, *, key: Path | None = None, path_prepend: list[str] | None = None,
               timeout: float = 15.0) -> SSHD:
    """Start one sshd on a free 127.0.0.1 port, with a fresh host key.

    Args:
        workdir: private directory for its keys, config and log.
        key: the user key to authorise (default: :func:`user_key` of ``workdir``).
        path_prepend: directories put first on PATH of every session (``SetEnv``).

    Raises:
        SSHDUnavailable: sshd is missing or did not accept connections in time.
    """
    if not os.path.exists(SSHD_BIN):
        raise SSHDUnavailable(f"{SSHD_BIN} is not installed (Debian package openssh-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    key = key or user_key(workdir)
    host_key = workdir / "host_key"
    if not host_key.exists():
        _keygen(host_key, "sandboxer-test-host")
    auth = workdir / "authorized_keys"
    auth.write_text(Path(f"{key}.pub").read_text())
    auth.chmod(0o600)
    port = _free_port()
    root = os.geteuid() == 0
    if root:
        # privilege separation needs its empty chroot directory
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    lines = [
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"AuthorizedKeysFile {auth}", f"PidFile {workdir / 'sshd.pid'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "StrictModes no", "PubkeyAuthentication yes", "AllowTcpForwarding yes",
        "PermitRootLogin prohibit-password", "MaxSessions 64", "MaxStartups 64:30:128",
        "LogLevel ERROR", "Subsystem sftp internal-sftp",
    ]
    if path_prepend:
        lines.append("SetEnv PATH=" + ":".join([*path_prepend, "/usr/local/bin:/usr/bin:/bin"]))
    config = workdir / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    log = open(workdir / "sshd.log", "ab")
    proc = subprocess.Popen([SSHD_BIN, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, close_fds=True)
    log.close()
    server = SSHD(workdir=workdir, port=port, user=getpass.getuser(), user_key=key,
                  host_pub=" ".join((workdir / "host_key.pub").read_text().split()[:2]), proc=proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(64).startswith(b"SSH-"):
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    tail = (workdir / "sshd.log").read_text(errors="replace")[-2000:]
    raise SSHDUnavailable(f"sshd on port {port} did not come up within {timeout:g}s; log:\n{tail}")


def sshd_or_skip(workdir: Path, **kw: object) -> SSHD:
    """:func:`start_sshd`, but a skip (with the reason) when not root and sshd is absent."""
    import pytest

    if os.geteuid() != 0 and not (os.path.exists(SSHD_BIN) and shutil.which("ssh-keygen")):
        pytest.skip(f"{SSHD_BIN} or ssh-keygen is not installed and not running as root")
    return start_sshd(workdir, **kw)  # as root a failure is an ERROR, never a skip
