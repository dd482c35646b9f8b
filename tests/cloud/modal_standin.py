"""A stand-in for Modal's control plane and task command router, on 127.0.0.1.

Two real grpclib servers built on the ``modal_proto`` server base classes,
which the unmodified ``modal`` SDK talks to over plaintext HTTP/2:

* the control plane (``ModalClientBase``): apps, environments, images, auth
  tokens and the ``Sandbox*V2`` RPCs;
* the per-task command router (``TaskCommandRouterBase``) whose URL the
  create response hands out: exec, stdio, readiness and filesystem snapshots.

A "sandbox" here is a scratch directory; exec runs the argv as a real local
process in it (the file tool modal 1.6's ``Sandbox.filesystem`` execs,
``/__modal/.bin/modal-sandbox-fs-tools``, is tests/cloud/modal_fs_tools.py, over
that directory; stdin also takes the SDK's resumable ``TaskExecStdinWriteStream``;
output is kept until it is read, at most :data:`PIPE_HIGH` bytes unread, as a pipe
holds it, and is sent in pieces of at most :data:`READ_PIECE`), and a filesystem snapshot is a copy of it, so a file written
before a snapshot is really there after a restore. An exec's workdir is
honoured as the SDK sends it: a path the sandbox's own commands reported (a
host path inside its directory) is that directory, any other absolute path is
taken from the sandbox's directory. Every process of a sandbox
carries ``MODAL_STANDIN_SANDBOX=<id>`` in its environment (tests/cloud/procs.py):
terminating the sandbox kills them all, as its container going away would. An
exec's ``timeout_secs`` ends in SIGKILL to the process the exec started, and
only to it (what it forked lives on in the sandbox).
Each token id is its own workspace (it sees only the apps and sandboxes it
made) unless :attr:`ModalStandIn.workspaces` maps it to another token id's.

Every call is recorded in :attr:`ModalStandIn.calls`; a sandbox's :attr:`Sbx.network` is the
outbound network its create sent, :attr:`Sbx.ports` the ports it opened (each answered by
``SandboxGetTunnels[V2]`` with a tunnel), :attr:`Sbx.inbound` who may connect to them, and
:attr:`Sbx.gpu` the GPU it asked for. The SDK sends a GPU sandbox through Modal's V1 sandbox
API (``SandboxCreate``, ``SandboxGetTaskId``, ``SandboxWait``, ``SandboxTerminate``, ...), so
those are served too, for sandboxes with a V1-shaped id. Any RPC the stand-in
does not implement is recorded in :attr:`ModalStandIn.unimplemented` and
answered UNIMPLEMENTED; the test fixture fails on it, so an SDK upgrade that
changes the wire shows up at once. Faults are scripted per RPC with
:meth:`ModalStandIn.fail_next` (a status, a message and status details);
:meth:`ModalStandIn.lose_next_create_response` makes a create happen but
answer UNAVAILABLE, which the SDK retries: Modal has no idempotency key, so
the retry makes a second sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib import GRPCError, Status
from grpclib.server import Server

from modal._utils.grpc_utils import custom_detail_codec
from modal_proto import api_pb2
from modal_proto import task_command_router_pb2 as sr_pb2
from modal_proto.api_grpc import ModalClientBase
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

from tests.cloud.procs import kill_marked

_GENERIC = api_pb2.GenericResult
#: The environment variable marking every process of a stand-in sandbox.
SANDBOX_MARKER = "MODAL_STANDIN_SANDBOX"
#: Where modal 1.6's Sandbox.filesystem expects its file tool, and the stand-in's own.
FS_TOOLS = "/__modal/.bin/modal-sandbox-fs-tools"
FS_TOOLS_STANDIN = str(Path(__file__).with_name("modal_fs_tools.py"))
#: Unread output an exec may have before its process waits (as on a full pipe).
PIPE_HIGH = 4 * 1024 * 1024
#: The most bytes one TaskExecStdioRead message carries.
READ_PIECE = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_jwt(ttl: float = 3600.0) -> str:
    """An unsigned JWT whose payload carries the ``exp`` claim the SDK parses."""

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'exp': int(time.time() + ttl), 'jti': secrets.token_hex(4)})}.sig"


@dataclass
class Output:
    """One stream's output not yet read: ``buf`` starts at byte ``start`` of the stream."""

    buf: bytearray = field(default_factory=bytearray)
    start: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.buf)


