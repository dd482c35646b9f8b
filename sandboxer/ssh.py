"""The one SSH layer every SSH backend uses (paramiko, imported lazily).

Rules it keeps:

* **Host keys are verified.** ``RejectPolicy`` against a known_hosts file
  (``[host]:port`` entries work) and/or a pinned ``SHA256:`` fingerprint.
  Accepting unknown keys needs ``insecure_accept_unknown_host_keys: true``
  and logs a warning on every connection. A key is verified before
  authentication, so a mismatch means nothing ran.
* **Keys only.** A key file (optional passphrase by :class:`SecretRef`) or the
  SSH agent; a ``password`` field is refused when the config is loaded.
* **Deadlines everywhere.** Connect, banner and auth timeouts; each remote
  command runs under :data:`DEADLINE_WRAPPER` on the host *and* a client deadline
  after which its channel is closed; output kept is capped. At the deadline the
  wrapper kills every process of the command (its session, and whatever carries
  its ``SANDBOXER_EXEC`` marker, ``setsid`` children included) and exits 124.
* **Quoting.** Commands are built from argv with :func:`shlex.quote`. Data goes
  in as positional parameters of fixed scripts, never interpolated. Env values
  travel on stdin (read with ``dd`` and ``eval``'d as quoted ``export``
  lines), never on the command line.
* **Reuse.** One transport per host, shared across the steps of a provision;
  :data:`STATS` counts connections and round trips (one per remote command).
* **Errors.** paramiko and socket exceptions become the error tree through one
  table, :func:`ssh_error_table`, applied by :func:`sandboxer.contract.translated`
  (outside the ``except`` block, so no paramiko exception rides on ours).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets as _secrets
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandboxer.contract import ErrorTable, translated
from sandboxer.errors import (
    AuthError,
    BackendError,
    ExecError,
    HostKeyError,
    InputError,
    MissingExtra,
    ProvisionError,
)
from sandboxer.execution import TIMEOUT_EXIT_CODE, OutputCollector, check_argv
from sandboxer.models import ExecResult
from sandboxer.secrets import SecretRef

log = logging.getLogger(__name__)

_FINGERPRINT = r"^SHA256:[A-Za-z0-9+/]{43}=?$"  # a pydantic pattern: Rust regex, where $ is the very end
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch only
#: Exit code reported for a command killed at its deadline (the exec convention's).
TIMEOUT_EXIT = TIMEOUT_EXIT_CODE
_KILL_GRACE = 2


class SSHHostConfig(BaseModel):
    """How to reach and trust one SSH host. Backends embed or extend it."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:%-]+$")
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    key_file: Path | None = Field(default=None, description="private key; None uses the SSH agent")
    key_passphrase: SecretRef | None = None
    use_agent: bool = True
    known_hosts: Path | None = Field(default=None, description="default ~/.ssh/known_hosts")
    host_key_fingerprint: str | None = Field(default=None, pattern=_FINGERPRINT)
    insecure_accept_unknown_host_keys: bool = False
    connect_timeout: float = Field(default=10.0, gt=0)
    banner_timeout: float = Field(default=10.0, gt=0)
    auth_timeout: float = Field(default=10.0, gt=0)
    command_timeout: float = Field(default=600.0, gt=0, description="default deadline of one remote command")
    output_cap_bytes: int = Field(default=1 << 20, gt=0, description="most bytes kept per stream")

    @model_validator(mode="before")
    @classmethod
    def _no_passwords(cls, data: Any) -> Any:
        if isinstance(data, dict) and any("password" in str(k).lower() for k in data):
            raise ValueError("passwords are not accepted in configuration; use key_file or the SSH agent")
        return data

    @field_validator("key_file", "known_hosts", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @property
    def target(self) -> str:
        """``user@address:port``, for messages and reachability."""
        return f"{self.user}@{self.address}:{self.port}"

    def ssh_command(self) -> str:
        """The OpenSSH command line a person would use to reach this host."""
        return f"ssh -p {self.port} {self.user}@{self.address}"


@dataclass
class SSHStats:
    """Counters for the benchmark and tests: connections opened, remote commands run."""

    connections: int = 0
    round_trips: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, *, connections: int = 0, round_trips: int = 0) -> None:
        with self._lock:
            self.connections += connections
            self.round_trips += round_trips

    def reset(self) -> None:
        with self._lock:
            self.connections = self.round_trips = 0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"connections": self.connections, "round_trips": self.round_trips}


