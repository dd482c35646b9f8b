"""``worker: {sandbox: namespace}``: the worker runs under bubblewrap, without the manager's home or network."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.host.conftest import STUB_PROCESS, STUB_PROFILE

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


def _python_in(pid: int) -> int:
    """The worker's python process under bwrap (a descendant of ``pid``), found in a bounded walk."""
    todo, seen = [pid], 0
    while todo and seen < 50:
        p = todo.pop()
        seen += 1
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sandboxer.host" in cmd and not cmd[0].endswith(b"bwrap"):
            return p
        for task in Path(f"/proc/{p}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    raise AssertionError(f"no worker python under pid {pid}")


@pytest.fixture
def mgr(cfg, host_manager):  # type: ignore[no-untyped-def]
    cfg.write("ext.stubproc.yaml", STUB_PROCESS + "    worker: {sandbox: namespace}\n")
    cfg.write("profile.stubproc.yaml", STUB_PROFILE)
    return host_manager()


def test_a_namespaced_worker_serves_the_lifecycle_without_the_managers_home_or_network(mgr) -> None:
    sb = mgr.create(profile="stubproc")
    ext = mgr.extension("ext.stubproc")
    assert mgr.exec(sb.id, ["echo", "inside"]).stdout == "inside\n"
    inner = _python_in(ext.pid())
    root = f"/proc/{inner}/root"
    assert (mgr.home / "state.db").exists()
    assert not os.path.exists(f"{root}{mgr.home}/state.db")  # the state store is not there
    assert os.path.isdir(f"{root}{ext.private_dir}")
    assert [ln.split(":")[0].strip() for ln in Path(f"/proc/{inner}/net/dev").read_text().splitlines()[2:]] == ["lo"]
    assert mgr.teardown(sb.id).state.value == "terminated"


def test_a_namespaced_worker_that_aborts_is_reported_with_its_signal(mgr) -> None:
    ext = mgr.extension("ext.stubproc")
    ext.ping()
    old = ext.worker()
    os.kill(_python_in(ext.pid()), 6)
    deadline = time.monotonic() + 10
    while old.dead is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert old.dead == "died of signal SIGABRT"  # bwrap's 134 read as the signal it stands for
    assert ext.ping() == "pong"  # restarted


def test_without_bubblewrap_a_namespaced_worker_is_refused_not_run_unconfined(mgr, monkeypatch) -> None:
    from sandboxer.errors import CapabilityError
    from sandboxer.host import client

    monkeypatch.setattr(client.shutil, "which", lambda name: None)
    with pytest.raises(CapabilityError, match=r"^ext\.stubproc: the manifest asks for worker\.sandbox 'namespace', "
                                              r"but bubblewrap \(bwrap\) is not installed; install it, or set "
                                              r"worker\.sandbox: none to run the worker unconfined$"):
        mgr.extension("ext.stubproc").ping()