@dataclass
class Exec:
    proc: asyncio.subprocess.Process
    out: Output = field(default_factory=Output)
    err: Output = field(default_factory=Output)
    stdin_written: int = 0
    stdin_closed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    code: int | None = None
    signal: int | None = None


@dataclass
class Sbx:
    id: str
    app_id: str
    task_id: str
    root: Path
    definition: api_pb2.Sandbox
    tags: dict[str, str]
    created_at: float
    token_id: str = ""  # whose token created it
    workspace: str = ""
    status: int = 0  # GenericResult status; 0 = running
    finished_at: float | None = None
    execs: dict[str, Exec] = field(default_factory=dict)
    #: the create's inline secret sources as sent, in order: each ``env`` source's contents
    #: (``Secret.from_dict``, and the ``env=`` dict last); every exec runs with them merged
    secret_sources: list[dict[str, str]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment the create gave the sandbox (every secret source, later ones winning)."""
        out: dict[str, str] = {}
        for source in self.secret_sources:
            out.update(source)
        return out

    @property
    def ports(self) -> list[tuple[int, str]]:
        """The ports the create opened, each with how: ``encrypted`` (TLS), ``unencrypted`` or ``h2``."""
        how = {(False, api_pb2.TUNNEL_TYPE_H2): "h2"}
        return [(p.port, "unencrypted" if p.unencrypted else how.get((False, p.tunnel_type), "encrypted"))
                for p in self.definition.open_ports.ports]

    @property
    def inbound(self) -> list[str]:
        """The create's ``inbound_cidr_allowlist`` as sent ([]: anyone may connect to its tunnels)."""
        return list(self.definition.inbound_cidr_allowlist)

    @property
    def gpu(self) -> tuple[str, int] | None:
        """The GPU the create asked for, as sent: (``gpu_type``, ``count``), or None."""
        cfg = self.definition.resources.gpu_config
        return (cfg.gpu_type, cfg.count) if cfg.gpu_type or cfg.count else None

    def tunnel_host(self, port: int) -> str:
        return f"{self.id.lower()}-{port}.modal-standin.test"

    @property
    def network(self) -> dict[str, Any]:
        """The outbound network the create asked for, as sent: the definition's ``network_access``
        (``BLOCKED``, ``OPEN`` or ``ALLOWLIST`` with its CIDRs and domains) and the legacy
        ``block_network`` field (which SDK 1.6 leaves False: it sends ``network_access``)."""
        access = self.definition.network_access
        return {
            "type": api_pb2.NetworkAccess.NetworkAccessType.Name(access.network_access_type),
            "cidrs": list(access.allowed_cidrs), "domains": list(access.allowed_domains),
            "block_network": self.definition.block_network,
        }


class ModalStandIn:
    """Both servers, their state, the call record and the fault script.

    Runs its own event loop in a daemon thread; :meth:`start` / :meth:`stop`.
    """

    def __init__(self, token_id: str, token_secret: str, *, list_page_size: int = 2):
        self.tokens = {token_id: token_secret}
        self.list_page_size = list_page_size
        self.calls: list[tuple[str, Any]] = []
        #: (method, token id) of every control-plane call: whose token was used.
        self.callers: list[tuple[str, str]] = []
        self.unimplemented: list[str] = []
        self.sandboxes: dict[str, Sbx] = {}
        self.images: dict[str, Path | None] = {}
        #: ephemeral Secrets made by SecretGetOrCreate (the V1 create's ``from_dict`` secrets), by id
        self.secrets: dict[str, dict[str, str]] = {}
        self.apps: dict[tuple[str, str], str] = {}  # (workspace, app name) -> app id
        #: Each token id is its own workspace unless mapped here to another token id's.
        self.workspaces: dict[str, str] = {}
        self.jwts: set[str] = set()
        #: Ports a create opens that SandboxGetTunnels[V2] nonetheless leaves out (a tunnel Modal did not set up).
        self.no_tunnel: set[int] = set()
        self._faults: dict[str, list[tuple[GRPCError, bool]]] = {}
        self._lose_create = 0
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="modal-standin-"))
        self.port = _free_port()
        self.router_port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.router_url = f"http://127.0.0.1:{self.router_port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modal-standin", daemon=True)
        self._servers: list[Server] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "ModalStandIn":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        control = Server([_ControlPlane(self)], status_details_codec=custom_detail_codec)
        router = Server([_Router(self)], status_details_codec=custom_detail_codec)
        await control.start("127.0.0.1", self.port)
        await router.start("127.0.0.1", self.router_port)
        self._servers = [control, router]

    def stop(self) -> None:
        async def _stop() -> None:
            for sb in self.sandboxes.values():
                await self._kill_execs(sb)
            for server in self._servers:
                server.close()
                await server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------ scripting

    def fail_next(self, method: str, status: Status, message: str = "", details: list[Any] | None = None,
                  times: int = 1, echo_secret: bool = False) -> None:
        """Answer the next ``times`` calls of ``method`` with this gRPC error.

        ``echo_secret`` appends the caller's token secret to the message (for a
        command-router call, that of the token that created the sandbox), as a
        careless provider's message might.
        """
        with self._lock:
            self._faults.setdefault(method, []).extend(
                (GRPCError(status, message, details), echo_secret) for _ in range(times)
            )

    def lose_next_create_response(self) -> None:
        """The next SandboxCreateV2 makes its sandbox, then answers UNAVAILABLE (the SDK retries it)."""
        with self._lock:
            self._lose_create += 1

    def kill(self, sandbox_id: str) -> None:
        """Kill a sandbox behind the SDK's back (its worker died, an operator stopped it): it stays known
        with a TERMINATED result (the SDK's ``returncode`` 137) until it is purged."""
        sb = self.sandboxes[sandbox_id]
        sb.status, sb.finished_at = _GENERIC.GENERIC_STATUS_TERMINATED, time.time()
        asyncio.run_coroutine_threadsafe(self._kill_execs(sb), self._loop).result(timeout=10)

    def forget(self, sandbox_id: str) -> None:
        """Drop a sandbox as if Modal had purged it: later lookups get NOT_FOUND."""
        sb = self.sandboxes.pop(sandbox_id)
        asyncio.run_coroutine_threadsafe(self._kill_execs(sb), self._loop).result(timeout=10)

    def finish(self, sandbox_id: str) -> None:
        """End a sandbox at its timeout, as Modal does: its container goes (everything it ran with it),
        and it stays known with a TIMEOUT result (the SDK's ``returncode`` 124) until it is purged."""
        sb = self.sandboxes[sandbox_id]
        sb.status, sb.finished_at = _GENERIC.GENERIC_STATUS_TIMEOUT, time.time()
        asyncio.run_coroutine_threadsafe(self._kill_execs(sb), self._loop).result(timeout=10)

    def called(self, method: str) -> list[Any]:
        return [req for name, req in self.calls if name == method]

    # ------------------------------------------------------------ internals

    def record(self, method: str, request: Any, metadata: Any, *, control: bool) -> None:
        self.calls.append((method, request))
        with self._lock:
            queue = self._faults.get(method)
            fault = queue.pop(0) if queue else None
        if fault is not None:
            error, echo = fault
            if echo:
                token_id = metadata.get("x-modal-token-id") if control else next(
                    (sb.token_id for sb in self.sandboxes.values() if sb.task_id == getattr(request, "task_id", None)),
                    "")
                secret = metadata.get("x-modal-token-secret") if control else self.tokens.get(token_id, "")
                raise GRPCError(error.status, f"{error.message} (token {token_id}:{secret})", error.details)
            raise error
        if control:
            token_id = metadata.get("x-modal-token-id")
            token_secret = metadata.get("x-modal-token-secret")
            self.callers.append((method, token_id))
            if self.tokens.get(token_id) != token_secret:
                # Real providers have been known to echo what they were sent; the
                # backend must redact it, so the stand-in echoes it on purpose.
                raise GRPCError(Status.UNAUTHENTICATED, f"Invalid token: {token_id}:{token_secret}")
        else:
            auth = metadata.get("authorization", "")
            if auth.removeprefix("Bearer ") not in self.jwts:
                raise GRPCError(Status.UNAUTHENTICATED, "bad router jwt")

    def new_jwt(self) -> str:
        jwt = make_jwt()
        self.jwts.add(jwt)
        return jwt

    def workspace(self, metadata: Any) -> str:
        token_id = metadata.get("x-modal-token-id", "")
        return self.workspaces.get(token_id, token_id)

    def sandbox(self, sandbox_id: str, metadata: Any = None) -> Sbx:
        """The sandbox, as the caller's workspace sees it (another workspace's is not found)."""
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or (metadata is not None and sb.workspace != self.workspace(metadata)):
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sb

    def by_task(self, task_id: str) -> Sbx:
        for sb in self.sandboxes.values():
            if sb.task_id == task_id:
                if sb.status:
                    raise GRPCError(Status.NOT_FOUND, f"Task {task_id} has finished")
                return sb
        raise GRPCError(Status.NOT_FOUND, f"Task {task_id} not found")

    async def _kill_execs(self, sb: Sbx) -> None:
        """Everything the sandbox ran goes, as its container does."""
        kill_marked(SANDBOX_MARKER, sb.id)
        for ex in sb.execs.values():
            if ex.proc.returncode is None:
                await ex.proc.wait()

    def result(self, sb: Sbx) -> api_pb2.GenericResult:
        return api_pb2.GenericResult(status=sb.status) if sb.status else api_pb2.GenericResult()


