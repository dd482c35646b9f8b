"""ext.docker's files (feature ``files``): the engine's archive API, streamed as tar.

* write: ``PUT /containers/{id}/archive`` with a tar of one file, generated as the source is read
  (a source of unknown length is spooled to a temporary file first: a tar header states the size).
  Missing parent directories are made by a tar of those directories alone, extracted at the deepest
  one that exists (never over an existing directory, whose mode and owner it would reset).
* read: ``GET /containers/{id}/archive``, its tar read as it arrives; a symlink is followed inside
  the container (the engine resolves it in the container's root), at most 40 of them.
* stat: ``HEAD /containers/{id}/archive`` (the engine's path-stat header), through the SDK client's
  own HTTP session.
* list and remove: the engine has no API for them; they run ``stat``/``rm``/``rmdir`` in the
  container (POSIX sh; the names come back one per line, so a name with a newline is not listed).

Paths are the container's: relative ones resolve against the sandbox's working directory (the
profile's, else the image's, else ``/``). Files are written owned by root, mode 0644 unless asked.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import re
import shutil
import stat as stat_mod
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from sandboxer.contract import FileInfo
from sandboxer.errors import ExecError, InputError, SandboxFileNotFound

T = TypeVar("T")

CHUNK = 1 << 20
MAX_LINKS = 40
_GO_DIR, _GO_LINK = 1 << 31, 1 << 27
_GO_OTHER = (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 23)  # device, pipe, socket, char, ...

_LIST = r"""cd -- "$1" 2>/dev/null || { [ -e "$1" ] || exit 3; exit 4; }
for f in * .[!.]* ..?*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  stat -c '%f %s %Y %n' -- "$f" || exit 5
done"""

_RMDIR = r"""rmdir -- "$1" 2>/dev/null && exit 0
[ -d "$1" ] && exit 39
exit 1"""


class _IterReader(io.RawIOBase):
    """The engine's chunk iterator as a readable stream (for tarfile's streaming mode)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _go_time(text: str | None) -> datetime | None:
    """An RFC 3339 time as Go writes it (nanoseconds, an offset) as a UTC datetime."""
    if not text:
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        return None
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}").astimezone(timezone.utc)


