"""Feature ``files`` of ext.e2b, through the SDK's own filesystem API (``Sandbox.files``).

What each verb sends (e2b 2.63, envd 0.6):

* write_file: ``files.write(path, <iterable of chunks>)``, an ``application/octet-stream`` upload
  to envd's ``POST /files`` streamed from the source (envd makes the missing parent directories
  and the file, 0o666 under its umask: 0o644), then ``files.get_info`` (the filesystem RPC's
  ``Stat``) for the mode; other bits than asked for are set with ``chmod`` through
  ``commands.run``, as envd's file API has no mode of its own;
* read_file: ``files.read(path, format="stream")``, envd's ``GET /files``, each chunk written to
  the sink as it arrives;
* list_files: ``files.get_info`` (``Stat``), then for a directory ``files.list(path, depth=1)``
  (``ListDir``);
* remove_file: ``Stat`` (a missing path is SandboxFileNotFound), for a directory without
  ``recursive`` a ``ListDir`` (one with entries is refused), then ``files.remove`` (``Remove``,
  which removes a tree whole).

Every call runs as the profile's ``user`` (envd's default user otherwise) and goes through
:meth:`E2BExtension._call`, so a missing path (envd's 404 or NOT_FOUND) is SandboxFileNotFound
naming the sandbox and the path, and the key, rate limits and the sandbox being gone are mapped
by the backend's one error table. A relative path is taken from the profile's ``cwd``; without
one envd resolves it against the user's home, where its commands start too.
"""

from __future__ import annotations

import posixpath
import shlex
from typing import TYPE_CHECKING, Any, BinaryIO

from sandboxer.contract import FileInfo
from sandboxer.errors import ExecError, InputError
from sandboxer.extensions.filepaths import check_mode, check_path, chunks, copy_into, not_root, resolve

if TYPE_CHECKING:
    from sandboxer.extensions.e2b import E2BHandle

_TYPES = {"file": "file", "dir": "dir", "symlink": "symlink"}


def _sdk() -> Any:
    from sandboxer.extensions.e2b import _sdk as sdk  # e2b imports this module: a late import

    return sdk()


class E2BFiles:
    """The ``files`` methods of :class:`~sandboxer.extensions.e2b.E2BExtension` (a mixin)."""

    # It uses E2BExtension's id and _call (the one error table).
    id: str
    _call: Any

    def _file_target(self, handle: "E2BHandle", path: str) -> str:
        path = check_path(path, backend=self.id, sandbox=handle.e2b_sandbox_id)
        return resolve(path, handle.exec.cwd)

    def _files_call(self, op: str, handle: "E2BHandle", path: str, fn: Any) -> Any:
        """``fn(sbx)`` with the sandbox connected, through the backend's error table."""
        sid = handle.e2b_sandbox_id
        sdk = _sdk()
        return self._call(op, lambda sdk_opts: fn(sdk.Sandbox.connect(sid, **sdk_opts)),
                          consumer=handle.consumer, fallback=ExecError, sandbox=sid, path=path)

    def write_file(self, handle: "E2BHandle", path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        """Stream ``source`` to ``path`` with ``files.write`` (see the module docstring)."""
        target = self._file_target(handle, path)
        want = check_mode(mode, backend=self.id, sandbox=handle.e2b_sandbox_id, path=path)
        user = handle.exec.user
        counted = [0]

        def put(sbx: Any) -> int:
            counted[0] = 0
            written = sbx.files.write(target, chunks(source, counted), user=user)
            info = sbx.files.get_info(written.path, user=user)
            if info.mode & 0o7777 != want:
                self._chmod(sbx, handle, written.path, want)
            return counted[0]

        return self._files_call("write", handle, target, put)

    def _chmod(self, sbx: Any, handle: "E2BHandle", path: str, mode: int) -> None:
        sdk = _sdk()
        try:
            # in the file's directory, by its name: the same file, and a cwd is all a stand-in maps
            sbx.commands.run(shlex.join(["chmod", format(mode, "o"), "--", posixpath.basename(path)]),
                             cwd=posixpath.dirname(path) or "/", user=handle.exec.user, timeout=60)
        except sdk.CommandExitException as exc:
            raise ExecError(f"E2B write of sandbox {handle.e2b_sandbox_id}: the file {path!r} was written, but "
                            f"chmod {mode:o} failed (exit {exc.exit_code}): {exc.stderr.strip()[-300:]}",
                            backend=self.id) from None

    def read_file(self, handle: "E2BHandle", path: str, sink: BinaryIO) -> int:
        """Stream the file at ``path`` into ``sink`` with ``files.read(format="stream")``."""
        target = self._file_target(handle, path)

        def get(sbx: Any) -> int:
            with sbx.files.read(target, format="stream", user=handle.exec.user) as stream:
                return copy_into(stream, sink)

        return self._files_call("read", handle, target, get)

    def list_files(self, handle: "E2BHandle", path: str) -> list[FileInfo]:
        """The directory's entries (``ListDir``, depth 1), sorted by name; a file's own (``Stat``)."""
        target = self._file_target(handle, path)
        sdk = _sdk()
        user = handle.exec.user

        def look(sbx: Any) -> list[Any]:
            info = sbx.files.get_info(target, user=user)
            if info.type == sdk.FileType.DIR:
                return list(sbx.files.list(target, depth=1, user=user))
            return [info]

        entries = self._files_call("list", handle, target, look)
        return sorted((_info(e, target) for e in entries), key=lambda f: f.name)

    def remove_file(self, handle: "E2BHandle", path: str, *, recursive: bool = False) -> None:
        """Remove the file, or the directory (a non-empty one only with ``recursive``)."""
        target = self._file_target(handle, path)
        sdk = _sdk()
        user = handle.exec.user

        def rm(sbx: Any) -> str | None:
            info = sbx.files.get_info(target, user=user)
            # envd's Remove is os.RemoveAll: where a relative path landed is known only now
            not_root(info.path or target, backend=self.id, sandbox=handle.e2b_sandbox_id, path=path)
            if info.type == sdk.FileType.DIR and not recursive and sbx.files.list(target, depth=1, user=user):
                return info.path or target
            sbx.files.remove(target, user=user)
            return None

        refused = self._files_call("remove", handle, target, rm)
        if refused is not None:
            raise InputError(f"{self.id}: sandbox {handle.e2b_sandbox_id}: the directory {refused!r} is not empty; "
                             "remove it with recursive=True")


def _info(entry: Any, asked: str) -> FileInfo:
    """Ours of envd's ``EntryInfo`` (an older envd answers ``Stat`` with name and type only: the path
    asked for stands in for its path)."""
    kind = getattr(entry.type, "value", None)
    modified = entry.modified_time
    path = entry.path or asked
    return FileInfo(
        path=path, name=entry.name or posixpath.basename(path), type=_TYPES.get(kind, "other"),
        size=0 if kind == "dir" else max(0, int(entry.size)), mode=int(entry.mode) & 0o7777,
        modified_at=modified if modified is not None and modified.timestamp() > 0 else None,
    )
