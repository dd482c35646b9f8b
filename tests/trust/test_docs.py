"""docs/extensions-trust.md works as pasted: the publisher's and the operator's commands, the
manifest and trust.yaml examples, run through the ``sandboxer`` command line in a tmp dir."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from sandboxer.trust import load_trust
from sandboxer.trust.bundle import parse_manifest, read_manifest_data

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "extensions-trust.md"
FENCE = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```\n', re.MULTILINE | re.DOTALL)


def _blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for _lang, title, body in FENCE.findall(DOC.read_text(encoding="utf-8")):
        assert title not in blocks, f"{DOC}: two blocks titled {title!r}"
        blocks[title] = body
    return blocks


def test_the_workflows_run_as_pasted(tmp_path, wheel):
    blocks = _blocks()
    assert set(blocks) == {"bundle/ext.workspace.yaml", "publisher", "operator", "operator/trust.yaml", "python",
                           "registry-dir/index.yaml", "publish to a registry", "operator: install", "home layout",
                           "audit --json (one event)", "a handler in an installed bundle",
                           "operator/trust.yaml (narrowing)"}
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "ext.workspace.yaml").write_text(blocks["bundle/ext.workspace.yaml"])
    assert wheel.name in blocks["publisher"]
    shutil.copyfile(wheel, tmp_path / "bundle" / wheel.name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "sandboxer"  # the console script, bound to this interpreter
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m sandboxer "$@"\n')
    shim.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SANDBOXER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks["publisher"] + blocks["operator"]],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    kid = re.search(r"^key id: ([0-9a-f]{16})$", run.stdout, re.MULTILINE).group(1)
    assert f"signed bundle/ext.workspace.yaml with key {kid}" in run.stdout
    assert f"trusted key {kid} of publisher acme" in run.stdout
    assert re.search(r"^verified: ext.workspace 0.1.0 from acme, key " + kid, run.stdout, re.MULTILINE)
    assert f"revoked key {kid}" in run.stdout
    assert run.stdout.endswith("refused: the key is revoked\n")
    assert "key of publisher 'acme' is revoked in operator/trust.yaml" in run.stderr


def test_the_trust_yaml_example_loads(tmp_path):
    d = tmp_path / "operator"
    d.mkdir()
    (d / "trust.yaml").write_text(_blocks()["operator/trust.yaml"])
    store = load_trust([d])
    assert sorted(store.keys) == ["219ce33b26f7f021", "9445ce17a6aef5f8"]
    assert store.keys["9445ce17a6aef5f8"].key.not_after.year == 2027 and "0123456789abcdef" in store.revoked


def test_the_manifest_example_is_a_valid_bundle_manifest_once_signed(tmp_path):
    path = tmp_path / "ext.workspace.yaml"
    path.write_text(_blocks()["bundle/ext.workspace.yaml"])
    data = read_manifest_data(path)
    data["artifact"] = {"file": "x.whl", "sha256": "0" * 64}  # what sign fills in
    from sandboxer.host import ABI_VERSION

    assert parse_manifest(path, data).abi == ABI_VERSION


def test_every_dotted_name_in_the_doc_exists():
    import importlib

    missing = []
    for name in sorted(set(re.findall(r"`(sandboxer(?:\.\w+)+)", DOC.read_text(encoding="utf-8")))):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
    assert not missing, missing


def test_the_python_example_runs(tmp_path, wheel, monkeypatch):
    """The installer's seam as the doc shows it, on a bundle signed and trusted as the workflows do."""
    from sandboxer.trust import SigningKey, add_trusted_key, sign_bundle

    blocks = _blocks()
    (tmp_path / "bundle").mkdir()
    (tmp_path / "operator").mkdir()
    manifest = tmp_path / "bundle" / "ext.workspace.yaml"
    manifest.write_text(blocks["bundle/ext.workspace.yaml"])
    shutil.copyfile(wheel, tmp_path / "bundle" / wheel.name)
    key = SigningKey.generate()
    sign_bundle(manifest, key, tmp_path / "bundle" / wheel.name)
    add_trusted_key(tmp_path / "operator", "acme", key.public_key_b64())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(blocks["python"], scope)
    bundle = scope["bundle"]
    assert bundle.manifest.capabilities.grants == ["fs:write:workspaces", "network:egress:*.example.com"]  # as the comment says
    assert "publisher" not in bundle.extension_data() and bundle.extension_data()["id"] == "ext.workspace"


