"""Fixtures for signed bundles: a real wheel of examples/sandboxer-workspace, a publisher key pair
made here, a bundle directory (manifest + artifact) and an operator config dir for trust.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from sandboxer.trust import SigningKey

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sandboxer-workspace"

MANIFEST = """\
# A bundle manifest: the ext.workspace.yaml fields, plus what a signed bundle declares.
id: ext.workspace
title: Local subprocess workspaces (example)
version: 0.1.0
handler: workspace
runtime: process
publisher: acme
abi: 2
capabilities:
  isolation_levels: [none]
  pricing_model: free
  features: [exec, list_owned]
  grants:
    - fs:write:workspaces
    - secrets:read:env:WORKSPACE_TOKEN
    - network:egress:*.example.com
dependencies: {}
config:
  max_workspaces: 50
"""


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """A real wheel of the example package, built once (pip wheel with hatchling, no network)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(EXAMPLE)], check=True, timeout=240, capture_output=True)
    (whl,) = out.glob("sandboxer_workspace-*.whl")
    return whl


@pytest.fixture
def acme() -> SigningKey:
    """The publisher's key pair, made in the test."""
    return SigningKey.generate()


@pytest.fixture
def bundle(tmp_path, wheel) -> Callable[..., tuple[Path, Path]]:
    """``make(text=MANIFEST)``: (manifest path, artifact path) in a fresh bundle dir, unsigned."""

    def make(text: str = MANIFEST) -> tuple[Path, Path]:
        d = tmp_path / "bundle"
        d.mkdir(exist_ok=True)
        artifact = d / wheel.name
        shutil.copyfile(wheel, artifact)
        manifest = d / "ext.workspace.yaml"
        manifest.write_text(text, encoding="utf-8")
        return manifest, artifact

    return make


@pytest.fixture
def operator_dir(tmp_path) -> Path:
    """The operator's config dir (where trust.yaml lives)."""
    d = tmp_path / "operator"
    d.mkdir()
    return d
