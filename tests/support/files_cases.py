"""Feature ``files`` checked the same way on each backend built here (ext.e2b, ext.modal, ext.saas-stub),
calling the extension's methods directly on a ready sandbox of it.

Each function takes the extension and a handle; what it checks is what base.py's docstrings promise,
seen by a user: the bytes really there (read back, and by a command in the sandbox), the sizes and
types listed, the file really gone, the exact error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import threading
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest

from sandboxer.errors import ExecError, InputError, SandboxFileNotFound

MIB = 1024 * 1024
#: Bytes that are no text: every byte value, invalid UTF-8 sequences, a NUL, CR/LF.
BINARY = bytes(range(256)) + b"\xff\xfe\x80\xc3\x28 caf\xe9\x00\r\n\xed\xa0\x80"


def write(ext: Any, handle: Any, path: str, data: bytes, **kw: Any) -> int:
    return ext.write_file(handle, path, io.BytesIO(data), **kw)


def read(ext: Any, handle: Any, path: str) -> bytes:
    sink = io.BytesIO()
    n = ext.read_file(handle, path, sink)
    assert n == len(sink.getvalue())
    return sink.getvalue()


def bytes_round_trip(ext: Any, handle: Any) -> None:
    """Binary and non-UTF-8 bytes come back byte for byte; replacing a file replaces all of it."""
    assert write(ext, handle, "bin/data.bin", BINARY) == len(BINARY)
    assert read(ext, handle, "bin/data.bin") == BINARY
    assert write(ext, handle, "bin/data.bin", b"short") == 5
    assert read(ext, handle, "bin/data.bin") == b"short"
    assert write(ext, handle, "bin/empty", b"") == 0
    assert read(ext, handle, "bin/empty") == b""


class _Random(io.RawIOBase):
    """``size`` pseudo-random bytes, made as they are read (the test holds no copy either)."""

    def __init__(self, size: int, seed: bytes = b"files"):
        self.left, self._h, self._buf = size, hashlib.sha256(seed), b""
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        while len(self._buf) < n:
            self._h.update(b"+")
            self._buf += self._h.digest() * 64
        piece, self._buf = self._buf[:n], self._buf[n:]
        b[:n] = piece
        self.left -= n
        self.digest.update(piece)
        return n


class _Digest(io.RawIOBase):
    def __init__(self) -> None:
        self.digest, self.size = hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.digest.update(b)
        self.size += len(b)
        return len(b)


def large_round_trip(ext: Any, handle: Any, *, size: int = 20 * MIB, peak_limit: int | None = 12 * MIB) -> None:
    """A 20 MiB file goes up and comes back whole, and (with ``peak_limit``) neither direction holds
    it in memory: tracemalloc's peak over the call (this process: the extension, the SDK, and a
    stand-in living in it) stays under the limit."""
    source = _Random(size)
    if peak_limit:
        tracemalloc.start()
    try:
        assert ext.write_file(handle, "big/twenty.bin", source) == size
        if peak_limit:
            _, up_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        sink = _Digest()
        assert ext.read_file(handle, "big/twenty.bin", sink) == size
        if peak_limit:
            _, down_peak = tracemalloc.get_traced_memory()
    finally:
        if peak_limit:
            tracemalloc.stop()
    assert sink.size == size
    assert sink.digest.hexdigest() == source.digest.hexdigest()
    if peak_limit:
        assert up_peak < peak_limit, f"the upload held {up_peak / MIB:.1f} MiB at once"
        assert down_peak < peak_limit, f"the download held {down_peak / MIB:.1f} MiB at once"
    [entry] = ext.list_files(handle, "big/twenty.bin")
    assert (entry.type, entry.size, entry.name) == ("file", size, "twenty.bin")


def listing(ext: Any, handle: Any) -> None:
    """Entries sorted by name with types and sizes; a file lists as itself; missing parents were made."""
    write(ext, handle, "tree/b.txt", b"12345")
    write(ext, handle, "tree/a.bin", BINARY)
    write(ext, handle, "tree/sub/deeper/c", b"x")  # two missing parent directories made on the way
    entries = ext.list_files(handle, "tree")
    assert [(e.name, e.type) for e in entries] == [("a.bin", "file"), ("b.txt", "file"), ("sub", "dir")]
    sizes = {e.name: e.size for e in entries}
    assert sizes["a.bin"] == len(BINARY) and sizes["b.txt"] == 5 and sizes["sub"] == 0
    assert all(e.path.startswith("/") and e.path.endswith("/tree/" + e.name) for e in entries)
    [deeper] = ext.list_files(handle, "tree/sub")
    assert (deeper.name, deeper.type) == ("deeper", "dir")
    [one] = ext.list_files(handle, "tree/b.txt")
    assert (one.name, one.type, one.size) == ("b.txt", "file", 5)
    assert ext.list_files(handle, one.path) == [one]  # the absolute path it reports names it too
    with pytest.raises(SandboxFileNotFound) as err:
        ext.list_files(handle, "tree/nothing-here")
    assert "nothing-here" in str(err.value)


def modes(ext: Any, handle: Any) -> None:
    """``mode`` sets the permission bits; without it a file is 0o644, a replaced one too."""
    write(ext, handle, "modes/run.sh", b"#!/bin/sh\necho ran\n", mode=0o755)
    [entry] = ext.list_files(handle, "modes/run.sh")
    assert entry.mode == 0o755
    write(ext, handle, "modes/plain", b"p")
    assert ext.list_files(handle, "modes/plain")[0].mode == 0o644
    write(ext, handle, "modes/run.sh", b"again")
    assert ext.list_files(handle, "modes/run.sh")[0].mode == 0o644


def removal(ext: Any, handle: Any, sandbox: str) -> None:
    """A file goes; a non-empty directory only with recursive; a missing path is SandboxFileNotFound
    naming the sandbox and the path."""
    write(ext, handle, "rm/one.txt", b"1")
    write(ext, handle, "rm/tree/inner/two.txt", b"2")
    ext.remove_file(handle, "rm/one.txt")
    with pytest.raises(SandboxFileNotFound):
        read(ext, handle, "rm/one.txt")
    with pytest.raises(InputError) as err:
        ext.remove_file(handle, "rm/tree")
    assert "recursive" in str(err.value)
    assert read(ext, handle, "rm/tree/inner/two.txt") == b"2"  # the refusal removed nothing
    ext.remove_file(handle, "rm/tree", recursive=True)
    assert [e.name for e in ext.list_files(handle, "rm")] == []
    write(ext, handle, "rm/empty/x", b"")
    ext.remove_file(handle, "rm/empty/x")
    ext.remove_file(handle, "rm/empty")  # an empty directory needs no recursive
    with pytest.raises(SandboxFileNotFound) as err:
        ext.remove_file(handle, "rm/never-was")
    assert sandbox in str(err.value) and "rm/never-was" in str(err.value)
    with pytest.raises(SandboxFileNotFound) as err:
        read(ext, handle, "rm/never-was")
    assert sandbox in str(err.value) and "rm/never-was" in str(err.value)
    for root in ("/", "/.."):  # the sandbox's whole filesystem is never removed by a path
        with pytest.raises(InputError):
            ext.remove_file(handle, root, recursive=True)


def relative_to_workdir(ext: Any, handle: Any) -> None:
    """A relative path is the one a command started in the working directory sees; an absolute one
    works as well."""
    write(ext, handle, "rel/note.txt", "héllo\n".encode())
    res = ext.exec(handle, ["cat", "rel/note.txt"])
    assert (res.exit_code, res.stdout) == (0, "héllo\n")
    here = ext.exec(handle, ["pwd"]).stdout.strip()
    assert read(ext, handle, here.rstrip("/") + "/rel/note.txt") == "héllo\n".encode()
    res = ext.exec(handle, ["sh", "-c", "mkdir -p rel && printf 'from inside' > rel/made.txt"])
    assert res.exit_code == 0
    assert read(ext, handle, "rel/made.txt") == b"from inside"


def bad_paths(ext: Any, handle: Any) -> None:
    """An empty path, a NUL byte and a mode that is no permission bits are InputError, and nothing is written."""
    for bad in ("", "nul\x00byte"):
        with pytest.raises(InputError):
            write(ext, handle, bad, b"x")
        with pytest.raises(InputError):
            read(ext, handle, bad)
        with pytest.raises(InputError):
            ext.list_files(handle, bad)
        with pytest.raises(InputError):
            ext.remove_file(handle, bad)
    for mode in (-1, 0o10000, "644", 6.44):
        with pytest.raises(InputError, match="mode"):
            write(ext, handle, "bad-mode", b"x", mode=mode)
    with pytest.raises(SandboxFileNotFound):
        ext.list_files(handle, "bad-mode")


def concurrent(ext: Any, handle: Any, n: int = 4) -> None:
    """Several transfers at once on one sandbox (the extension is shared by the manager's threads)."""
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            data = os.urandom(256 * 1024) + bytes([i])
            write(ext, handle, f"par/{i}.bin", data)
            assert read(ext, handle, f"par/{i}.bin") == data
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


def from_real_file(ext: Any, handle: Any) -> None:
    """A real file opened in binary mode is a source, and a sink."""
    with tempfile.TemporaryFile() as up, tempfile.TemporaryFile() as down:
        up.write(BINARY * 100)
        up.seek(0)
        assert ext.write_file(handle, "real.bin", up) == len(BINARY) * 100
        assert ext.read_file(handle, "real.bin", down) == len(BINARY) * 100
        down.seek(0)
        assert down.read() == BINARY * 100



def symlink_out_of_the_box(ext: Any, handle: Any, root: Path, outside: Path, prefix: str = "") -> None:
    """A stand-in whose sandbox is a host directory ``root``: a symlink planted there that leads out
    (to ``outside``, a host directory) is not followed by a read; it is listed and removed as itself."""
    outside.mkdir(exist_ok=True)
    (outside / "host-secret").write_text("host")
    (root / "link").symlink_to(outside / "host-secret")
    with pytest.raises(ExecError):
        read(ext, handle, prefix + "link")
    [entry] = ext.list_files(handle, prefix + "link")
    assert entry.type == "symlink"
    ext.remove_file(handle, prefix + "link")  # the link goes, not what it points at
    assert (outside / "host-secret").read_text() == "host"


def everyday(ext: Any, handle: Any, *, relative: bool = True) -> None:
    """The everyday cases in one go: bytes, listing, modes, bad paths, a real file (and, with
    ``relative``, a relative path against where commands start, which needs exec)."""
    bytes_round_trip(ext, handle)
    listing(ext, handle)
    modes(ext, handle)
    if relative:
        relative_to_workdir(ext, handle)
    bad_paths(ext, handle)
    from_real_file(ext, handle)


@contextlib.contextmanager
def ready(ext: Any, req: Any) -> Iterator[tuple[Any, Any]]:
    """A sandbox of ``ext`` provisioned from ``req`` and ready, torn down after: ``(ext, handle)``."""
    handle = ext.provision(req)
    try:
        ext.wait_ready(handle, timeout=10)
        yield ext, handle
    finally:
        ext.teardown(handle)
