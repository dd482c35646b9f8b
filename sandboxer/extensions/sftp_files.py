"""Files over SFTP (feature ``files``) for the SSH backends (ext.compose-ssh, ext.vm-packer).

Through the one SSH layer (:meth:`sandboxer.ssh.SSHConnection.sftp`: the same verified host key and
credentials as every command). A sandbox of these backends is a workspace directory on the host,
where its commands run as the SSH user; its files are that workspace's: a relative path resolves
against the directory exec runs in, an absolute one must lie inside the workspace (as exec's
``cwd`` must). The server resolves symlinks; before each call the real path (``realpath`` on the
server) of the directory involved is checked to be inside the workspace's real path, so a link
planted in the workspace does not lead a write, read, list or remove out of it. (The SSH user could
reach the rest anyway: it is the sandbox's own identity on the host; the check keeps the verbs'
promise, it is not the host's isolation.) A file is written beside its name and renamed over it.
"""

from __future__ import annotations

import errno
import posixpath
import stat
import uuid
from datetime import datetime, timezone
from typing import Any, BinaryIO, Callable, TypeVar

from sandboxer.contract import FileInfo, translated
from sandboxer.errors import ExecError, InputError, SandboxerError, SandboxFileNotFound

T = TypeVar("T")
CHUNK = 1 << 18


class SFTPFiles:
    """The files of one workspace (``root``) on the host of ``conn``; ``base`` is where exec runs."""

    def __init__(self, conn: Any, *, ext_id: str, sandbox_id: str, root: str, base: str):
        self.conn, self.ext_id, self.sandbox_id = conn, ext_id, sandbox_id
        self.root, self.base = root.rstrip("/") or "/", base

    def _where(self, path: str) -> str:
        return f"{self.ext_id}: sandbox {self.sandbox_id}: {path!r}"

    def _inside(self, where: str, root: str) -> bool:
        return where == root or where.startswith(root.rstrip("/") + "/")

    def absolute(self, path: str) -> str:
        where = posixpath.normpath(posixpath.join(self.base, path))
        if not self._inside(where, self.root):
            raise InputError(f"{self._where(path)} is outside the sandbox's workspace {self.root}")
        return where

    def _session(self, path: str, call: Callable[[Any], T]) -> T:
        """``call(sftp)`` in a session of its own: a file's OSError as ours, the transport's through the
        connection's error table."""
        sftp = self.conn.sftp(ExecError)

        def run() -> T:
            try:
                return call(sftp)
            except SandboxerError:
                raise
            except OSError as exc:
                if isinstance(exc, ConnectionError):
                    raise
                if exc.errno == errno.ENOENT or isinstance(exc, FileNotFoundError):
                    raise SandboxFileNotFound(f"{self._where(path)}: no such file or directory") from None
                raise ExecError(f"{self._where(path)}: {exc.strerror or exc}", backend=self.ext_id) from None

        try:
            return translated(run, self.conn.errors(ExecError))
        finally:
            sftp.close()

    def _confine(self, sftp: Any, path: str, where: str) -> None:
        """``where`` (an existing path) really is inside the workspace, links resolved by the server."""
        real, root = sftp.normalize(where), sftp.normalize(self.root)
        if not self._inside(real, root):
            raise ExecError(f"{self._where(path)} leads through a symbolic link to {real!r}, outside the sandbox's "
                            f"workspace; not followed", backend=self.ext_id)

    # ------------------------------------------------------------ verbs

    def write(self, path: str, source: BinaryIO, mode: int | None) -> int:
        dest = self.absolute(path)
        if dest == self.root:
            raise ExecError(f"{self._where(path)} is the workspace directory, not a file", backend=self.ext_id)

        def run(sftp: Any) -> int:
            parent, name = posixpath.split(dest)
            self._make_parents(sftp, path, parent)
            try:
                if stat.S_ISDIR(sftp.stat(dest).st_mode):
                    raise ExecError(f"{self._where(path)} is a directory", backend=self.ext_id)
            except FileNotFoundError:
                pass
            tmp = posixpath.join(parent, f".sbx-write-{uuid.uuid4().hex[:12]}")
            n = 0
            try:
                with sftp.open(tmp, "wb") as f:
                    f.set_pipelined(True)
                    while chunk := source.read(CHUNK):
                        f.write(chunk)
                        n += len(chunk)
                sftp.chmod(tmp, 0o644 if mode is None else mode)
                sftp.posix_rename(tmp, dest)
            except BaseException:
                try:
                    sftp.remove(tmp)
                except OSError:
                    pass
                raise
            return n

        return self._session(path, run)

    def _make_parents(self, sftp: Any, path: str, parent: str) -> None:
        missing: list[str] = []
        here = parent
        while True:
            try:
                st = sftp.stat(here)
            except FileNotFoundError:
                if here == self.root:
                    raise SandboxFileNotFound(f"{self._where(path)}: the workspace {self.root} is gone") from None
                missing.append(here)
                here = posixpath.dirname(here)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ExecError(f"{self._where(path)}: {here!r} is not a directory", backend=self.ext_id)
            break
        self._confine(sftp, path, here)
        for d in reversed(missing):
            try:
                sftp.mkdir(d, 0o755)
            except OSError:  # SFTP says only "Failure": made meanwhile by a concurrent transfer is fine
                try:
                    made = stat.S_ISDIR(sftp.lstat(d).st_mode)
                except OSError:
                    made = False
                if not made:
                    raise

    def read(self, path: str, sink: BinaryIO) -> int:
        where = self.absolute(path)

        def run(sftp: Any) -> int:
            self._confine(sftp, path, where)
            st = sftp.stat(where)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise ExecError(f"{self._where(path)} is {kind}", backend=self.ext_id)
            n = 0
            with sftp.open(where, "rb") as f:
                f.prefetch(st.st_size)
                while chunk := f.read(CHUNK):
                    sink.write(chunk)
                    n += len(chunk)
            return n

        return self._session(path, run)

    def list(self, path: str) -> list[FileInfo]:
        where = self.absolute(path)

        def run(sftp: Any) -> list[FileInfo]:
            self._confine(sftp, path, where)
            st = sftp.stat(where)
            if not stat.S_ISDIR(st.st_mode):
                return [_info(where, posixpath.basename(where), st)]
            return sorted((_info(posixpath.join(where, a.filename), a.filename, a) for a in sftp.listdir_attr(where)),
                          key=lambda i: i.name)

        return self._session(path, run)

    def remove(self, path: str, recursive: bool) -> None:
        where = self.absolute(path)
        if where == self.root:
            raise InputError(f"{self._where(path)} is the sandbox's workspace itself; it goes with the sandbox")

        def run(sftp: Any) -> None:
            self._confine(sftp, path, posixpath.dirname(where))
            st = sftp.lstat(where)
            if not stat.S_ISDIR(st.st_mode):
                sftp.remove(where)
            elif recursive:
                _rmtree(sftp, where)
            elif sftp.listdir(where):
                raise InputError(f"{self._where(path)} is a directory that is not empty; remove it with recursive=True")
            else:
                sftp.rmdir(where)

        self._session(path, run)


