"""Fixtures for signed bundles: a real wheel of examples/sandboxer-workspace, a publisher key pair
made here, a bundle directory (manifest + artifact) and an operator config dir for trust.yaml."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
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


def build_wheel(source: Path, out: Path) -> Path:
    """A real wheel of the package at ``source`` (pip wheel with hatchling, no network), in ``out``."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(source)], check=True, timeout=240, capture_output=True)
    (whl,) = out.glob("*.whl")
    return whl


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """A real wheel of the example package, built once."""
    return build_wheel(EXAMPLE, tmp_path_factory.mktemp("wheel"))


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


def manifest_text(version: str = "0.1.0", *, ext_id: str = "ext.workspace", grants: list[str] | None = None,
                  dependencies: dict[str, str] | None = None, publisher: str = "acme",
                  worker: dict | None = None) -> str:
    """A bundle manifest of the example package at ``version`` (grants: just its home by default)."""
    import yaml

    data = yaml.safe_load(MANIFEST)
    data.update(id=ext_id, version=version, publisher=publisher, dependencies=dependencies or {})
    data["capabilities"]["grants"] = ["fs:write:workspaces"] if grants is None else grants
    if worker is not None:
        data["worker"] = worker
    return yaml.safe_dump(data, sort_keys=False)


class Publisher:
    """A registry directory being published into: ``add(version, ...)`` signs a bundle and lists it."""

    def __init__(self, root: Path, wheel: Path, key: SigningKey):
        self.root, self.wheel, self.key = root, wheel, key
        self.entries: list[dict] = []
        root.mkdir(parents=True, exist_ok=True)
        self._write()

    def _write(self) -> None:
        import yaml

        (self.root / "index.yaml").write_text(yaml.safe_dump({"bundles": self.entries}, sort_keys=False))

    def add(self, version: str = "0.1.0", *, deprecated: bool = False, reason: str | None = None,
            sign: bool = True, key: SigningKey | None = None, folder: str | None = None, **kw) -> Path:
        from sandboxer.trust import sign_bundle

        ext_id = kw.get("ext_id", "ext.workspace")
        d = self.root / (folder or f"{ext_id.removeprefix('ext.')}/{version}")
        d.mkdir(parents=True, exist_ok=True)
        artifact = d / self.wheel.name
        shutil.copyfile(self.wheel, artifact)
        manifest = d / f"{ext_id}.yaml"
        manifest.write_text(manifest_text(version, **kw), encoding="utf-8")
        if sign:
            sign_bundle(manifest, key or self.key, artifact)
        entry = {"manifest": str(manifest.relative_to(self.root))}
        if deprecated:
            entry["deprecated"] = True
        if reason:
            entry["reason"] = reason
        self.entries.append(entry)
        self._write()
        return manifest


@pytest.fixture
def trusted(operator_dir, acme) -> Path:
    """The operator's config dir, trusting acme's key."""
    from sandboxer.trust import add_trusted_key

    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    return operator_dir


@pytest.fixture
def publish(tmp_path, wheel, acme, trusted) -> Publisher:
    """A registry directory the operator's trust.yaml lists (``registries: [<dir>]``)."""
    import yaml

    reg = Publisher(tmp_path / "acme-registry", wheel, acme)
    tf = trusted / "trust.yaml"
    data = yaml.safe_load(tf.read_text())
    data["registries"] = [str(reg.root)]
    tf.write_text(yaml.safe_dump(data))
    return reg


@pytest.fixture
def http_registry(publish):
    """The same registry directory served over HTTP on 127.0.0.1; yields its URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(publish.root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    t.join(10)


@pytest.fixture(autouse=True)
def _example_package_set_aside():
    """The example bundle's package is installed in the test environment, and tests elsewhere import
    it. Set it aside for each trust test, so "not in sys.modules" means "not imported by this test";
    put back afterwards."""
    import sys

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "sandboxer_workspace"}
    yield
    for k in [k for k in sys.modules if k.split(".")[0] == "sandboxer_workspace"]:
        del sys.modules[k]
    sys.modules.update(saved)
