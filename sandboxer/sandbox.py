"""The :class:`Sandbox` object ``Manager.create`` returns: a sandbox's status plus its verbs.

A ``Sandbox`` *is* a :class:`~sandboxer.models.SandboxStatus` (a subclass: every field, ``model_dump``
and the JSON are the status's, and it compares equal to a status with the same fields); the
manager it came from rides along in a private attribute, so ``sb.exec(...)``, ``sb.files.write(...)``,
``sb.extend_ttl(...)``, ``sb.snapshot()`` and ``sb.teardown()`` need no id. ``with mgr.create(...) as sb:``
tears it down on any exit. Every verb is the manager's (same checks, same errors); this module
holds no state of its own beyond the last status read.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import PrivateAttr

from sandboxer.contract import FileInfo
from sandboxer.errors import SandboxerError
from sandboxer.models import ExecResult, SandboxStatus, SnapshotMeta

log = logging.getLogger("sandboxer")

_FIELDS = tuple(SandboxStatus.model_fields)


class SandboxFiles:
    """``sb.files``: the sandbox's files (feature ``files``), streamed; the manager's verbs without the id."""

    def __init__(self, manager: Any, sandbox_id: str):
        self._mgr = manager
        self.sandbox_id = sandbox_id

    def __repr__(self) -> str:
        return f"<SandboxFiles of {self.sandbox_id}>"

    def write(self, path: str, data: bytes | str | BinaryIO, *, mode: int | None = None) -> int:
        """Write ``data`` (bytes, str as UTF-8, or a binary file object) to ``path``; the bytes written."""
        return self._mgr.write_file(self.sandbox_id, path, data, mode=mode)

    def read(self, path: str, into: BinaryIO | None = None) -> bytes | int:
        """The content of ``path``, or with ``into`` the bytes streamed into it."""
        return self._mgr.read_file(self.sandbox_id, path, into)

    def list(self, path: str = ".") -> list[FileInfo]:
        """The entries of the directory ``path`` (sorted by name), or a file's own entry."""
        return self._mgr.list_files(self.sandbox_id, path)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove the file (with ``recursive``, the tree) at ``path``."""
        self._mgr.remove_file(self.sandbox_id, path, recursive=recursive)

    def upload(self, local_path: str | os.PathLike[str], remote: str, *, mode: int | None = None) -> int:
        """Stream the local file ``local_path`` to ``remote``; ``mode`` defaults to the local file's
        permission bits. Returns the bytes written."""
        with open(local_path, "rb") as f:
            bits = os.fstat(f.fileno()).st_mode & 0o777 if mode is None else mode
            return self._mgr.write_file(self.sandbox_id, remote, f, mode=bits)

    def download(self, remote: str, local_path: str | os.PathLike[str]) -> int:
        """Stream ``remote`` into the local file ``local_path`` (written beside it first and moved
        into place once whole, so a failed download leaves nothing). Returns the bytes read."""
        target = Path(local_path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                n = self._mgr.read_file(self.sandbox_id, remote, f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return n


class Sandbox(SandboxStatus):
    """A sandbox: its status (the fields of :class:`~sandboxer.models.SandboxStatus`) and its verbs.

    ``Manager.create`` returns one; :meth:`from_id` reattaches to an existing sandbox. The fields are
    the status as last read: :meth:`refresh` reads it again (``extend_ttl`` and ``teardown`` do too).
    """

    _manager: Any = PrivateAttr(default=None)

    @classmethod
    def attach(cls, manager: Any, status: SandboxStatus) -> "Sandbox":
        """``status`` as a Sandbox bound to ``manager``."""
        sb = cls.model_construct(_fields_set=set(status.model_fields_set),
                                 **{k: getattr(status, k) for k in _FIELDS})
        sb._manager = manager
        return sb

    @classmethod
    def from_id(cls, manager: Any, sandbox_id: str) -> "Sandbox":
        """Reattach to sandbox ``sandbox_id`` of ``manager``'s state store.

        Raises:
            SandboxNotFound: no sandbox has that id.
        """
        return cls.attach(manager, manager.get(sandbox_id))

    @property
    def manager(self) -> Any:
        if self._manager is None:
            raise SandboxerError(f"sandbox {self.id} is not bound to a manager; use Sandbox.from_id(manager, id)")
        return self._manager

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SandboxStatus):
            return all(getattr(self, k) == getattr(other, k) for k in _FIELDS)
        return NotImplemented

    def _update(self, status: SandboxStatus) -> "Sandbox":
        for k in _FIELDS:
            object.__setattr__(self, k, getattr(status, k))
        return self

    # ------------------------------------------------------------ verbs

    def exec(self, argv: list[str], **kwargs: Any) -> ExecResult:
        """Run ``argv`` in the sandbox (keywords as :meth:`Manager.exec`: env, cwd, timeout, stdin, on_output)."""
        return self.manager.exec(self.id, argv, **kwargs)

    @property
    def files(self) -> SandboxFiles:
        """The sandbox's files: ``write``, ``read``, ``list``, ``remove``, ``upload``, ``download``."""
        return SandboxFiles(self.manager, self.id)

    def extend_ttl(self, seconds: float) -> "Sandbox":
        """Let it live ``seconds`` longer (TTLError past the profile's maximum TTL); returns itself, updated."""
        return self._update(self.manager.extend_ttl(self.id, seconds))

    def keepalive(self, seconds: float | None = None) -> "Sandbox":
        """Make sure it lives at least ``seconds`` (default: the profile's default TTL) from now; a
        sandbox that already does is left as it is. Returns itself, updated."""
        import time

        want = self.manager.profile(self.profile).ttl.default if seconds is None else float(seconds)
        self.refresh(probe=False)
        short = time.time() + want - self.expires_at.timestamp()
        return self.extend_ttl(short) if short > 0 else self

    def snapshot(self) -> SnapshotMeta:
        """Capture it (feature ``snapshots``)."""
        return self.manager.snapshot(self.id)

    def teardown(self, **kwargs: Any) -> "Sandbox":
        """Tear it down (keywords as :meth:`Manager.teardown`); returns itself, updated."""
        return self._update(self.manager.teardown(self.id, **kwargs))

    def refresh(self, *, probe: bool = True) -> "Sandbox":
        """Read its status again (with ``probe``, asking the backend whether a ready one still exists)."""
        return self._update(self.manager.get(self.id, refresh=probe))

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.teardown()
        except SandboxerError as err:
            log.error("teardown of %s failed on exit: %s (gc will retry)", self.id, err)
