"""The Modal stand-in's ``/__modal/.bin/modal-sandbox-fs-tools``: the program modal 1.6's
``Sandbox.filesystem`` execs inside a sandbox, over the stand-in sandbox's directory.

Run as ``python modal_fs_tools.py '<command JSON>'`` by the stand-in's ``TaskExecStart`` when the
SDK execs the tool, with ``MODAL_STANDIN_ROOT`` naming the sandbox's directory. It speaks the
tool's interface as modal's ``_utils/sandbox_fs_utils.py`` reads it: one JSON command
(``WriteFile``, ``ReadFile``, ``ListFiles``, ``Stat``, ``Remove``, ``MakeDirectory``) as the
argument; file bytes on stdin (write) or stdout (read), streamed in 64 KiB pieces; a listing or
stat as JSON on stdout (``name, path, type: file|directory|symlink, size, mode, permissions,
owner, group, modified_time, symlink_target``); a failure as exit 1 with ``{"error_kind",
"message"}`` on stderr (``NotFound``, ``IsDirectory``, ``NotDirectory``, ``DirectoryNotEmpty``,
``PathAlreadyExists``, ``PermissionDenied``). New files are 0o644, like a process with umask 022
(the tool's own mode is Modal's business). Paths are mapped by tests/cloud/box_paths.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.cloud.box_paths import Escape, followed, locate, owner_group  # noqa: E402

PIECE = 64 * 1024


class Failed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _entry(host: Path, box_path: str) -> dict[str, Any]:
    st = host.lstat()
    kind = ("symlink" if stat.S_ISLNK(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode)
            else "file")
    owner, group = owner_group(st)
    return {"name": host.name or "/", "path": box_path, "type": kind, "size": st.st_size, "mode": st.st_mode,
            "permissions": stat.filemode(st.st_mode), "owner": owner, "group": group,
            "modified_time": st.st_mtime, "symlink_target": os.readlink(host) if kind == "symlink" else None}


def _where(root: Path, path: str, *, follow: bool = False) -> tuple[Path, str]:
    try:
        host, box_path = locate(root, path)
        if follow and os.path.lexists(host):
            host = followed(root, host)
    except Escape as exc:
        raise Failed("PermissionDenied", str(exc)) from None
    parent = host.parent
    while parent != root.resolve() and not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise Failed("NotDirectory", "Not a directory")
    return host, box_path


def write_file(root: Path, path: str) -> None:
    host, _ = _where(root, path, follow=True)
    if host.is_dir():
        raise Failed("IsDirectory", "Is a directory")
    host.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        while piece := sys.stdin.buffer.read(PIECE):
            f.write(piece)


def read_file(root: Path, path: str) -> None:
    host, _ = _where(root, path, follow=True)
    if not host.exists():
        raise Failed("NotFound", "No such file or directory")
    if host.is_dir():
        raise Failed("IsDirectory", "Is a directory")
    with open(host, "rb") as f:
        while piece := f.read(PIECE):
            sys.stdout.buffer.write(piece)
    sys.stdout.buffer.flush()


def list_files(root: Path, path: str) -> None:
    host, box_path = _where(root, path, follow=True)
    if not host.exists():
        raise Failed("NotFound", "No such file or directory")
    if not host.is_dir():
        raise Failed("NotDirectory", "Not a directory")
    base = box_path.rstrip("/")
    out = [_entry(Path(e.path), f"{base}/{e.name}") for e in sorted(os.scandir(host), key=lambda e: e.name)]
    json.dump(out, sys.stdout)


def stat_(root: Path, path: str) -> None:
    host, box_path = _where(root, path)
    if not os.path.lexists(host):
        raise Failed("NotFound", "No such file or directory")
    json.dump(_entry(host, box_path), sys.stdout)


def remove(root: Path, path: str, recursive: bool) -> None:
    host, _ = _where(root, path)
    if not os.path.lexists(host):
        raise Failed("NotFound", "No such file or directory")
    if host.is_dir() and not host.is_symlink():
        if host == root.resolve():
            raise Failed("PermissionDenied", "Permission denied")
        if recursive:
            shutil.rmtree(host)
        elif any(os.scandir(host)):
            raise Failed("DirectoryNotEmpty", "Directory not empty")
        else:
            host.rmdir()
    else:
        host.unlink()


def make_directory(root: Path, path: str, parents: bool) -> None:
    host, _ = _where(root, path)
    if os.path.lexists(host) and not (parents and host.is_dir()):
        raise Failed("PathAlreadyExists", "File exists")
    if not parents and not host.parent.is_dir():
        raise Failed("NotFound", "No such file or directory")
    host.mkdir(parents=parents, exist_ok=parents)


def main(argv: list[str]) -> int:
    root = Path(os.environ["MODAL_STANDIN_ROOT"])
    [(name, args)] = json.loads(argv[1]).items()
    try:
        if name == "WriteFile":
            write_file(root, args["path"])
        elif name == "ReadFile":
            read_file(root, args["path"])
        elif name == "ListFiles":
            list_files(root, args["path"])
        elif name == "Stat":
            stat_(root, args["path"])
        elif name == "Remove":
            remove(root, args["path"], bool(args.get("recursive")))
        elif name == "MakeDirectory":
            make_directory(root, args["path"], bool(args.get("parents")))
        else:
            raise Failed("Unsupported", f"the stand-in's fs tools do not implement {name}")
    except Failed as exc:
        json.dump({"error_kind": exc.kind, "message": str(exc)}, sys.stderr)
        return 1
    except PermissionError:
        json.dump({"error_kind": "PermissionDenied", "message": "Permission denied"}, sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
