"""Feature ``files`` of ext.modal, through the SDK's own filesystem API (``Sandbox.filesystem``).

modal 1.6.4 has no ``Sandbox.open`` / ``ls`` / ``rm`` / ``mkdir`` any more (nor their
``ContainerFilesystemExec`` RPCs); its file API is ``Sandbox.filesystem``, which runs Modal's own
tool in the sandbox (``/__modal/.bin/modal-sandbox-fs-tools``) over the task command router: file
bytes go in through the exec's resumable stdin stream and come out through its stdout.

* write_file: the source is spooled in chunks to a private temporary file (0o600, in a 0o700
  directory, removed at once), then ``filesystem.copy_from_local`` streams it in, making the
  missing parent directories; ``filesystem.stat`` then gives the mode, and other bits than asked
  for are set with ``chmod`` through ``Sandbox.exec`` (the tool has no mode of its own);
* read_file: ``filesystem.copy_to_local`` into such a temporary file, which the SDK writes chunk by
  chunk as they arrive, then copied into the sink in chunks;
* list_files: ``filesystem.stat``, then ``filesystem.list_files`` for a directory;
* remove_file: ``filesystem.remove(path, recursive=...)``, which itself refuses a non-empty
  directory without ``recursive`` and a missing path.

Only ``copy_from_local`` and ``copy_to_local`` stream on the SDK's public surface (``write_bytes`` and
``read_bytes`` hold the whole file), hence the spool. The SDK takes absolute paths only: a relative
one is taken from the profile's ``workdir``, else from the directory a command starts in (``pwd``,
asked once per sandbox). Every call goes through :meth:`ModalExtension._call`: a missing path
(``SandboxFilesystemNotFoundError``) is SandboxFileNotFound naming the sandbox and the path, a
non-empty directory InputError, and the token, rate limits and the sandbox being gone are mapped
by the backend's one error table.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, BinaryIO

from sandboxer.contract import FileInfo
from sandboxer.errors import ExecError
from sandboxer.extensions.filepaths import CHUNK, check_mode, check_path, chunks, copy_into, not_root, resolve

if TYPE_CHECKING:
    from sandboxer.extensions.modal import ModalHandle

_TYPES = {"file": "file", "directory": "dir", "symlink": "symlink"}


class ModalFiles:
    """The ``files`` methods of :class:`~sandboxer.extensions.modal.ModalExtension` (a mixin)."""

    # It uses ModalExtension's id, _call (the one error table) and _sandbox (the SDK Sandbox, reattached).
    id: str
    _call: Any
    _sandbox: Any

    def _files_call(self, op: str, handle: "ModalHandle", target: str, fn: Any) -> Any:
        oid = handle.object_id
        return self._call(op, lambda client: fn(self._sandbox(client, oid)), consumer=handle.credentials,
                          sandbox=oid, error=ExecError, path=target)

    def _target(self, handle: "ModalHandle", path: str) -> str:
        """``path`` as the absolute path the SDK wants (see the module docstring)."""
        path = check_path(path, backend=self.id, sandbox=handle.object_id)
        if posixpath.isabs(path):
            return resolve(path, None)
        return resolve(path, handle.workdir or self._start_dir(handle))

    def _start_dir(self, handle: "ModalHandle") -> str:
        """The directory the sandbox's commands start in (the image's workdir), asked once."""
        lock = self.__dict__.setdefault("_files_lock", threading.Lock())
        known: dict[str, str] = self.__dict__.setdefault("_start_dirs", {})
        with lock:
            if handle.object_id in known:
                return known[handle.object_id]

        def ask(sb: Any) -> str:
            proc = sb.exec("pwd", text=True, timeout=60)
            out = proc.stdout.read()
            code = proc.wait()
            if code != 0 or not out.strip().startswith("/"):
                raise ExecError(f"{self.id}: sandbox {handle.object_id}: cannot tell its working directory "
                                f"(pwd exit {code}); give an absolute path", backend=self.id)
            return out.strip()

        where = self._files_call("workdir", handle, ".", ask)
        with lock:
            known[handle.object_id] = where
        return where

    def write_file(self, handle: "ModalHandle", path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        """Stream ``source`` to ``path`` with ``filesystem.copy_from_local`` (see the module docstring)."""
        target = self._target(handle, path)
        want = check_mode(mode, backend=self.id, sandbox=handle.object_id, path=path)
        counted = [0]
        with tempfile.TemporaryDirectory(prefix="sandboxer-modal-") as tmp:
            spool = os.path.join(tmp, "upload")
            with open(os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                copy_into(chunks(source, counted), f)

            def put(sb: Any) -> None:
                sb.filesystem.copy_from_local(spool, target)
                if sb.filesystem.stat(target).mode & 0o7777 != want:
                    self._chmod(sb, handle, target, want)

            self._files_call("write", handle, target, put)
        return counted[0]

    def _chmod(self, sb: Any, handle: "ModalHandle", target: str, mode: int) -> None:
        # in the file's directory, by its name: the same file, and a workdir is all a stand-in maps
        proc = sb.exec("chmod", format(mode, "o"), "--", posixpath.basename(target),
                       workdir=posixpath.dirname(target) or "/", text=True, timeout=60)
        err = proc.stderr.read()
        code = proc.wait()
        if code != 0:
            raise ExecError(f"{self.id}: write of {handle.object_id}: the file {target!r} was written, but chmod "
                            f"{mode:o} failed (exit {code}): {err.strip()[-300:]}", backend=self.id)

    def read_file(self, handle: "ModalHandle", path: str, sink: BinaryIO) -> int:
        """Stream the file at ``path`` into ``sink`` through ``filesystem.copy_to_local``."""
        target = self._target(handle, path)
        with tempfile.TemporaryDirectory(prefix="sandboxer-modal-") as tmp:
            local = os.path.join(tmp, "download")
            self._files_call("read", handle, target, lambda sb: sb.filesystem.copy_to_local(target, local))
            with open(local, "rb") as f:
                return copy_into(lambda n: f.read(min(n, CHUNK)), sink)

    def list_files(self, handle: "ModalHandle", path: str) -> list[FileInfo]:
        """The directory's entries (``filesystem.list_files``), sorted by name; a file's own (``stat``)."""
        target = self._target(handle, path)

        def look(sb: Any) -> list[Any]:
            info = sb.filesystem.stat(target)
            if info.is_dir():
                return list(sb.filesystem.list_files(target))
            return [info]

        entries = self._files_call("list", handle, target, look)
        return sorted((_info(e) for e in entries), key=lambda f: f.name)

    def remove_file(self, handle: "ModalHandle", path: str, *, recursive: bool = False) -> None:
        """``filesystem.remove``: a file, an empty directory, or (``recursive``) a tree."""
        target = self._target(handle, path)
        not_root(target, backend=self.id, sandbox=handle.object_id, path=path)
        self._files_call("remove", handle, target, lambda sb: sb.filesystem.remove(target, recursive=recursive))


def _info(entry: Any) -> FileInfo:
    kind = _TYPES.get(getattr(entry.type, "value", ""), "other")
    modified = entry.modified_time
    return FileInfo(
        path=entry.path, name=entry.name or posixpath.basename(entry.path), type=kind,
        size=0 if kind == "dir" else max(0, int(entry.size)), mode=int(entry.mode) & 0o7777,
        modified_at=datetime.fromtimestamp(modified, tz=timezone.utc) if modified else None,
    )