def _tunnel(sb: Sbx, port: int, how: str) -> api_pb2.TunnelData:
    """A port's tunnel as Modal describes it: a TLS host on 443, or a plain TCP host and port."""
    if how == "unencrypted":
        return api_pb2.TunnelData(container_port=port, unencrypted_host=sb.tunnel_host(port),
                                  unencrypted_port=40000 + port)
    return api_pb2.TunnelData(container_port=port, host=sb.tunnel_host(port), port=443)


def _in_sandbox(root: Path, path: str) -> Path:
    """Where a path the SDK sent (an exec's workdir) is, in a sandbox whose files live under ``root``.

    Its commands are host processes, so what they report (``pwd``) is a host path under
    ``root``: such a path names that very directory, and round-trips. Any other absolute
    path is the sandbox's own, taken from its root.
    """
    given = Path(path)
    if given.is_absolute() and given.resolve().is_relative_to(root.resolve()):
        return given.resolve()
    return root / path.lstrip("/")


def _recording(cls: type, base: type, *, control: bool) -> type:
    """Wrap each implemented RPC to record and fault it; make every other one record and fail."""

    def wrap(name: str, impl: Any):
        async def handler(self, stream) -> None:
            request = await stream.recv_message()
            self.standin.record(name, request, stream.metadata, control=control)
            await impl(self, stream, request)

        return handler

    def missing(name: str):
        async def handler(self, stream) -> None:
            self.standin.unimplemented.append(name)
            self.standin.calls.append((name, None))
            raise GRPCError(Status.UNIMPLEMENTED, f"{name} is not implemented by the Modal stand-in")

        return handler

    for name, member in inspect.getmembers(base, predicate=inspect.isfunction):
        if not getattr(member, "__isabstractmethod__", False):
            continue
        own = cls.__dict__.get(name)
        setattr(cls, name, wrap(name, own) if own else missing(name))
    cls.__abstractmethods__ = frozenset()
    return cls


