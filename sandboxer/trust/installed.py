"""Running an installed bundle: its worker gets the bundle's unpacked package on its import path.

An installed extension (:mod:`sandboxer.trust.installer`) always runs out of process. Its package
is in ``<home>/extensions/<id>/<version>/lib``, which is put first on the *worker's* import path
(and bound read-only into a namespaced worker, whose view of the manager's home is otherwise
empty); the manager's own ``sys.path`` never holds it, so nothing of the bundle can be imported
into the manager, and its entry points are seen by its worker alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from sandboxer.host.client import ProcessExtension, confine, describe_process
from sandboxer.models import ExtensionManifest


def import_env(import_path: Path) -> dict[str, str]:
    """PYTHONPATH for a worker of an installed bundle: its package first, then what the manager imports."""
    return {"PYTHONPATH": os.pathsep.join([str(import_path), *(p for p in sys.path if p)])}


def confine_installed(manifest: ExtensionManifest, hidden: Path, private: Path, argv: list[str],
                      import_path: Path) -> list[str]:
    """:func:`~sandboxer.host.client.confine`, the bundle's package bound read-only when namespaced."""
    out = confine(manifest, hidden, private, argv)
    if out is argv or "--chdir" not in out:
        return out
    at = out.index("--chdir")
    return out[:at] + ["--ro-bind", str(import_path), str(import_path)] + out[at:]


class InstalledProcessExtension(ProcessExtension):
    """A :class:`ProcessExtension` whose worker imports the handler from the installed bundle's package."""

    def __init__(self, manifest: ExtensionManifest, info: Any, *, home: Path, import_path: Path, **kw: Any):
        super().__init__(manifest, info, home=home, **kw)
        self.import_path = Path(import_path)

    def confine(self, argv: list[str]) -> list[str]:
        return confine_installed(self.manifest, self.home, self.private_dir, argv, self.import_path)

    def secrets(self) -> dict[str, str]:
        # worker_env() lays these over its minimal environment: PYTHONPATH here replaces the manager's.
        return {**super().secrets(), **import_env(self.import_path)}


def describe_installed(loaded: Any, import_path: Path) -> None:
    """:func:`~sandboxer.host.client.describe_process` for an installed bundle (its package on the worker's path).

    Raises:
        ConfigError (the subclass the worker named): the handler or its config is refused.
        ExtensionLoadError: the worker crashed, hung, or answered garbage.
    """
    describe_process(loaded, confine_with=lambda m, hidden, private, argv: confine_installed(
        m, hidden, private, argv, import_path), extra_env=import_env(import_path))
