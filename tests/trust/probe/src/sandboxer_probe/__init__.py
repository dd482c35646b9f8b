"""ext.probe: a test bundle whose ``exec`` runs one probe, in the worker, of what the worker can reach.

``exec(["<probe>", *args])`` answers with the probe's result as JSON on stdout (exit 0), or
``{"error": "<Class>: <message>"}`` (exit 1). The probes: ``connect HOST PORT [KIND]`` (through
the broker; what the far end sends first), ``direct HOST PORT`` (a plain socket), ``secret REF``
(a SecretRef's value: through the broker), ``http URL`` (httpx through the broker's proxy),
``noproxy URL`` (the same without the proxy's credential), ``token-less`` (a request to the broker
without the token, as a child process would make), ``state ACTION [KEY [VALUE]]``, ``write PATH``,
``exists PATH``, ``environ``, ``ssh CONFIG_JSON`` (sandboxer.ssh, then ``echo``).

Its files (feature ``files``, declared by a test's manifest) live in the worker's own /tmp, one
file per path: they show that file content crosses a brokered worker's confinement streamed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import datetime, timezone
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict

from sandboxer.contract import FileInfo, Handle, ProvisionRequest, Reachability, TeardownReport
from sandboxer.errors import SandboxFileNotFound
from sandboxer.extensions.base import SandboxExtension
from sandboxer.models import ExecResult


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: dict[str, str] | None = None


class ProbeExtension(SandboxExtension):
    Config = ProbeConfig
    features = frozenset({"exec", "files"})
    enforces = frozenset({"network:none"})

    def provision(self, request: ProvisionRequest) -> Handle:
        return Handle(sandbox_id=request.sandbox_id, host="localhost")

    def wait_ready(self, handle: Handle, timeout: float = 60.0) -> Reachability:
        return Reachability(host="localhost")

    def teardown(self, handle: Handle) -> TeardownReport:
        return TeardownReport(removed=[handle.sandbox_id])

    def exec(self, handle: Handle, argv: list[str], **kw: Any) -> ExecResult:
        try:
            out = json.dumps(getattr(self, "_p_" + argv[0].replace("-", "_"))(*argv[1:]))
            code = 0
        except Exception as exc:  # noqa: BLE001 - the probe's answer is what went wrong
            out, code = json.dumps({"error": f"{type(exc).__name__}: {exc}"}), 1
        return ExecResult(exit_code=code, stdout=out, stderr="")

    # ------------------------------------------------------------ files

    @staticmethod
    def _store(handle: Handle, path: str) -> str:
        d = f"/tmp/probe-files/{handle.sandbox_id}"
        os.makedirs(d, exist_ok=True)
        return f"{d}/{path.encode().hex()}"

    def write_file(self, handle: Handle, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        with open(self._store(handle, path), "wb") as f:
            shutil.copyfileobj(source, f, 1 << 16)
            return f.tell()

    def read_file(self, handle: Handle, path: str, sink: BinaryIO) -> int:
        try:
            f = open(self._store(handle, path), "rb")
        except FileNotFoundError:
            raise SandboxFileNotFound(f"{self.id}: no file {path!r}") from None
        with f:
            n = 0
            while chunk := f.read(1 << 16):
                sink.write(chunk)
                n += len(chunk)
            return n

    def list_files(self, handle: Handle, path: str) -> list[FileInfo]:
        st = os.stat(self._store(handle, path))
        return [FileInfo(path=path, name=path.rsplit("/", 1)[-1], type="file", size=st.st_size,
                         modified_at=datetime.fromtimestamp(st.st_mtime, timezone.utc))]

    def remove_file(self, handle: Handle, path: str, *, recursive: bool = False) -> None:
        try:
            os.unlink(self._store(handle, path))
        except FileNotFoundError:
            raise SandboxFileNotFound(f"{self.id}: no file {path!r}") from None

    # ------------------------------------------------------------ probes

    def _p_connect(self, host: str, port: str, kind: str = "egress") -> str:
        from sandboxer.host import brokered

        with brokered.open_connection(host, int(port), kind=kind, timeout=10) as s:
            return s.recv(100).decode()

    def _p_direct(self, host: str, port: str) -> str:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            return s.recv(100).decode()

    def _p_secret(self, ref: str) -> str:
        from sandboxer.secrets import SecretRef

        kind, _, where = ref.partition(":")
        return SecretRef.model_validate({kind: where}).resolve()

    def _p_http(self, url: str) -> list[Any]:
        import httpx

        from sandboxer.host import brokered

        r = httpx.get(url, proxy=brokered.proxy_url(), timeout=10, trust_env=False)
        return [r.status_code, r.text]

    def _p_noproxy(self, url: str) -> list[Any]:
        import httpx

        from sandboxer.host import brokered

        bare = brokered.proxy_url().replace(brokered.proxy_url().split("@")[0].split("//")[1] + "@", "")
        r = httpx.get(url, proxy=bare, timeout=10, trust_env=False)
        return [r.status_code, r.text]

    def _p_token_less(self) -> Any:
        from sandboxer.host.broker import WORKER_SOCKET

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(WORKER_SOCKET)
            s.sendall(b'{"op": "secret", "ref": "env:PROBE_TOKEN"}\n')
            return json.loads(s.recv(65536))

    def _p_state(self, action: str, key: str | None = None, value: str | None = None) -> Any:
        from sandboxer.host import brokered

        t = brokered.own_tables
        if action == "put":
            return t.put(key, json.loads(value))
        return t.keys() if action == "keys" else getattr(t, action)(key)

    def _p_write(self, path: str) -> str:
        with open(os.path.expandvars(path), "w") as f:
            f.write("x")
        return "written"

    def _p_exists(self, path: str) -> bool:
        return os.path.exists(os.path.expandvars(path))

    def _p_environ(self) -> dict[str, str]:
        return dict(os.environ)

    def _p_ssh(self, config: str) -> str:
        from sandboxer.ssh import SSHConnection, SSHHostConfig

        with SSHConnection(SSHHostConfig.model_validate(json.loads(config)), backend=self.id) as conn:
            return conn.run(["echo", "over", "ssh"]).stdout
