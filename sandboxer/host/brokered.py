"""The worker's side of the capability broker: how a handler reaches what its bundle was granted.

A signed bundle's worker has no network of its own and sees no secret; what its grants allow it
asks the broker for (:mod:`sandboxer.host.broker`). Handlers use:

* :func:`open_connection` for a TCP connection (``kind="ssh"`` under an ``ssh:connect`` grant):
  a connected socket, e.g. paramiko's ``sock=`` (:mod:`sandboxer.ssh` does this itself);
* :func:`proxy_url` for HTTP clients: an HTTP proxy on the worker's own loopback, with a
  credential only this process knows (``httpx.Client(proxy=proxy_url())``);
* :class:`~sandboxer.secrets.SecretRef` as everywhere: in a brokered worker its ``read()`` asks
  the broker, so a config's ``{env: NAME}`` works as it does in process, for granted names;
* :data:`own_tables` for rows of its own in the state store (``state:own-tables``).

A refusal raises :class:`~sandboxer.errors.GrantDenied`. Outside a brokered worker :func:`active`
is False and the calls raise :class:`~sandboxer.errors.ConfigError`.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
from typing import Any

from sandboxer.errors import BackendError, ConfigError, GrantDenied
from sandboxer.host.broker import pipe

_lock = threading.Lock()
_token: str | None = None
_confined = False
_proxy: "tuple[str, str] | None" = None  # (url, credential)


def configure(token: str | None, *, confined: bool = True) -> None:
    """Called by the worker: this process is brokered, with ``token`` (None in a describe worker)."""
    global _token, _confined
    from sandboxer import secrets as _secrets

    _token, _confined = token, confined
    _secrets.BROKER_READ = read_secret if confined else None


def active() -> bool:
    """Whether this process is a brokered worker (its network and secrets come through the broker)."""
    return _confined


def request(op: str, sock_out: bool = False, **params: Any) -> Any:
    """One request to the broker: its ``ok`` value (and the socket, when ``sock_out``).

    Raises:
        GrantDenied: the broker refused it (the message names the call and the grants).
        BackendError: the broker could not do it (a connection refused, say).
        ConfigError: this is not a brokered worker.
    """
    from sandboxer.host.broker import WORKER_SOCKET

    if not _confined or _token is None:
        raise ConfigError("the capability broker is only there in an installed bundle's worker "
                          "(sandboxer.host.brokered.active() is False here)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(60)
        s.connect(WORKER_SOCKET)
        s.sendall(json.dumps({"op": op, "token": _token, **params}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(1 if sock_out else 65536)  # a relay's bytes follow the answer: read no further
            if not chunk:
                raise BackendError(f"the capability broker closed the connection during {op}")
            buf += chunk
        answer = json.loads(buf)
    except BaseException:
        s.close()
        raise
    if "error" in answer:
        s.close()
        err = answer["error"]
        if err.get("type") == "GrantDenied":
            raise GrantDenied(str(err.get("message")))
        if err.get("type") == "ConnectionError":
            raise ConnectionRefusedError(str(err.get("message")))
        raise BackendError(str(err.get("message")))
    if sock_out:
        s.settimeout(None)
        return answer["ok"], s
    s.close()
    return answer["ok"]


def open_connection(host: str, port: int, *, kind: str = "egress", timeout: float | None = 30.0) -> socket.socket:
    """A socket connected (through the broker) to ``host:port``; ``kind="ssh"`` under an ``ssh:connect`` grant.

    Raises:
        GrantDenied: no grant allows it. ConnectionRefusedError: the far end refused.
    """
    _, s = request("connect", sock_out=True, host=host, port=int(port), kind=kind)
    s.settimeout(timeout)
    return s


def read_secret(ref: Any) -> str:
    """The value of a secret reference (a SecretRef, or ``env:NAME`` / ``file:/path``) the bundle is granted."""
    text = ref if isinstance(ref, str) else (f"env:{ref.env}" if ref.env else f"file:{ref.file}")
    return str(request("secret", ref=text)["value"])


_files: dict[str, Any] = {}


def materialize(path: Any) -> Any:
    """A private copy (in the worker's own /tmp, mode 0600) of the file at ``path``, read through the broker.

    For libraries that want a path (paramiko's key and known_hosts files). The grant is
    ``secrets:read:file:<path>``. Returns a :class:`~pathlib.Path`.

    Raises:
        GrantDenied: no grant names the file.
    """
    import os
    import tempfile
    from pathlib import Path

    key = str(path)
    with _lock:
        if key in _files:
            return _files[key]
    text = str(request("secret", ref=f"file:{key}", whole=True)["value"])
    fd, tmp = tempfile.mkstemp(prefix="broker-", suffix="-" + Path(key).name)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    with _lock:
        _files[key] = Path(tmp)
    return Path(tmp)


class _OwnTables:
    """Key-value rows of this extension's own in the state store (``state:own-tables``); values are JSON."""

    def get(self, key: str) -> Any:
        return request("state", action="get", key=key)["value"]

    def put(self, key: str, value: Any) -> None:
        request("state", action="put", key=key, value=value)

    def delete(self, key: str) -> None:
        request("state", action="delete", key=key)

    def keys(self) -> list[str]:
        return list(request("state", action="keys")["value"])


own_tables = _OwnTables()


# ---------------------------------------------------------------- the HTTP proxy


def proxy_url() -> str:
    """The URL of an HTTP proxy on this worker's loopback that goes through the broker (started on first use).

    It speaks CONNECT (for https) and absolute-form requests (for http), and asks for a credential
    that is in the URL and nowhere else: a child process of the worker cannot use it.
    """
    global _proxy
    if not _confined:
        raise ConfigError("the broker's proxy is only there in an installed bundle's worker")
    with _lock:
        if _proxy is None:
            cred = secrets.token_urlsafe(24)
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind(("127.0.0.1", 0))
            srv.listen(64)
            threading.Thread(target=_proxy_accept, args=(srv, cred), name="broker-proxy", daemon=True).start()
            _proxy = (f"http://sandboxer:{cred}@127.0.0.1:{srv.getsockname()[1]}", cred)
        return _proxy[0]


def _proxy_accept(srv: socket.socket, cred: str) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=_proxy_serve, args=(conn, cred), daemon=True).start()


def _proxy_serve(conn: socket.socket, cred: str) -> None:
    try:
        conn.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk or len(head) > 65536:
                return
            head += chunk
        head, _, body = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = (lines[0].split(" ") + ["", ""])[:3]
        headers = lines[1:]
        wanted = "basic " + base64.b64encode(f"sandboxer:{cred}".encode()).decode()
        auth = [h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("proxy-authorization:")]
        if not auth or not secrets.compare_digest(auth[0].lower(), wanted.lower()):
            conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up = _upstream(conn, host.strip("[]"), int(port))
            if up is None:
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            first = body
        else:
            from urllib.parse import urlsplit

            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            up = _upstream(conn, url.hostname, url.port or 80)
            if up is None:
                return
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            kept = [h for h in headers if not h.lower().startswith(("proxy-", "connection:"))]
            first = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode("latin-1") + body
        conn.settimeout(None)
        if first:
            up.sendall(first)
        t = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        t.start()
        pipe(conn, up)
        t.join(timeout=600)
        up.close()
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def _upstream(conn: socket.socket, host: str, port: int) -> socket.socket | None:
    try:
        return open_connection(host, port, timeout=None)
    except GrantDenied as exc:
        msg = str(exc).encode()
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     + f"Content-Length: {len(msg)}\r\n\r\n".encode() + msg)
    except (OSError, BackendError) as exc:
        msg = str(exc).encode()
        conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     + f"Content-Length: {len(msg)}\r\n\r\n".encode() + msg)
    return None

