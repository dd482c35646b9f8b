"""Files in a sandbox (feature ``files``): the manager's write_file / read_file / list_files / remove_file.

Rules kept here:

* the path is checked first (empty, NUL byte: InputError naming the sandbox), then the sandbox
  must be ready and its backend must declare ``files`` (CapabilityError), before any data moves;
* data is streamed: a file object is handed to the backend as it is, never read whole here;
* every call goes through the manager's deadline caller. A transfer of known size gets
  ``CallLimits.files`` seconds plus one second per ``files_rate`` bytes (2 minutes + 1 s/MiB by
  default); one of unknown size (a read, a pipe) gets ``files_stream`` (an hour); listing and
  removing get ``files``;
* the caller's stream is lent to the backend through a gate that closes when the call returns or
  is abandoned at its deadline, so a late backend thread can no longer read or write it;
* an error names the sandbox and the path.
"""

from __future__ import annotations

import io
import os
import stat
from typing import Any, BinaryIO, Union

from sandboxer.contract import FileInfo, bound
from sandboxer.errors import CapabilityError, InputError, SandboxerError, SandboxStateError

#: What ``write_file`` takes: bytes, text (written as UTF-8), or a binary file object read to EOF.
Data = Union[bytes, bytearray, memoryview, str, BinaryIO]


def check_path(sandbox_id: str, path: Any) -> str:
    """``path`` if it can name a file inside a sandbox.

    Raises:
        InputError: not a string, empty, or with a NUL byte (naming the sandbox and the path).
    """
    if not isinstance(path, str):
        raise InputError(f"sandbox {sandbox_id}: a path must be a string, got {type(path).__name__}")
    if not path:
        raise InputError(f"sandbox {sandbox_id}: the path is empty; give a file's path inside the sandbox "
                         "(absolute, or relative to its working directory)")
    if "\0" in path:
        raise InputError(f"sandbox {sandbox_id}: path {path!r} contains a NUL byte")
    return path


def check_mode(sandbox_id: str, mode: Any) -> int | None:
    if mode is None:
        return None
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise InputError(f"sandbox {sandbox_id}: mode {mode!r} is not permission bits (0 to 0o7777, e.g. 0o644)")
    return mode


def size_of(source: BinaryIO) -> int | None:
    """Bytes left to read in ``source``, when it can tell (a regular file, a seekable stream)."""
    try:
        st = os.fstat(source.fileno())
        if stat.S_ISREG(st.st_mode):
            return max(0, st.st_size - source.tell())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    try:
        if source.seekable():
            here = source.tell()
            end = source.seek(0, io.SEEK_END)
            source.seek(here)
            return max(0, end - here)
    except (AttributeError, OSError, ValueError):
        pass
    return None


class Gate:
    """A caller's stream lent to a backend until :meth:`close` (then every use raises).

    ``length`` is the bytes left to read when known (a backend that must announce a size, as a tar
    header does, uses it instead of spooling the stream), else None.
    """

    def __init__(self, stream: Any, what: str, length: int | None = None):
        self._stream = stream
        self._what = what
        self.length = length
        self.open = True

    def _check(self) -> Any:
        if not self.open:
            raise SandboxStateError(f"{self._what} already ended (returned or abandoned at its deadline); "
                                    "the stream it was given is no longer its to use")
        return self._stream

    def read(self, n: int = -1) -> bytes:
        return self._check().read(n)

    def readinto(self, buf: Any) -> int:
        data = self._check().read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        n = self._check().write(data)
        return len(data) if n is None else n

    def flush(self) -> None:
        flush = getattr(self._check(), "flush", None)
        if flush is not None:
            flush()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.open = False