class _ControlPlane(ModalClientBase):
    def __init__(self, standin: ModalStandIn):
        self.standin = standin

    async def ClientHello(self, stream, request) -> None:
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def AppGetOrCreate(self, stream, request) -> None:
        key = (self.standin.workspace(stream.metadata), request.app_name)
        app_id = self.standin.apps.setdefault(key, f"ap-{secrets.token_hex(11)}")
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app_id))

    async def EnvironmentGetOrCreate(self, stream, request) -> None:
        meta = api_pb2.EnvironmentMetadata(
            name=request.deployment_name or "main",
            settings=api_pb2.EnvironmentSettings(image_builder_version="2025.06"),
        )
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(environment_id="en-standin", metadata=meta))

    async def ImageGetOrCreate(self, stream, request) -> None:
        image_id = f"im-{secrets.token_hex(11)}"
        self.standin.images[image_id] = None
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(
            image_id=image_id, result=api_pb2.GenericResult(status=_GENERIC.GENERIC_STATUS_SUCCESS)
        ))

    async def ImageFromId(self, stream, request) -> None:
        if request.image_id not in self.standin.images:
            raise GRPCError(Status.NOT_FOUND, f"Image {request.image_id} not found")
        await stream.send_message(api_pb2.ImageFromIdResponse(image_id=request.image_id))

    async def AuthTokenGet(self, stream, request) -> None:
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=make_jwt()))

    async def SandboxCreateV2(self, stream, request) -> None:
        with self.standin._lock:
            lose, self.standin._lose_create = self.standin._lose_create > 0, max(0, self.standin._lose_create - 1)
        response = await self._create(stream, request)
        if lose:  # made, but the answer is lost on its way back
            raise GRPCError(Status.UNAVAILABLE, "upstream connect error or disconnect/reset before headers")
        await stream.send_message(response)

    async def _create(self, stream, request, *, v1: bool = False) -> api_pb2.SandboxCreateV2Response:
        st = self.standin
        definition = request.definition
        if definition.image_id not in st.images:
            raise GRPCError(Status.NOT_FOUND, f"Image {definition.image_id} not found")
        # V1 ids are "sb-" and 22 letters or digits; the SDK routes every other shape to V2
        sandbox_id = f"sb-{secrets.token_hex(11)[:21]}V" if v1 else f"sb-{secrets.token_hex(12)}"
        root = st._tmp / sandbox_id
        source = st.images[definition.image_id]
        if source is not None:
            shutil.copytree(source, root)
        else:
            root.mkdir()
        sb = Sbx(
            id=sandbox_id, app_id=request.app_id, task_id=f"ta-{secrets.token_hex(11)}V", root=root,
            definition=definition, tags={t.tag_name: t.tag_value for t in request.tags}, created_at=time.time(),
            token_id=stream.metadata.get("x-modal-token-id", ""), workspace=st.workspace(stream.metadata),
            secret_sources=self._secret_sources(request, definition),
        )
        st.sandboxes[sandbox_id] = sb
        response = api_pb2.SandboxCreateV2Response(
            sandbox_id=sandbox_id, task_id=sb.task_id,
            metadata=api_pb2.SandboxHandleMetadata(app_id=request.app_id),
            command_router_access=api_pb2.CommandRouterAccess(url=st.router_url, jwt=st.new_jwt()),
        )
        return response

    def _secret_sources(self, request, definition) -> list[dict[str, str]]:
        """V2 sends a from_dict Secret inline (``secret_sources``); V1 (a GPU sandbox) makes it an
        ephemeral Secret first and names it in ``definition.secret_ids``."""
        if any(not source.HasField("env") for source in getattr(request, "secret_sources", ())):
            raise GRPCError(Status.UNIMPLEMENTED, "the stand-in keeps no named Secrets (secret_id sources)")
        inline = [dict(source.env.contents) for source in getattr(request, "secret_sources", ())]
        missing = [i for i in definition.secret_ids if i not in self.standin.secrets]
        if missing:
            raise GRPCError(Status.NOT_FOUND, f"Secret {missing[0]} not found")
        return [dict(self.standin.secrets[i]) for i in definition.secret_ids] + inline

    async def SecretGetOrCreate(self, stream, request) -> None:
        """Only the ephemeral kind (``Secret.from_dict`` loaded for a V1 create): named Secrets are not kept."""
        if request.deployment_name:
            raise GRPCError(Status.UNIMPLEMENTED, "the stand-in keeps no named Secrets")
        secret_id = f"st-{secrets.token_hex(11)}"
        self.standin.secrets[secret_id] = dict(request.env_dict)
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=secret_id))

    async def SandboxCreate(self, stream, request) -> None:
        """V1's create, which the SDK uses for a GPU sandbox."""
        response = await self._create(stream, request, v1=True)
        await stream.send_message(api_pb2.SandboxCreateResponse(sandbox_id=response.sandbox_id,
                                                                 metadata=response.metadata))

    async def SandboxGetTunnelsV2(self, stream, request) -> None:
        sb = self.standin.sandbox(request.sandbox_id, stream.metadata)
        await stream.send_message(api_pb2.SandboxGetTunnelsResponse(
            result=api_pb2.GenericResult(status=_GENERIC.GENERIC_STATUS_SUCCESS),
            tunnels=[_tunnel(sb, port, how) for port, how in sb.ports if port not in self.standin.no_tunnel],
        ))

    async def TaskGetCommandRouterAccess(self, stream, request) -> None:
        st = self.standin
        sb = st.by_task(request.task_id)
        await stream.send_message(api_pb2.TaskGetCommandRouterAccessResponse(url=st.router_url, jwt=st.new_jwt()))

    async def SandboxGetTaskIdV2(self, stream, request) -> None:
        sb = self.standin.sandbox(request.sandbox_id, stream.metadata)
        if sb.status:
            await stream.send_message(api_pb2.SandboxGetTaskIdResponse(task_result=self.standin.result(sb)))
        else:
            await stream.send_message(api_pb2.SandboxGetTaskIdResponse(task_id=sb.task_id))

    async def SandboxGetCommandRouterAccess(self, stream, request) -> None:
        st = self.standin
        sb = st.sandbox(request.sandbox_id, stream.metadata) if request.sandbox_id else st.by_task(request.task_id)
        if sb.status:
            raise GRPCError(Status.FAILED_PRECONDITION, f"Sandbox {sb.id} has finished")
        await stream.send_message(api_pb2.SandboxGetCommandRouterAccessResponse(url=st.router_url, jwt=st.new_jwt()))

    async def SandboxWaitV2(self, stream, request) -> None:
        sb = self.standin.sandbox(request.sandbox_id, stream.metadata)
        deadline = time.monotonic() + min(request.timeout, 5.0)
        while not sb.status and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await stream.send_message(api_pb2.SandboxWaitResponse(
            result=self.standin.result(sb), metadata=api_pb2.SandboxHandleMetadata(app_id=sb.app_id)
        ))

    async def SandboxTerminateV2(self, stream, request) -> None:
        sb = self.standin.sandbox(request.sandbox_id, stream.metadata)
        existing = self.standin.result(sb)
        if not sb.status:
            sb.status, sb.finished_at = _GENERIC.GENERIC_STATUS_TERMINATED, time.time()
            await self.standin._kill_execs(sb)
        await stream.send_message(api_pb2.SandboxTerminateResponse(existing_result=existing))

    async def SandboxListV2(self, stream, request) -> None:
        wanted = {t.tag_name: t.tag_value for t in request.tags}
        workspace = self.standin.workspace(stream.metadata)
        found = sorted(
            (sb for sb in self.standin.sandboxes.values()
             if sb.workspace == workspace and (not request.app_id or sb.app_id == request.app_id)
             and (request.include_finished or not sb.status)
             and (not request.before_timestamp or sb.created_at < request.before_timestamp)
             and all(sb.tags.get(k) == v for k, v in wanted.items())),
            key=lambda sb: sb.created_at, reverse=True,
        )[: self.standin.list_page_size]
        await stream.send_message(api_pb2.SandboxListResponse(sandboxes=[
            api_pb2.SandboxInfo(
                id=sb.id, app_id=sb.app_id, created_at=sb.created_at,
                tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.tags.items()],
                task_info=api_pb2.TaskInfo(id=sb.task_id, result=self.standin.result(sb)),
                metadata=api_pb2.SandboxHandleMetadata(app_id=sb.app_id),
            )
            for sb in found
        ]))

    async def SandboxTagsGetV2(self, stream, request) -> None:
        sb = self.standin.sandbox(request.sandbox_id, stream.metadata)
        await stream.send_message(api_pb2.SandboxTagsGetResponse(
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.tags.items()]
        ))

    async def SandboxGetStats(self, stream, request) -> None:
        sb = self.standin.sandbox(request.sandbox_id, stream.metadata)
        seconds = (sb.finished_at or time.time()) - sb.created_at
        res = sb.definition.resources
        cpu_s = res.milli_cpu / 1000 * seconds
        gib_s = res.memory_mb / 1024 * seconds
        resp = api_pb2.SandboxGetStatsResponse(
            duration_hours=seconds / 3600, billed_cpu_core_seconds=cpu_s, billed_memory_gib_seconds=gib_s,
            cost=f"{cpu_s * 0.0000131 + gib_s * 0.00000222:.8f}",
        )
        resp.since.FromSeconds(int(sb.created_at))
        resp.until.FromSeconds(int(sb.finished_at or time.time()))
        await stream.send_message(resp)

    # V1's RPCs take and answer the same messages as V2's (a GPU sandbox is a V1 one)
    SandboxGetTunnels = SandboxGetTunnelsV2
    SandboxGetTaskId = SandboxGetTaskIdV2
    SandboxWait = SandboxWaitV2
    SandboxTerminate = SandboxTerminateV2
    SandboxTagsGet = SandboxTagsGetV2


