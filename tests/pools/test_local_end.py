"""ext.local's movable end (what a warm pool's hand-out uses): the init keeps the end set_ttl writes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest


def _alive_after(pid: int, seconds: float) -> bool:
    time.sleep(seconds)
    return Path(f"/proc/{pid}").exists()


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("tool", ["bwrap", "unshare"])
def test_set_ttl_moves_the_end_the_init_keeps(make_manager, monkeypatch, tool):  # type: ignore[no-untyped-def]
    import sandboxer.extensions.local as local

    if shutil.which(tool) is None and os.geteuid() != 0:
        pytest.skip(f"{tool} not installed")
    monkeypatch.setattr(local, "TTL_GRACE_S", 0)
    mgr = make_manager(refill=False)
    ext = mgr.extension("ext.local")
    monkeypatch.setattr(ext, "_tool", tool)
    sb = mgr.create(profile="local", ttl=1)
    handle = ext.Handle.model_validate(mgr.state.get(sb.id)["handle"])
    ext.set_ttl(handle, 30)  # later: the init outlives its first end
    assert _alive_after(handle.pid, 2.5), "the init ended at its first end, not the one set_ttl moved it to"
    assert ext.exec(handle, ["echo", "still"]).stdout == "still\n"  # (the manager's own expires_at has passed)
    ext.set_ttl(handle, 1)  # sooner: it ends at its next look (within 10 s)
    assert _gone_within(handle.pid, 13), "the init did not end at the end set_ttl moved it to"
    mgr.teardown(sb.id)
    assert not (ext.root / ".meta" / f"{sb.id}.end").exists()


def test_the_end_file_is_out_of_the_sandboxs_reach(make_manager):  # type: ignore[no-untyped-def]
    mgr = make_manager(refill=False)
    sb = mgr.create(profile="local")
    ext = mgr.extension("ext.local")
    path = ext.root / ".meta" / f"{sb.id}.end"
    assert path.stat().st_mode & 0o777 == 0o644 and path.stat().st_uid == os.geteuid()
    r = mgr.exec(sb.id, ["sh", "-c", f"cat {path} || echo unreachable; echo 1 > {path} || echo refused"])
    assert "refused" in r.stdout + r.stderr
    assert int(path.read_text()) > time.time() + 3000  # untouched: the profile's 1h default
    mgr.teardown(sb.id)
