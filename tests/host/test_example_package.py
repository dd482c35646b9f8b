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


def test_the_packages_own_manifest_and_profile_are_found_without_config(installed_examples, home, tmp_path) -> None:
    """pip install is enough: no --config, no SANDBOXER_CONFIG (entry-point group sandboxer.config)."""
    import subprocess
    import sys

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(installed_examples), str(Path(__file__).resolve().parents[2])])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "sandboxer", "--home", str(home), *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=120)
    listed = run("extensions", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ext.workspace" in listed.stdout
    made = run("create", "workspace", "--json")
    assert made.returncode == 0, made.stderr
    import json

    sid = json.loads(made.stdout)["id"]
    out = run("exec", sid, "--", "cat", "README.txt")
    assert (out.returncode, out.stdout) == (0, "a sandbox made by the sandboxer-workspace example\n")
    assert run("teardown", sid).returncode == 0
    # and it can be switched off
    env["SANDBOXER_PACKAGE_CONFIG"] = "0"
    off = run("create", "workspace")
    assert off.returncode == 66 and off.stderr.startswith("error: unknown profile 'workspace'")


def test_a_third_partys_optional_sdk_hint_names_its_own_distribution(installed_examples, cfg, home) -> None:
    from sandboxer.errors import MissingExtra

    cfg.write("ext.needs-sdk.yaml", """
        id: ext.needs-sdk
        title: needs an SDK
        version: 0.1.0
        handler: needs-sdk
        capabilities: {isolation_levels: [none], pricing_model: free}
    """)
    with Manager(config_dirs=[cfg.root], home=home) as mgr:  # it loads: the SDK is needed only to use it
        with pytest.raises(MissingExtra) as err:
            mgr.extension("ext.needs-sdk")
    assert str(err.value) == ("ext.needs-sdk needs the Python package 'sandboxer_test_sdk_that_is_not_installed'; "
                              "install it with: pip install 'sandboxer-misbehaving-test-ext[cloud]'")


def test_the_example_passes_the_conformance_kit_out_of_process(ws_mgr) -> None:
    from sandboxer.testing import run_conformance

    report = run_conformance(ws_mgr, "ext.workspace")
    assert [r.message for r in report.failures] == [] and report.ok