STATS = SSHStats()


def _paramiko() -> Any:
    try:
        import paramiko
    except ImportError as exc:
        raise MissingExtra("SSH backends need the Python package 'paramiko'; "
                           "install it with: pip install 'sand-boxer[ssh]'") from exc
    return paramiko


def fingerprint(key_bytes: bytes) -> str:
    """OpenSSH's ``SHA256:`` fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_bytes).digest()).decode().rstrip("=")


class _HostKeyRejected(Exception):
    """Raised by our policy; mapped to HostKeyError by :func:`ssh_error_table`."""


def _policy(cfg: SSHHostConfig) -> Any:
    paramiko = _paramiko()

    class Policy(paramiko.MissingHostKeyPolicy):
        """Not in known_hosts: accept only a pinned fingerprint, or the loud lab opt-in."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            seen = fingerprint(key.asbytes())
            if cfg.host_key_fingerprint is not None:
                if seen.rstrip("=") == cfg.host_key_fingerprint.rstrip("="):
                    return
                raise _HostKeyRejected(
                    f"host key of {hostname} is {seen}, not the pinned {cfg.host_key_fingerprint}"
                )
            if cfg.insecure_accept_unknown_host_keys:
                log.warning("INSECURE: accepting unverified host key %s of %s "
                            "(insecure_accept_unknown_host_keys is on)", seen, hostname)
                return
            where = cfg.known_hosts or "~/.ssh/known_hosts"
            raise _HostKeyRejected(
                f"host key {seen} of {hostname} is not in {where} and no fingerprint is pinned; "
                f"add it to known_hosts or set host_key_fingerprint"
            )

    return Policy()


def ssh_error_table(
    cfg: SSHHostConfig,
    *,
    backend: str | None = None,
    host: str | None = None,
    fail: type[BackendError] = ProvisionError,
) -> ErrorTable:
    """The one map from paramiko's and the socket layer's exceptions to the error tree.

    Used with :func:`sandboxer.contract.translated` around every step that talks to a host.
    Looked up along each exception's MRO, so the most specific row wins (a
    ``PasswordRequiredException`` is an ``AuthenticationException``, a ``BadHostKeyException``
    an ``SSHException``, ``TimeoutError`` (``socket.timeout``) an ``OSError``).

    Args:
        cfg: the host, named in messages.
        backend, host: carried on the raised error.
        fail: what a lost or unreachable connection becomes in this phase
            (ProvisionError is raised as ``transient=True``).
    """
    paramiko = _paramiko()
    where: dict[str, Any] = dict(backend=backend, host=host or cfg.address)

    def lost(msg: str) -> BackendError:
        if fail is ProvisionError:
            return ProvisionError(msg, transient=True, **where)
        return fail(msg, **where)

    def refused(exc: BaseException) -> AuthError:
        how = f"key file {cfg.key_file}" if cfg.key_file else "the SSH agent"
        return AuthError(f"{cfg.target}: authentication with {how} was refused", **where)

    def mismatch(exc: Any) -> HostKeyError:
        return HostKeyError(f"{cfg.target}: host key {fingerprint(exc.key.asbytes())} does not match the known key "
                            f"{fingerprint(exc.expected_key.asbytes())}; nothing was run", **where)

    def timed_out(exc: BaseException) -> BackendError:
        return lost(f"{cfg.target}: timed out ({exc or 'no answer'})")

    def failed(exc: BaseException) -> BackendError:
        return lost(f"{cfg.target}: SSH connection failed: {type(exc).__name__}: {exc}")

    return ErrorTable({
        _HostKeyRejected: lambda exc: HostKeyError(f"{cfg.target}: {exc}; nothing was run", **where),
        paramiko.BadHostKeyException: mismatch,
        paramiko.AuthenticationException: refused,
        paramiko.PasswordRequiredException: lambda exc: AuthError(
            f"{cfg.target}: key file {cfg.key_file} is encrypted; set key_passphrase", **where),
        _KeyUnusable: lambda exc: AuthError(f"{cfg.target}: {exc}", **where),
        TimeoutError: timed_out,  # socket.timeout is its alias
        paramiko.SSHException: failed,
        EOFError: failed,
        OSError: failed,
    })


class _KeyUnusable(Exception):
    """Raised by :func:`_load_key` (the message names the file, never the passphrase); mapped to
    AuthError by :func:`ssh_error_table`."""


