"""ext.daytona's feature ``files`` through the SDK's ``sandbox.fs`` (upload/download streamed, list,
info, delete, permissions) against the stand-in's toolbox file-system routes; nothing in the SDK is
mocked."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer.errors import ExecError, InputError, SandboxFileNotFound  # noqa: E402 - after the importorskip
from sandboxer.extensions.base import FEATURE_METHODS  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_daytona import config_dir, inputs, make_ext, sentinel, standin  # noqa: E402,F401
from tests.cloud.daytona_standin import DaytonaStandIn  # noqa: E402


@pytest.fixture
def ready(make_ext, standin: DaytonaStandIn):
    """A ready sandbox: (extension, handle, the stand-in's box)."""
    def make(profile=None, **config):
        ext, prof = make_ext(profile, **config)
        handle = ext.provision(request(prof, inputs(f"sb-files-{len(standin.boxes)}"), None))
        ext.wait_ready(handle, timeout=10)
        return ext, handle, standin.boxes[handle.daytona_sandbox_id]

    return make


class Trickle(io.RawIOBase):
    """A source that hands out at most 64 KiB per read and counts the reads (never one whole read)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.reads = data, 0, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        n = 65536 if size is None or size < 0 else min(size, 65536)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


class Sink(io.RawIOBase):
    """A sink that hashes what it is given and records the largest single write."""

    def __init__(self):
        self.h, self.n, self.largest = hashlib.sha256(), 0, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        self.largest = max(self.largest, len(b))
        return len(b)


def test_files_is_declared_in_the_manifest_and_the_class(ready):
    ext, _, _ = ready()
    assert "files" in ext.features and "files" in ext.manifest.capabilities.features
    for name in FEATURE_METHODS["files"]:
        assert getattr(type(ext), name) is not getattr(type(ext).__mro__[1], name), name


def test_bytes_round_trip_including_binary_and_mode(ready):
    ext, handle, box = ready()
    data = bytes(range(256)) * 4 + b"\r\n\x00\r\n--boundary\r\n"
    assert ext.write_file(handle, "/tmp/bin/blob.dat", io.BytesIO(data), mode=0o600) == len(data)
    target = box.workdir / "tmp" / "bin" / "blob.dat"
    assert target.read_bytes() == data  # parent directories were made
    assert oct(target.stat().st_mode & 0o7777) == oct(0o600)
    out = io.BytesIO()
    assert ext.read_file(handle, "/tmp/bin/blob.dat", out) == len(data)
    assert out.getvalue() == data
    assert ext.write_file(handle, "/tmp/bin/blob.dat", io.BytesIO(b"shorter")) == 7  # replaced
    assert target.read_bytes() == b"shorter" and oct(target.stat().st_mode & 0o7777) == oct(0o644)
    assert ext.write_file(handle, "empty", io.BytesIO(b"")) == 0
    out = io.BytesIO()
    assert ext.read_file(handle, "empty", out) == 0 and out.getvalue() == b""


def test_twenty_mib_round_trip_streams_both_ways(ready):
    ext, handle, box = ready()
    data = os.urandom(20 * 1024 * 1024)
    source = Trickle(data)
    assert ext.write_file(handle, "big.bin", source) == len(data)
    assert source.reads > 100, "the source was not read in chunks"
    assert hashlib.sha256((box.workdir / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    sink = Sink()
    assert ext.read_file(handle, "big.bin", sink) == len(data)
    assert sink.h.digest() == hashlib.sha256(data).digest()
    assert sink.largest < len(data), "the download arrived in one piece, not streamed"


def test_list_files_sizes_types_and_a_files_own_entry(ready):
    ext, handle, box = ready()
    ext.write_file(handle, "d/b.txt", io.BytesIO(b"12345"))
    ext.write_file(handle, "d/a.sh", io.BytesIO(b"#!/bin/sh\n"), mode=0o755)
    (box.workdir / "d" / "sub").mkdir()
    os.symlink("a.sh", box.workdir / "d" / "link")
    entries = ext.list_files(handle, "d")
    assert [(e.name, e.type, e.size) for e in entries] == [
        ("a.sh", "file", 10), ("b.txt", "file", 5), ("link", "symlink", 4), ("sub", "dir", 0)]
    by = {e.name: e for e in entries}
    assert by["a.sh"].mode == 0o755 and by["b.txt"].mode == 0o644
    assert by["b.txt"].path == f"{box.workdir}/d/b.txt" and by["b.txt"].modified_at is not None
    [own] = ext.list_files(handle, "d/b.txt")
    assert (own.name, own.type, own.size, own.path) == ("b.txt", "file", 5, f"{box.workdir}/d/b.txt")


def test_remove_a_file_an_empty_dir_and_a_tree_only_when_recursive(ready):
    ext, handle, box = ready()
    ext.write_file(handle, "t/one/two.txt", io.BytesIO(b"2"))
    ext.write_file(handle, "lone.txt", io.BytesIO(b"x"))
    (box.workdir / "empty").mkdir()
    ext.remove_file(handle, "lone.txt")
    assert not (box.workdir / "lone.txt").exists()
    ext.remove_file(handle, "empty")
    assert not (box.workdir / "empty").exists()
    with pytest.raises(InputError, match=r"'t' in Daytona sandbox .* is a directory that is not empty; remove it "
                                         r"with recursive=True"):
        ext.remove_file(handle, "t")
    assert (box.workdir / "t" / "one" / "two.txt").exists()
    ext.remove_file(handle, "t", recursive=True)
    assert not (box.workdir / "t").exists()


def test_a_missing_path_is_sandbox_file_not_found_naming_sandbox_and_path(ready):
    ext, handle, box = ready()
    sid = handle.daytona_sandbox_id
    calls = [lambda: ext.read_file(handle, "nope.txt", io.BytesIO()),
             lambda: ext.list_files(handle, "nope.txt"),
             lambda: ext.remove_file(handle, "nope.txt")]
    for call in calls:
        with pytest.raises(SandboxFileNotFound) as err:
            call()
        assert str(err.value) == f"Daytona sandbox {sid}: no file or directory at nope.txt ({box.workdir}/nope.txt)"
        assert err.value.__context__ is None and err.value.__cause__ is None
    with pytest.raises(SandboxFileNotFound, match=f"Daytona sandbox {sid}: no file or directory at /no/such$"):
        ext.list_files(handle, "/no/such")


def test_a_relative_path_is_taken_from_the_profiles_cwd_else_the_work_dir(ready):
    ext, handle, box = ready({"options": {"cwd": "/proj"}})
    assert handle.cwd == "/proj"
    ext.write_file(handle, "sub/rel.txt", io.BytesIO(b"here"))
    assert (box.workdir / "proj" / "sub" / "rel.txt").read_bytes() == b"here"
    assert [e.path for e in ext.list_files(handle, "sub")] == ["/proj/sub/rel.txt"]
    out = io.BytesIO()
    ext.read_file(handle, "./sub/../sub/rel.txt", out)
    assert out.getvalue() == b"here"
    plain, handle2, box2 = ready()
    assert handle2.cwd is None
    plain.write_file(handle2, "rel.txt", io.BytesIO(b"work"))  # Daytona's work directory
    assert (box2.workdir / "rel.txt").read_bytes() == b"work"


def test_bad_paths_are_refused_before_any_request(ready, standin: DaytonaStandIn):
    ext, handle, _ = ready()
    before = len(standin.calls)
    with pytest.raises(InputError, match="must be a non-empty string"):
        ext.write_file(handle, "", io.BytesIO(b"x"))
    with pytest.raises(InputError, match="holds a NUL byte"):
        ext.read_file(handle, "a\0b", io.BytesIO())
    with pytest.raises(InputError, match="not permission bits"):
        ext.write_file(handle, "x", io.BytesIO(b"x"), mode=0o10000)
    assert len(standin.calls) == before


def test_files_of_a_torn_down_sandbox_are_an_exec_error(ready):
    ext, handle, _ = ready()
    ext.teardown(handle)
    with pytest.raises(ExecError, match=r"Daytona list_files of sandbox .*: the sandbox is destroyed, not started"):
        ext.list_files(handle, "/")
