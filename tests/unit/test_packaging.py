"""The wheel ships the built-in manifests, profiles and registry as package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_builtin_config(tmp_path):
    pytest.importorskip("hatchling")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("sand_boxer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind, folder in (("ext.local.yaml", "extensions"), ("profile.local.yaml", "profiles"),
                         ("capabilities.yaml", "registry")):
        assert f"sandboxer/_data/{folder}/{kind}" in names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("sandboxer/_data/extensions/")}
    assert shipped == {p.name for p in (ROOT / "extensions").glob("ext.*.yaml")}
    assert "sandboxer/cli.py" in names and not any(n.startswith("tests/") for n in names)


def test_installed_layout_prefers_package_data(tmp_path, monkeypatch):
    import sandboxer.loader as loader

    pkg = tmp_path / "sandboxer"
    (pkg / "_data" / "profiles").mkdir(parents=True)
    monkeypatch.setattr(loader, "_PKG_DIR", pkg)
    assert loader.builtin_dir("profiles") == pkg / "_data" / "profiles"
    assert loader.builtin_dir("extensions") == tmp_path / "extensions"  # source checkout fallback
