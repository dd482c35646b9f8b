"""envd's file API for the E2B stand-in (tests/cloud/e2b_standin.py): ``GET``/``POST /files`` and
the Connect RPC ``filesystem.Filesystem`` service, over the box's own directory.

Answered as envd 0.6 answers (packages/envd of e2b-dev/infra): an upload makes the missing parent
directories and the file (0o666 under envd's umask 022: 0o644), replaces a file there, refuses a
directory (400) and answers ``[{path, name, type: "file"}]``; a download of a missing path is 404
and of a directory 400; ``Stat`` and ``ListDir`` (depth-limited, symlinks not followed) answer
``EntryInfo`` with size, permission bits, owner, group and modification time; ``ListDir`` of a
file is INVALID_ARGUMENT; ``Remove`` is ``os.RemoveAll`` (a missing path is no error, a tree goes
whole); ``MakeDir`` makes the parents and says ALREADY_EXISTS for a directory there.

A box's ``/`` is its directory; a relative path is taken from the user's home, which in the
stand-in is that same directory (where its commands start); a host path under the directory (as
its commands' ``pwd`` reports) names itself. Unlike a microVM, the stand-in's box is a host
directory, so a path or a symlink that would lead out of it is refused (403 / PERMISSION_DENIED)
rather than followed. Uploads and downloads are streamed in 64 KiB pieces: nothing holds a whole
file.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf.wkt import Timestamp

from e2b.envd.filesystem import filesystem_pb as fs_pb

from tests.cloud.box_paths import Escape, followed, locate, owner_group

PIECE = 64 * 1024
#: The bits a new file gets: 0o666 under envd's umask 022.
NEW_FILE_MODE = 0o644


def entry_info(host: Path, box_path: str) -> fs_pb.EntryInfo:
    st = host.lstat()
    symlink_target = None
    if stat.S_ISLNK(st.st_mode):
        kind = fs_pb.FileType.SYMLINK
        symlink_target = os.readlink(host)
    elif stat.S_ISDIR(st.st_mode):
        kind = fs_pb.FileType.DIRECTORY
    elif stat.S_ISREG(st.st_mode):
        kind = fs_pb.FileType.FILE
    else:
        kind = fs_pb.FileType.UNSPECIFIED
    owner, group = owner_group(st)
    return fs_pb.EntryInfo(
        name=posixpath.basename(box_path) or "/", type=kind, path=box_path, size=st.st_size,
        mode=stat.S_IMODE(st.st_mode) & 0o777, permissions=stat.filemode(st.st_mode), owner=owner, group=group,
        modified_time=Timestamp(seconds=int(st.st_mtime), nanos=st.st_mtime_ns % 1_000_000_000),
        symlink_target=symlink_target,
    )


class Filesystem:
    """The ``filesystem.Filesystem`` service, served by the SDK's own ``FilesystemWSGIApplication``."""

    def __init__(self, root_of: Callable[[Any], Path], unimplemented: list[tuple[str, str]]):
        self._root_of = root_of
        self._unimplemented = unimplemented

    def _where(self, ctx: Any, path: str) -> tuple[Path, Path, str]:
        root = self._root_of(ctx)
        try:
            host, box_path = locate(root, path)
        except Escape as exc:
            raise ConnectError(Code.PERMISSION_DENIED, str(exc)) from None
        return root, host, box_path

    def stat(self, request: fs_pb.StatRequest, ctx: Any) -> fs_pb.StatResponse:
        _, host, box_path = self._where(ctx, request.path)
        if not os.path.lexists(host):
            raise ConnectError(Code.NOT_FOUND, f"file not found: stat {box_path}: no such file or directory")
        return fs_pb.StatResponse(entry=entry_info(host, box_path))

    def list_dir(self, request: fs_pb.ListDirRequest, ctx: Any) -> fs_pb.ListDirResponse:
        root, host, box_path = self._where(ctx, request.path)
        if not os.path.lexists(host):
            raise ConnectError(Code.NOT_FOUND, f"path not found: lstat {box_path}: no such file or directory")
        try:
            real = followed(root, host)
        except Escape as exc:
            raise ConnectError(Code.PERMISSION_DENIED, str(exc)) from None
        if not real.is_dir():
            raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {box_path}")
        depth = request.depth or 1
        entries: list[fs_pb.EntryInfo] = []

        def walk(d: Path, prefix: str, level: int) -> None:
            for child in sorted(os.scandir(d), key=lambda e: e.name):
                child_path = posixpath.join(prefix, child.name)
                entries.append(entry_info(Path(child.path), child_path))
                if level < depth and child.is_dir(follow_symlinks=False):
                    walk(Path(child.path), child_path, level + 1)

        walk(real, box_path, 1)
        return fs_pb.ListDirResponse(entries=entries)

    def make_dir(self, request: fs_pb.MakeDirRequest, ctx: Any) -> fs_pb.MakeDirResponse:
        _, host, box_path = self._where(ctx, request.path)
        if host.is_dir():
            raise ConnectError(Code.ALREADY_EXISTS, f"directory already exists: {box_path}")
        if os.path.lexists(host):
            raise ConnectError(Code.INVALID_ARGUMENT, f"path already exists but it is not a directory: {box_path}")
        host.mkdir(parents=True)
        return fs_pb.MakeDirResponse(entry=fs_pb.EntryInfo(name=host.name, type=fs_pb.FileType.DIRECTORY,
                                                           path=box_path))

    def move(self, request: fs_pb.MoveRequest, ctx: Any) -> fs_pb.MoveResponse:
        _, src, _ = self._where(ctx, request.source)
        _, dst, dst_path = self._where(ctx, request.destination)
        if not os.path.lexists(src):
            raise ConnectError(Code.NOT_FOUND, f"source file not found: {request.source}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        return fs_pb.MoveResponse(entry=entry_info(dst, dst_path))

    def remove(self, request: fs_pb.RemoveRequest, ctx: Any) -> fs_pb.RemoveResponse:
        root, host, _ = self._where(ctx, request.path)
        if host == root.resolve():
            raise ConnectError(Code.INTERNAL, "error removing file or directory: the sandbox's root")
        if host.is_dir() and not host.is_symlink():
            shutil.rmtree(host)
        elif os.path.lexists(host):
            host.unlink()
        return fs_pb.RemoveResponse()  # os.RemoveAll: a missing path is no error

    def __getattr__(self, name: str) -> Any:
        def unimplemented(request: Any, ctx: Any) -> Any:
            self._unimplemented.append(("RPC", f"/filesystem.Filesystem/{name}"))
            raise ConnectError(Code.UNIMPLEMENTED, f"stand-in does not implement {name}")
        return unimplemented


def _json_error(h: Any, status: int, message: str) -> None:
    h._reply(status, {"code": status, "message": message})


def body_pieces(h: Any):
    """The request body, as it arrives (de-chunked), in pieces of at most :data:`PIECE` bytes."""
    if h.headers.get("transfer-encoding", "").lower() != "chunked":
        yield from _exactly(h.rfile, int(h.headers.get("content-length") or 0))
        return
    while True:
        size = int(h.rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return
        yield from _exactly(h.rfile, size)
        h.rfile.readline()


def _exactly(rfile: Any, left: int):
    while left:
        piece = rfile.read(min(left, PIECE))
        if not piece:
            raise ConnectionError("the upload ended early")
        left -= len(piece)
        yield piece


def _drain(h: Any) -> None:
    for _ in body_pieces(h):
        pass


def serve_files(h: Any, root: Path, query: dict[str, list[str]], unimplemented: list[tuple[str, str]]) -> None:
    """``GET /files?path=`` (download) or ``POST /files?path=`` (an octet-stream upload) for the box at ``root``."""
    path = (query.get("path") or [""])[0]
    if h.command == "POST":
        ctype = h.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream":
            _drain(h)
            unimplemented.append(("POST", f"/files ({ctype or 'no content type'})"))
            _json_error(h, 400, f"the stand-in serves only octet-stream uploads, got {ctype!r}")
            return
        if not path:
            _drain(h)
            _json_error(h, 400, "path query parameter is required for raw body upload")
            return
    try:
        host, box_path = locate(root, path or ".")
        if h.command == "GET" or os.path.lexists(host):
            target = followed(root, host) if os.path.lexists(host) else host
        else:
            target = host
    except Escape as exc:
        _drain(h)
        _json_error(h, 403, str(exc))
        return
    if h.command == "GET":
        _download(h, target, box_path)
    elif h.command == "POST":
        _upload(h, root, target, box_path)
    else:
        _drain(h)
        unimplemented.append((h.command, "/files"))
        _json_error(h, 405, f"method {h.command} not allowed")


def _download(h: Any, target: Path, box_path: str) -> None:
    if not target.exists():
        _json_error(h, 404, f"path '{box_path}' does not exist")
        return
    if target.is_dir():
        _json_error(h, 400, f"path '{box_path}' is a directory")
        return
    with open(target, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(size))
        h.end_headers()
        left = size
        while left:
            piece = f.read(min(left, PIECE))
            if not piece:
                break
            h.wfile.write(piece)
            left -= len(piece)


def _upload(h: Any, root: Path, target: Path, box_path: str) -> None:
    if target.is_dir():
        _drain(h)
        _json_error(h, 400, f"path is a directory: {box_path}")
        return
    try:
        parent = followed(root, target.parent) if target.parent.exists() else target.parent
        parent.mkdir(parents=True, exist_ok=True)
    except (Escape, OSError) as exc:
        _drain(h)
        _json_error(h, 500, f"error ensuring directories: {exc}")
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, NEW_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        for piece in body_pieces(h):
            f.write(piece)
    body = json.dumps([{"path": box_path, "name": posixpath.basename(box_path), "type": "file"}]).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)
