"""ext.docker's files against a real engine: links resolve inside the container, never on the engine's host;
a directory is never overwritten by a file; what is missing says so."""

from __future__ import annotations

import io
import os

import pytest

from sandboxer.errors import ExecError, InputError, SandboxFileNotFound

pytestmark = pytest.mark.root


def test_links_resolve_inside_the_container(ext, make, tmp_path):
    handle = make()
    ext.wait_ready(handle, 30)
    res = ext.exec(handle, ["sh", "-c", "mkdir -p /work && cd /work && ln -s / up && ln -s /etc/hostname x"])
    assert res.exit_code == 0, res.stderr
    host_before = os.path.exists("/sbx-docker-files-pwned")
    ext.write_file(handle, "/work/up/sbx-docker-files-pwned", io.BytesIO(b"in the container"))
    assert os.path.exists("/sbx-docker-files-pwned") == host_before  # the engine's host is untouched
    assert ext.exec(handle, ["cat", "/sbx-docker-files-pwned"]).stdout == "in the container"
    sink = io.BytesIO()
    ext.read_file(handle, "/work/x", sink)
    assert sink.getvalue() == ext.exec(handle, ["cat", "/etc/hostname"]).stdout.encode()  # the container's
    with pytest.raises(ExecError, match="is a directory"):
        ext.write_file(handle, "/work", io.BytesIO(b"x"))
    assert ext.exec(handle, ["test", "-L", "/work/up"]).exit_code == 0  # /work survived
    with pytest.raises(SandboxFileNotFound, match="/work/nope"):
        ext.read_file(handle, "/work/nope", io.BytesIO())
    with pytest.raises(InputError, match="not empty"):
        ext.remove_file(handle, "/work")
    kinds = {i.name: i.type for i in ext.list_files(handle, "/work")}
    assert kinds == {"up": "symlink", "x": "symlink"}
    ext.remove_file(handle, "/work", recursive=True)
    with pytest.raises(SandboxFileNotFound):
        ext.list_files(handle, "/work")
    ext.teardown(handle)
