"""ext.local's files (feature ``files``): read and written on the host side of a sandbox's workspace.

The sandbox sees its workspace at the same path as the host does (and, in a namespace, the
workspace's ``.tmp`` as ``/tmp``); the rest of its filesystem is the host's, read-only. So a path
is resolved inside the workspace only: relative to it, or absolute under it (or under ``/tmp``).

The rule kept here: the sandbox owns everything in its workspace, symlinks included, and a
host-side call must never be led out of it. Every component is opened with ``openat`` relative to
the directory before it, with ``O_NOFOLLOW``; ``..`` goes back up the chain of open directories and
never above the workspace; a symlink is read (``readlinkat``) and followed only while its target
stays inside the workspace (absolute targets are the sandbox's view: the workspace, or ``/tmp``),
at most :data:`MAX_LINKS` of them; a target outside is refused. A file is written beside its final
name and renamed over it (a hard link or a symlink there is replaced, never written through);
a read opens with ``O_NONBLOCK`` and refuses anything but a regular file (a FIFO would hang).
Files made here belong to the sandbox's own uid.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO, Iterator

from sandboxer.contract import FileInfo
from sandboxer.errors import ExecError, InputError, SandboxFileNotFound

#: Most symlinks followed while resolving one path (as Linux's MAXSYMLINKS).
MAX_LINKS = 40
CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Walk:
    """The chain of open directories from the workspace down to where a path leads."""

    fds: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class LocalFiles:
    """The files of one ext.local sandbox (``ws``: its workspace; ``namespaced``: /tmp is its ``.tmp``)."""

    def __init__(self, ext_id: str, sandbox_id: str, ws: str, *, namespaced: bool, uid: int | None):
        self.ext_id, self.sandbox_id, self.ws = ext_id, sandbox_id, ws.rstrip("/") or "/"
        self.namespaced, self.uid = namespaced, uid

    # ------------------------------------------------------------ resolving

    def _where(self, path: str) -> str:
        return f"{self.ext_id}: sandbox {self.sandbox_id}: {path!r}"

    def _inside(self, path: str, original: str, *, link: bool = False) -> list[str]:
        """The components of ``path`` below the workspace (an absolute one in the sandbox's view)."""
        if not path.startswith("/"):
            return path.split("/")
        if path == self.ws or path.startswith(self.ws + "/"):
            return path[len(self.ws):].split("/")
        if self.namespaced and (path == "/tmp" or path.startswith("/tmp/")):
            return [".tmp", *path[len("/tmp"):].split("/")]
        if link:
            raise ExecError(f"{self._where(original)} leads through a symbolic link to {path!r}, outside the "
                            f"sandbox's workspace; ext.local does not follow it on the host", backend=self.ext_id)
        raise InputError(f"{self._where(original)} is outside the sandbox's workspace ({self.ws}"
                         f"{' and /tmp' if self.namespaced else ''}), the only place ext.local reads or writes "
                         "files; the rest of its filesystem is the host's, read-only")

    def _walk(self, path: str, *, create: bool, follow_last: bool) -> tuple[_Walk, str | None]:
        """Open the directories down to ``path``'s last component; (the walk, that name or None for the
        workspace itself). ``create`` makes missing directories on the way; ``follow_last`` follows a
        symlink in the last place too (inside the workspace only)."""
        todo = [p for p in self._inside(path, path) if p not in ("", ".")]
        walk = _Walk([os.open(self.ws, _DIR)], [])
        links = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp == "..":
                    if len(walk.fds) == 1:
                        raise InputError(f"{self._where(path)} goes above the sandbox's workspace")
                    os.close(walk.fds.pop())
                    walk.names.pop()
                    continue
                last = not any(p not in ("", ".") for p in todo)
                try:
                    st = os.stat(comp, dir_fd=walk.fd, follow_symlinks=False)
                except FileNotFoundError:
                    if last:
                        return walk, comp
                    if not create:
                        raise SandboxFileNotFound(f"{self._where(path)}: no directory {comp!r} "
                                                  f"in {self._shown(walk)}") from None
                    try:
                        os.mkdir(comp, 0o755, dir_fd=walk.fd)
                    except FileExistsError:  # made meanwhile (a concurrent transfer, or the sandbox)
                        made = False
                    else:
                        made = True
                    st = os.stat(comp, dir_fd=walk.fd, follow_symlinks=False)  # what is there now, as is
                    if made and self.uid is not None:
                        os.chown(comp, self.uid, self.uid, dir_fd=walk.fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                    links += 1
                    if links > MAX_LINKS:
                        raise ExecError(f"{self._where(path)}: more than {MAX_LINKS} symbolic links", backend=self.ext_id)
                    target = os.readlink(comp, dir_fd=walk.fd)
                    rest = [p for p in self._inside(target, path, link=True) if p not in ("", ".")]
                    if target.startswith("/"):  # from the workspace again
                        for fd in walk.fds[1:]:
                            os.close(fd)
                        del walk.fds[1:], walk.names[:]
                    todo[:0] = rest
                    continue
                if last:
                    return walk, comp
                if not stat.S_ISDIR(st.st_mode):
                    raise ExecError(f"{self._where(path)}: {comp!r} in {self._shown(walk)} is not a directory",
                                    backend=self.ext_id)
                walk.fds.append(os.open(comp, _DIR, dir_fd=walk.fd))
                walk.names.append(comp)
            return walk, None
        except OSError as exc:
            walk.close()
            raise self._os_error(path, exc) from None
        except BaseException:
            walk.close()
            raise

    @contextmanager
    def _at(self, path: str, *, create: bool = False, follow_last: bool = True) -> Iterator[tuple[_Walk, str | None]]:
        """:meth:`_walk` for a ``with`` block: an OSError inside becomes ours, the directories are closed."""
        walk, name = self._walk(path, create=create, follow_last=follow_last)
        try:
            yield walk, name
        except OSError as exc:
            raise self._os_error(path, exc) from None
        finally:
            walk.close()

    def _shown(self, walk: _Walk, name: str | None = None) -> str:
        return "/".join([self.ws if self.ws != "/" else "", *walk.names, *([name] if name else [])]) or "/"

    def _os_error(self, path: str, exc: OSError) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return SandboxFileNotFound(f"{self._where(path)}: no such file or directory")
        if exc.errno == 40:  # ELOOP: a component turned into a symlink under us
            return ExecError(f"{self._where(path)}: a component is a symbolic link (changed while resolving); "
                             "not followed", backend=self.ext_id)
        return ExecError(f"{self._where(path)}: {exc.strerror or exc}", backend=self.ext_id)

    # ------------------------------------------------------------ verbs

    def write(self, path: str, source: BinaryIO, mode: int | None) -> int:
        with self._at(path, create=True) as (walk, name):
            if name is None:
                raise ExecError(f"{self._where(path)} is the workspace directory, not a file", backend=self.ext_id)
            try:
                if stat.S_ISDIR(os.stat(name, dir_fd=walk.fd, follow_symlinks=False).st_mode):
                    raise ExecError(f"{self._where(path)} is a directory", backend=self.ext_id)
            except FileNotFoundError:
                pass
            tmp = f".sbx-write-{secrets.token_hex(6)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=walk.fd)
            written = 0
            try:
                with os.fdopen(fd, "wb", closefd=True) as out:
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                    os.fchmod(out.fileno(), 0o644 if mode is None else mode)
                    if self.uid is not None:
                        os.fchown(out.fileno(), self.uid, self.uid)
                os.rename(tmp, name, src_dir_fd=walk.fd, dst_dir_fd=walk.fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=walk.fd)
                except OSError:
                    pass
                raise
            return written

    def read(self, path: str, sink: BinaryIO) -> int:
        with self._at(path) as (walk, name):
            if name is None:
                raise ExecError(f"{self._where(path)} is a directory, not a file", backend=self.ext_id)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=walk.fd)
            with os.fdopen(fd, "rb", buffering=0) as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ExecError(f"{self._where(path)} is not a regular file", backend=self.ext_id)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                n = 0
                while chunk := f.read(CHUNK):
                    sink.write(chunk)
                    n += len(chunk)
                return n

    def list(self, path: str) -> list[FileInfo]:
        with self._at(path) as (walk, name):
            if name is not None:
                st = os.stat(name, dir_fd=walk.fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    return [self._info(self._shown(walk, name), name, st)]
                walk.fds.append(os.open(name, _DIR, dir_fd=walk.fd))
                walk.names.append(name)
            here = self._shown(walk)
            out = []
            with os.scandir(os.dup(walk.fd)) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    out.append(self._info(f"{here.rstrip('/')}/{entry.name}", entry.name, st))
            return sorted(out, key=lambda i: i.name)

    def remove(self, path: str, recursive: bool) -> None:
        with self._at(path, follow_last=False) as (walk, name):
            if name is None:
                raise InputError(f"{self._where(path)} is the sandbox's workspace itself; it goes with the sandbox")
            st = os.stat(name, dir_fd=walk.fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=walk.fd)
            elif recursive:
                shutil.rmtree(name, dir_fd=walk.fd)  # fd-based: never follows a link out
            else:
                try:
                    os.rmdir(name, dir_fd=walk.fd)
                except OSError as exc:
                    if exc.errno == 39:  # ENOTEMPTY
                        raise InputError(f"{self._where(path)} is a directory that is not empty; remove it "
                                         "with recursive=True") from None
                    raise

    @staticmethod
    def _info(path: str, name: str, st: os.stat_result) -> FileInfo:
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
        return FileInfo(path=path, name=name, type=kind, size=st.st_size if kind == "file" else 0,
                        mode=stat.S_IMODE(st.st_mode),
                        modified_at=datetime.fromtimestamp(st.st_mtime, tz=timezone.utc))


def files_of(ext_id: str, handle: Any) -> LocalFiles:
    """The files of the sandbox ``handle`` (a LocalHandle)."""
    return LocalFiles(ext_id, handle.sandbox_id, handle.workspace, namespaced=handle.tool != "none", uid=handle.uid)


class LocalFilesMixin:
    """The files verbs of :class:`~sandboxer.extensions.local.LocalExtension`."""

    id: str

    def write_file(self, handle: Any, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        return files_of(self.id, handle).write(path, source, mode)

    def read_file(self, handle: Any, path: str, sink: BinaryIO) -> int:
        return files_of(self.id, handle).read(path, sink)

    def list_files(self, handle: Any, path: str) -> list[FileInfo]:
        return files_of(self.id, handle).list(path)

    def remove_file(self, handle: Any, path: str, *, recursive: bool = False) -> None:
        files_of(self.id, handle).remove(path, recursive)
