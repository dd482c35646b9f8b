"""A stand-in for Daytona's REST API and a sandbox's toolbox (its daemon), on 127.0.0.1.

One real HTTP/1.1 server that the unmodified ``daytona`` SDK talks to (point ``api_url`` at
:attr:`DaytonaStandIn.api_url`):

* the REST API under ``/api`` (``Authorization: Bearer <key>``): create, get (by id or name),
  delete, list (label filter, ``nextCursor`` paging), the toolbox proxy URL, a port's preview
  URL, sandbox snapshots, snapshot get and delete. Error bodies are ``{statusCode, message, error}`` as Daytona's API
  sends them;
* the toolbox under ``/toolbox/<sandbox id>`` (the ``toolboxProxyUrl`` every sandbox carries):
  work and home directory, sessions (create, exec, command status, the command's logs as a
  WebSocket with Daytona's stdout/stderr markers, delete), ``/process/execute``, and the file
  system (``/files...``: :mod:`tests.cloud.daytona_standin_files`).

A "sandbox" is a scratch directory: its commands run as real local processes in it, under a
minimal environment, and a snapshot is a copy of it, so a file written before a snapshot is
there after a restore. Paths the SDK sends are read as :func:`_in_sandbox` says. Every process
of a box carries ``DAYTONA_STANDIN_BOX=<id>`` (tests/cloud/procs.py): deleting the box kills
them all, as a sandbox going away would. A session command runs until it ends or its session
is deleted (Daytona gives session commands no deadline).

What a create asked for is recorded on the box as it arrived (:attr:`Box.body`: the network
fields, labels, env, resources, auto-stop/-delete and TTL). Each API key is its own
organization, which sees only its own sandboxes. Every request is recorded in
:attr:`DaytonaStandIn.calls`; a route the stand-in lacks is answered 404 and recorded in
:attr:`DaytonaStandIn.unimplemented`, which the test fixture fails on, so an SDK upgrade that
changes the wire shows up at once. Faults are scripted with :meth:`DaytonaStandIn.fail`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.cloud import daytona_standin_files
from tests.cloud.procs import kill_marked

#: The environment variable marking every process of a stand-in box.
BOX_MARKER = "DAYTONA_STANDIN_BOX"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STDOUT_PREFIX = b"\x01\x01\x01"
STDERR_PREFIX = b"\x02\x02\x02"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Command:
    """One session command: a real process, and its output as it came."""

    id: str
    command: str
    proc: subprocess.Popen
    chunks: list[tuple[str, bytes]] = field(default_factory=list)
    done: bool = False
    exit_code: int | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)


@dataclass
class Box:
    """One stand-in sandbox."""

    id: str
    name: str
    org: str
    snapshot: str | None
    labels: dict[str, str]
    env: dict[str, str]
    workdir: Path
    created_at: float
    ready_at: float
    body: dict[str, Any]
    state: str = "started"
    queue_timed_out_at: float | None = None
    sessions: dict[str, dict[str, Command]] = field(default_factory=dict)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def live_state(self) -> str:
        if self.state == "started" and time.time() < self.ready_at:
            return "starting"
        return self.state

    def dto(self, toolbox_url: str) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id, "organizationId": "org-" + hashlib.sha256(self.org.encode()).hexdigest()[:12],
            "name": self.name, "snapshot": self.snapshot,
            "user": "daytona", "env": dict(self.env), "labels": dict(self.labels), "public": bool(b.get("public")),
            "networkBlockAll": bool(b.get("networkBlockAll")), "kvm": False,
            "networkAllowList": b.get("networkAllowList"), "domainAllowList": b.get("domainAllowList"),
            "target": b.get("target") or "us", "cpu": int(b.get("cpu") or 1), "gpu": int(b.get("gpu") or 0),
            "memory": int(b.get("memory") or 1), "disk": int(b.get("disk") or 3),
            "state": self.live_state(), "desiredState": "destroyed" if self.state == "destroyed" else "started",
            "autoStopInterval": b.get("autoStopInterval", 15), "autoArchiveInterval": b.get("autoArchiveInterval"),
            "autoDeleteInterval": b.get("autoDeleteInterval", -1),
            "autoDestroyAt": _iso(self.created_at + 60 * b["ttlMinutes"]) if b.get("ttlMinutes") else None,
            "createdAt": _iso(self.created_at), "updatedAt": _iso(self.created_at),
            "toolboxProxyUrl": toolbox_url, "daemonVersion": "standin",
            "queueTimedOutAt": _iso(self.queue_timed_out_at) if self.queue_timed_out_at else None,
            "queueTimeout": b.get("queueTimeout"),
        }

    def list_item(self, toolbox_url: str) -> dict[str, Any]:
        keep = ("id", "organizationId", "name", "target", "state", "desiredState", "snapshot", "user", "public",
                "networkBlockAll", "networkAllowList", "domainAllowList", "cpu", "gpu", "memory", "disk", "labels",
                "autoStopInterval", "autoDeleteInterval", "autoDestroyAt", "createdAt", "updatedAt",
                "toolboxProxyUrl")
        return {k: v for k, v in self.dto(toolbox_url).items() if k in keep}


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    message: str
    headers: dict[str, str]
    times: int
    echo_key: bool = False


class DaytonaStandIn:
    """The stand-in server. Start with :meth:`start`, stop with :meth:`stop`.

    Args:
        keys: API keys accepted; each is its own organization.
        snapshots: snapshot names a create may name besides the ones made from sandboxes
            (a create naming none gets Daytona's default).
    """

    def __init__(self, keys: list[str], snapshots: tuple[str, ...] = ("daytonaio/sandbox:standin",)):
        self.keys = set(keys)
        self.base_snapshots = set(snapshots)
        self.boxes: dict[str, Box] = {}
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        self.unimplemented: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.boot_delay = 0.0
        #: Most items one list page returns (a server may return fewer than asked, with a cursor).
        self.page_limit: int | None = None
        #: No runner takes new sandboxes: each is destroyed at once with ``queueTimedOutAt`` set.
        self.no_runner = False
        #: The log WebSocket stays open after its command ended (until the client leaves, or 30 s).
        self.logs_stay_open = False
        self._lose_create = 0
        self.lock = threading.RLock()
        self.root = Path(tempfile.mkdtemp(prefix="daytona-standin-"))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # ------------------------------------------------------------ control

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def api_url(self) -> str:
        """What ``DaytonaConfig(api_url=...)`` should be."""
        return self.url + "/api"

    @property
    def toolbox_url(self) -> str:
        return self.url + "/toolbox"

    def start(self) -> "DaytonaStandIn":
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="daytona-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        for box in self.boxes.values():
            self._kill_box(box)
        shutil.rmtree(self.root, ignore_errors=True)

    def fail(self, method: str, path: str, status: int, message: str = "scripted failure", *,
             headers: dict[str, str] | None = None, times: int = 1, echo_key: bool = False) -> None:
        """Answer the next ``times`` requests matching ``method`` and the ``path`` regex with an error.

        ``echo_key`` puts the request's bearer token into the error body, as a careless
        provider's message might; the backend must keep it out of everything it raises.
        """
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path), status, message, headers or {}, times,
                                     echo_key))

    def lose_next_create_response(self) -> None:
        """The next create makes its sandbox but answers 502, as if a proxy lost the response."""
        with self.lock:
            self._lose_create += 1

    def creates(self) -> list[dict[str, Any]]:
        """The body of every create request, as it arrived."""
        return [json.loads(c["body"]) for c in self.calls if c["method"] == "POST" and c["path"] == "/api/sandbox"]

    def live(self, key: str | None = None) -> list[Box]:
        return [b for b in self.boxes.values() if b.state != "destroyed" and (key is None or b.org == key)]

    def destroy(self, sandbox_id: str) -> None:
        """Destroy a sandbox behind the SDK's back (its TTL passed, an operator deleted it)."""
        with self.lock:
            box = self.boxes[sandbox_id]
            box.state = "destroyed"
        self._kill_box(box)

    def _kill_box(self, box: Box) -> None:
        kill_marked(BOX_MARKER, box.id)
        for proc in list(box.procs.values()):
            try:
                proc.wait(timeout=5)  # reap our own children
            except subprocess.TimeoutExpired:
                pass

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.path.fullmatch(path):
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                    return f
        return None

    # ------------------------------------------------------------ REST

    @staticmethod
    def error(status: int, message: str) -> tuple[int, Any, dict[str, str]]:
        names = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
                 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
                 503: "Service Unavailable"}
        return status, {"statusCode": status, "message": message, "error": names.get(status, "Error")}, {}

    def handle_api(self, method: str, path: str, query: dict[str, list[str]], key: str,
                   body: Any) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            for (verb, pattern), fn in self._routes():
                m = re.fullmatch(pattern, path)
                if m and method == verb:
                    return fn(key, query, body, *m.groups())
        self.unimplemented.append((method, path))
        return self.error(404, f"stand-in has no route {method} {path}")

    def _routes(self) -> list[tuple[tuple[str, str], Any]]:
        return [
            (("POST", r"/api/sandbox"), self._create),
            (("GET", r"/api/sandbox"), self._list),
            (("GET", r"/api/sandbox/([^/]+)/toolbox-proxy-url"), self._toolbox_proxy_url),
            (("POST", r"/api/sandbox/([^/]+)/snapshot"), self._snapshot),
            (("GET", r"/api/sandbox/([^/]+)/ports/([0-9]+)/preview-url"), self._preview_url),
            (("GET", r"/api/sandbox/([^/]+)"), self._get),
            (("DELETE", r"/api/sandbox/([^/]+)"), self._delete),
            (("GET", r"/api/snapshots/([^/]+)"), self._get_snapshot),
            (("DELETE", r"/api/snapshots/([^/]+)"), self._delete_snapshot),
        ]

    def _find(self, key: str, id_or_name: str, *, destroyed: bool = False) -> Box | None:
        for box in self.boxes.values():
            if box.org == key and id_or_name in (box.id, box.name) and (destroyed or box.state != "destroyed"):
                return box
        return None

    def _not_found(self, what: str) -> tuple[int, Any, dict[str, str]]:
        return self.error(404, f"Sandbox with ID or name {what} not found")

    def _create(self, key: str, query: Any, body: Any) -> tuple[int, Any, dict[str, str]]:
        body = dict(body or {})
        name = body.get("name") or str(uuid.uuid4())
        if self._find(key, name):
            return self.error(409, f"Sandbox with name {name} already exists")
        snapshot = body.get("snapshot")
        snap = self._snapshot_named(key, snapshot) if snapshot else None
        if snapshot and snap is None and snapshot not in self.base_snapshots:
            return self.error(404, f"Snapshot {snapshot} not found. Did you add it through the Daytona Dashboard?")
        sid = str(uuid.uuid4())
        workdir = self.root / sid
        if snap is not None:
            shutil.copytree(snap["dir"], workdir)
        else:
            workdir.mkdir()
        now = time.time()
        box = Box(id=sid, name=name, org=key, snapshot=snapshot or "daytonaio/sandbox:standin",
                  labels=dict(body.get("labels") or {}), env=dict(body.get("env") or {}), workdir=workdir,
                  created_at=now, ready_at=now + self.boot_delay, body=body)
        self.boxes[sid] = box
        if self.no_runner:
            box.state = "destroyed"
            box.queue_timed_out_at = now
        if self._lose_create:
            self._lose_create -= 1
            return self.error(502, "upstream connect error or disconnect/reset before headers")
        return 200, box.dto(self.toolbox_url), {}

    def _get(self, key: str, query: Any, body: Any, what: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, what, destroyed=True)
        if box is None:
            return self._not_found(what)
        return 200, box.dto(self.toolbox_url), {}

    def _delete(self, key: str, query: Any, body: Any, what: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, what)
        if box is None:
            return self._not_found(what)
        box.state = "destroyed"
        self._kill_box(box)
        return 200, box.dto(self.toolbox_url), {}

    def _list(self, key: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any, dict[str, str]]:
        want = json.loads(query["labels"][0]) if "labels" in query else {}
        rows = [b for b in sorted(self.live(key), key=lambda b: (b.created_at, b.id))
                if all(b.labels.get(k) == v for k, v in want.items())]
        limit = int(query.get("limit", ["100"])[0])
        if self.page_limit is not None:
            limit = min(limit, self.page_limit)
        offset = int(query.get("cursor", ["0"])[0])
        page = rows[offset:offset + limit]
        cursor = str(offset + limit) if offset + limit < len(rows) else None
        return 200, {"items": [b.list_item(self.toolbox_url) for b in page], "nextCursor": cursor}, {}

    def _toolbox_proxy_url(self, key: str, query: Any, body: Any, what: str) -> tuple[int, Any, dict[str, str]]:
        if self._find(key, what) is None:
            return self._not_found(what)
        return 200, {"url": self.toolbox_url}, {}

    def _preview_url(self, key: str, query: Any, body: Any, what: str, port: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, what)
        if box is None:
            return self._not_found(what)
        # Daytona's preview host is <port>-<id>.<proxy domain>; a private one needs this token
        token = hashlib.sha256(f"{box.id}:{port}".encode()).hexdigest()[:32]
        return 200, {"sandboxId": box.id, "url": f"https://{port}-{box.id}.proxy.standin.test", "token": token}, {}

    def _snapshot_named(self, key: str, name: str) -> dict[str, Any] | None:
        for snap in self.snapshots.values():
            if snap["org"] == key and name in (snap["id"], snap["name"]):
                return snap
        return None

    def _snapshot(self, key: str, query: Any, body: Any, what: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, what)
        if box is None:
            return self._not_found(what)
        name = (body or {}).get("name")
        if not name:
            return self.error(400, "name must be a string")
        if self._snapshot_named(key, name):
            return self.error(409, f"Snapshot with name {name} already exists")
        snap_id = str(uuid.uuid4())
        target = self.root / "snapshots" / snap_id
        shutil.copytree(box.workdir, target)
        self.snapshots[snap_id] = {"id": snap_id, "name": name, "dir": target, "org": key, "source": box.id,
                                   "created_at": time.time()}
        return 200, box.dto(self.toolbox_url), {}

    def _get_snapshot(self, key: str, query: Any, body: Any, what: str) -> tuple[int, Any, dict[str, str]]:
        snap = self._snapshot_named(key, urllib.parse.unquote(what))
        if snap is None:
            return self.error(404, f"Snapshot {what} not found")
        when = _iso(snap["created_at"])
        return 200, {"id": snap["id"], "organizationId": "org-" + hashlib.sha256(key.encode()).hexdigest()[:12],
                     "general": False, "name": snap["name"],
                     "state": "active", "size": 1, "entrypoint": None, "cpu": 1, "gpu": 0, "mem": 1, "disk": 3,
                     "errorReason": None, "createdAt": when, "updatedAt": when, "lastUsedAt": None,
                     "sourceSandboxId": snap["source"]}, {}

    def _delete_snapshot(self, key: str, query: Any, body: Any, what: str) -> tuple[int, Any, dict[str, str]]:
        snap = self._snapshot_named(key, urllib.parse.unquote(what))
        if snap is None:
            return self.error(404, f"Snapshot {what} not found")
        shutil.rmtree(snap["dir"], ignore_errors=True)
        del self.snapshots[snap["id"]]
        return 200, None, {}

    # ------------------------------------------------------------ toolbox

    def toolbox_box(self, key: str, sandbox_id: str) -> tuple[Box | None, tuple[int, Any, dict[str, str]] | None]:
        """The box a toolbox request is for, or the proxy's refusal."""
        box = self.boxes.get(sandbox_id)
        if box is None or box.org != key:
            return None, self.error(404, f"Sandbox with ID {sandbox_id} not found")
        if box.live_state() != "started":
            return None, self.error(400, f"Sandbox {sandbox_id} is not started (state {box.live_state()})")
        return box, None

    def handle_toolbox(self, box: Box, method: str, path: str, headers: dict[str, str],
                       raw: bytes) -> tuple[int, Any, dict[str, str]]:
        body = json.loads(raw) if raw and headers.get("content-type", "").startswith("application/json") else None
        if method == "GET" and path in ("/work-dir", "/user-home-dir"):
            return 200, {"dir": str(box.workdir)}, {}
        if method == "POST" and path == "/process/session":
            sid = body["sessionId"]
            if sid in box.sessions:
                return self.error(409, f"session {sid} already exists")
            box.sessions[sid] = {}
            return 201, None, {}
        m = re.fullmatch(r"/process/session/([^/]+)/exec", path)
        if method == "POST" and m:
            return self._session_exec(box, m.group(1), body)
        m = re.fullmatch(r"/process/session/([^/]+)/command/([^/]+)", path)
        if method == "GET" and m:
            cmd = box.sessions.get(m.group(1), {}).get(m.group(2))
            if cmd is None:
                return self.error(404, f"command {m.group(2)} not found")
            return 200, {"id": cmd.id, "command": cmd.command, "exitCode": cmd.exit_code}, {}
        m = re.fullmatch(r"/process/session/([^/]+)", path)
        if method == "DELETE" and m:
            cmds = box.sessions.pop(m.group(1), None)
            if cmds is None:
                return self.error(404, f"session {m.group(1)} not found")
            for cmd in cmds.values():
                if cmd.proc.poll() is None:
                    _killpg(cmd.proc.pid)
            return 204, None, {}
        if method == "POST" and path == "/process/execute":
            return self._execute(box, body)
        self.unimplemented.append((method, "/toolbox/{id}" + path))
        return self.error(404, f"stand-in toolbox has no route {method} {path}")

    def _env(self, box: Box, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"PATH": _PATH, "HOME": str(box.workdir), **box.env, **(extra or {}), BOX_MARKER: box.id}

    def _session_exec(self, box: Box, session: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        cmds = box.sessions.get(session)
        if cmds is None:
            return self.error(404, f"session {session} not found")
        command = body["command"]
        proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=box.workdir, env=self._env(box),
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        box.procs[proc.pid] = proc
        cmd = Command(id=str(uuid.uuid4()), command=command, proc=proc)
        cmds[cmd.id] = cmd
        threading.Thread(target=_pump_command, args=(box, cmd), daemon=True).start()
        if not body.get("runAsync"):
            with cmd.cond:
                cmd.cond.wait_for(lambda: cmd.done, timeout=600)
            out = b"".join(c for _, c in cmd.chunks).decode(errors="replace")
            return 200, {"cmdId": cmd.id, "output": out, "exitCode": cmd.exit_code}, {}
        return 202, {"cmdId": cmd.id}, {}

    def _execute(self, box: Box, body: Any) -> tuple[int, Any, dict[str, str]]:
        cwd = _in_sandbox(box.workdir, body["cwd"]) if body.get("cwd") else box.workdir
        proc = subprocess.Popen(["/bin/sh", "-c", body["command"]], cwd=cwd, env=self._env(box, body.get("envs")),
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        box.procs[proc.pid] = proc
        try:
            out, _ = proc.communicate(timeout=body.get("timeout") or 360)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.communicate()
            return self.error(408, "command timed out")
        finally:
            box.procs.pop(proc.pid, None)
        return 200, {"exitCode": proc.returncode, "result": out.decode(errors="replace")}, {}

    def stream_logs(self, handler: "_Handler", box: Box, session: str, cmd_id: str) -> None:
        """Serve a command's logs as Daytona's daemon does: a WebSocket of marked chunks, closed at its end."""
        cmd = box.sessions.get(session, {}).get(cmd_id)
        if cmd is None:
            handler.reply(*self.error(404, f"command {cmd_id} not found"))
            return
        key = handler.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept)
        handler.end_headers()
        handler.close_connection = True
        sent = 0
        while True:
            with cmd.cond:
                cmd.cond.wait_for(lambda: cmd.done or len(cmd.chunks) > sent, timeout=1)
                new, done = cmd.chunks[sent:], cmd.done
            for stream, data in new:
                prefix = STDOUT_PREFIX if stream == "stdout" else STDERR_PREFIX
                handler.wfile.write(_ws_frame(0x2, prefix + data))
            handler.wfile.flush()
            sent += len(new)
            if done and sent == len(cmd.chunks):
                break
        if self.logs_stay_open:
            handler.connection.settimeout(30)
            try:
                handler.rfile.read(1)  # the client's close frame, or its leaving
            except OSError:
                pass
        handler.wfile.write(_ws_frame(0x8, struct.pack("!H", 1000)))
        handler.wfile.flush()


def _pump_command(box: Box, cmd: Command) -> None:
    """Read a session command's two streams into its chunks, then record its exit code."""
    def read(name: str, stream: Any) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            with cmd.cond:
                cmd.chunks.append((name, chunk))
                cmd.cond.notify_all()

    readers = [threading.Thread(target=read, args=(n, s), daemon=True)
               for n, s in (("stdout", cmd.proc.stdout), ("stderr", cmd.proc.stderr))]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    code = cmd.proc.wait()
    box.procs.pop(cmd.proc.pid, None)
    with cmd.cond:
        # a command killed by a signal reports 128 + the signal, as the daemon's shell does
        cmd.exit_code = code if code >= 0 else 128 - code
        cmd.done = True
        cmd.cond.notify_all()


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; request bodies by length or chunked; the log WebSocket."""

    owner: DaytonaStandIn
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30

    def setup(self) -> None:
        super().setup()
        self.owner._conns.add(self.connection)

    def finish(self) -> None:
        self.owner._conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        raw = self._body()
        url = urllib.parse.urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        call = {"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                "headers": headers, "body": raw}
        self.owner.calls.append(call)
        auth = headers.get("authorization", "")
        key = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        fault = self.owner.take_fault(self.command, url.path)
        if fault is not None:
            message = fault.message + (f" (request had Authorization {auth!r})" if fault.echo_key else "")
            status, payload, _ = self.owner.error(fault.status, message)
            self.reply(status, payload, fault.headers)
            return
        if key not in self.owner.keys:
            self.reply(*self.owner.error(401, "Invalid credentials"))
            return
        if url.path.startswith("/api/"):
            body = json.loads(raw) if raw else None
            self.reply(*self.owner.handle_api(self.command, url.path, call["query"], key, body))
            return
        m = re.fullmatch(r"/toolbox/([^/]+)(/.*)", url.path)
        if not m:
            self.owner.unimplemented.append((self.command, url.path))
            self.reply(*self.owner.error(404, f"stand-in has no route {self.command} {url.path}"))
            return
        with self.owner.lock:
            box, refusal = self.owner.toolbox_box(key, m.group(1))
        if refusal is not None:
            self.reply(*refusal)
            return
        assert box is not None
        logs = re.fullmatch(r"/process/session/([^/]+)/command/([^/]+)/logs", m.group(2))
        if logs and headers.get("upgrade", "").lower() == "websocket":
            self.owner.stream_logs(self, box, logs.group(1), logs.group(2))
            return
        if daytona_standin_files.serve(self, box, self.command, m.group(2), call["query"], headers, raw):
            return
        self.reply(*self.owner.handle_toolbox(box, self.command, m.group(2), headers, raw))

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


def _in_sandbox(root: Path, path: str) -> Path:
    """Where a path the SDK sent is, in a box whose files live under ``root``.

    Its commands are host processes, so what they report (``pwd``, the work directory) is a
    host path under ``root``: such a path names that very directory. Any other absolute path is
    taken from the box's root, a relative one from its home (the root too).
    """
    given = Path(path)
    if given.is_absolute() and given.resolve().is_relative_to(root.resolve()):
        return given.resolve()
    return (root / path.lstrip("/")).resolve()


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
