"""ext.workspace: sandboxes as plain local directories, commands as subprocesses in them.

An example of a complete third-party backend. It keeps everything it needs to find a sandbox
again on disk, under its ``home`` (a private directory when it runs out of process): one
directory per sandbox, with a ``.sandboxer.json`` naming the sandbox and its owner labels, so
``list_owned`` finds what a crashed manager left behind. It offers no isolation: it declares
``isolation_levels: [none]``.

The exec convention every backend keeps: exit 124 and ``timed_out`` when the timeout kills the
command, output streamed to ``on_output`` as it arrives, UTF-8 decoded incrementally (a
character split between two reads is never corrupted).
"""

from __future__ import annotations

import codecs
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

from sandboxer.errors import CapacityUnavailable, ExecError, InputError, ProvisionError, ReadinessTimeout, TeardownError
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.models import ExecResult, Profile

_META = ".sandboxer.json"
_ID = re.compile(r"sb-[a-z0-9]{1,64}")


class WorkspaceConfig(BaseModel):
    """The manifest's ``config``."""

    model_config = ConfigDict(extra="forbid")

    max_workspaces: int = Field(default=50, ge=1, description="most workspaces at once")
    root: str | None = Field(default=None, description="where workspaces live; default <home>/workspaces")


class WorkspaceOptions(BaseModel):
    """A profile's ``options``."""

    model_config = ConfigDict(extra="forbid")

    files: dict[str, str] = Field(default_factory=dict, description="files to write into a new workspace")


class WorkspaceExtension(SandboxExtension):
    """Each sandbox is ``<root>/<sandbox_id>``; exec runs ``argv`` there as a subprocess."""

    Config = WorkspaceConfig
    ProfileOptions = WorkspaceOptions
    features = frozenset({"exec", "list_owned"})

    def __init__(self, manifest, config):  # type: ignore[no-untyped-def]
        super().__init__(manifest, config)
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return Path(self.config.root) if self.config.root else self.home / "workspaces"

    def _dir(self, handle: dict[str, Any]) -> Path:
        sid = handle.get("sandbox_id")
        if not isinstance(sid, str) or not _ID.fullmatch(sid):
            raise InputError(f"{self.id}: handle names no valid sandbox id: {sid!r}")
        return self.root / sid

    def resource_names(self, profile: Profile, inputs: dict[str, Any], host: str | None) -> list[str]:
        return [f"workspace {self.root / str(inputs['sandbox_id'])}"]

    # ------------------------------------------------------------ lifecycle

    def provision(self, profile: Profile, inputs: dict[str, Any], host: str | None) -> dict[str, Any]:
        handle = {"sandbox_id": inputs["sandbox_id"], "host": "localhost"}
        path = self._dir(handle)
        opts = self.options(profile)
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
                (path / _META).write_text(json.dumps({"sandbox_id": inputs["sandbox_id"],
                                                      "owner_labels": inputs["owner_labels"]}))
            except FileExistsError:
                raise ProvisionError(f"{self.id}: workspace {path} exists already", backend=self.id) from None
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
        return handle

    def wait_ready(self, handle: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        path = self._dir(handle)
        if not (path / _META).is_file():
            raise ReadinessTimeout(f"{self.id}: workspace {path} is gone", backend=self.id)
        return {"host": "localhost", "path": str(path)}

    def teardown(self, handle: dict[str, Any]) -> dict[str, Any]:
        path = self._dir(handle)
        if not path.exists():
            return {"already_gone": True}
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            raise TeardownError(f"{self.id}: could not remove workspace {path}", backend=self.id)
        return {"already_gone": False, "removed": str(path)}

    def probe(self, handle: dict[str, Any]) -> bool | None:
        return (self._dir(handle) / _META).is_file()

    def list_owned(self, owner_labels: dict[str, str]) -> list[dict[str, Any]]:
        found = []
        for meta in sorted(self.root.glob(f"*/{_META}")) if self.root.is_dir() else []:
            try:
                rec = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if all(rec.get("owner_labels", {}).get(k) == v for k, v in owner_labels.items()):
                found.append({"sandbox_id": rec["sandbox_id"],
                              "handle": {"sandbox_id": rec["sandbox_id"], "host": "localhost"}})
        return found

    # ------------------------------------------------------------ exec

    def exec(self, handle: dict[str, Any], argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        path = self._dir(handle)
        if not (path / _META).is_file():
            raise ExecError(f"{self.id}: workspace {path} is gone", backend=self.id)
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise InputError(f"{self.id}: exec needs a non-empty list of strings without NUL, got {argv!r}")
        workdir = (path / cwd).resolve() if cwd else path
        if not workdir.is_relative_to(path.resolve()):
            raise InputError(f"{self.id}: cwd {cwd!r} leaves the workspace")
        full_env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(path), "LANG": "C.UTF-8", **(env or {})}
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=full_env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return ExecResult(exit_code=127, stderr=f"{argv[0]}: {exc.strerror}\n")
        parts: dict[str, list[str]] = {"stdout": [], "stderr": []}

        def pump(stream: str, pipe: Any) -> None:
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            while True:
                chunk = pipe.read1(65536)
                text = decoder.decode(chunk, final=not chunk)
                if text:
                    parts[stream].append(text)
                    if on_output is not None:
                        on_output(stream, text)
                if not chunk:
                    return

        pumps = [threading.Thread(target=pump, args=(s, getattr(proc, s)), daemon=True) for s in parts]
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
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        for t in pumps:
            t.join(10)
        return ExecResult(exit_code=124 if timed_out else code, stdout="".join(parts["stdout"]),
                          stderr="".join(parts["stderr"]), timed_out=timed_out)