def _shell(tmp_path, wheel, script):
    blocks = _blocks()
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "ext.workspace.yaml").write_text(blocks["bundle/ext.workspace.yaml"])
    shutil.copyfile(wheel, tmp_path / "bundle" / wheel.name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "sandboxer"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m sandboxer "$@"\n')
    shim.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SANDBOXER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=180)


def test_the_install_workflow_runs_as_pasted(tmp_path, wheel):
    import getpass
    import json

    blocks = _blocks()
    assert wheel.name in blocks["publish to a registry"]
    run = _shell(tmp_path, wheel, blocks["publisher"] + blocks["publish to a registry"] + blocks["operator: install"])
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    out = run.stdout
    assert "ext.workspace  0.1.0  acme  Local subprocess workspaces (example)\n" in out
    assert "ext.workspace: Local subprocess workspaces (example), publisher acme\nlatest: 0.1.0\n" in out
    version_dir = tmp_path / "home" / "extensions" / "ext.workspace" / "0.1.0"
    assert f"installed ext.workspace 0.1.0 from acme: active ({version_dir})\n" in out
    assert "disabled ext.workspace 0.1.0 from acme: disabled\n" in out
    assert "enabled ext.workspace 0.1.0 from acme: active\n" in out
    assert f"{getpass.getuser()}  ext.workspace 0.1.0  transition active -> disabled  (under review)" in out
    assert out.endswith("removed ext.workspace 0.1.0\n")
    sample = json.loads(blocks["audit --json (one event)"])
    state = __import__("sandboxer.state", fromlist=["StateStore"]).StateStore(home=tmp_path / "home")
    try:
        real = [e for e in state.audit_events("ext.workspace") if e["to_state"] == "disabled"][0]
    finally:
        state.close()
    assert set(sample) - {"when"} <= set(real) and real["reason"] == sample["reason"]


def test_the_layout_and_index_examples_are_what_the_installer_makes(tmp_path, wheel):
    import yaml

    from sandboxer.trust.registry import IndexFile

    index = IndexFile.model_validate(yaml.safe_load(_blocks()["registry-dir/index.yaml"]))
    assert [e.manifest for e in index.bundles] == ["workspace/0.1.0/ext.workspace.yaml"]
    script = _blocks()["publisher"] + _blocks()["publish to a registry"] + \
        _blocks()["operator: install"].replace("sandboxer --config ops extensions remove workspace\n", "")
    assert _shell(tmp_path, wheel, script).returncode == 0
    base = tmp_path / "home" / "extensions" / "ext.workspace"
    layout = _blocks()["home layout"]
    assert "current -> 0.1.0" in layout and os.readlink(base / "current") == "0.1.0"
    for name in ("ext.workspace.yaml", "bundle.yaml", "bundle.yaml.sig", "artifact", "lib"):
        assert name in layout and (base / "0.1.0" / name).exists()


def test_the_narrowing_example_narrows_the_example_bundle(tmp_path):
    import yaml

    d = tmp_path / "operator"
    d.mkdir()
    (d / "trust.yaml").write_text(_blocks()["operator/trust.yaml (narrowing)"])
    declared = yaml.safe_load(_blocks()["bundle/ext.workspace.yaml"])["capabilities"]["grants"]
    got = load_trust([d]).grants_for("ext.workspace", declared)
    assert got.grants == ("fs:write:workspaces", "network:egress:api.example.com")
    assert got.egress("api.example.com") and not got.egress("www.example.com") and not got.secret_refs


def test_the_handler_example_names_only_what_exists():
    from sandboxer.host import brokered

    text = _blocks()["a handler in an installed bundle"]
    for name in re.findall(r"brokered\.(\w+)", text):
        assert hasattr(brokered, name), name
    compile(text, "example", "exec")