def _rmtree(sftp: Any, top: str) -> None:
    """Remove ``top`` and everything under it; links are removed, never followed (lstat entries)."""
    todo, dirs = [top], []
    while todo:
        d = todo.pop()
        dirs.append(d)
        for a in sftp.listdir_attr(d):
            p = posixpath.join(d, a.filename)
            if stat.S_ISDIR(a.st_mode or 0):
                todo.append(p)
            else:
                sftp.remove(p)
    for d in reversed(dirs):
        sftp.rmdir(d)


def _info(path: str, name: str, attr: Any) -> FileInfo:
    bits = attr.st_mode or 0
    kind = ("dir" if stat.S_ISDIR(bits) else "file" if stat.S_ISREG(bits)
            else "symlink" if stat.S_ISLNK(bits) else "other")
    return FileInfo(path=path, name=name, type=kind, size=(attr.st_size or 0) if kind == "file" else 0,
                    mode=stat.S_IMODE(bits),
                    modified_at=datetime.fromtimestamp(attr.st_mtime, timezone.utc) if attr.st_mtime else None)


class SFTPFilesMixin:
    """The files verbs of an SSH backend whose :meth:`_sftp_files` says where a sandbox's files are."""

    def _sftp_files(self, handle: Any) -> SFTPFiles:  # pragma: no cover - each backend's own
        raise NotImplementedError

    def write_file(self, handle: Any, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        return self._sftp_files(handle).write(path, source, mode)

    def read_file(self, handle: Any, path: str, sink: BinaryIO) -> int:
        return self._sftp_files(handle).read(path, sink)

    def list_files(self, handle: Any, path: str) -> list[FileInfo]:
        return self._sftp_files(handle).list(path)

    def remove_file(self, handle: Any, path: str, *, recursive: bool = False) -> None:
        self._sftp_files(handle).remove(path, recursive)