class DockerFiles:
    """The files verbs of one ext.docker sandbox (call them inside the extension's ``_engine``)."""

    def __init__(self, ext: Any, handle: Any):
        self.ext, self.handle = ext, handle
        self.api = ext.client().api
        self.cid = handle.container_id

    def _where(self, path: str) -> str:
        return f"{self.ext.id}: sandbox {self.handle.sandbox_id}: {path!r}"

    def absolute(self, path: str) -> str:
        if path.startswith("/"):
            return posixpath.normpath(path) if path != "/" else "/"
        wd = self.handle.workdir or self.api.inspect_container(self.cid)["Config"].get("WorkingDir") or "/"
        return posixpath.normpath(posixpath.join(wd, path))

    def stat(self, path: str) -> dict[str, Any] | None:
        """The engine's stat of ``path`` in the container, or None when nothing is there."""
        url = f"{self.api.base_url}/v{self.api.api_version}/containers/{self.cid}/archive"
        res = self.api.head(url, params={"path": path})
        if res.status_code == 404:
            if "no such container" in res.headers.get("Content-Type", "") or not self._alive():
                raise ExecError(f"{self._where(path)}: the container is gone", backend=self.ext.id)
            return None
        if res.status_code != 200:
            raise ExecError(f"{self._where(path)}: the engine answered {res.status_code} to a stat",
                            backend=self.ext.id)
        return json.loads(base64.b64decode(res.headers.get("X-Docker-Container-Path-Stat", "e30=")))

    def _alive(self) -> bool:
        import docker.errors as derr

        try:
            self.api.inspect_container(self.cid)
        except derr.NotFound:
            return False
        return True

    # ------------------------------------------------------------ verbs

    def write(self, path: str, source: BinaryIO, mode: int | None) -> int:
        dest = self.absolute(path)
        parent, name = posixpath.split(dest)
        if not name:
            raise InputError(f"{self._where(path)} names the root directory, not a file")
        there = self.stat(dest)
        if there is not None and there.get("mode", 0) & _GO_DIR:
            raise ExecError(f"{self._where(path)} is a directory", backend=self.ext.id)
        self._make_parents(path, parent)
        length = getattr(source, "length", None)
        spool = None
        if not isinstance(length, int):
            spool = tempfile.TemporaryFile()
            shutil.copyfileobj(source, spool, CHUNK)
            length = spool.tell()
            spool.seek(0)
            source = spool  # type: ignore[assignment]
        try:
            self.api.put_archive(self.cid, parent, self._tar(path, name, source, length,
                                                             0o644 if mode is None else mode))
        finally:
            if spool is not None:
                spool.close()
        return length

    def _tar(self, path: str, name: str, source: BinaryIO, length: int, mode: int) -> Iterator[bytes]:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = length, mode, int(time.time())
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        left = length
        while left:
            data = source.read(min(CHUNK, left))
            if not data:
                raise ExecError(f"{self._where(path)}: the source ended {left} bytes before the length it "
                                f"announced ({length})", backend=self.ext.id)
            left -= len(data)
            yield data
        yield b"\0" * ((-length) % 512) + b"\0" * 1024

    def _make_parents(self, path: str, parent: str) -> None:
        missing: list[str] = []
        here = parent
        while True:
            st = self.stat(here)
            if st is not None:
                if not st.get("mode", 0) & _GO_DIR and not st.get("linkTarget"):
                    raise ExecError(f"{self._where(path)}: {here!r} is not a directory", backend=self.ext.id)
                break
            missing.append(posixpath.basename(here))
            here = posixpath.dirname(here)
        if not missing:
            return
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            rel = ""
            for part in reversed(missing):
                rel = posixpath.join(rel, part) if rel else part
                info = tarfile.TarInfo(rel)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                tf.addfile(info)
        self.api.put_archive(self.cid, here, buf.getvalue())

    def read(self, path: str, sink: BinaryIO) -> int:
        where = self.absolute(path)
        for _ in range(MAX_LINKS):
            st = self.stat(where)
            if st is None:
                raise SandboxFileNotFound(f"{self._where(path)}: no such file", )
            if not st.get("linkTarget") or not st.get("mode", 0) & _GO_LINK:
                break
            where = st["linkTarget"]
        else:
            raise ExecError(f"{self._where(path)}: more than {MAX_LINKS} symbolic links", backend=self.ext.id)
        if st.get("mode", 0) & _GO_DIR:
            raise ExecError(f"{self._where(path)} is a directory, not a file", backend=self.ext.id)
        chunks, _ = self.api.get_archive(self.cid, where, chunk_size=CHUNK)
        stream = io.BufferedReader(_IterReader(iter(chunks)), CHUNK)
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                if not member.isreg():
                    raise ExecError(f"{self._where(path)} is not a regular file", backend=self.ext.id)
                f = tf.extractfile(member)
                n = 0
                while data := f.read(CHUNK):  # type: ignore[union-attr]
                    sink.write(data)
                    n += len(data)
                return n
        raise ExecError(f"{self._where(path)}: the engine sent an empty archive", backend=self.ext.id)

    def list(self, path: str) -> list[FileInfo]:
        where = self.absolute(path)
        st = self.stat(where)
        if st is None:
            raise SandboxFileNotFound(f"{self._where(path)}: no such file or directory")
        if not st.get("mode", 0) & _GO_DIR and not (st.get("mode", 0) & _GO_LINK):
            return [self._from_stat(where, st)]
        res = self.ext.exec(self.handle, ["sh", "-c", _LIST, "sh", where], timeout=60)
        if res.exit_code == 3:
            raise SandboxFileNotFound(f"{self._where(path)}: no such file or directory")
        if res.exit_code == 4:  # a symlink to a file, or a directory it may not enter
            return [self._from_stat(where, st)]
        if res.exit_code != 0:
            raise ExecError(f"{self._where(path)}: listing failed (exit {res.exit_code}): {res.stderr.strip()[-300:]}",
                            backend=self.ext.id)
        out = []
        for line in res.stdout.splitlines():
            raw, size, mtime, name = line.split(" ", 3)
            bits = int(raw, 16)
            kind = ("dir" if stat_mod.S_ISDIR(bits) else "file" if stat_mod.S_ISREG(bits)
                    else "symlink" if stat_mod.S_ISLNK(bits) else "other")
            out.append(FileInfo(path=posixpath.join(where, name), name=name, type=kind,
                                size=int(size) if kind == "file" else 0, mode=stat_mod.S_IMODE(bits),
                                modified_at=datetime.fromtimestamp(int(mtime), timezone.utc)))
        return sorted(out, key=lambda i: i.name)

    def _from_stat(self, where: str, st: dict[str, Any]) -> FileInfo:
        bits = int(st.get("mode", 0))
        kind = "dir" if bits & _GO_DIR else "symlink" if bits & _GO_LINK else "other" if bits & _GO_OTHER else "file"
        return FileInfo(path=where, name=posixpath.basename(where) or "/", type=kind,
                        size=int(st.get("size", 0)) if kind == "file" else 0, mode=bits & 0o777,
                        modified_at=_go_time(st.get("mtime")))

    def remove(self, path: str, recursive: bool) -> None:
        where = self.absolute(path)
        if where == "/":
            raise InputError(f"{self._where(path)} is the container's root; tear the sandbox down instead")
        st = self.stat(where)
        if st is None:
            raise SandboxFileNotFound(f"{self._where(path)}: no such file or directory")
        is_dir = bool(st.get("mode", 0) & _GO_DIR)
        if not is_dir:
            argv = ["rm", "-f", "--", where]
        elif recursive:
            argv = ["rm", "-rf", "--", where]
        else:
            argv = ["sh", "-c", _RMDIR, "sh", where]
        res = self.ext.exec(self.handle, argv, timeout=300)
        if res.exit_code == 39:
            raise InputError(f"{self._where(path)} is a directory that is not empty; remove it with recursive=True")
        if res.exit_code != 0:
            raise ExecError(f"{self._where(path)}: removing failed (exit {res.exit_code}): "
                            f"{res.stderr.strip()[-300:]}", backend=self.ext.id)


class DockerFilesMixin:
    """The files verbs of :class:`~sandboxer.extensions.docker.DockerExtension`, each inside its ``_engine``
    (the SDK's exceptions translated by the backend's one table)."""

    def _files(self, handle: Any, action: str, path: str, call: Callable[[DockerFiles], T]) -> T:
        return self._engine(f"{action} {path!r}", ExecError,  # type: ignore[attr-defined]
                            lambda: call(DockerFiles(self, handle)), sandbox=handle.sandbox_id)

    def write_file(self, handle: Any, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        return self._files(handle, "writing", path, lambda f: f.write(path, source, mode))

    def read_file(self, handle: Any, path: str, sink: BinaryIO) -> int:
        return self._files(handle, "reading", path, lambda f: f.read(path, sink))

    def list_files(self, handle: Any, path: str) -> list[FileInfo]:
        return self._files(handle, "listing", path, lambda f: f.list(path))

    def remove_file(self, handle: Any, path: str, *, recursive: bool = False) -> None:
        self._files(handle, "removing", path, lambda f: f.remove(path, recursive))
