"""ext.daytona's feature ``files``: a sandbox's files through Daytona's toolbox file-system API.

Each verb is one :meth:`~sandboxer.extensions.daytona.DaytonaExtension._call` (so the SDK's errors
map through the backend's one table) that first reads the sandbox (a sandbox gone at Daytona is
that, not a missing file; one not started is refused), then uses the SDK's ``sandbox.fs``:

* ``write_file``: ``upload_file_stream`` (multipart, chunked: the source is read as it is sent,
  never held whole), then ``set_file_permissions`` (``mode``, default 0o644). Daytona creates
  missing parent directories;
* ``read_file``: ``get_file_info`` (a directory is refused; an empty file is read as such without a
  download, which the SDK would refuse for carrying no data), then ``download_file_stream``, each
  chunk written to the sink as it arrives;
* ``list_files``: ``get_file_info`` of the path, then ``list_files`` of a directory;
* ``remove_file``: ``get_file_info``, then ``delete_file`` (``recursive`` only when asked, or for
  a directory found empty).

A relative path is taken from the sandbox's working directory (the profile's ``cwd``, else
Daytona's work directory); every path is sent absolute. Daytona's "not found" for a path becomes
:class:`~sandboxer.errors.SandboxFileNotFound` naming the sandbox and the path; anything else it
refuses is an :class:`~sandboxer.errors.ExecError`.
"""

from __future__ import annotations

import posixpath
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, TypeVar

from sandboxer.contract import FileInfo
from sandboxer.errors import ExecError, InputError, SandboxFileNotFound

from sandboxer.extensions.daytona import _sdk

if TYPE_CHECKING:
    from sandboxer.extensions.daytona import DaytonaExtension, DaytonaHandle

T = TypeVar("T")
#: permission bits of a written file when the caller gives none (the files contract's default)
DEFAULT_MODE = 0o644


def check_path(ext: "DaytonaExtension", path: str) -> str:
    """``path`` as given, refused when it is empty or holds a NUL byte (before any request)."""
    if not isinstance(path, str) or not path:
        raise InputError(f"{ext.id}: a file path must be a non-empty string (got {path!r})")
    if "\0" in path:
        raise InputError(f"{ext.id}: file path {path!r} holds a NUL byte, which no file name can")
    return path


class _Counting:
    """The caller's source as the SDK reads it, counting the bytes."""

    def __init__(self, source: BinaryIO):
        self.source, self.count = source, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        self.count += len(chunk)
        return chunk


def _on_sandbox(ext: "DaytonaExtension", handle: "DaytonaHandle", op: str, path: str,
                fn: Callable[[Any, str], T]) -> T:
    """``fn(sandbox, absolute path)`` in one SDK call; a Daytona "not found" from ``fn`` is a missing path."""
    sdk = _sdk()
    sid = handle.daytona_sandbox_id
    given = check_path(ext, path)

    def run(client: Any) -> T:
        sbx = client.get(sid)
        state = str(getattr(sbx.state, "value", sbx.state))
        if state != "started":
            raise ExecError(f"Daytona {op} of sandbox {sid}: the sandbox is {state}, not started", backend=ext.id)
        where = given
        if not posixpath.isabs(where):
            where = posixpath.join(handle.cwd or sbx.get_work_dir(), where)
        where = posixpath.normpath(where)
        try:
            return fn(sbx, where)
        except sdk.DaytonaNotFoundError:
            pass  # raised below, outside this block: the SDK's exception (its text may quote a key) stays out
        shown = given if given == where else f"{given} ({where})"
        raise SandboxFileNotFound(f"Daytona sandbox {sid}: no file or directory at {shown}")

    return ext._call(op, run, consumer=handle.consumer, fallback=ExecError, sandbox=sid)


def _info(entry: Any, where: str) -> FileInfo:
    """Daytona's FileInfo (``mode`` is Go's ``FileMode.String()``, ``permissions`` octal) as ours."""
    mode_text = str(entry.mode or "")
    kind = "dir" if entry.is_dir else {"-": "file", "L": "symlink"}.get(mode_text[:1], "other")
    try:
        bits = int(str(entry.permissions), 8) & 0o7777
    except (TypeError, ValueError):
        bits = None
    modified = None
    if entry.modified_at:
        try:
            modified = datetime.fromisoformat(entry.modified_at.replace("Z", "+00:00")).astimezone(timezone.utc)
        except ValueError:
            modified = None
    return FileInfo(path=where, name=posixpath.basename(where) or where, type=kind,
                    size=0 if kind == "dir" else max(0, int(entry.size or 0)), mode=bits, modified_at=modified)


def write_file(ext: "DaytonaExtension", handle: "DaytonaHandle", path: str, source: BinaryIO, *,
               mode: int | None = None) -> int:
    bits = DEFAULT_MODE if mode is None else mode
    if not isinstance(bits, int) or not 0 <= bits <= 0o7777:
        raise InputError(f"{ext.id}: file mode {mode!r} for {path!r} is not permission bits (0 to 0o7777)")

    def write(sbx: Any, where: str) -> int:
        counted = _Counting(source)
        sbx.fs.upload_file_stream(counted, where, timeout=int(ext.config.exec_timeout) or 0)
        sbx.fs.set_file_permissions(where, mode=f"{bits:o}")
        return counted.count

    return _on_sandbox(ext, handle, "write_file", path, write)


def read_file(ext: "DaytonaExtension", handle: "DaytonaHandle", path: str, sink: BinaryIO) -> int:
    def read(sbx: Any, where: str) -> int:
        own = sbx.fs.get_file_info(where)
        if own.is_dir:
            raise InputError(f"{ext.id}: {path!r} in Daytona sandbox {handle.daytona_sandbox_id} is a directory, "
                             "not a file")
        if not own.size:
            return 0  # the SDK's stream refuses a download that carried no data ("No file data received")
        total = 0
        for chunk in sbx.fs.download_file_stream(where, timeout=int(ext.config.exec_timeout) or 0):
            sink.write(chunk)
            total += len(chunk)
        return total

    return _on_sandbox(ext, handle, "read_file", path, read)


def list_files(ext: "DaytonaExtension", handle: "DaytonaHandle", path: str) -> list[FileInfo]:
    def ls(sbx: Any, where: str) -> list[FileInfo]:
        own = sbx.fs.get_file_info(where)
        if not own.is_dir:
            return [_info(own, where)]
        found = [_info(e, posixpath.join(where, e.name)) for e in sbx.fs.list_files(where)]
        return sorted(found, key=lambda f: f.name)

    return _on_sandbox(ext, handle, "list_files", path, ls)


def remove_file(ext: "DaytonaExtension", handle: "DaytonaHandle", path: str, *, recursive: bool = False) -> None:
    def rm(sbx: Any, where: str) -> None:
        if where == "/":
            raise InputError(f"{ext.id}: refusing to remove / of Daytona sandbox {handle.daytona_sandbox_id}")
        own = sbx.fs.get_file_info(where)
        if own.is_dir and not recursive:
            if sbx.fs.list_files(where):
                raise InputError(f"{ext.id}: {path!r} in Daytona sandbox {handle.daytona_sandbox_id} is a "
                                 "directory that is not empty; remove it with recursive=True")
            sbx.fs.delete_file(where, recursive=True)  # an empty directory: Daytona removes a directory so only
            return
        sbx.fs.delete_file(where, recursive=bool(own.is_dir))

    _on_sandbox(ext, handle, "remove_file", path, rm)
