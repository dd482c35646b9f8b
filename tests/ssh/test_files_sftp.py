"""Files over SFTP on ext.vm-packer (attach mode) against a real sshd: streamed, confined to the
workspace, a planted symlink never followed out of it."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from sandboxer.errors import ExecError, InputError, SandboxFileNotFound
from sandboxer.testing import request
from tests.ssh.test_vm_packer import backend, profile, sid, vm_cfg  # noqa: F401 - fixtures


def test_files_over_sftp_stay_in_the_workspace(backend, tmp_path):  # noqa: F811
    handle = backend.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("files")}, None))
    try:
        data = hashlib.sha256(b"sftp").digest() * (1 << 16)  # 2 MiB
        assert backend.write_file(handle, "a/b/data.bin", io.BytesIO(data), mode=0o600) == len(data)
        ws = Path(handle.remote_dir)
        assert (ws / "a/b/data.bin").read_bytes() == data and (ws / "a/b/data.bin").stat().st_mode & 0o777 == 0o600
        sink = io.BytesIO()
        assert backend.read_file(handle, f"{handle.remote_dir}/a/b/data.bin", sink) == len(data)
        assert sink.getvalue() == data
        [info] = backend.list_files(handle, "a/b")
        assert (info.name, info.type, info.size, info.mode) == ("data.bin", "file", len(data), 0o600)

        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "keep.txt").write_text("host")
        (ws / "up").symlink_to(outside)
        (ws / "x").symlink_to(outside / "keep.txt")
        for call in (lambda: backend.write_file(handle, "up/new.txt", io.BytesIO(b"p")),
                     lambda: backend.read_file(handle, "x", io.BytesIO()),
                     lambda: backend.read_file(handle, "up/keep.txt", io.BytesIO()),
                     lambda: backend.list_files(handle, "up"),
                     lambda: backend.remove_file(handle, "up/keep.txt")):
            with pytest.raises(ExecError, match="outside the sandbox's workspace"):
                call()
        with pytest.raises(InputError, match="outside the sandbox's workspace"):
            backend.write_file(handle, "../../escape.txt", io.BytesIO(b"p"))
        assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"] and (outside / "keep.txt").read_text() == "host"
        backend.remove_file(handle, "up")  # the link itself is the sandbox's
        assert outside.is_dir() and not (ws / "up").exists()

        with pytest.raises(InputError, match="not empty"):
            backend.remove_file(handle, "a")
        backend.remove_file(handle, "a", recursive=True)
        with pytest.raises(SandboxFileNotFound, match="a/b/data.bin"):
            backend.read_file(handle, "a/b/data.bin", io.BytesIO())
    finally:
        backend.teardown(handle)
