"""The installer end to end: search, info, install from a registry, a sandbox created and torn down
through the installed bundle's out-of-process worker, disable (create refused, teardown of a live
one still works), enable, upgrade, remove; the audit trail of it all. Atomic unpack, dependencies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandboxer import Manager
from sandboxer.state import StateStore
from sandboxer.state.extensions import LifecycleError
from sandboxer.trust import load_trust
from sandboxer.trust.installer import DependencyError, Installer
from sandboxer.trust.registry import Registries, configured_registries

REPO = Path(__file__).resolve().parents[2]

PROFILE = """\
slug: ws
extension: ext.workspace
ready_timeout: 20s
ttl: {default: 10m, max: 1h}
network: {egress: none}
"""


@pytest.fixture
def cli(tmp_path, trusted):
    """``run(*args)`` of the sandboxer command with the operator's config and a home of its own."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SANDBOXER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}

    def run(*args, check=0):
        p = subprocess.run([sys.executable, "-m", "sandboxer", "--config", str(trusted), *map(str, args)],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
        if check is not None:
            assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
        return p

    return run


def _installer(tmp_path, trusted, **kw):
    state = StateStore(home=tmp_path / "home")
    return Installer(tmp_path / "home", state, load_trust([trusted]),
                     lambda: Registries.load(configured_registries([trusted])), who="tester", **kw), state


def test_the_happy_path_end_to_end(publish, trusted, cli, tmp_path):
    publish.add("0.1.0")
    publish.add("0.2.0")
    (trusted / "profiles").mkdir()
    (trusted / "profiles" / "profile.ws.yaml").write_text(PROFILE)
    home = tmp_path / "home"
    assert "ext.workspace  0.2.0  acme" in cli("extensions", "search", "workspace").stdout
    assert json.loads(cli("extensions", "info", "workspace", "--json").stdout)["latest"] == "0.2.0"

    out = cli("extensions", "install", "workspace==0.1.0").stdout
    version_dir = home / "extensions" / "ext.workspace" / "0.1.0"
    assert out == f"installed ext.workspace 0.1.0 from acme: active ({version_dir})\n"
    assert (home / "extensions" / "ext.workspace" / "current").resolve() == version_dir
    assert (version_dir / "lib" / "sandboxer_workspace" / "backend.py").is_file()
    assert "sandboxer_workspace" not in sys.modules  # nothing of it was imported here

    mgr = Manager(config_dirs=[trusted], home=home)
    try:
        loaded = mgr.catalog.extensions["ext.workspace"]
        assert loaded.runtime == "process" and loaded.import_path == version_dir / "lib"
        sb = mgr.create(profile="ws", consumer="me")
        res = mgr.exec(sb.id, ["sh", "-c", "echo hi from $PWD"])
        assert res.exit_code == 0 and res.stdout.startswith("hi from ")
        worker = mgr.extension("ext.workspace").pid()
        assert worker is not None and worker != os.getpid()  # it ran in the worker, not here
        assert "sandboxer_workspace" not in sys.modules
        live = mgr.create(profile="ws", consumer="me")
        assert mgr.teardown(sb.id).state.value == "terminated"

        assert cli("extensions", "disable", "workspace", "--reason", "incident 42").stdout == \
            "disabled ext.workspace 0.1.0 from acme: disabled\n"
        with pytest.raises(LifecycleError, match=r"^ext.workspace is disabled: it takes no new sandboxes "
                                                 r"\(`sandboxer extensions enable ext.workspace` makes it active again\)$"):
            mgr.create(profile="ws", consumer="me")
        busy = cli("extensions", "remove", "workspace", check=67)
        assert busy.stderr == f"error: ext.workspace has live sandboxes ({live.id}); tear them down first " \
                              f"(`sandboxer teardown ID`)\n"
        assert mgr.exec(live.id, ["true"]).exit_code == 0  # a live one is still served
        assert mgr.teardown(live.id).state.value == "terminated"  # and still goes
        refused = cli("extensions", "disable", "workspace", check=67)
        assert refused.stderr == "error: ext.workspace is disabled; it cannot become disabled (from disabled it " \
                                 "can only become active)\n"
        cli("extensions", "enable", "workspace")
        again = mgr.create(profile="ws", consumer="me")
        assert mgr.teardown(again.id).state.value == "terminated"
    finally:
        mgr.close()

    assert cli("extensions", "upgrade", "workspace").stdout == \
        "upgraded ext.workspace 0.1.0 -> 0.2.0 from acme: active\n"
    assert not version_dir.exists() and (home / "extensions" / "ext.workspace" / "current").resolve().name == "0.2.0"
    mgr = Manager(config_dirs=[trusted], home=home)
    try:
        assert mgr.catalog.extensions["ext.workspace"].manifest.version == "0.2.0"
        sb = mgr.create(profile="ws", consumer="me")
        assert mgr.teardown(sb.id).state.value == "terminated"
    finally:
        mgr.close()
    rollback = cli("extensions", "install", "workspace==0.1.0", check=77)
    assert rollback.stderr.endswith("a rollback is refused (install 0.2.0 or later)\n")  # verified first
    assert "already installed (version 0.2.0, active)" in cli("extensions", "install", "workspace", check=67).stderr

    assert cli("extensions", "remove", "workspace").stdout == "removed ext.workspace 0.2.0\n"
    assert list((home / "extensions").iterdir()) == []
    refused = cli("extensions", "install", "workspace==0.1.0", check=77)  # removed, but never below 0.2.0
    assert "a rollback is refused (install 0.2.0 or later)" in refused.stderr

    events = json.loads(cli("extensions", "audit", "workspace", "--json").stdout)
    steps = [(e["what"], e["from_state"], e["to_state"], e["version"]) for e in events]
    assert steps == [
        ("transition", None, "verified", "0.1.0"), ("transition", "verified", "installed", "0.1.0"),
        ("transition", "installed", "active", "0.1.0"), ("install", None, None, "0.1.0"),
        ("transition", "active", "disabled", "0.1.0"), ("transition", "disabled", "active", "0.1.0"),
        ("upgrade", "active", None, "0.1.0"), ("transition", None, "verified", "0.2.0"),
        ("transition", "verified", "installed", "0.2.0"), ("transition", "installed", "active", "0.2.0"),
        ("upgrade", None, None, "0.2.0"), ("verify_failed", None, None, "0.1.0"),
        ("remove", "active", None, "0.2.0"), ("verify_failed", None, None, "0.1.0"),
    ]
    assert events[4]["reason"] == "incident 42" and events[-1]["reason"] == "rollback"
    import getpass

    assert {e["who"] for e in events} == {getpass.getuser()}
    assert all(e["when"].endswith("Z") for e in events)
    table = cli("extensions", "audit", "workspace").stdout
    assert "ext.workspace 0.1.0  transition active -> disabled  (incident 42)" in table


def test_an_interrupted_install_leaves_nothing(publish, trusted, tmp_path, monkeypatch):
    publish.add("0.1.0")
    inst, state = _installer(tmp_path, trusted)

    def crash(tmp):  # the fault: after a complete unpack, before the rename into place
        assert (tmp / "lib" / "sandboxer_workspace").is_dir()
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(inst, "_before_rename", crash)
    with pytest.raises(KeyboardInterrupt):
        inst.install("workspace")
    root = tmp_path / "home" / "extensions"
    assert [p.name for p in root.rglob("*")] == ["ext.workspace"]  # an empty folder, no version, no current
    assert state.installed_extension("ext.workspace") is None and state.installed_versions() == {}
    assert [e["what"] for e in state.audit_events("ext.workspace")][-1] == "install_failed"
    monkeypatch.undo()
    assert inst.install("workspace")["state"] == "active"  # and the next try installs it whole
    state.close()


def test_a_missing_dependency_is_named_with_its_specifier(publish, trusted, tmp_path):
    manifest = publish.add("0.1.0", dependencies={"ext.base": ">=1.2,<2"})
    inst, state = _installer(tmp_path, trusted)
    with pytest.raises(DependencyError) as err:
        inst.install(str(manifest))
    assert str(err.value).startswith(f"{manifest}: ext.workspace needs ext.base>=1.2,<2, which is not installed and "
                                     f"cannot be installed from a registry (ext.base: not in any registry (")
    assert not (tmp_path / "home" / "extensions" / "ext.workspace").exists()
    assert state.audit_events("ext.workspace")[-1]["reason"] == "dependency"
    state.close()


def test_a_dependency_is_installed_from_the_registry(publish, trusted, tmp_path):
    publish.add("1.1.0", ext_id="ext.base")
    publish.add("1.3.0", ext_id="ext.base")
    publish.add("2.0.0", ext_id="ext.base")
    publish.add("0.1.0", dependencies={"ext.base": ">=1.2,<2"})
    inst, state = _installer(tmp_path, trusted)
    assert inst.install("workspace")["version"] == "0.1.0"
    assert state.installed_extension("ext.base")["version"] == "1.3.0"
    with pytest.raises(Exception, match=r"ext.base is needed by ext.workspace; remove it first"):
        inst.remove("base")
    state.close()


def test_deprecated_is_not_installed_unless_asked_for(publish, trusted, tmp_path):
    publish.add("0.1.0")
    publish.add("0.2.0", deprecated=True)
    inst, state = _installer(tmp_path, trusted)
    assert inst.install("workspace")["version"] == "0.1.0"
    with pytest.raises(LifecycleError, match="0.1.0 is installed and is the latest listed"):
        inst.upgrade("workspace")
    assert inst.upgrade("workspace", allow_deprecated=True)["version"] == "0.2.0"
    state.close()


def test_lifecycle_refusals_name_the_current_state(publish, trusted, tmp_path):
    publish.add("0.1.0")
    inst, state = _installer(tmp_path, trusted)
    with pytest.raises(LifecycleError, match=r"^ext.workspace is not installed; `sandboxer extensions install "
                                             r"ext.workspace` installs it$"):
        inst.enable("workspace")
    inst.install("workspace")
    with pytest.raises(LifecycleError, match=r"^ext.workspace is active; it cannot become active \(from active "
                                             r"it can only become disabled\)$"):
        inst.enable("workspace")
    state.close()


def test_install_from_an_http_registry(publish, http_registry, trusted, tmp_path):
    import yaml

    publish.add("0.3.0")
    tf = trusted / "trust.yaml"
    data = yaml.safe_load(tf.read_text())
    data["registries"] = [http_registry]  # only the HTTP index now
    tf.write_text(yaml.safe_dump(data))
    inst, state = _installer(tmp_path, trusted)
    row = inst.install("workspace")
    assert (row["version"], row["source"]) == ("0.3.0", f"{http_registry}workspace/0.3.0/ext.workspace.yaml")
    assert (Path(row["path"]) / "lib" / "sandboxer_workspace").is_dir()
    assert [p.name for p in (tmp_path / "home" / "extensions").iterdir()] == ["ext.workspace"]  # staging gone
    state.close()


def test_an_installed_manifest_edited_to_run_in_process_is_refused(publish, trusted, tmp_path):
    from sandboxer.errors import ManifestError
    from sandboxer.loader import load_catalog

    publish.add("0.1.0")
    inst, state = _installer(tmp_path, trusted)
    path = Path(inst.install("workspace")["path"]) / "ext.workspace.yaml"
    state.close()
    path.write_text(path.read_text().replace("runtime: process", "runtime: in-process"))
    with pytest.raises(ManifestError, match=rf"^{path}: field 'runtime' \(value 'in-process'\): an installed bundle "
                                            rf"always runs out of process; reinstall it"):
        load_catalog([trusted], installed=tmp_path / "home")
    assert "sandboxer_workspace" not in sys.modules


def test_a_disabled_extension_is_skipped_by_routing_with_the_reason(publish, trusted, tmp_path):
    publish.add("0.1.0")
    (trusted / "extensions").mkdir()
    (trusted / "extensions" / "ext.fake.yaml").write_text(textwrap.dedent("""\
        id: ext.fake
        title: Fake
        version: 1.0.0
        handler: sandboxer.extensions.fake:FakeExtension
        capabilities: {isolation_levels: [none], pricing_model: free, features: [exec]}
        """))
    (trusted / "profiles").mkdir()
    (trusted / "profiles" / "profile.both.yaml").write_text(textwrap.dedent("""\
        slug: both
        backends: [{extension: ext.workspace}, {extension: ext.fake}]
        ready_timeout: 20s
        ttl: {default: 10m, max: 1h}
        network: {egress: none}
        """))
    inst, state = _installer(tmp_path, trusted)
    inst.install("workspace")
    inst.disable("workspace", reason="under review")
    state.close()
    mgr = Manager(config_dirs=[trusted], home=tmp_path / "home")
    try:
        sb = mgr.create(profile="both", consumer="me")
        assert sb.extension == "ext.fake"
        intent = [e for e in mgr.events(sb.id) if e["kind"] == "create_intent"][0]
        assert intent["detail"]["route"]["tried_before"] == [{
            "backend": "ext.workspace", "host": None, "sandbox_id": None,
            "error": "LifecycleError: ext.workspace is disabled: it takes no new sandboxes (`sandboxer extensions "
                     "enable ext.workspace` makes it active again)"}]
        mgr.teardown(sb.id)
    finally:
        mgr.close()


def test_a_namespaced_worker_sees_the_bundle_but_not_the_rest_of_the_home(publish, trusted, tmp_path):
    import shutil

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    publish.add("0.1.0", worker={"sandbox": "namespace"})
    (trusted / "profiles").mkdir()
    (trusted / "profiles" / "profile.ws.yaml").write_text(PROFILE)
    inst, state = _installer(tmp_path, trusted)
    lib = Path(inst.install("workspace")["path"]) / "lib"
    state.close()
    home = tmp_path / "home"
    mgr = Manager(config_dirs=[trusted], home=home)
    try:
        sb = mgr.create(profile="ws", consumer="me")
        seen = mgr.exec(sb.id, ["sh", "-c", f"ls {lib}; ls {home}; test -e {home}/state.db || echo no-state-db"])
        assert "sandboxer_workspace" in seen.stdout and "no-state-db" in seen.stdout, seen
        mgr.teardown(sb.id)
    finally:
        mgr.close()
