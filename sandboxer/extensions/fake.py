"""ext.fake: a scriptable in-memory backend for testing the manager and router.

Like httpx's MockTransport: a test scripts what each verb does next and reads
back every call. ``script(verb, *steps)`` queues steps; a step is an exception
(raised), a callable (called with the verb's arguments, a ProvisionRequest for ``provision``; its result used), or
None (default behaviour). State lives in the instance, so it is per process.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict, deque
from typing import Any, BinaryIO, Callable

from sandboxer.errors import ExecError, SandboxFileNotFound
from sandboxer.execution import OutputCollector, check_argv
from sandboxer.contract import FileInfo, Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult, TeardownReport
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.models import ExecResult, SnapshotMeta
from sandboxer.policy import ENFORCEMENTS


class FakeHandle(Handle):
    fake_id: str
    sandbox_id: str | None = None


class FakeExtension(SandboxExtension):
    features = frozenset({"exec", "snapshots", "metering", "list_owned", "files"})
    own_ttl = "none"  # nothing here ends a sandbox on its own: the manager's gc does
    # it runs nothing: every promise is vacuously kept (a test's manifest narrows it to what it needs)
    enforces = frozenset(ENFORCEMENTS)
    Handle = FakeHandle

    def __init__(self, manifest, config):  # type: ignore[no-untyped-def]
        super().__init__(manifest, config)
        self._lock = threading.Lock()
        self._script: dict[str, deque[Any]] = defaultdict(deque)
        self.calls: list[tuple[str, Any]] = []
        self.live: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str], bytes] = {}  # (fake id, path) -> content (a fake: held in memory)

    def script(self, verb: str, *steps: BaseException | Callable[..., Any] | None) -> None:
        """Queue what the next calls of ``verb`` do."""
        with self._lock:
            self._script[verb].extend(steps)

    def _step(self, verb: str, *args: Any) -> tuple[bool, Any]:
        with self._lock:
            self.calls.append((verb, args))
            step = self._script[verb].popleft() if self._script[verb] else None
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return True, step(*args)
        return False, None

    def provision(self, request: ProvisionRequest) -> FakeHandle:
        done, out = self._step("provision", request)
        if done:
            return out
        fid = "fake-" + uuid.uuid4().hex[:8]
        with self._lock:
            self.live[fid] = {"sandbox_id": request.sandbox_id, "owner_labels": request.owner_labels}
        return FakeHandle(fake_id=fid, sandbox_id=request.sandbox_id, host=request.host or "fake")

    def wait_ready(self, handle: FakeHandle, timeout: float = 60.0) -> Reachability:
        done, out = self._step("wait_ready", handle, timeout)
        return out if done else Reachability(host=handle.host, url=f"fake://{handle.fake_id}")

    def teardown(self, handle: FakeHandle) -> TeardownReport:
        done, out = self._step("teardown", handle)
        if done:
            return out
        with self._lock:
            gone = self.live.pop(handle.fake_id, None) is None
        return TeardownReport(already_gone=gone, removed=[] if gone else [handle.fake_id])

    def exec(self, handle: FakeHandle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        argv = check_argv(argv, backend=self.id)
        done, out = self._step("exec", handle, argv)
        if done:
            return out
        if handle.fake_id not in self.live:
            raise ExecError(f"{self.id}: {handle.fake_id} is gone", backend=self.id)
        collected = OutputCollector(on_output)
        collected.feed_text("stdout", " ".join(argv) + "\n")
        return collected.result(0)

    def probe(self, handle: FakeHandle) -> bool | None:
        done, out = self._step("probe", handle)
        if done:
            return out
        with self._lock:
            return handle.fake_id in self.live

    def handle_id(self, handle: FakeHandle) -> str | None:
        return handle.fake_id

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        self._step("list_owned", owner_labels)
        with self._lock:
            return [OwnedSandbox(sandbox_id=v["sandbox_id"], handle=FakeHandle(fake_id=k, sandbox_id=v["sandbox_id"]))
                    for k, v in self.live.items()
                    if all(v["owner_labels"].get(a) == b for a, b in owner_labels.items())]

    def write_file(self, handle: FakeHandle, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        done, out = self._step("write_file", handle, path, source)
        if done:
            return out
        data = b"".join(iter(lambda: source.read(1 << 16), b""))
        with self._lock:
            self.files[(handle.fake_id, path)] = data
        return len(data)

    def read_file(self, handle: FakeHandle, path: str, sink: BinaryIO) -> int:
        done, out = self._step("read_file", handle, path, sink)
        if done:
            return out
        data = self._file(handle, path)
        sink.write(data)
        return len(data)

    def _file(self, handle: FakeHandle, path: str) -> bytes:
        with self._lock:
            data = self.files.get((handle.fake_id, path))
        if data is None:
            raise SandboxFileNotFound(f"{self.id}: no file {path!r} in {handle.fake_id}")
        return data

    def list_files(self, handle: FakeHandle, path: str) -> list[FileInfo]:
        done, out = self._step("list_files", handle, path)
        if done:
            return out
        return [FileInfo(path=path, name=path.rsplit("/", 1)[-1], type="file", size=len(self._file(handle, path)))]

    def remove_file(self, handle: FakeHandle, path: str, *, recursive: bool = False) -> None:
        done, _ = self._step("remove_file", handle, path)
        if not done:
            self._file(handle, path)
            with self._lock:
                self.files.pop((handle.fake_id, path), None)

    def snapshot(self, handle: FakeHandle) -> SnapshotResult:
        done, out = self._step("snapshot", handle)
        return out if done else SnapshotResult(data={"of": handle.fake_id}, size_bytes=1, checksum="sha256:0")

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> FakeHandle:
        self._step("restore", snapshot)
        return self.provision(request)
