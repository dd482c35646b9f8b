"""Running an installed bundle: its worker gets the bundle's unpacked package on its import path.

An installed extension (:mod:`sandboxer.trust.installer`) always runs out of process. Its package
is in ``<home>/extensions/<id>/<version>/lib``, which is put first on the *worker's* import path
(and bound read-only into a namespaced worker, whose view of the manager's home is otherwise
empty); the manager's own ``sys.path`` never holds it, so nothing of the bundle can be imported
into the manager, and its entry points are seen by its worker alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sandboxer.host.client import HANDSHAKE_TIMEOUT, ProcessExtension, _tail, confine, worker_env
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
    from sandboxer import errors
    from sandboxer.loader import HandlerInfo

    manifest = loaded.manifest
    source = str(loaded.source)
    payload = {"manifest": manifest.model_dump(mode="json"), "source": source,
               "config_source": str(loaded.config_overrides[-1]) if loaded.config_overrides else source,
               "options": loaded.pending_options}
    with tempfile.TemporaryDirectory(prefix="sandboxer-describe-") as tmp:
        private = Path(tmp)
        argv = confine_installed(manifest, Path(os.environ.get("SANDBOXER_HOME") or private), private,
                                 [sys.executable, "-m", "sandboxer.host", "--describe", "--extension", manifest.id],
                                 import_path)
        try:
            done = subprocess.run(argv, input=json.dumps(payload).encode(), capture_output=True,
                                  env={**worker_env(private, {}), **import_env(import_path)}, cwd=private,
                                  timeout=HANDSHAKE_TIMEOUT, close_fds=True, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise errors.ExtensionLoadError(
                f"{source}: field 'handler' (value {manifest.handler!r}): loading the handler in a worker did not "
                f"finish within {HANDSHAKE_TIMEOUT:g}s; last stderr: {_tail(exc.stderr)!r}") from None
    try:
        answer = json.loads(done.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = f"exited with status {done.returncode}" if done.returncode >= 0 else \
            f"died of signal {signal.Signals(-done.returncode).name}"
        raise errors.ExtensionLoadError(
            f"{source}: field 'handler' (value {manifest.handler!r}): the worker loading the handler {why} without "
            f"an answer; last stderr: {_tail(done.stderr)!r}") from None
    if "error" in answer:
        cls = getattr(errors, str(answer["error"].get("type")), None)
        if not (isinstance(cls, type) and issubclass(cls, errors.ConfigError)):
            cls = errors.ExtensionLoadError
        raise cls(str(answer["error"].get("message")))
    ok = answer["ok"]
    loaded.info = HandlerInfo.from_json(ok)
    loaded.missing_extra = ok.get("missing_extra")
    loaded.refusals = {(str(slug), int(index)): [str(r) for r in reasons]
                       for slug, index, reasons in ok.get("refusals") or ()}
    loaded.pending_options = []