class FilesMixin:
    """The files verbs of :class:`~sandboxer.manager.Manager` (which provides ``_ready_row``,
    ``extension``, ``limits`` and ``_caller``)."""

    def write_file(self, sandbox_id: str, path: str, data: Data, *, mode: int | None = None) -> int:
        """Write ``data`` to ``path`` in the sandbox (replacing a file there, creating missing parent
        directories); a file object is streamed from its current position to EOF.

        Args:
            path: absolute, or relative to the sandbox's working directory.
            data: bytes, str (written as UTF-8), or a binary file object.
            mode: permission bits of the file (default 0o644).

        Returns:
            The bytes written.

        Raises:
            InputError (bad path or mode), SandboxNotFound, SandboxStateError, CapabilityError,
            ExecError (the backend refused), ExtensionTimeout.
        """
        check_path(sandbox_id, path)
        check_mode(sandbox_id, mode)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if isinstance(data, (bytes, bytearray, memoryview)):
            source: Any = io.BytesIO(bytes(data))
        elif hasattr(data, "read"):
            source = data
        else:
            raise InputError(f"sandbox {sandbox_id}: cannot write {type(data).__name__} to {path!r}; give bytes, "
                             "str or a binary file object")
        size = size_of(source)
        return self._files_call(sandbox_id, path, "write_file", "write to", self.limits.files_deadline(size),
                                source, size, mode=mode)

    def read_file(self, sandbox_id: str, path: str, into: BinaryIO | None = None) -> bytes | int:
        """Read the file at ``path`` in the sandbox.

        Args:
            into: a binary file object the content is streamed into; without it the content is
                returned (whole, in memory: use ``into`` for a large file).

        Returns:
            The content, or with ``into`` the bytes written to it.

        Raises:
            SandboxFileNotFound: no file there. Otherwise as :meth:`write_file`.
        """
        check_path(sandbox_id, path)
        sink: Any = io.BytesIO() if into is None else into
        n = self._files_call(sandbox_id, path, "read_file", "read from", self.limits.files_deadline(None), sink)
        return sink.getvalue() if into is None else n

    def list_files(self, sandbox_id: str, path: str = ".") -> list[FileInfo]:
        """The entries of the directory at ``path`` (not recursive, sorted by name), or a file's own entry.

        Raises:
            SandboxFileNotFound: nothing there. Otherwise as :meth:`write_file`.
        """
        check_path(sandbox_id, path)
        return self._files_call(sandbox_id, path, "list_files", "list files in", self.limits.files)

    def remove_file(self, sandbox_id: str, path: str, *, recursive: bool = False) -> None:
        """Remove the file (with ``recursive``, the directory tree) at ``path``.

        Raises:
            SandboxFileNotFound: nothing there; InputError: a non-empty directory without ``recursive``.
            Otherwise as :meth:`write_file`.
        """
        check_path(sandbox_id, path)
        self._files_call(sandbox_id, path, "remove_file", "remove files in", self.limits.files,
                         recursive=bool(recursive))

    def _files_call(self, sandbox_id: str, path: str, method: str, verb: str, deadline: float,
                    stream: Any = None, length: int | None = None, **kwargs: Any) -> Any:
        row = self._ready_row(sandbox_id, verb)  # type: ignore[attr-defined]
        ext = self.extension(row["extension"], sandbox_id=sandbox_id)  # type: ignore[attr-defined]
        if not ext.supports("files"):
            raise CapabilityError(f"{ext.id} does not support files (sandbox {sandbox_id}); a backend with exec "
                                  "can still move data with exec and stdin")
        what = f"{method} of {path!r} in sandbox {sandbox_id}"
        run = bound(ext, method, what)
        gate = Gate(stream, what, length) if stream is not None else None
        args = (path,) if gate is None else (path, gate)
        try:
            return self._caller.call(lambda: run(row["handle"], *args, **kwargs),  # type: ignore[attr-defined]
                                     timeout=deadline, what=what, backend=ext.id)
        except SandboxerError as exc:
            _name(exc, sandbox_id, path)
            raise
        finally:
            if gate is not None:
                gate.close()


def _name(exc: SandboxerError, sandbox_id: str, path: str) -> None:
    """Make ``exc``'s message name the sandbox and the path, if the backend's did not."""
    text = str(exc)
    if sandbox_id in text and path in text:
        return
    exc.args = (f"sandbox {sandbox_id}, {path!r}: {text}", *exc.args[1:])
