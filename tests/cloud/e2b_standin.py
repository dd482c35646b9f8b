"""A stand-in for E2B's control-plane REST API and a sandbox's envd, on 127.0.0.1.

One real HTTP/1.1 server that the unmodified ``e2b`` SDK talks to (point
``api_url`` and ``sandbox_url`` at :attr:`E2BStandIn.url`):

* the REST API (``X-API-KEY``): create, list (metadata filter, ``x-next-token``
  paging), info, kill, timeout, pause, connect, snapshots, snapshot delete;
  error bodies are ``{code, message}`` as E2B sends them;
* envd: ``GET /health`` and the Connect RPC ``process.Process`` service, served
  by the SDK's own server-side ``ProcessWSGIApplication`` (JSON codec; the
  streaming requests arrive chunked and are de-chunked here); the file API,
  ``GET``/``POST /files`` and the ``filesystem.Filesystem`` service (its own
  ``FilesystemWSGIApplication``) over the box's directory, streamed
  (tests/cloud/e2b_standin_files.py). Requests must carry ``E2b-Sandbox-Id``
  and the sandbox's ``X-Access-Token``.

A "sandbox" is a scratch directory: commands run as real local processes in
it, and a snapshot is a copy of it, so a file written before a snapshot is
there after a restore. A command's cwd is honoured as the SDK sends it: a path
the box's own commands reported (a host path inside its directory) is that
directory, any other absolute path is taken from the box's directory. The network
a create asks for (``allow_internet_access``, ``network.allowOut`` / ``denyOut`` /
``allowPublicTraffic``) is recorded on the box as sent; a box created with
``allowPublicTraffic: false`` gets a traffic access token, handed out (as E2B does)
only by create and connect. Each API key is its own team: a key sees only the
sandboxes it created. Every process of a box carries ``E2B_STANDIN_BOX=<id>``
in its environment (see tests/cloud/procs.py): killing the box kills them all,
as a microVM going away would.

As envd does, a command's deadline (the Connect timeout the SDK sends) ends in
SIGKILL to the process envd started, and only to it: what that process forked
(its process group, a ``setsid`` child) lives on in the sandbox. A create
honours its ``Idempotency-Key`` unless :attr:`E2BStandIn.ignore_idempotency`
is set; :meth:`E2BStandIn.lose_next_create_response` makes the next create
happen but answer 502, as a create whose response a proxy dropped.

Every request is recorded in :attr:`E2BStandIn.calls`; a route the stand-in
does not implement is answered 404 and recorded in
:attr:`E2BStandIn.unimplemented`, which the test fixture fails on, so an SDK
upgrade that changes the wire shows up at once. Faults are scripted with
:meth:`E2BStandIn.fail`.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

from tests.cloud.procs import kill_marked

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from e2b.envd.client_shared import ENVD_JSON_CODEC
from e2b.envd.process import process_pb
from e2b.envd.filesystem.filesystem_connect import FilesystemWSGIApplication
from e2b.envd.process.process_connect import ProcessWSGIApplication

from tests.cloud.e2b_standin_files import Filesystem, body_pieces, serve_files

ENVD_VERSION = "0.6.4"
#: The environment variable marking every process of a stand-in box.
BOX_MARKER = "E2B_STANDIN_BOX"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Box:
    """One stand-in sandbox."""

    id: str
    team: str
    template: str
    metadata: dict[str, str]
    env: dict[str, str]
    workdir: Path
    token: str
    started_at: float
    end_at: float
    ready_at: float
    state: str = "running"
    cpu: int = 2
    memory_mb: int = 512
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    #: the create body's ``allow_internet_access`` as sent (None: the SDK left it out)
    allow_internet_access: bool | None = None
    #: the create body's ``network`` as sent (``allowOut``, ``denyOut``, ``allowPublicTraffic``...; {} when left out)
    network: dict[str, Any] = field(default_factory=dict)
    #: the domain its ports are served under (``<port>-<id>.<domain>``), as the API reports it
    domain: str = "e2b-standin.test"
    #: the token its public URLs ask for (E2B issues one when the create says ``allowPublicTraffic: false``)
    traffic_token: str | None = None

    def summary(self, client_id: str = "standin") -> dict[str, Any]:
        return {
            "templateID": self.template, "sandboxID": self.id, "clientID": client_id,
            "startedAt": _iso(self.started_at), "endAt": _iso(self.end_at),
            "cpuCount": self.cpu, "memoryMB": self.memory_mb, "diskSizeMB": 10240,
            "state": self.state, "envdVersion": ENVD_VERSION, "metadata": dict(self.metadata),
        }

    def created(self) -> dict[str, Any]:
        """What a create or a connect answers: E2B hands out the traffic access token only here."""
        out = {
            "templateID": self.template, "sandboxID": self.id, "clientID": "standin",
            "envdVersion": ENVD_VERSION, "envdAccessToken": self.token, "domain": self.domain,
        }
        if self.traffic_token is not None:
            out["trafficAccessToken"] = self.traffic_token
        return out


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    message: str
    headers: dict[str, str]
    times: int
    echo_key: bool = False


class _Process:
    """The envd ``process.Process`` service: real local processes in the box's directory."""

    def __init__(self, standin: "E2BStandIn"):
        self.standin = standin

    def _box(self, ctx: Any) -> Box:
        return self.standin.boxes[ctx.request_headers.get("e2b-sandbox-id")]

    def start(self, request: process_pb.StartRequest, ctx: Any) -> Iterator[process_pb.StartResponse]:
        box = self._box(ctx)
        cfg = request.process
        if cfg is None or not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        cwd = box.workdir
        if cfg.cwd:
            cwd = _in_sandbox(box.workdir, cfg.cwd)
            if not cwd.is_dir() or not cwd.is_relative_to(box.workdir.resolve()):
                raise ConnectError(Code.INVALID_ARGUMENT, f"cwd {cfg.cwd!r} does not exist")
        env = {"PATH": _PATH, "HOME": str(box.workdir), **box.env, **dict(cfg.envs or {}), BOX_MARKER: box.id}
        proc = subprocess.Popen(
            [cfg.cmd, *cfg.args], cwd=cwd, env=env, start_new_session=True,
            stdin=subprocess.PIPE if request.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        box.procs[proc.pid] = proc
        timeout_ms = ctx.timeout_ms
        deadline = time.monotonic() + (timeout_ms / 1000 if timeout_ms else 3600)
        return self._events(box, proc, deadline)

    def _events(self, box: Box, proc: subprocess.Popen, deadline: float) -> Iterator[process_pb.StartResponse]:
        Ev = process_pb.ProcessEvent
        q: queue.Queue[tuple[str, bytes | None]] = queue.Queue()

        def pump(name: str, stream: Any) -> None:
            for chunk in iter(lambda: stream.read1(65536), b""):
                q.put((name, chunk))
            q.put((name, None))

        readers = [threading.Thread(target=pump, args=(n, s), daemon=True)
                   for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for t in readers:
            t.start()
        try:
            yield process_pb.StartResponse(event=Ev(event=Oneof("start", Ev.StartEvent(pid=proc.pid))))
            open_streams = 2
            while open_streams:
                try:
                    name, chunk = q.get(timeout=max(0.01, min(0.5, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        # envd: the request's deadline kills the process it started, nothing else
                        _kill(proc.pid)
                        proc.wait(timeout=10)
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "the command's deadline passed; process killed")
                    continue
                if chunk is None:
                    open_streams -= 1
                    continue
                data = Ev.DataEvent(output=Oneof(name, chunk))
                yield process_pb.StartResponse(event=Ev(event=Oneof("data", data)))
            code = proc.wait(timeout=10)
            end = Ev.EndEvent(exit_code=code, exited=code >= 0, status=f"exit status {code}")
            yield process_pb.StartResponse(event=Ev(event=Oneof("end", end)))
        finally:
            if proc.poll() is None:
                _kill(proc.pid)  # the client went away: envd kills the process, as at its deadline
                proc.wait(timeout=10)
            box.procs.pop(proc.pid, None)
            for t in readers:
                t.join(timeout=5)

    def _proc(self, ctx: Any, selector: Any) -> subprocess.Popen:
        box = self._box(ctx)
        pid = selector.selector.value if selector is not None and selector.selector is not None else None
        proc = box.procs.get(pid)
        if proc is None:
            raise ConnectError(Code.NOT_FOUND, f"process {pid} not found")
        return proc

    def send_input(self, request: process_pb.SendInputRequest, ctx: Any) -> process_pb.SendInputResponse:
        proc = self._proc(ctx, request.process)
        data = request.input.input.value if request.input and request.input.input else b""
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.flush()
        return process_pb.SendInputResponse()

    def close_stdin(self, request: process_pb.CloseStdinRequest, ctx: Any) -> process_pb.CloseStdinResponse:
        proc = self._proc(ctx, request.process)
        if proc.stdin is not None:
            proc.stdin.close()
        return process_pb.CloseStdinResponse()

    def __getattr__(self, name: str) -> Any:
        def unimplemented(request: Any, ctx: Any) -> Any:
            self.standin.unimplemented.append(("RPC", f"/process.Process/{name}"))
            raise ConnectError(Code.UNIMPLEMENTED, f"stand-in does not implement {name}")
        return unimplemented


class E2BStandIn:
    """The stand-in server. Start with :meth:`start`, stop with :meth:`stop`.

    Args:
        keys: API keys accepted; each is its own team.
        templates: template ids a create may name.
    """

    def __init__(self, keys: list[str], templates: tuple[str, ...] = ("base",)):
        self.keys = set(keys)
        self.templates = set(templates)
        self.boxes: dict[str, Box] = {}
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        self.unimplemented: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.max_concurrent: int | None = None
        self.boot_delay = 0.0
        self.page_limit: int | None = None  # a server may return fewer than asked, with a next token
        #: Create a new sandbox on every create, even a retry carrying the same Idempotency-Key.
        self.ignore_idempotency = False
        self._idempotent: dict[tuple[str, str], str] = {}  # (team, key) -> sandbox id
        self._lose_create = 0
        self.lock = threading.RLock()
        self.root = Path(tempfile.mkdtemp(prefix="e2b-standin-"))
        self._envd = ProcessWSGIApplication(_Process(self), codecs=[ENVD_JSON_CODEC])
        self._envd_fs = FilesystemWSGIApplication(
            Filesystem(lambda ctx: self.boxes[ctx.request_headers.get("e2b-sandbox-id")].workdir, self.unimplemented),
            codecs=[ENVD_JSON_CODEC])
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._ids: set[str] = set()  # every sandbox and snapshot id handed out, for routes()

    # ------------------------------------------------------------ control

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "E2BStandIn":
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="e2b-standin", daemon=True)
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
            self._kill_box_processes(box)
        shutil.rmtree(self.root, ignore_errors=True)

    def fail(self, method: str, path: str, status: int, message: str = "scripted failure", *,
             headers: dict[str, str] | None = None, times: int = 1, echo_key: bool = False) -> None:
        """Answer the next ``times`` requests matching ``method`` and the ``path`` regex with an error.

        ``echo_key`` puts the request's API key into the error body, as a careless
        provider's message might; the backend must keep it out of everything it raises.
        """
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path), status, message, headers or {}, times,
                                     echo_key))

    def lose_next_create_response(self) -> None:
        """The next create makes its sandbox but answers 502, as if a proxy lost the response."""
        with self.lock:
            self._lose_create += 1

    def routes(self) -> list[str]:
        """``METHOD path`` of every call, ids replaced by ``{id}``."""
        out = []
        for c in self.calls:
            p = c["path"]
            for sid in self._ids:
                p = p.replace(sid, "{id}")
            out.append(f"{c['method']} {p}")
        return out

    def live(self, team_key: str | None = None) -> list[Box]:
        return [b for b in self.boxes.values() if b.state != "killed" and (team_key is None or b.team == team_key)]

    def expire(self, sandbox_id: str) -> None:
        """Make a sandbox disappear as if it reached its timeout."""
        with self.lock:
            self.boxes[sandbox_id].state = "killed"
        self._kill_box_processes(self.boxes[sandbox_id])

    def kill(self, sandbox_id: str) -> None:
        """Kill a sandbox behind the SDK's back (E2B lost the host, an operator killed it in the dashboard)."""
        self.expire(sandbox_id)

    def _kill_box_processes(self, box: Box) -> None:
        kill_marked(BOX_MARKER, box.id)
        for proc in list(box.procs.values()):
            try:
                proc.wait(timeout=5)  # reap our own children
            except subprocess.TimeoutExpired:
                pass

    # ------------------------------------------------------------ REST

    def handle_api(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
                   body: Any) -> tuple[int, Any, dict[str, str]]:
        key = headers.get("x-api-key", "")
        if key not in self.keys:
            return 401, {"code": 401, "message": f"Invalid API key, got {key!r}"}, {}
        with self.lock:
            if method == "POST" and path == "/v2/sandboxes":
                return self._create(key, query, body, headers.get("idempotency-key"))
            for pattern, fn in self._routes():
                m = re.fullmatch(pattern[1], path)
                if m and method == pattern[0]:
                    return fn(key, query, body, *m.groups())
        self.unimplemented.append((method, path))
        return 404, {"code": 404, "message": f"stand-in has no route {method} {path}"}, {}

    def _routes(self) -> list[tuple[tuple[str, str], Any]]:
        return [
            (("GET", r"/v2/sandboxes"), self._list),
            (("GET", r"/sandboxes/([^/]+)"), self._info),
            (("DELETE", r"/sandboxes/([^/]+)"), self._kill),
            (("POST", r"/sandboxes/([^/]+)/timeout"), self._timeout),
            (("POST", r"/sandboxes/([^/]+)/pause"), self._pause),
            (("POST", r"/v2/sandboxes/([^/]+)/connect"), self._connect),
            (("POST", r"/sandboxes/([^/]+)/snapshots"), self._snapshot),
            (("DELETE", r"/templates/([^/]+)"), self._delete_template),
        ]

    def _find(self, key: str, sid: str) -> Box | None:
        box = self.boxes.get(sid)
        if box is None or box.team != key or box.state == "killed":
            return None
        return box

    @staticmethod
    def _not_found(sid: str) -> tuple[int, Any, dict[str, str]]:
        return 404, {"code": 404, "message": f"sandbox \"{sid}\" doesn't exist or you don't have access to it"}, {}

    def _create(self, key: str, query: Any, body: Any, idempotency_key: str | None) -> tuple[int, Any, dict[str, str]]:
        earlier = self._idempotent.get((key, idempotency_key or ""))
        if idempotency_key and not self.ignore_idempotency and earlier and self._find(key, earlier):
            return 201, self.boxes[earlier].created(), {}
        template = body.get("templateID")
        snap = self.snapshots.get(template)
        if template not in self.templates and snap is None:
            return 404, {"code": 404, "message": f"template '{template}' not found"}, {}
        running = [b for b in self.live(key) if b.state == "running"]
        if self.max_concurrent is not None and len(running) >= self.max_concurrent:
            return 429, {"code": 429, "message": (
                f"You have reached the maximum number of concurrent E2B sandboxes ({self.max_concurrent})")}, {}
        sid = "i" + secrets.token_hex(9)
        workdir = self.root / sid
        if snap is not None:
            shutil.copytree(snap["dir"], workdir)
        else:
            workdir.mkdir()
        now = time.time()
        timeout = int(body.get("timeout", 15))
        box = Box(
            id=sid, team=key, template=template, metadata=dict(body.get("metadata") or {}),
            env=dict(body.get("envVars") or {}), workdir=workdir, token=secrets.token_hex(16),
            started_at=now, end_at=now + timeout, ready_at=now + self.boot_delay,
            allow_internet_access=body.get("allow_internet_access"), network=dict(body.get("network") or {}),
        )
        if box.network.get("allowPublicTraffic") is False:
            box.traffic_token = "tat_" + secrets.token_hex(16)
        self.boxes[sid] = box
        self._ids.add(sid)
        if idempotency_key:
            self._idempotent[(key, idempotency_key)] = sid
        if self._lose_create:
            self._lose_create -= 1
            return 502, {"code": 502, "message": "upstream connect error or disconnect/reset before headers"}, {}
        return 201, box.created(), {}

    def _list(self, key: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any, dict[str, str]]:
        want: dict[str, str] = {}
        if "metadata" in query:
            # the SDK quotes each key and value, then urlencodes the pairs
            want = {urllib.parse.unquote(k): urllib.parse.unquote(v)
                    for k, v in urllib.parse.parse_qsl(query["metadata"][0])}
        states = set(query["state"][0].split(",")) if "state" in query else {"running", "paused"}
        rows = [b for b in sorted(self.live(key), key=lambda b: (b.started_at, b.id))
                if b.state in states and all(b.metadata.get(k) == v for k, v in want.items())]
        limit = int(query.get("limit", ["100"])[0])
        if self.page_limit is not None:
            limit = min(limit, self.page_limit)
        offset = int(query.get("nextToken", ["0"])[0])
        page = rows[offset:offset + limit]
        headers = {"x-next-token": str(offset + limit)} if offset + limit < len(rows) else {}
        return 200, [b.summary() for b in page], headers

    def _info(self, key: str, query: Any, body: Any, sid: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, sid)
        if box is None:
            return self._not_found(sid)
        return 200, {**box.summary(), "envdAccessToken": box.token}, {}

    def _kill(self, key: str, query: Any, body: Any, sid: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, sid)
        if box is None:
            return self._not_found(sid)
        box.state = "killed"
        self._kill_box_processes(box)
        return 204, None, {}

    def _timeout(self, key: str, query: Any, body: Any, sid: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, sid)
        if box is None:
            return self._not_found(sid)
        box.end_at = time.time() + int(body["timeout"])
        return 204, None, {}

    def _pause(self, key: str, query: Any, body: Any, sid: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, sid)
        if box is None:
            return self._not_found(sid)
        if box.state == "paused":
            return 409, {"code": 409, "message": f"sandbox {sid} is already paused"}, {}
        box.state = "paused"
        return 204, None, {}

    def _connect(self, key: str, query: Any, body: Any, sid: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, sid)
        if box is None:
            return self._not_found(sid)
        status = 200
        if box.state == "paused":
            box.state = "running"
            status = 201
        if body and "timeout" in body:
            box.end_at = max(box.end_at, time.time() + int(body["timeout"]))
        return status, box.created(), {}

    def _snapshot(self, key: str, query: Any, body: Any, sid: str) -> tuple[int, Any, dict[str, str]]:
        box = self._find(key, sid)
        if box is None:
            return self._not_found(sid)
        snap_id = "snap" + secrets.token_hex(6)
        name = (body or {}).get("name") or snap_id
        target = self.root / "snapshots" / snap_id
        shutil.copytree(box.workdir, target)
        self.snapshots[snap_id] = {"dir": target, "source": sid, "team": key}
        self._ids.add(snap_id)
        return 201, {"snapshotID": snap_id, "names": [f"standin/{name}:default"]}, {}

    def _delete_template(self, key: str, query: Any, body: Any, tid: str) -> tuple[int, Any, dict[str, str]]:
        snap = self.snapshots.get(urllib.parse.unquote(tid))
        if snap is None or snap["team"] != key:
            return 404, {"code": 404, "message": f"template '{tid}' not found"}, {}
        shutil.rmtree(snap["dir"], ignore_errors=True)
        del self.snapshots[urllib.parse.unquote(tid)]
        return 204, None, {}

    # ------------------------------------------------------------ envd

    def envd_refusal(self, path: str, headers: dict[str, str]) -> tuple[int, Any] | None:
        """Why envd (behind E2B's proxy) would not serve this request, or None."""
        box = self.boxes.get(headers.get("e2b-sandbox-id", ""))
        if box is None or box.state != "running":
            return 502, {"code": 502, "message": "The sandbox was not found"}
        if time.time() < box.ready_at:
            return 502, {"code": 502, "message": "The sandbox is running but port is not open"}
        if path != "/health" and headers.get("x-access-token") != box.token:
            return 401, {"code": 401, "message": "invalid access token"}
        return None

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.path.fullmatch(path):
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                    return f
        return None


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; request bodies by length or chunked; chunked streaming replies."""

    owner: E2BStandIn
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes; no 40 ms delayed-ACK stalls
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

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
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
        url = urllib.parse.urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        if url.path == "/files":
            self._files(url, headers)
            return
        raw = self._body()
        envd = url.path == "/health" or url.path.startswith("/process.Process/") or url.path.startswith(
            "/filesystem.Filesystem/")
        call = {"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                "headers": headers, "plane": "envd" if envd else "api", "body": raw}
        self.owner.calls.append(call)
        fault = self.owner.take_fault(self.command, url.path)
        if fault is not None:
            message = fault.message
            if fault.echo_key:
                message += f" (request had X-API-Key {headers.get('x-api-key', '')!r})"
            self._reply(fault.status, {"code": fault.status, "message": message}, fault.headers)
            return
        if not envd:
            body = json.loads(raw) if raw else None
            status, payload, extra = self.owner.handle_api(self.command, url.path, call["query"], headers, body)
            self._reply(status, payload, extra)
            return
        refusal = self.owner.envd_refusal(url.path, headers)
        if refusal is not None:
            self._reply(*refusal)
            return
        if url.path == "/health":
            self._reply(204, None)
            return
        self._wsgi(url, raw)

    def _files(self, url: urllib.parse.SplitResult, headers: dict[str, str]) -> None:
        """envd's ``/files``: the body is streamed to (or from) the box, never read whole."""
        query = urllib.parse.parse_qs(url.query)
        self.owner.calls.append({"method": self.command, "path": url.path, "query": query, "headers": headers,
                                 "plane": "envd", "body": b""})
        fault = self.owner.take_fault(self.command, url.path)
        refusal = self.owner.envd_refusal(url.path, headers)
        if fault is not None or refusal is not None:
            for _ in body_pieces(self):
                pass
            if fault is not None:
                self._reply(fault.status, {"code": fault.status, "message": fault.message}, fault.headers)
            else:
                self._reply(*refusal)
            return
        serve_files(self, self.owner.boxes[headers["e2b-sandbox-id"]].workdir, query, self.owner.unimplemented)

    def _wsgi(self, url: urllib.parse.SplitResult, raw: bytes) -> None:
        environ = {
            "REQUEST_METHOD": self.command, "PATH_INFO": url.path, "QUERY_STRING": url.query,
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(self.server.server_address[1]),
            "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_LENGTH": str(len(raw)),
            "wsgi.input": io.BytesIO(raw), "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(),
            "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
            "REMOTE_ADDR": self.client_address[0],
        }
        if "content-type" in self.headers:
            environ["CONTENT_TYPE"] = self.headers["content-type"]
        for k, v in self.headers.items():
            name = "HTTP_" + k.upper().replace("-", "_")
            if name not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING"):
                environ[name] = v
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started["status"], started["headers"] = status, headers
            return lambda data: None

        app = self.owner._envd_fs if url.path.startswith("/filesystem.Filesystem/") else self.owner._envd
        body = app(environ, start_response)
        try:
            it = iter(body)
            first = next(it, None)
            code = int(started["status"].split()[0])
            hdrs = started["headers"]
            sized = any(k.lower() == "content-length" for k, _ in hdrs)
            self.send_response(code)
            for k, v in hdrs:
                self.send_header(k, v)
            if not sized:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunks = ([first] if first is not None else [])
            for chunk in _chain(chunks, it):
                if not chunk:
                    continue
                if sized:
                    self.wfile.write(chunk)
                else:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            if not sized:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(body, "close", None)
            if close:
                close()

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


def _in_sandbox(root: Path, path: str) -> Path:
    """Where a path the SDK sent (a command's cwd) is, in a box whose files live under ``root``.

    Its commands are host processes, so what they report (``pwd``) is a host path under
    ``root``: such a path names that very directory, and round-trips. Any other path is the
    box's own: an absolute one is taken from the box's root, a relative one from its home.
    """
    given = Path(path)
    if given.is_absolute() and given.resolve().is_relative_to(root.resolve()):
        return given.resolve()
    return (root / path.lstrip("/")).resolve()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest
