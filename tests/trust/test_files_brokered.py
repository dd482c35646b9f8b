"""Files through an installed (signed, brokered, bwrap-confined) bundle's worker: the staged write and the
streamed read cross its confinement; its errors arrive as the same classes."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from sandboxer.errors import SandboxFileNotFound
from tests.trust.test_broker import install, probe_wheel  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def test_files_through_a_brokered_worker(install, tmp_path) -> None:  # noqa: F811
    mgr = install([], features=("exec", "files"))
    sb = mgr.create(profile="probe", consumer="me")
    data = hashlib.sha256(b"seed").digest() * (1 << 17)  # 4 MiB
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    assert sb.files.upload(src, "/work/in.bin") == len(data)
    assert sb.files.read("/work/in.bin") == data
    assert [(i.name, i.size) for i in sb.files.list("/work/in.bin")] == [("in.bin", len(data))]
    sb.files.remove("/work/in.bin")
    with pytest.raises(SandboxFileNotFound, match=rf"sandbox {sb.id}.*'/work/in.bin'"):
        sb.files.read("/work/in.bin")
    sb.teardown()
