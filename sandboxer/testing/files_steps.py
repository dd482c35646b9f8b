"""The conformance kit's files steps (feature ``files``): one contract for every backend that declares it.

Mixed into :class:`~sandboxer.testing.suite.Conformance`; each step drives the extension directly
(as the manager does, a source with ``read`` and ``length``, a sink with ``write``) on the main
sandbox, in a directory of its own relative to the working directory.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sandboxer.errors import SandboxFileNotFound

#: The large file's size: big enough that holding it whole, or a fixed small buffer, shows.
LARGE = 20 << 20

FILES_STEPS: dict[str, str] = {
    "files_roundtrip": "write_file then read_file gives the same bytes back (every byte value; text as UTF-8)",
    "files_large": f"a {LARGE >> 20} MiB file is written and read back streamed, byte for byte",
    "files_list": "list_files shows a written file with its size, and a directory's entries sorted by name",
    "files_remove": "after remove_file, reading the file raises SandboxFileNotFound",
    "files_relative": "a relative path resolves against the working directory (where exec runs)",
    "files_parents": "missing parent directories are created",
}


class Source:
    """``length`` bytes of deterministic data, produced as read (never held whole)."""

    def __init__(self, length: int, seed: bytes = b"sbx"):
        self.length = length
        self._left = length
        self._block = b""
        self._counter = 0
        self._seed = seed
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        want = self._left if n is None or n < 0 else min(n, self._left)
        out = bytearray()
        while len(out) < want:
            if not self._block:
                self._block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest() * 2048
                self._counter += 1
            take = self._block[:want - len(out)]
            self._block = self._block[len(take):]
            out += take
        self._left -= len(out)
        self.length = self._left
        self.digest.update(out)
        return bytes(out)


class Sink:
    """Hashes what is written, keeping only the count and the first bytes."""

    def __init__(self, keep: int = 1 << 16):
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = bytearray()
        self._keep = keep

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.digest.update(data)
        self.size += len(data)
        if len(self.head) < self._keep:
            self.head += data[:self._keep - len(self.head)]
        return len(data)


class FilesSteps:
    """The steps (``step_files_*``) of :data:`FILES_STEPS`; needs the suite's ``call``, ``_need``,
    ``handle``, ``exec`` and ``run_id``."""

    def _files_ready(self) -> Any:
        self._need("files")  # type: ignore[attr-defined]
        from sandboxer.testing.suite import StepSkipped

        if self.handle is None:  # type: ignore[attr-defined]
            raise StepSkipped("no ready sandbox (provision or wait_ready failed)")
        return self.handle  # type: ignore[attr-defined]

    @property
    def _dir(self) -> str:
        return f"sbx-conf-files-{self.run_id}"  # type: ignore[attr-defined]

    def _write(self, path: str, data: bytes | Source, mode: int | None = None) -> int:
        import io

        source: Any = data if isinstance(data, Source) else _Lengthed(io.BytesIO(data), len(data))
        deadline = self.manager.limits.files_deadline(source.length)  # type: ignore[attr-defined]
        return self.call("write_file", self._files_ready(), path, source, mode=mode,  # type: ignore[attr-defined]
                         deadline=deadline)

    def _read(self, path: str) -> Sink:
        sink = Sink()
        n = self.call("read_file", self._files_ready(), path, sink,  # type: ignore[attr-defined]
                      deadline=self.manager.limits.files_deadline(None))  # type: ignore[attr-defined]
        from sandboxer.testing.suite import _expect

        _expect(n, sink.size, f"read_file's count for {path!r} (the bytes it wrote to the sink)")
        return sink

    def step_files_roundtrip(self) -> None:
        from sandboxer.testing.suite import _expect

        data = bytes(range(256)) * 64 + "é\n".encode()
        path = f"{self._dir}/bytes.bin"
        _expect(self._write(path, data), len(data), "write_file's count")
        _expect(bytes(self._read(path).head), data, f"the bytes read back from {path!r}")
        self._write(f"{self._dir}/text.txt", "ligne é\n".encode())
        _expect(bytes(self._read(f"{self._dir}/text.txt").head), "ligne é\n".encode(), "the text read back")

    def step_files_large(self) -> None:
        from sandboxer.testing.suite import _expect

        source = Source(LARGE)
        path = f"{self._dir}/large.bin"
        _expect(self._write(path, source), LARGE, f"write_file's count for {LARGE} bytes")
        sink = self._read(path)
        _expect(sink.size, LARGE, "the size read back")
        _expect(sink.digest.hexdigest(), source.digest.hexdigest(), "the sha256 of what was read back")

    def step_files_list(self) -> None:
        from sandboxer.testing.suite import StepFailed, _expect

        handle = self._files_ready()
        d = f"{self._dir}/listed"
        self._write(f"{d}/b.txt", b"12345")
        self._write(f"{d}/a.txt", b"1")
        entries = self.call("list_files", handle, d, deadline=self.manager.limits.files)  # type: ignore[attr-defined]
        got = [(e.name, e.type, e.size) for e in entries]
        _expect(got, [("a.txt", "file", 1), ("b.txt", "file", 5)], f"the entries of {d!r} (name, type, size)")
        [one] = self.call("list_files", handle, f"{d}/b.txt", deadline=self.manager.limits.files)  # type: ignore[attr-defined]
        _expect((one.name, one.type, one.size), ("b.txt", "file", 5), "the entry of a file")
        if not one.path.startswith("/") or not one.path.endswith(f"{d}/b.txt"):
            raise StepFailed(f"expected the entry's path to be absolute and end with {d}/b.txt, got {one.path!r}")

    def step_files_remove(self) -> None:
        from sandboxer.testing.suite import StepFailed

        handle = self._files_ready()
        path = f"{self._dir}/gone.txt"
        self._write(path, b"bye")
        self.call("remove_file", handle, path, deadline=self.manager.limits.files)  # type: ignore[attr-defined]
        try:
            self._read(path)
        except SandboxFileNotFound:
            pass
        else:
            raise StepFailed(f"expected reading the removed {path!r} to raise SandboxFileNotFound, it read")
        try:
            self.call("remove_file", handle, path, deadline=self.manager.limits.files)  # type: ignore[attr-defined]
        except SandboxFileNotFound:
            return
        raise StepFailed(f"expected removing the missing {path!r} to raise SandboxFileNotFound")

    def step_files_relative(self) -> None:
        from sandboxer.testing.suite import StepSkipped, _expect

        path = f"{self._dir}/rel.txt"
        self._write(path, b"relative\n")
        if not self.ext.supports("exec"):  # type: ignore[attr-defined]
            raise StepSkipped("the backend has no exec to look at the working directory with")
        res = self.exec(["cat", path])  # type: ignore[attr-defined]
        _expect((res.exit_code, res.stdout), (0, "relative\n"), f"`cat {path}` in the working directory")
        res = self.exec(["sh", "-c", f"printf %s \"$PWD\"/{self._dir}/rel.txt"])  # type: ignore[attr-defined]
        _expect(bytes(self._read(res.stdout).head), b"relative\n", f"the file read by its absolute path {res.stdout!r}")

    def step_files_parents(self) -> None:
        from sandboxer.testing.suite import _expect

        path = f"{self._dir}/new/deeper/still/leaf.txt"
        self._write(path, b"leaf")
        _expect(bytes(self._read(path).head), b"leaf", f"the file written under missing directories ({path!r})")
        entries = self.call("list_files", self._files_ready(), f"{self._dir}/new",  # type: ignore[attr-defined]
                            deadline=self.manager.limits.files)  # type: ignore[attr-defined]
        _expect([(e.name, e.type) for e in entries], [("deeper", "dir")], "the created parent directory")


class _Lengthed:
    def __init__(self, f: Any, length: int):
        self._f = f
        self.length = length

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.length -= len(data)
        return data
