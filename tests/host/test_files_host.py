"""Files through the extension host: a ``runtime: process`` ext.local serves write/read/list/remove from its
worker, streamed (the write staged in the worker's private directory, the read as data events), and
what goes wrong crosses as the same error classes."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from sandboxer.errors import InputError, SandboxFileNotFound
from sandboxer.host.client import ProcessExtension

LOCAL_PROCESS = """
    id: ext.localproc
    title: ext.local, out of process
    version: 0.1.0
    handler: sandboxer.extensions.local:LocalExtension
    runtime: process
    capabilities:
      isolation_levels: [process]
      pricing_model: free
      features: [exec, files]
    config: {}
"""

LOCAL_PROFILE = """
    slug: localproc
    extension: ext.localproc
    ready_timeout: 20s
"""


@pytest.fixture
def mgr(cfg, host_manager):  # type: ignore[no-untyped-def]
    cfg.write("ext.localproc.yaml", LOCAL_PROCESS)
    cfg.write("profile.localproc.yaml", LOCAL_PROFILE)
    return host_manager()


def _hwm(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_files_cross_the_worker_streamed(mgr, tmp_path) -> None:
    sb = mgr.create(profile="localproc", consumer="me")
    ext = mgr.extension("ext.localproc")
    assert isinstance(ext, ProcessExtension)
    assert sb.files.write("small/bin.dat", bytes(range(256)) * 4, mode=0o600) == 1024
    assert sb.files.read("small/bin.dat") == bytes(range(256)) * 4
    [info] = sb.files.list("small")
    assert (info.name, info.type, info.size, info.mode) == ("bin.dat", "file", 1024, 0o600)

    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for i in range(20):
            f.write(hashlib.sha256(str(i).encode()).digest() * (1 << 15))  # 1 MiB each
    before = _hwm(ext.pid())
    assert sb.files.upload(big, "big.bin") == 20 << 20
    out = tmp_path / "back.bin"
    assert sb.files.download("big.bin", out) == 20 << 20
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    # neither the write (staged in a file) nor the read (1 MiB data events) held the file in the worker
    assert _hwm(ext.pid()) - before < 12 << 20
    assert os.listdir(ext.private_dir / ".files") == []  # the staged copy is gone

    with pytest.raises(SandboxFileNotFound, match=rf"sandbox {sb.id}.*'nope.txt'"):
        sb.files.read("nope.txt")
    sb.exec(["sh", "-c", "mkdir full && touch full/x"])
    with pytest.raises(InputError, match="not empty"):
        sb.files.remove("full")
    sb.files.remove("full", recursive=True)
    assert [i.name for i in sb.files.list(".")] == [".tmp", "big.bin", "small"]
    sb.teardown()


def test_a_sink_that_fails_fails_the_read_and_the_worker_serves_on(mgr) -> None:
    sb = mgr.create(profile="localproc", consumer="me")
    sb.files.write("f.txt", b"x" * (3 << 20))

    class Broken(io.RawIOBase):
        def write(self, data):  # type: ignore[no-untyped-def]
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sb.files.read("f.txt", into=Broken())
    assert sb.files.read("f.txt") == b"x" * (3 << 20)
    sb.teardown()