class _Router(TaskCommandRouterBase):
    def __init__(self, standin: ModalStandIn):
        self.standin = standin

    async def SandboxWaitUntilReady(self, stream, request) -> None:
        sb = self.standin.by_task(request.task_id)
        if not sb.definition.HasField("readiness_probe"):
            raise GRPCError(Status.FAILED_PRECONDITION, "Sandbox has no readiness probe")
        await stream.send_message(sr_pb2.SandboxWaitUntilReadyTcrResponse(ready_at=time.time()))

    async def TaskExecStart(self, stream, request) -> None:
        sb = self.standin.by_task(request.task_id)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(sb.root), **sb.env}
        for source in request.secret_sources:
            env.update(source.env.contents)
        env[SANDBOX_MARKER] = sb.id
        argv = list(request.command_args)
        if argv[:1] == [FS_TOOLS]:
            argv = [sys.executable, FS_TOOLS_STANDIN, *argv[1:]]
            env["MODAL_STANDIN_ROOT"] = str(sb.root)
        cwd = sb.root
        if request.workdir:
            cwd = _in_sandbox(sb.root, request.workdir)
            cwd.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, start_new_session=True,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        ex = Exec(proc=proc)
        sb.execs[request.exec_id] = ex
        asyncio.ensure_future(self._pump(ex, request.timeout_secs))
        await stream.send_message(sr_pb2.TaskExecStartResponse())

    async def _pump(self, ex: Exec, timeout: int) -> None:
        async def copy(reader: asyncio.StreamReader, out: Output) -> None:
            while True:
                async with ex.changed:  # unread output past the high-water mark: the process waits
                    await ex.changed.wait_for(lambda: len(out.buf) < PIPE_HIGH)
                chunk = await reader.read(65536)
                if not chunk:
                    return
                out.buf.extend(chunk)
                async with ex.changed:
                    ex.changed.notify_all()

        assert ex.proc.stdout and ex.proc.stderr
        try:
            await asyncio.wait_for(
                asyncio.gather(copy(ex.proc.stdout, ex.out), copy(ex.proc.stderr, ex.err), ex.proc.wait()),
                timeout=timeout or None,
            )
        except asyncio.TimeoutError:
            # the exec's own process, nothing it forked
            try:
                os.kill(ex.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await ex.proc.wait()
        rc = ex.proc.returncode
        ex.code, ex.signal = (None, -rc) if rc is not None and rc < 0 else (rc, None)
        ex.done.set()
        async with ex.changed:
            ex.changed.notify_all()

    def _exec(self, request) -> Exec:
        sb = self.standin.by_task(request.task_id)
        ex = sb.execs.get(request.exec_id)
        if ex is None:
            raise GRPCError(Status.NOT_FOUND, f"exec {request.exec_id} not found")
        return ex

    async def TaskExecStdioRead(self, stream, request) -> None:
        ex = self._exec(request)
        out = ex.out if request.file_descriptor == sr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDOUT else ex.err
        offset = request.offset
        if offset < out.start:
            raise GRPCError(Status.OUT_OF_RANGE, f"output before offset {out.start} was already read")
        while True:
            async with ex.changed:
                await ex.changed.wait_for(lambda: out.end > offset or ex.done.is_set())
            if out.end > offset:
                at = offset - out.start
                data = bytes(out.buf[at:at + READ_PIECE])
                offset += len(data)
                await stream.send_message(sr_pb2.TaskExecStdioReadResponse(data=data))
                del out.buf[:offset - out.start]  # delivered: a pipe does not keep it either
                out.start = offset
                async with ex.changed:
                    ex.changed.notify_all()
            elif ex.done.is_set():
                return

    async def TaskExecStdinWrite(self, stream, request) -> None:
        ex = self._exec(request)
        assert ex.proc.stdin
        if request.data:
            ex.proc.stdin.write(request.data)
            await ex.proc.stdin.drain()
            ex.stdin_written += len(request.data)
        if request.eof:
            ex.proc.stdin.close()
            ex.stdin_closed = True
        await stream.send_message(sr_pb2.TaskExecStdinWriteResponse())

    async def TaskExecStdinWriteStream(self, stream, request) -> None:
        """Client streaming: a start (task, exec, offset), data, then an end that closes stdin."""
        start = request.start
        ex = self._exec(start)
        assert ex.proc.stdin
        if ex.stdin_closed or start.offset != ex.stdin_written:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"stdin is at offset {ex.stdin_written}{' and closed' if ex.stdin_closed else ''}, "
                            f"not {start.offset}")
        while (msg := await stream.recv_message()) is not None:
            which = msg.WhichOneof("payload")
            if which == "data" and msg.data:
                ex.proc.stdin.write(msg.data)
                await ex.proc.stdin.drain()
                ex.stdin_written += len(msg.data)
            elif which == "end":
                ex.proc.stdin.close()
                ex.stdin_closed = True
        await stream.send_message(sr_pb2.TaskExecStdinWriteStreamResponse())

    async def TaskExecStdinStatus(self, stream, request) -> None:
        ex = self._exec(request)
        await stream.send_message(sr_pb2.TaskExecStdinStatusResponse(num_bytes_written=ex.stdin_written,
                                                                     closed=ex.stdin_closed))

    async def TaskExecWait(self, stream, request) -> None:
        ex = self._exec(request)
        await ex.done.wait()
        if ex.signal is not None:
            await stream.send_message(sr_pb2.TaskExecWaitResponse(signal=ex.signal))
        else:
            await stream.send_message(sr_pb2.TaskExecWaitResponse(code=ex.code or 0))

    async def TaskExecPoll(self, stream, request) -> None:
        ex = self._exec(request)
        if not ex.done.is_set():
            await stream.send_message(sr_pb2.TaskExecPollResponse())
        elif ex.signal is not None:
            await stream.send_message(sr_pb2.TaskExecPollResponse(signal=ex.signal))
        else:
            await stream.send_message(sr_pb2.TaskExecPollResponse(code=ex.code or 0))

    async def TaskSnapshotFilesystem(self, stream, request) -> None:
        sb = self.standin.by_task(request.task_id)
        image_id = f"im-{secrets.token_hex(11)}"
        target = self.standin._tmp / image_id
        shutil.copytree(sb.root, target, symlinks=True)
        self.standin.images[image_id] = target
        await stream.send_message(sr_pb2.TaskSnapshotFilesystemResponse(image_id=image_id))


_recording(_ControlPlane, ModalClientBase, control=True)
_recording(_Router, TaskCommandRouterBase, control=False)