def _brokered() -> Any:
    """:mod:`sandboxer.host.brokered` in an installed bundle's worker (no network, no files of the manager's), else None."""
    from sandboxer.host import brokered

    return brokered if brokered.active() else None


def _load_key(cfg: SSHHostConfig, backend: str | None) -> Any:
    """The private key of ``cfg.key_file`` (None: use the agent).

    paramiko lets the ``cryptography`` loader's own errors through (a TypeError when an
    encrypted key gets no passphrase, a ValueError for a wrong one): they are named here,
    where nothing else can raise them, and the one table turns them into an AuthError.
    """
    if cfg.key_file is None:
        return None
    paramiko = _paramiko()
    passphrase = cfg.key_passphrase.resolve(backend=backend) if cfg.key_passphrase else None
    try:
        # bytes: the cryptography loader refuses a str passphrase with a TypeError
        return paramiko.PKey.from_path(cfg.key_file, password=None if passphrase is None else passphrase.encode())
    except OSError as exc:
        problem = f"cannot read key file {cfg.key_file}: {exc.strerror}"
    except (TypeError, ValueError, paramiko.SSHException):
        problem = (f"key file {cfg.key_file} is encrypted; set key_passphrase" if passphrase is None else
                   f"key file {cfg.key_file} cannot be loaded with key_passphrase ({cfg.key_passphrase}): "
                   "a wrong passphrase, or not a private key")
    raise _KeyUnusable(problem)


#: Runs ``$4...`` with a deadline of ``$2`` seconds and ``$3`` seconds' grace; ``$1`` is a fresh
#: token. The command gets its own session (``setsid``: its pid is its process group) and the
#: environment marker ``SANDBOXER_EXEC=$1``, which its children inherit even when they leave the
#: session. At the deadline: TERM to the group and to every marked process, KILL once they are gone
#: or the grace is over, then exit 124. Only a command killed at its deadline is swept: a daemon
#: left by a command that ended in time stays. (A child that both leaves the session and clears
#: its environment escapes; a per-exec cgroup would need root on the host.) Plain POSIX sh:
#: ``kill -s`` (dash has no ``kill -SIG -- -pgid``); stdin goes through fd 3 because sh gives
#: a background job /dev/null before its own redirections.
DEADLINE_WRAPPER = r"""
tok=$1; t=$2; k=$3; shift 3
fired=
trap 'fired=1' USR1
exec 3<&0
if command -v setsid >/dev/null 2>&1; then
  SANDBOXER_EXEC=$tok setsid "$@" 0<&3 3<&- &
else
  SANDBOXER_EXEC=$tok "$@" 0<&3 3<&- &
fi
pid=$!
exec 3<&- 0</dev/null
main=$$
(trap 'kill "$s" 2>/dev/null; exit 0' TERM; sleep "$t" & s=$!; wait "$s" && kill -USR1 "$main") >/dev/null 2>&1 &
dog=$!
while :; do
  wait "$pid"; rc=$?
  [ -n "$fired" ] && break
  kill -0 "$pid" 2>/dev/null || { kill "$dog" 2>/dev/null; wait "$dog" 2>/dev/null; exit "$rc"; }
done
if printf 'x\0y' | grep -q -a -F -e y 2>/dev/null; then
  marked() { grep -l -a -F -e "SANDBOXER_EXEC=$tok" /proc/[0-9]*/environ 2>/dev/null; }
else  # busybox grep stops reading a line at its first NUL: one file at a time through tr
  marked() { for f in /proc/[0-9]*/environ; do
    tr '\0' '\n' < "$f" 2>/dev/null | grep -qxF -e "SANDBOXER_EXEC=$tok" && echo "$f"; done; }
fi
sweep() {
  kill -s "$1" -- "-$pid" 2>/dev/null
  for f in $(marked); do p=${f#/proc/}; kill -s "$1" "${p%/environ}" 2>/dev/null; done
}
sweep TERM
n=0
while [ -n "$(marked)" ] && [ "$n" -lt $((k * 10)) ]; do sleep 0.1; n=$((n + 1)); done
sweep KILL
n=0
while [ -n "$(marked)" ] && [ "$n" -lt 20 ]; do sweep KILL; sleep 0.05; n=$((n + 1)); done
wait "$pid" 2>/dev/null
exit 124
"""


