"""ext.workspace: sandboxes as plain local directories, commands as subprocesses in them.

An example of a complete third-party backend. It keeps everything it needs to find a sandbox
again on disk, under its ``home`` (a private directory when it runs out of process): one
directory per sandbox, with a ``.sandboxer.json`` naming the sandbox and its owner labels, so
``list_owned`` finds what a crashed manager left behind. It offers no isolation: it declares
``isolation_levels: [none]``.

It shows the typed contract (``sandboxer.contract``): ``provision`` takes a ``ProvisionRequest``
and returns this backend's own ``WorkspaceHandle``; every other method gets that handle back as
the same model. Its exec keeps the convention every backend keeps through
``sandboxer.execution``: argv checked by ``check_argv``, output through an ``OutputCollector``
(streamed as it arrives, UTF-8 decoded incrementally, capped), and exit 124 with ``timed_out``
when the timeout kills the command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sandboxer.contract import Handle, OwnedSandbox, ProvisionRequest, Reachability, TeardownReport
from sandboxer.errors import CapacityUnavailable, ExecError, InputError, ProvisionError, ReadinessTimeout, TeardownError
from sandboxer.execution import OutputCollector, check_argv
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.models import ExecResult

_META = ".sandboxer.json"
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,79}")  # the manager's ids (sb-...) and the conformance kit's


class WorkspaceConfig(BaseModel):
    """The manifest's ``config``."""

    model_config = ConfigDict(extra="forbid")

    max_workspaces: int = Field(default=50, ge=1, description="most workspaces at once")
    root: str | None = Field(default=None, description="where workspaces live; default <home>/workspaces")


class WorkspaceOptions(BaseModel):
    """A profile's ``options``."""

    model_config = ConfigDict(extra="forbid")

    files: dict[str, str] = Field(default_factory=dict, description="files to write into a new workspace")


class WorkspaceHandle(Handle):
    """What finds a workspace again: the sandbox id names its directory (stored by the manager)."""

    sandbox_id: str
    host: str | None = "localhost"


class WorkspaceExtension(SandboxExtension):
    """Each sandbox is ``<root>/<sandbox_id>``; exec runs ``argv`` there as a subprocess."""

    Config = WorkspaceConfig
    ProfileOptions = WorkspaceOptions
    features = frozenset({"exec", "list_owned"})
    Handle = WorkspaceHandle
    # Its commands are subprocesses of the handler and share its network: the host's (then the only
    # promise it keeps is "internet"), or none at all when it runs as an installed bundle, whose
    # worker has no network of its own (then it keeps "none"). unavailable() says which.
    enforces = frozenset({"network:internet", "network:none"})

    @classmethod
    def unavailable(cls, config: BaseModel) -> dict[str, str]:
        from sandboxer.host import brokered

        if brokered.active():
            return {"network:internet": "it runs as an installed bundle, in a worker with no network, and its "
                                        "commands share the worker's"}
        return {"network:none": "its commands run on this host, with the host's network"}

    def __init__(self, manifest, config):  # type: ignore[no-untyped-def]
        super().__init__(manifest, config)
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return Path(self.config.root) if self.config.root else self.home / "workspaces"

    def _dir(self, sandbox_id: str) -> Path:
        if not _ID.fullmatch(sandbox_id):
            raise InputError(f"{self.id}: not a valid sandbox id for a workspace: {sandbox_id!r}")
        return self.root / sandbox_id

    def resource_names(self, request: ProvisionRequest) -> list[str]:
        return [f"workspace {self._dir(request.sandbox_id)}"]

    # ------------------------------------------------------------ lifecycle

    def provision(self, request: ProvisionRequest) -> WorkspaceHandle:
        path = self._dir(request.sandbox_id)
        opts = self.options(request.profile)
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            if sum(1 for p in self.root.iterdir() if (p / _META).is_file()) >= self.config.max_workspaces:
                raise CapacityUnavailable(f"{self.id}: {self.config.max_workspaces} workspaces exist already "
                                          f"(config max_workspaces)", backend=self.id)
            try:
                path.mkdir()
                for name, text in opts.files.items():
                    target = (path / name).resolve()
                    if not target.is_relative_to(path.resolve()):
                        raise InputError(f"{self.id}: profile option files.{name}: path leaves the workspace")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
                (path / _META).write_text(json.dumps({"sandbox_id": request.sandbox_id,
                                                      "owner_labels": request.owner_labels}))
            except FileExistsError:
                raise ProvisionError(f"{self.id}: workspace {path} exists already", backend=self.id) from None
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
        return WorkspaceHandle(sandbox_id=request.sandbox_id)

    def wait_ready(self, handle: WorkspaceHandle, timeout: float = 60.0) -> Reachability:
        path = self._dir(handle.sandbox_id)
        if not (path / _META).is_file():
            raise ReadinessTimeout(f"{self.id}: workspace {path} is gone", backend=self.id)
        return Reachability(host="localhost", path=str(path))

    def teardown(self, handle: WorkspaceHandle) -> TeardownReport:
        path = self._dir(handle.sandbox_id)
        if not path.exists():
            return TeardownReport(already_gone=True)
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            raise TeardownError(f"{self.id}: could not remove workspace {path}", backend=self.id)
        return TeardownReport(removed=[str(path)])

    def probe(self, handle: WorkspaceHandle) -> bool | None:
        return (self._dir(handle.sandbox_id) / _META).is_file()

    def handle_id(self, handle: WorkspaceHandle) -> str | None:
        return None  # the directory is the sandbox id: a retried create cannot make a second one

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        found = []
        for meta in sorted(self.root.glob(f"*/{_META}")) if self.root.is_dir() else []:
            try:
                rec = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if all(rec.get("owner_labels", {}).get(k) == v for k, v in owner_labels.items()):
                found.append(OwnedSandbox(sandbox_id=rec["sandbox_id"],
                                          handle=WorkspaceHandle(sandbox_id=rec["sandbox_id"])))
        return found

    # ------------------------------------------------------------ exec

    def exec(self, handle: WorkspaceHandle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        argv = check_argv(argv, backend=self.id)
        path = self._dir(handle.sandbox_id)
        if not (path / _META).is_file():
            raise ExecError(f"{self.id}: workspace {path} is gone", backend=self.id)
        workdir = (path / cwd).resolve() if cwd else path
        if not workdir.is_relative_to(path.resolve()):
            raise InputError(f"{self.id}: cwd {cwd!r} leaves the workspace")
        full_env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(path), "LANG": "C.UTF-8", **(env or {})}
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=full_env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return ExecResult(exit_code=127, stderr=f"{argv[0]}: {exc.strerror}\n")
        out = OutputCollector(on_output)

        def pump(stream: str, pipe: Any) -> None:
            while chunk := pipe.read1(65536):
                out.feed(stream, chunk)

        pumps = [threading.Thread(target=pump, args=(s, getattr(proc, s)), daemon=True) for s in ("stdout", "stderr")]
        for t in pumps:
            t.start()
        try:
            if stdin:
                proc.stdin.write(stdin)  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: nothing it started runs on
            code = proc.wait()
        for t in pumps:
            t.join(10)
        return out.result(code, timed_out=timed_out)
