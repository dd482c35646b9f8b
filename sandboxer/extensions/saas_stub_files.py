"""Feature ``files`` of ext.saas-stub: the files of a stub sandbox are those in its directory.

The stub's "machine" is its sandbox directory (its commands' home and working directory, bound
writable at its own host path inside their confinement), so the stub's file API works there and
nowhere else, with what the operating system gives for that:

* a path is relative to the sandbox directory, or absolute inside it (as its commands see it,
  e.g. what ``pwd`` prints); any other path is refused with InputError: the read-only host the
  commands see around it is not the sandbox's to hand out;
* the sandbox's own files are the sandbox's to plant: every component is opened relative to the
  one before it with ``O_NOFOLLOW`` (``openat``), so a symlink the sandbox made is never followed
  by the manager's process, which may be root (reading or writing through one is ExecError; a
  symlink itself is listed and removed like any entry); a recursive removal is
  ``shutil.rmtree`` by directory descriptors, which does not follow one either;
* a write goes to a new file beside the target (0o600 until done), then is renamed over it: a
  reader sees the old file or the new one, never half of either, and a failed write leaves
  nothing; the mode is set on the descriptor (0o644 unless ``mode`` says otherwise); when the
  manager is root, what it makes is owned by the sandbox's own uid, as if its commands had made it;
* data is copied in 1 MiB chunks, never held whole.

A fault at stage ``files`` (the stub's config) raises as configured, for drills.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
import uuid
from datetime import datetime, timezone
from typing import Any, BinaryIO, Iterator

from sandboxer.contract import FileInfo
from sandboxer.errors import ExecError, InputError, SandboxFileNotFound
from sandboxer.extensions.filepaths import CHUNK, check_mode, check_path, chunks, copy_into

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StubFiles:
    """The ``files`` methods of :class:`~sandboxer.extensions.saas_stub.SaasStubExtension` (a mixin)."""

    # It uses SaasStubExtension's id, sandbox_dir, _record (its table's row), _fault and _raise.
    id: str
    sandbox_dir: Any
    _record: Any
    _fault: Any
    _raise: Any

    # ------------------------------------------------------------ plumbing

    def _files_box(self, handle: Any, path: str, op: str) -> tuple[str, str, list[str], dict[str, Any]]:
        """(who, the sandbox directory, the path's components under it, the table's record)."""
        who = handle.sandbox_id or handle.stub_id
        path = check_path(path, backend=self.id, sandbox=who)
        fault = self._fault("files")
        if fault is not None:
            self._raise(fault, f"files ({op} {path!r})")
        rec = self._record(handle.stub_id)
        if rec is None:
            raise ExecError(f"{self.id}: {handle.stub_id} is not running", backend=self.id)
        box = self.sandbox_dir(handle)
        norm = posixpath.normpath(path)
        if posixpath.isabs(norm):
            roots = {box, os.path.realpath(box)}
            base = next((r for r in roots if norm == r or norm.startswith(r + "/")), None)
            if base is None:
                raise InputError(f"{self.id}: sandbox {who}: {path!r} is outside its directory {box}; give a path "
                                 "inside it, or one relative to it")
            norm = posixpath.relpath(norm, base)
        elif norm == ".." or norm.startswith("../"):
            raise InputError(f"{self.id}: sandbox {who}: {path!r} leads out of its directory {box}")
        parts = [p for p in norm.split("/") if p not in ("", ".")]
        return who, box, parts, rec

    @contextlib.contextmanager
    def _walk(self, who: str, box: str, parts: list[str], path: str, *, create: bool = False,
              uid: int | None = None) -> Iterator[int]:
        """A descriptor of the directory ``parts`` names under ``box``, each step without following a
        symlink; with ``create``, missing directories are made (0o755, owned by ``uid``)."""
        fd = os.open(box, _DIR_FLAGS)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise SandboxFileNotFound(f"{self.id}: sandbox {who}: no file or directory at {path!r} "
                                                  f"(no directory {part!r} on the way)") from None
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:  # made by a concurrent transfer: opened below, never followed
                        pass
                    else:
                        if uid is not None:
                            os.chown(part, uid, uid, dir_fd=fd, follow_symlinks=False)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise self._refused(who, path, part, exc, fd) from None
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def _refused(self, who: str, path: str, part: str, exc: OSError, dir_fd: int | None = None) -> ExecError:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and dir_fd is not None:
            with contextlib.suppress(OSError):  # O_DIRECTORY|O_NOFOLLOW on a symlink is ENOTDIR: say which
                if stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    exc = OSError(errno.ELOOP, "symlink")
        why = {errno.ELOOP: f"{part!r} is a symlink, which the stub does not follow",
               errno.ENOTDIR: f"{part!r} is not a directory",
               errno.EISDIR: f"{part!r} is a directory",
               errno.EACCES: f"{part!r}: permission denied"}.get(exc.errno or 0, f"{part!r}: {exc.strerror}")
        return ExecError(f"{self.id}: sandbox {who}: {path!r}: {why}", backend=self.id)

    def _missing(self, who: str, path: str) -> SandboxFileNotFound:
        return SandboxFileNotFound(f"{self.id}: sandbox {who}: no file or directory at {path!r}")

    # ------------------------------------------------------------ the contract

    def write_file(self, handle: Any, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        """Write ``source`` to ``path`` in the sandbox directory (see the module docstring)."""
        who, box, parts, rec = self._files_box(handle, path, "write")
        if not parts:
            raise ExecError(f"{self.id}: sandbox {who}: {path!r} is its directory, not a file", backend=self.id)
        uid = rec.get("uid")
        want = check_mode(mode, backend=self.id, sandbox=who, path=path)
        name, counted = parts[-1], [0]
        with self._walk(who, box, parts[:-1], path, create=True, uid=uid) as dfd:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                    raise ExecError(f"{self.id}: sandbox {who}: {path!r} is a directory", backend=self.id)
            tmp = f".sandboxer-write-{uuid.uuid4().hex[:12]}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            try:
                with open(fd, "wb", closefd=True) as f:
                    copy_into(chunks(source, counted), f)
                    if uid is not None:
                        os.fchown(f.fileno(), uid, uid)
                    os.fchmod(f.fileno(), want)
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        return counted[0]

    def read_file(self, handle: Any, path: str, sink: BinaryIO) -> int:
        """Copy the file at ``path`` into ``sink`` in chunks."""
        who, box, parts, _ = self._files_box(handle, path, "read")
        if not parts:
            raise ExecError(f"{self.id}: sandbox {who}: {path!r} is its directory, not a file", backend=self.id)
        with self._walk(who, box, parts[:-1], path) as dfd:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
            except FileNotFoundError:
                raise self._missing(who, path) from None
            except OSError as exc:
                raise self._refused(who, path, parts[-1], exc, dfd) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ExecError(f"{self.id}: sandbox {who}: {path!r} is not a regular file", backend=self.id)
        with open(fd, "rb", closefd=True) as f:
            return copy_into(lambda n: f.read(min(n, CHUNK)), sink)

    def list_files(self, handle: Any, path: str) -> list[FileInfo]:
        """The directory's entries, sorted by name, or a file's own; symlinks are entries, not followed."""
        who, box, parts, _ = self._files_box(handle, path, "list")
        here = posixpath.join(box, *parts) if parts else box
        if parts:
            with self._walk(who, box, parts[:-1], path) as dfd:
                try:
                    st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    raise self._missing(who, path) from None
                if not stat.S_ISDIR(st.st_mode):
                    return [_info(here, st)]
        with self._walk(who, box, parts, path) as fd:
            with os.scandir(fd) as it:
                entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        return [_info(posixpath.join(here, n), st) for n, st in sorted(entries, key=lambda e: e[0])]

    def remove_file(self, handle: Any, path: str, *, recursive: bool = False) -> None:
        """Remove the file, or the directory (a non-empty one only with ``recursive``)."""
        who, box, parts, _ = self._files_box(handle, path, "remove")
        if not parts:
            raise InputError(f"{self.id}: sandbox {who}: {path!r} is the sandbox's own directory; tear the sandbox "
                             "down instead")
        name = parts[-1]
        with self._walk(who, box, parts[:-1], path) as dfd:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                raise self._missing(who, path) from None
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dfd)
                return
            try:
                os.rmdir(name, dir_fd=dfd)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise self._refused(who, path, name, exc) from None
            if not recursive:
                raise InputError(f"{self.id}: sandbox {who}: the directory {path!r} is not empty; remove it with "
                                 "recursive=True")
            shutil.rmtree(name, dir_fd=dfd)


def _info(path: str, st: os.stat_result) -> FileInfo:
    mode = st.st_mode
    kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "symlink" if stat.S_ISLNK(mode) else "other")
    return FileInfo(path=path, name=posixpath.basename(path), type=kind, size=0 if kind == "dir" else st.st_size,
                    mode=stat.S_IMODE(mode), modified_at=datetime.fromtimestamp(st.st_mtime, tz=timezone.utc))