def build_command(argv: list[str], *, cwd: str | None = None, env_bytes: int = 0,
                  timeout: float | None = None) -> str:
    """The remote command line for ``argv``: every word quoted, nothing interpolated.

    Args:
        cwd: remote directory to run in.
        env_bytes: when > 0, that many bytes of quoted ``export`` lines come
            first on stdin and are evaluated before ``argv`` runs.
        timeout: run under :data:`DEADLINE_WRAPPER`, so the host kills every
            process of the command at the deadline and reports exit 124.
    """
    if not argv:
        raise InputError("exec needs a non-empty command (argv)")
    words = [shlex.quote(str(a)) for a in argv]
    if timeout is not None:
        words = ["sh", "-c", shlex.quote(DEADLINE_WRAPPER), "sh", _secrets.token_hex(8),
                 f"{max(timeout, 0.1):.1f}", f"{int(_KILL_GRACE)}", *words]
    cmd = " ".join(words)
    if env_bytes:
        # dd reads byte by byte, so it never consumes the command's own stdin.
        cmd = f'eval "$(dd bs=1 count={int(env_bytes)} 2>/dev/null)" && {cmd}'
    if cwd is not None:
        cmd = f"cd {shlex.quote(cwd)} && {cmd}"
    return cmd


def env_script(env: dict[str, str]) -> bytes:
    """Quoted ``export`` lines; values arrive literally (``$()``, quotes, newlines).

    Raises:
        InputError: a name the shell would not take as a variable name.
    """
    lines = []
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise InputError(f"invalid environment variable name {key!r}: use letters, digits and _")
        lines.append(f"export {key}={shlex.quote(str(value))}\n")
    return "".join(lines).encode()


