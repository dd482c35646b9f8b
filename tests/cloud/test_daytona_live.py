"""A smoke test against the real Daytona service, with the operator's own key.

Skipped unless ``DAYTONA_API_KEY`` is set (and then it needs internet access and spends a few
cents of Daytona time): create from the built-in ``daytona`` profile, run one command, round-trip a file, tear down.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.contract import load_handle  # noqa: E402
from sandboxer.errors import SandboxFileNotFound  # noqa: E402
from sandboxer.models import SandboxState  # noqa: E402

pytestmark = pytest.mark.skipif(
    not os.environ.get("DAYTONA_API_KEY"),
    reason="live Daytona smoke test: no credentials (set DAYTONA_API_KEY to run it against the real service)",
)


def test_live_create_exec_teardown(tmp_path: Path):
    with Manager(config_dirs=[], home=tmp_path / "home") as mgr:
        sb = mgr.create(SandboxCreateRequest(profile="daytona", consumer="live-smoke", ttl="5m"))
        try:
            assert sb.state is SandboxState.READY
            res = mgr.exec(sb.id, ["sh", "-c", "echo ok; echo err >&2"])
            assert (res.exit_code, res.stdout, res.stderr) == (0, "ok\n", "err\n")
            # the files feature, on the backend itself (the manager's side is another change)
            ext = mgr.extension("ext.daytona")
            handle = load_handle(ext.Handle, mgr.state.get(sb.id)["handle"], what="live", backend=ext.id)
            data = bytes(range(256)) * 4096
            assert ext.write_file(handle, "live/blob.bin", io.BytesIO(data)) == len(data)
            out = io.BytesIO()
            assert ext.read_file(handle, "live/blob.bin", out) == len(data) and out.getvalue() == data
            listed = [(f.name, f.type, f.size) for f in ext.list_files(handle, "live")]
            assert listed == [("blob.bin", "file", len(data))]
            ext.remove_file(handle, "live", recursive=True)
            with pytest.raises(SandboxFileNotFound):
                ext.list_files(handle, "live")
        finally:
            assert mgr.teardown(sb.id).state is SandboxState.TERMINATED
        assert mgr.gc().orphans == []
