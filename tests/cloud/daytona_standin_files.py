"""The Daytona stand-in's toolbox file-system routes, as Daytona's daemon answers them.

``/files`` (GET: a directory's entries; DELETE: remove, ``recursive`` for a directory),
``/files/info``, ``/files/folder``, ``/files/permissions``, ``/files/bulk-upload`` (multipart,
parsed as it is fed, so binary data arrives byte for byte) and ``/files/bulk-download`` (a
``multipart/form-data`` reply: a ``file`` part, or an ``error`` part with Daytona's JSON error,
streamed from the file). An entry is Daytona's ``FileInfo``: ``mode`` in Go's ``FileMode.String()``
form (``drwxr-xr-x``, ``-rw-r--r--``, ``Lrwxrwxrwx``), ``permissions`` in octal, ``modifiedAt``
ISO 8601. Paths are read as :func:`tests.cloud.daytona_standin._in_sandbox` says.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from tests.cloud.daytona_standin import Box, _Handler

CHUNK = 1 << 20


def _entry(path: Path, name: str) -> dict[str, Any]:
    st = path.lstat()
    mode = stat.filemode(st.st_mode)
    if mode.startswith("l"):
        mode = "L" + mode[1:]  # Go writes a symlink's type letter upper-case
    mtime = datetime.fromtimestamp(st.st_mtime, tz=timezone.utc)
    return {"name": name, "path": str(path), "size": st.st_size, "isDir": stat.S_ISDIR(st.st_mode), "mode": mode,
            "permissions": f"{stat.S_IMODE(st.st_mode):04o}", "modTime": str(mtime),
            "modifiedAt": mtime.isoformat().replace("+00:00", "Z"), "owner": str(st.st_uid), "group": str(st.st_gid)}


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return (query.get(name) or ["false"])[0].lower() == "true"


def serve(handler: "_Handler", box: "Box", method: str, path: str, query: dict[str, list[str]],
          headers: dict[str, str], raw: bytes) -> bool:
    """Answer a file-system request of ``box``'s toolbox; False if ``path`` is not one of these routes."""
    from tests.cloud.daytona_standin import _in_sandbox

    owner = handler.owner
    where = _in_sandbox(box.workdir, query["path"][0]) if query.get("path") else None
    missing = owner.error(404, f"file not found: {query.get('path', [''])[0]}")
    if method == "POST" and path == "/files/bulk-upload":
        handler.reply(*_upload(owner, box, headers, raw))
    elif method == "POST" and path == "/files/bulk-download":
        _download(handler, box, json.loads(raw)["paths"])
    elif method == "GET" and path == "/files/info":
        handler.reply(*(missing if not os.path.lexists(where) else (200, _entry(where, where.name), {})))
    elif method == "GET" and path == "/files":
        if not os.path.lexists(where):
            handler.reply(*missing)
        elif not where.is_dir():
            handler.reply(*owner.error(400, f"{where} is not a directory"))
        else:
            handler.reply(200, [_entry(p, p.name) for p in sorted(where.iterdir())], {})
    elif method == "DELETE" and path == "/files":
        if not os.path.lexists(where):
            handler.reply(*missing)
        elif where.is_dir() and not where.is_symlink():
            if not _flag(query, "recursive"):
                handler.reply(*owner.error(400, "cannot delete directory without recursive flag"))
                return True
            shutil.rmtree(where)
            handler.reply(204, None, {})
        else:
            where.unlink()
            handler.reply(204, None, {})
    elif method == "POST" and path == "/files/folder":
        where.mkdir(parents=True, exist_ok=True, mode=int(query.get("mode", ["755"])[0], 8))
        handler.reply(201, None, {})
    elif method == "POST" and path == "/files/permissions":
        if not os.path.lexists(where):
            handler.reply(*missing)
        else:
            if query.get("mode"):
                where.chmod(int(query["mode"][0], 8))
            handler.reply(200, None, {})
    else:
        return False
    return True


def _upload(owner: Any, box: "Box", headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
    """``files[i].path`` and ``files[i].file`` fields; each file is written to a temporary name, then moved."""
    _, params = parse_options_header(headers["content-type"])
    paths: dict[str, str] = {}
    staged: dict[str, Path] = {}
    part: dict[str, Any] = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, field=bytearray(), value=bytearray(), data=bytearray(), out=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"].extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"].extend(data[start:end])

    def on_header_end() -> None:
        part["headers"][bytes(part["field"]).decode().lower()] = bytes(part["value"]).decode()
        part["field"].clear()
        part["value"].clear()

    def on_headers_finished() -> None:
        _, cd = parse_options_header(part["headers"].get("content-disposition", ""))
        part["name"] = cd.get(b"name", b"").decode()
        if part["name"].endswith(".file"):
            tmp = box.workdir / f".standin-upload-{uuid.uuid4().hex}"
            staged[part["name"][:-len(".file")]] = tmp
            part["out"] = tmp.open("wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part["out"] is not None:
            part["out"].write(data[start:end])
        else:
            part["data"].extend(data[start:end])

    def on_part_end() -> None:
        if part["out"] is not None:
            part["out"].close()
        elif part["name"].endswith(".path"):
            paths[part["name"][:-len(".path")]] = bytes(part["data"]).decode()

    parser = MultipartParser(params[b"boundary"], callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    for i in range(0, len(raw), CHUNK):
        parser.write(raw[i:i + CHUNK])
    parser.finalize()
    for key, tmp in staged.items():
        if key not in paths:
            tmp.unlink()
            return owner.error(400, f"form field {key}.path missing")
        from tests.cloud.daytona_standin import _in_sandbox

        target = _in_sandbox(box.workdir, paths[key])
        if target.is_dir():
            tmp.unlink()
            return owner.error(400, f"{paths[key]} is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    return 200, None, {}


def _download(handler: "_Handler", box: "Box", paths: list[str]) -> None:
    """One part per path, streamed from the file; a missing one is an ``error`` part (Daytona's JSON)."""
    from tests.cloud.daytona_standin import _in_sandbox

    boundary = uuid.uuid4().hex
    pieces: list[tuple[bytes, Path | None, int]] = []
    for given in paths:
        target = _in_sandbox(box.workdir, given)
        if target.is_file():
            size = target.stat().st_size
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{given}"\r\n'
                    f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n").encode()
            pieces.append((head, target, size))
        else:
            err = json.dumps({"message": f"file not found: {given}", "statusCode": 404}).encode()
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="error"; filename="{given}"\r\n'
                    "Content-Type: application/json\r\n\r\n").encode() + err
            pieces.append((head, None, 0))
    tail = f"\r\n--{boundary}--\r\n".encode()
    total = sum(len(h) + size for h, _, size in pieces) + 2 * (len(pieces) - 1) + len(tail)
    handler.send_response(200)
    handler.send_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    handler.send_header("Content-Length", str(total))
    handler.end_headers()
    for i, (head, target, _size) in enumerate(pieces):
        if i:
            handler.wfile.write(b"\r\n")
        handler.wfile.write(head)
        if target is not None:
            with target.open("rb") as fh:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    handler.wfile.write(chunk)
    handler.wfile.write(tail)