class SSHConnection:
    """One verified, authenticated transport to a host; many commands over it."""

    def __init__(self, cfg: SSHHostConfig, *, backend: str | None = None, host: str | None = None):
        self.cfg, self.backend, self.host = cfg, backend, host or cfg.address
        self._client: Any = None
        self.round_trips = 0
        self.last_used = time.monotonic()

    def __repr__(self) -> str:
        return f"<SSHConnection {self.cfg.target} {'open' if self.alive else 'closed'}>"

    def errors(self, fail: type[BackendError] = ProvisionError) -> ErrorTable:
        """This host's :func:`ssh_error_table`, a lost connection becoming ``fail``."""
        return ssh_error_table(self.cfg, backend=self.backend, host=self.host, fail=fail)

    @property
    def alive(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def open(self, fail: type[BackendError] = ProvisionError) -> "SSHConnection":
        """Connect, verify the host key, authenticate.

        Raises:
            HostKeyError, AuthError, or ``fail`` (transient) when unreachable.
        """
        paramiko = _paramiko()
        cfg = self.cfg
        client = paramiko.SSHClient()
        known = cfg.known_hosts or Path("~/.ssh/known_hosts").expanduser()
        brokered = _brokered()
        if brokered is not None:  # an installed bundle's worker: files and connection through the broker
            known = brokered.materialize(known)
            if cfg.key_file is not None:
                cfg = cfg.model_copy(update={"key_file": brokered.materialize(cfg.key_file)})

        def connect() -> None:
            if known.exists():
                client.load_host_keys(str(known))
            elif cfg.known_hosts is not None and not (cfg.host_key_fingerprint
                                                      or cfg.insecure_accept_unknown_host_keys):
                raise HostKeyError(f"{cfg.target}: known_hosts file {known} does not exist; nothing was run",
                                   backend=self.backend, host=self.host)
            client.set_missing_host_key_policy(_policy(cfg))
            pkey = _load_key(cfg, self.backend)
            STATS.add(connections=1)
            sock = None if brokered is None else brokered.open_connection(cfg.address, cfg.port, kind="ssh",
                                                                          timeout=cfg.connect_timeout)
            client.connect(
                cfg.address, port=cfg.port, username=cfg.user, pkey=pkey, sock=sock,
                allow_agent=cfg.use_agent and pkey is None, look_for_keys=False,
                timeout=cfg.connect_timeout, banner_timeout=cfg.banner_timeout,
                auth_timeout=cfg.auth_timeout, channel_timeout=cfg.connect_timeout,
            )

        try:
            translated(connect, self.errors(fail))
        except BaseException:
            client.close()
            raise
        self._client = client
        return self

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "SSHConnection":
        return self if self.alive else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def transport(self) -> Any:
        return self._client.get_transport()

    def run(
        self,
        argv: list[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | IO[bytes] | None = None,
        timeout: float | None = None,
        stdout_sink: IO[bytes] | None = None,
        on_output: Callable[[str, str], None] | None = None,
        fail: type[BackendError] = ExecError,
        check: bool = False,
    ) -> ExecResult:
        """Run ``argv`` on the host and wait for it (or its deadline).

        Args:
            argv: the command; each word is quoted.
            cwd: remote directory.
            env: environment, delivered on stdin (never on the command line).
            stdin: bytes or a binary file streamed to the command, then EOF.
            timeout: deadline in seconds (default the host's ``command_timeout``).
                At the deadline the host kills every process of the command
                (see :data:`DEADLINE_WRAPPER`); the channel is closed client-side
                shortly after, should the host not answer.
            stdout_sink: stream stdout here uncapped (for archives) instead of keeping it.
            on_output: called with ``("stdout"|"stderr", text)`` as output arrives.
            fail: the error for a lost connection in this phase.
            check: raise ``fail`` when the exit code is not 0.

        Returns:
            ExecResult (sandboxer/execution.py's convention): ``timed_out`` with exit code 124
            when killed at the deadline; ``truncated`` when a stream passed ``output_cap_bytes``.
        """
        argv = check_argv(argv, backend=self.backend)
        deadline_s = timeout if timeout is not None else self.cfg.command_timeout
        prefix = env_script(env) if env else b""
        cmd = build_command(argv, cwd=cwd, env_bytes=len(prefix), timeout=deadline_s)
        out = OutputCollector(on_output, self.cfg.output_cap_bytes)
        self.round_trips += 1
        self.last_used = started = time.monotonic()
        STATS.add(round_trips=1)
        def execute() -> tuple[bool, int]:
            if not self.alive:
                raise EOFError("connection is closed")
            chan = self.transport.open_session(timeout=self.cfg.connect_timeout)
            try:
                timed_out = self._pump(chan, cmd, prefix, stdin, out, stdout_sink, deadline_s)
                return timed_out, TIMEOUT_EXIT if timed_out else chan.recv_exit_status()
            finally:
                chan.close()

        timed_out, code = translated(execute, self.errors(fail))
        # the wrapper exits 124 when it killed the command at the deadline
        if code == TIMEOUT_EXIT and time.monotonic() - started >= deadline_s:
            timed_out, code = True, TIMEOUT_EXIT
        result = out.result(code, timed_out=timed_out)
        if check and code != 0:
            what = "timed out after %gs" % deadline_s if timed_out else f"exited {code}"
            raise fail(f"{self.cfg.target}: {shlex.join(argv[:3])}... {what}: {result.stderr.strip()[-800:]}",
                       backend=self.backend, host=self.host)
        return result

    def _pump(self, chan: Any, cmd: str, prefix: bytes, stdin: bytes | IO[bytes] | None,
              out: OutputCollector, stdout_sink: IO[bytes] | None, deadline_s: float) -> bool:
        """Send input, collect output until exit or deadline (stdout into ``stdout_sink``, raw and
        uncapped, when given). True when timed out."""
        chan.settimeout(None)
        chan.exec_command(cmd)
        end = time.monotonic() + deadline_s + _KILL_GRACE + 3.0  # the host's sweep: grace + KILL retries
        feeder = None
        if prefix or stdin is not None:
            feeder = threading.Thread(target=_feed, args=(chan, prefix, stdin), daemon=True)
            feeder.start()
        else:
            chan.shutdown_write()
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return True
                select.select([chan], [], [], min(left, 0.5))
                got = False
                for name, ready, recv in (("stdout", chan.recv_ready, chan.recv),
                                          ("stderr", chan.recv_stderr_ready, chan.recv_stderr)):
                    while ready():
                        data = recv(65536)
                        got = True
                        if name == "stdout" and stdout_sink is not None:
                            stdout_sink.write(data)
                        else:
                            out.feed(name, data)
                if not got and chan.exit_status_ready() and chan.eof_received:
                    return False
                if not got and chan.closed:
                    return False
        finally:
            if feeder is not None:
                feeder.join(timeout=1.0)

    def sftp(self, fail: type[BackendError] = ProvisionError) -> Any:
        """An SFTP session (paramiko ``SFTPClient``) over this verified connection; close it after use.

        Raises:
            ``fail`` when the server has no SFTP subsystem or the connection is lost.
        """
        if not self.alive:
            self.open(fail)
        paramiko = _paramiko()
        STATS.add(round_trips=1)
        return translated(lambda: paramiko.SFTPClient.from_transport(self.transport), self.errors(fail))

    def put_file(self, path: str, data: bytes, *, mode: int = 0o600, fail: type[BackendError] = ProvisionError) -> None:
        """Write ``data`` to a remote file created with ``mode`` (default 0600), via stdin."""
        script = 'umask 077 && cat > "$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}"], stdin=data, fail=fail, check=True)


def _feed(chan: Any, prefix: bytes, stdin: bytes | IO[bytes] | None) -> None:
    """Send the env prefix and stdin, then EOF. Runs in its own thread so output never blocks."""
    try:
        if prefix:
            chan.sendall(prefix)
        if isinstance(stdin, (bytes, bytearray)):
            chan.sendall(bytes(stdin))
        elif stdin is not None:
            while chunk := stdin.read(65536):
                chan.sendall(chunk)
        chan.shutdown_write()
    except (OSError, EOFError):
        pass  # the command exited or was killed before reading everything


class ConnectionCache:
    """One live transport per host, reused across provision, wait_ready and exec.

    Idle connections are closed when next looked at after ``idle_s`` seconds.
    Thread-safe: paramiko multiplexes channels over one transport.
    """

    def __init__(self, backend: str | None = None, idle_s: float = 60.0):
        self.backend, self.idle_s = backend, idle_s
        self._conns: dict[tuple, SSHConnection] = {}
        self._lock = threading.Lock()

    def get(self, cfg: SSHHostConfig, *, host: str | None = None,
            fail: type[BackendError] = ProvisionError) -> SSHConnection:
        """A live connection to ``cfg`` (opened if needed)."""
        key = (host, cfg.model_dump_json())
        with self._lock:
            now = time.monotonic()
            for k, c in list(self._conns.items()):
                if not c.alive or now - c.last_used > self.idle_s:
                    c.close()
                    del self._conns[k]
            conn = self._conns.get(key)
        if conn is not None:
            conn.last_used = now
            return conn
        conn = SSHConnection(cfg, backend=self.backend, host=host).open(fail)
        with self._lock:
            other = self._conns.setdefault(key, conn)
        if other is not conn:
            conn.close()
        return other

    def close_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()


class LocalForward:
    """A local port forward (``ssh -L``) over its own connection, until :meth:`close`.

    Listens on 127.0.0.1 and carries each accepted connection to
    ``remote_host:remote_port`` as seen from the SSH host.
    """

    def __init__(self, conn: SSHConnection, remote_port: int, *, remote_host: str = "127.0.0.1",
                 local_port: int = 0):
        self.conn, self.remote = conn, (remote_host, remote_port)
        self._sock = socket.create_server(("127.0.0.1", local_port))
        self._sock.settimeout(0.5)
        self.local_port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name=f"sbx-fwd-{self.local_port}", daemon=True)
        self._accept.start()

    def __repr__(self) -> str:
        return f"<LocalForward 127.0.0.1:{self.local_port} -> {self.remote[0]}:{self.remote[1]}>"

    @property
    def open(self) -> bool:
        return not self._stop.is_set() and self.conn.alive

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, peer = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                chan = self.conn.transport.open_channel("direct-tcpip", self.remote, peer, timeout=10)
            except Exception as exc:  # noqa: BLE001 - one refused forward must not stop the listener
                log.warning("%r: cannot open forward channel: %s", self, exc)
                client.close()
                continue
            t = threading.Thread(target=self._pipe, args=(client, chan), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _pipe(self, client: socket.socket, chan: Any) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, chan], [], [], 0.5)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
        except OSError:
            pass
        finally:
            chan.close()
            client.close()

    def close(self) -> None:
        """Stop listening, close every forwarded connection and the SSH connection."""
        self._stop.set()
        self._sock.close()
        self._accept.join(timeout=2)
        for t in self._threads:
            t.join(timeout=2)
        self.conn.close()


def local_ports_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (used to prove a tunnel is gone)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


__all__ = [
    "DEADLINE_WRAPPER", "STATS", "TIMEOUT_EXIT", "ConnectionCache", "LocalForward",
    "SSHConnection", "SSHHostConfig", "SSHStats", "build_command", "env_script", "fingerprint", "local_ports_free",
    "ssh_error_table",
]
