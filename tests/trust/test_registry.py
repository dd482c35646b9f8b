"""Registries: a directory and an HTTP index of the same layout, semver-aware latest, deprecated
versions, duplicates, and `sandboxer extensions search` / `info` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxer.trust.registry import Registries, RegistryError, configured_registries

REPO = Path(__file__).resolve().parents[2]


def _cli(tmp_path, operator, *args):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SANDBOXER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "sandboxer", "--config", str(operator), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_latest_is_semver_aware_and_skips_deprecated(publish, trusted):
    for v in ("0.9.0", "0.10.0", "0.11.0-rc1"):
        publish.add(v)
    publish.add("0.12.0", deprecated=True, reason="writes outside its home")
    regs = Registries.load(configured_registries([trusted]))
    assert [x.version for x in regs.versions("workspace")] == ["0.9.0", "0.10.0", "0.11.0-rc1", "0.12.0"]
    assert regs.choose("workspace").version == "0.11.0-rc1"  # 0.10 > 0.9; deprecated 0.12 not chosen
    assert regs.choose("ext.workspace", version="0.12.0").version == "0.12.0"  # ==VERSION: asked for
    assert regs.choose("workspace", allow_deprecated=True).version == "0.12.0"
    assert regs.choose("workspace", specifier="<0.10").version == "0.9.0"


def test_only_deprecated_says_how_to_ask(publish, trusted):
    publish.add("1.0.0", deprecated=True)
    with pytest.raises(RegistryError, match=r"ext.workspace: only deprecated versions are listed \(1.0.0\); "
                                            r"install one with ext.workspace==1.0.0 or --allow-deprecated"):
        Registries.load(configured_registries([trusted])).choose("workspace")


def test_duplicate_name_and_version_names_both_files(publish, trusted):
    a = publish.add("1.0.0", folder="a")
    b = publish.add("1.0.0", folder="b")
    with pytest.raises(RegistryError) as err:
        Registries.load(configured_registries([trusted]))
    assert f"ext.workspace 1.0.0 is listed twice: in {a} and in {b}" in str(err.value)


def test_a_manifest_outside_the_registry_is_refused(publish, trusted):
    (publish.root / "index.yaml").write_text("bundles:\n  - manifest: ../elsewhere/ext.x.yaml\n")
    with pytest.raises(RegistryError, match=r"field 'bundles.0.manifest' \(value '../elsewhere/ext.x.yaml'\): "
                                            r"must be a path inside the registry"):
        Registries.load(configured_registries([trusted]))


def test_an_http_index_lists_and_fetches_the_same_bundles(publish, http_registry, tmp_path, trusted):
    from sandboxer.trust import load_trust, verify

    publish.add("0.1.0")
    publish.add("0.2.0")
    regs = Registries.load([http_registry])
    x = regs.choose("workspace")
    assert x.version == "0.2.0" and x.location == f"{http_registry}workspace/0.2.0/ext.workspace.yaml"
    local = x.fetch(tmp_path / "fetched")
    assert sorted(p.name for p in local.parent.iterdir()) == sorted(
        ["ext.workspace.yaml", "ext.workspace.yaml.sig", publish.wheel.name])
    assert verify(local, None, load_trust([trusted]), {}).manifest.version == "0.2.0"


def test_an_http_registry_that_is_down_is_named(tmp_path):
    with pytest.raises(RegistryError, match=r"registry http://127.0.0.1:9/: GET http://127.0.0.1:9/index.yaml: "):
        Registries.load(["http://127.0.0.1:9/"])


def test_search_and_info_on_the_command_line(publish, trusted, tmp_path):
    publish.add("0.1.0", deprecated=True, reason="old")
    publish.add("0.2.0", grants=["fs:write:workspaces", "network:egress:*.example.com"])
    found = _cli(tmp_path, trusted, "extensions", "search", "workspace", "--json")
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)  # a list: a JSON array of objects
    assert [(r["id"], r["version"], r["deprecated"]) for r in rows] == [
        ("ext.workspace", "0.1.0", True), ("ext.workspace", "0.2.0", False)]
    assert rows[1]["publisher"] == "acme" and rows[1]["grants"] == ["fs:write:workspaces",
                                                                    "network:egress:*.example.com"]
    table = _cli(tmp_path, trusted, "extensions", "search")
    assert "ext.workspace  0.1.0  acme  DEPRECATED (old)" in table.stdout
    assert "ext.workspace  0.2.0  acme" in table.stdout
    assert _cli(tmp_path, trusted, "extensions", "search", "nothing-like-it").stdout == "no bundle matches\n"
    info = _cli(tmp_path, trusted, "extensions", "info", "workspace", "--json")
    data = json.loads(info.stdout)
    assert data["latest"] == "0.2.0" and [v["version"] for v in data["versions"]] == ["0.1.0", "0.2.0"]
    assert data["installed"] is None
    text = _cli(tmp_path, trusted, "extensions", "info", "workspace").stdout
    assert "ext.workspace: Local subprocess workspaces (example), publisher acme" in text
    assert "latest: 0.2.0" in text and "grants: fs:write:workspaces, network:egress:*.example.com" in text
    missing = _cli(tmp_path, trusted, "extensions", "info", "nope")
    assert missing.returncode == 78 and missing.stderr.startswith("error: ext.nope: not in any registry (")


def test_info_of_a_bundle_with_only_deprecated_versions(publish, trusted, tmp_path):
    publish.add("1.0.0", deprecated=True, reason="superseded")
    data = json.loads(_cli(tmp_path, trusted, "extensions", "info", "workspace", "--json").stdout)
    assert data["latest"] is None and [(v["version"], v["reason"]) for v in data["versions"]] == [("1.0.0", "superseded")]
    text = _cli(tmp_path, trusted, "extensions", "info", "workspace").stdout
    assert "latest: none (only deprecated versions are listed; install one with ==VERSION)" in text
