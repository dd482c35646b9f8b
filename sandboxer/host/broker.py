"""The capability broker: what an installed bundle's worker may reach, decided call by call.

A signed bundle's worker (:mod:`sandboxer.trust.installed`) runs in namespaces of its own: no
network but its own loopback, a filesystem holding only the system's libraries, the Python it
runs on, its package, its private home (writable only where ``fs:write`` grants say) and the
secret files it is granted. The one way out is this broker's Unix socket, bound into the worker
at :data:`WORKER_SOCKET`. Each connection to it carries one request, a JSON line with the token
the worker was given on its handshake (its children are never given it, so a sandbox the worker
runs as a subprocess cannot use the worker's grants), and gets one JSON line back:

* ``{"op": "secret", "ref": "env:NAME"}`` -> the value, if a ``secrets:read:<ref>`` grant names it
  (``"whole": true`` with a ``file:`` reference: the whole file, for key and known_hosts files);
* ``{"op": "connect", "host": H, "port": P, "kind": "egress"|"ssh"}`` -> the socket becomes a relay to
  ``H:P``, if a ``network:egress`` (or ``ssh:connect``) grant matches ``H``; an ``ssh`` relay is
  closed unless the far end speaks SSH, and a host *name* never reaches a loopback, link-local or
  unspecified address (grant the address itself for that);
* ``{"op": "state", "action": "get"|"put"|"delete"|"keys", ...}`` -> the extension's own rows, if
  ``state:own-tables`` is granted.

Every decision, allowed or denied, is an audit event in the state store (``what: capability``),
and a denial reaches the handler as :class:`~sandboxer.errors.GrantDenied` naming the call, the
grants it has and how the operator would grant it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

#: Where the broker's socket is inside a worker (its directory is bound there).
WORKER_DIR = "/run/sandboxer"
WORKER_SOCKET = f"{WORKER_DIR}/broker.sock"
#: Longest request line the broker reads.
MAX_REQUEST = 64 * 1024
#: Seconds a worker has to send its request, and the broker to connect out.
REQUEST_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
#: Most bytes the broker reads from an SSH server looking for its ``SSH-`` version line.
SSH_BANNER_MAX = 8192


def _is_internal(ip: str) -> str | None:
    addr = ipaddress.ip_address(ip.split("%")[0])
    for kind, test in (("loopback", addr.is_loopback), ("link-local", addr.is_link_local),
                       ("unspecified", addr.is_unspecified), ("multicast", addr.is_multicast)):
        if test:
            return kind
    return None


class Denied(Exception):
    """A request the broker refuses (its message goes back to the worker as GrantDenied)."""


class Broker:
    """One extension's broker: a listening Unix socket, a thread per request, every decision recorded.

    Args:
        ext_id: the extension (named in messages and audit events).
        grants: its :class:`~sandboxer.trust.grants.GrantSet`.
        version: its installed version (in audit events).
        state: the manager's state store, for audit events and ``state:own-tables`` (anything with
            ``record_audit`` and ``extension_data``); None records nothing (a describe worker).
    """

    def __init__(self, ext_id: str, grants: Any, *, version: str | None = None, state: Any = None):
        self.ext_id = ext_id
        self.grants = grants
        self.version = version
        self.state = state
        self.token = secrets.token_urlsafe(32)
        self.dir: Path | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False

    def __repr__(self) -> str:  # never the token
        return f"<Broker {self.ext_id} grants={self.grants.describe()}>"

    # ------------------------------------------------------------ lifetime

    def start(self) -> Path:
        """Listen (once); returns the directory to bind at :data:`WORKER_DIR` in the worker."""
        with self._lock:
            if self.dir is not None:
                return self.dir
            # A short path of its own (a Unix socket's path has at most 107 bytes), 0700.
            self.dir = Path(tempfile.mkdtemp(prefix="sbx-broker-"))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.dir / "broker.sock"))
            sock.listen(64)
            self._sock = sock
        threading.Thread(target=self._accept, name=f"{self.ext_id}-broker", daemon=True).start()
        return self.dir

    def close(self) -> None:
        """Stop listening, cut every relay, remove the socket's directory."""
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
            live, self._open = list(self._open), set()
        for s in ([sock] if sock else []) + live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _track(self, s: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._open.add(s)
            return True

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._open.discard(s)
        for s in socks:
            s.close()

    def _accept(self) -> None:
        while True:
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if not self._track(conn):
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.ext_id}-broker-req", daemon=True).start()

    # ------------------------------------------------------------ requests

    def _serve(self, conn: socket.socket) -> None:
        keep = False
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            req = self._read(conn)
            if not isinstance(req, dict) or not hmac.compare_digest(str(req.get("token", "")), self.token):
                self._record("denied", "request", "-", None, "the caller is not the extension's worker (no token)")
                self._reply(conn, error="the caller is not this extension's worker (requests need the token "
                                        "given on its handshake, which its child processes never get)")
                return
            op = req.get("op")
            if op == "secret":
                self._secret(conn, str(req.get("ref", "")), whole=bool(req.get("whole")))
            elif op == "connect":
                keep = self._connect(conn, str(req.get("host", "")), req.get("port"), str(req.get("kind", "egress")))
            elif op == "state":
                self._state(conn, req)
            else:
                self._reply(conn, error=f"the broker has no operation {op!r} (secret, connect, state)")
        except Denied as exc:
            self._reply(conn, error=str(exc))
        except (OSError, ValueError) as exc:
            self._reply(conn, error=f"the broker could not serve the request: {exc}", kind="BackendError")
        finally:
            if not keep:
                self._untrack(conn)

    @staticmethod
    def _read(conn: socket.socket) -> Any:
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REQUEST:
                raise ValueError(f"request over {MAX_REQUEST} bytes")
        line, _, rest = buf.partition(b"\n")
        if rest:
            raise ValueError("bytes after the request line")
        return json.loads(line or b"null")

    @staticmethod
    def _reply(conn: socket.socket, ok: Any = None, *, error: str | None = None, kind: str = "GrantDenied") -> None:
        msg = {"error": {"type": kind, "message": error}} if error is not None else {"ok": ok}
        try:
            conn.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            pass

    def _record(self, decision: str, op: str, target: str, grant: str | None, why: str | None = None) -> None:
        if self.state is None:
            return
        detail = {"op": op, "target": target, "grant": grant}
        try:
            self.state.record_audit("broker", "capability", extension=self.ext_id, version=self.version,
                                    reason=decision, detail={**detail, **({"why": why} if why else {})})
        except Exception:  # noqa: BLE001 - an audit write that fails must not open or close a door
            pass

    def _deny(self, op: str, target: str, what: str, grant: str) -> Denied:
        why = f"no grant allows {what}"
        self._record("denied", op, target, None, why)
        return Denied(f"{self.ext_id}: the broker refused {what}: no grant allows it (granted: "
                      f"{self.grants.describe()}); an operator allows it only by installing a bundle that declares "
                      f"{grant!r} (and not narrowing it away in trust.yaml)")

    def _secret(self, conn: socket.socket, ref: str, whole: bool = False) -> None:
        grant = f"secrets:read:{ref}"
        if ref not in self.grants.secret_refs:
            raise self._deny("secret", ref, f"reading the secret {ref}", grant)
        from sandboxer.secrets import SecretRef

        kind, _, where = ref.partition(":")
        if kind == "file" and whole:  # a key file or known_hosts, whole (a SecretRef reads the first line)
            value = Path(where).read_text(encoding="utf-8")
        else:
            value = SecretRef.model_validate({kind: where}).read() if kind in ("env", "file") else ""
        self._record("allowed", "secret", ref, grant)
        self._reply(conn, {"value": value})

    def _state(self, conn: socket.socket, req: dict[str, Any]) -> None:
        action = str(req.get("action"))
        if not self.grants.own_tables:
            raise self._deny("state", action, f"state-store access ({action})", "state:own-tables")
        if self.state is None:
            raise Denied(f"{self.ext_id}: there is no state store here (a describe worker)")
        out = self.state.extension_data(self.ext_id, action, req.get("key"), req.get("value"))
        self._record("allowed", "state", action, "state:own-tables")
        self._reply(conn, {"value": out})

    def _connect(self, conn: socket.socket, host: str, port: Any, kind: str) -> bool:
        if not host or not isinstance(port, int) or not 0 < port < 65536 or kind not in ("egress", "ssh"):
            raise Denied(f"{self.ext_id}: a connect request needs a host, a port (1-65535) and kind egress or ssh; "
                         f"got {host!r}, {port!r}, {kind!r}")
        target = f"{host}:{port}"
        grant = self.grants.ssh(host) if kind == "ssh" else self.grants.egress(host)
        if grant is None:
            wanted = f"ssh:connect:{host}" if kind == "ssh" else f"network:egress:{host}"
            raise self._deny(kind, target, f"{'an SSH connection' if kind == 'ssh' else 'a connection'} to {target}",
                             wanted)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            self._record("denied", kind, target, grant, f"does not resolve: {exc}")
            raise Denied(f"{self.ext_id}: {host} does not resolve ({exc.strerror})") from None
        literal = _literal(host)
        for info in infos:
            internal = _is_internal(info[4][0])
            if internal and not literal:
                why = f"{host} resolves to {info[4][0]}, a {internal} address"
                self._record("denied", kind, target, grant, why)
                raise Denied(f"{self.ext_id}: the broker refused a connection to {target}: {why}; a grant of a host "
                             f"name never reaches such an address (grant the address itself)")
        try:
            out = socket.create_connection((infos[0][4][0], port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            self._record("allowed", kind, target, grant, f"connect failed: {exc.strerror or exc}")
            self._reply(conn, error=f"{target}: {exc.strerror or exc}", kind="ConnectionError")
            return False
        if not self._track(out):
            out.close()
            return False
        first = b""
        if kind == "ssh":
            try:
                first = _ssh_banner(out)
            except (OSError, ValueError) as exc:
                self._untrack(out)
                why = f"it is not an SSH server ({exc})"
                self._record("denied", kind, target, grant, why)
                raise Denied(f"{self.ext_id}: the broker closed the connection to {target}: {why}; an ssh:connect "
                             f"grant carries SSH only") from None
        self._record("allowed", kind, target, grant)
        conn.settimeout(None)
        out.settimeout(None)
        self._reply(conn, {"connected": target})
        if first:
            conn.sendall(first)
        left = [2]  # directions still open; the last to end closes both sockets
        for src, dst in ((out, conn), (conn, out)):
            threading.Thread(target=self._pump, args=(src, dst, left), daemon=True).start()
        return True

    def _pump(self, src: socket.socket, dst: socket.socket, left: list[int]) -> None:
        if not pipe(src, dst):
            for s in (src, dst):  # one side broke: end the other direction too
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self._lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            self._untrack(src, dst)


def pipe(src: socket.socket, dst: socket.socket) -> bool:
    """Copy ``src`` to ``dst`` until ``src`` ends, then end ``dst``'s writing; False if either side broke."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
        return True
    except OSError:
        return False


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _ssh_banner(sock: socket.socket) -> bytes:
    """What an SSH server sent up to and including its ``SSH-`` version line."""
    sock.settimeout(CONNECT_TIMEOUT)
    buf = b""
    while len(buf) < SSH_BANNER_MAX:
        chunk = sock.recv(1024)
        if not chunk:
            raise ValueError("it closed the connection without a version line")
        buf += chunk
        for line in buf.split(b"\n")[:-1]:
            if line.startswith(b"SSH-"):
                return buf
    raise ValueError(f"no 'SSH-' version line in its first {SSH_BANNER_MAX} bytes")

