"""asyncio API: :class:`AsyncManager` and :class:`AsyncSandbox`, for agent frameworks.

The same verbs, arguments, results and errors as :class:`~sandboxer.manager.Manager` and
:class:`~sandboxer.sandbox.Sandbox`, as coroutines. Each call runs the synchronous Manager's on a
worker thread (``asyncio.to_thread``), so the event loop never blocks on a backend. That is safe
because a Manager is thread-safe: its state store hands each thread a connection of its own (a
pool of SQLite connections opened with ``check_same_thread=False``, one transaction per use), its
in-process bookkeeping is under a lock, and every extension call already runs on the deadline
caller's threads. Cancelling a coroutine stops waiting for the call, not the call itself: a
create goes on to ready (or to clean-up) on its thread; tear it down by id if it matters.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, BinaryIO, Callable, TypeVar

from sandboxer.contract import FileInfo
from sandboxer.models import CleanupReport, ExecResult, MeterQuote, SandboxStatus, SnapshotMeta
from sandboxer.sandbox import Sandbox

T = TypeVar("T")


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


class AsyncSandboxFiles:
    """``sb.files`` of an :class:`AsyncSandbox`: the verbs of :class:`~sandboxer.sandbox.SandboxFiles`, awaited."""

    def __init__(self, sandbox: Sandbox):
        self._files = sandbox.files

    async def write(self, path: str, data: bytes | str | BinaryIO, *, mode: int | None = None) -> int:
        return await _run(self._files.write, path, data, mode=mode)

    async def read(self, path: str, into: BinaryIO | None = None) -> bytes | int:
        return await _run(self._files.read, path, into)

    async def list(self, path: str = ".") -> list[FileInfo]:
        return await _run(self._files.list, path)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await _run(self._files.remove, path, recursive=recursive)

    async def upload(self, local_path: str | os.PathLike[str], remote: str, *, mode: int | None = None) -> int:
        return await _run(self._files.upload, local_path, remote, mode=mode)

    async def download(self, remote: str, local_path: str | os.PathLike[str]) -> int:
        return await _run(self._files.download, remote, local_path)


class AsyncSandbox:
    """A sandbox with awaitable verbs. Its status fields (``id``, ``state``, ``reachability``, ...) read
    through to :attr:`status`, the :class:`~sandboxer.sandbox.Sandbox` underneath, as last read."""

    def __init__(self, sandbox: Sandbox):
        self.status = sandbox

    def __getattr__(self, name: str) -> Any:
        if name in SandboxStatus.model_fields:
            return getattr(self.status, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.status.id} {self.status.state.value}>"

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        return self.status.model_dump(**kwargs)

    @classmethod
    async def from_id(cls, manager: "AsyncManager", sandbox_id: str) -> "AsyncSandbox":
        """Reattach to ``sandbox_id`` (SandboxNotFound if unknown)."""
        return cls(await _run(Sandbox.from_id, manager.sync, sandbox_id))

    @property
    def files(self) -> AsyncSandboxFiles:
        return AsyncSandboxFiles(self.status)

    async def exec(self, argv: list[str], **kwargs: Any) -> ExecResult:
        return await _run(self.status.exec, argv, **kwargs)

    async def extend_ttl(self, seconds: float) -> "AsyncSandbox":
        await _run(self.status.extend_ttl, seconds)
        return self

    async def keepalive(self, seconds: float | None = None) -> "AsyncSandbox":
        await _run(self.status.keepalive, seconds)
        return self

    async def snapshot(self) -> SnapshotMeta:
        return await _run(self.status.snapshot)

    async def teardown(self, **kwargs: Any) -> "AsyncSandbox":
        await _run(self.status.teardown, **kwargs)
        return self

    async def refresh(self, *, probe: bool = True) -> "AsyncSandbox":
        await _run(self.status.refresh, probe=probe)
        return self

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await _run(self.status.__exit__, *exc)


class AsyncManager:
    """The Manager's API as coroutines, over one synchronous :class:`~sandboxer.manager.Manager`.

    Args:
        manager: a Manager to share (its state store and extension workers); without one a
            Manager is made from ``*args, **kwargs`` (as :class:`~sandboxer.manager.Manager`'s)
            and closed by :meth:`close`.
    """

    def __init__(self, *args: Any, manager: Any = None, **kwargs: Any):
        if manager is None:
            from sandboxer.manager import Manager

            manager = Manager(*args, **kwargs)
            self._owns = True
        else:
            self._owns = False
        self.sync = manager

    def __repr__(self) -> str:
        return f"<AsyncManager over {self.sync!r}>"

    async def close(self) -> None:
        if self._owns:
            await _run(self.sync.close)

    async def __aenter__(self) -> "AsyncManager":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ lifecycle

    async def create(self, request: Any = None, /, **kwargs: Any) -> AsyncSandbox:
        return AsyncSandbox(await _run(self.sync.create, request, **kwargs))

    @asynccontextmanager
    async def sandbox(self, profile: str, **kwargs: Any) -> AsyncIterator[AsyncSandbox]:
        """``async with mgr.sandbox("local") as sb:``; torn down on any exit."""
        sb = await self.create(profile=profile, **kwargs)
        async with sb:
            yield sb

    async def get(self, sandbox_id: str, *, refresh: bool = False) -> SandboxStatus:
        return await _run(self.sync.get, sandbox_id, refresh=refresh)

    async def list(self, *, all: bool = False) -> list[SandboxStatus]:  # noqa: A002 - as Manager.list
        return await _run(self.sync.list, all=all)

    async def exec(self, sandbox_id: str, argv: list[str], **kwargs: Any) -> ExecResult:
        return await _run(self.sync.exec, sandbox_id, argv, **kwargs)

    async def teardown(self, sandbox_id: str, **kwargs: Any) -> SandboxStatus:
        return await _run(self.sync.teardown, sandbox_id, **kwargs)

    async def extend_ttl(self, sandbox_id: str, seconds: float) -> SandboxStatus:
        return await _run(self.sync.extend_ttl, sandbox_id, seconds)

    async def snapshot(self, sandbox_id: str) -> SnapshotMeta:
        return await _run(self.sync.snapshot, sandbox_id)

    async def restore(self, snapshot_id: str, profile: str | None = None, **kwargs: Any) -> AsyncSandbox:
        return AsyncSandbox(await _run(self.sync.restore, snapshot_id, profile, **kwargs))

    async def gc(self) -> CleanupReport:
        return await _run(self.sync.gc)

    async def quote(self, profile: str, duration: float) -> list[MeterQuote]:
        return await _run(self.sync.quote, profile, duration)

    async def events(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        return await _run(self.sync.events, sandbox_id)

    # ------------------------------------------------------------ files

    async def write_file(self, sandbox_id: str, path: str, data: bytes | str | BinaryIO, *,
                         mode: int | None = None) -> int:
        return await _run(self.sync.write_file, sandbox_id, path, data, mode=mode)

    async def read_file(self, sandbox_id: str, path: str, into: BinaryIO | None = None) -> bytes | int:
        return await _run(self.sync.read_file, sandbox_id, path, into)

    async def list_files(self, sandbox_id: str, path: str = ".") -> list[FileInfo]:
        return await _run(self.sync.list_files, sandbox_id, path)

    async def remove_file(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        await _run(self.sync.remove_file, sandbox_id, path, recursive=recursive)
