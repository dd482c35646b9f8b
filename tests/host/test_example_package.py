"""The example package under examples/ installs, is found through its entry point, and runs out of process."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from sandboxer import Manager
from sandboxer.host.client import ProcessExtension


@pytest.fixture
def ws_mgr(installed_examples, host_manager, home) -> Manager:  # type: ignore[no-untyped-def]
    import sandboxer_workspace

    assert Path(sandboxer_workspace.__file__).is_relative_to(installed_examples)
    return host_manager(config_dirs=[sandboxer_workspace.config_dir()])


def test_found_through_its_entry_point(installed_examples) -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="sandboxer.extensions")}
    assert eps["workspace"] == "sandboxer_workspace.backend:WorkspaceExtension"


def test_create_exec_teardown_out_of_process(ws_mgr) -> None:
    loaded = ws_mgr.catalog.extensions["ext.workspace"]
    assert loaded.runtime == "process"
    ext = ws_mgr.extension("ext.workspace")
    assert isinstance(ext, ProcessExtension)
    sb = ws_mgr.create(profile="workspace")
    assert sb.state.value == "ready"
    path = Path(sb.reachability["path"])
    assert path.is_relative_to(ext.private_dir)  # the worker's home, not the manager's
    assert ext.pid() != os.getpid()

    res = ws_mgr.exec(sb.id, ["cat", "README.txt"])
    assert (res.exit_code, res.stdout) == (0, "a sandbox made by the sandboxer-workspace example\n")
    seen: list[str] = []
    res = ws_mgr.exec(sb.id, ["sh", "-c", "printf 'é%.0s' $(seq 5000); echo oops >&2; exit 3"],
                      on_output=lambda s, t: seen.append(s))
    assert res.exit_code == 3 and res.stdout == "é" * 5000 and res.stderr == "oops\n"
    assert "stdout" in seen and "stderr" in seen
    res = ws_mgr.exec(sb.id, ["cat"], stdin=b"from stdin", env={"X": "1"})
    assert res.stdout == "from stdin"
    res = ws_mgr.exec(sb.id, ["sleep", "30"], timeout=0.5)
    assert (res.exit_code, res.timed_out) == (124, True)

    assert ws_mgr.teardown(sb.id).state.value == "terminated"
    assert not path.exists()
