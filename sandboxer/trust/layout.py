"""Where installed bundles live under a manager's home; read by the catalog on every start, so light.

``<home>/extensions/<name>/<version>/`` holds one unpacked, verified bundle (its ``ext.*.yaml`` and
``lib/``); ``<home>/extensions/<name>/current`` links the version in use (sandboxer.trust.installer).
"""

from __future__ import annotations

from pathlib import Path

EXTENSIONS_DIR = "extensions"
CURRENT = "current"


def installed_manifests(home: Path) -> list[tuple[Path, Path]]:
    """(manifest, import path) of each installed extension's ``current`` version under ``home``."""
    root = Path(home) / EXTENSIONS_DIR
    out: list[tuple[Path, Path]] = []
    if not root.is_dir():
        return out
    for base in sorted(root.iterdir()):
        link = base / CURRENT
        if base.name.startswith(".") or not link.is_symlink():
            continue
        version = link.resolve()
        for manifest in sorted(version.glob("ext.*.yaml")):
            out.append((manifest, version / "lib"))
    return out
