"""Fixtures for the extension host: a Manager whose extension runs in a worker process.

Every worker a test starts is stopped at its end (and checked gone), so no test leaks a process.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from sandboxer import Manager
from sandboxer.deadline import CallLimits
from sandboxer.host.client import ProcessExtension, wait_gone

STUB_PROCESS = """
    id: ext.stubproc
    title: SaaS stand-in, out of process
    version: 0.1.0
    handler: sandboxer.extensions.saas_stub:SaasStubExtension
    runtime: process
    capabilities:
      isolation_levels: [microvm]
      pricing_model: metered
      features: [exec, snapshots, metering, list_owned]
    config: {capacity: 5}
"""

STUB_PROFILE = """
    slug: stubproc
    extension: ext.stubproc
    ready_timeout: 5s
"""


@pytest.fixture
def host_manager(cfg, home) -> Callable[..., Manager]:  # type: ignore[no-untyped-def]
    """``make(limits=None, config_dirs=[cfg])``: a Manager whose process extensions are bound to its
    call limits. At the end its sandboxes are torn down and every worker is stopped and checked gone."""
    made: list[Manager] = []

    def make(limits: CallLimits | None = None, config_dirs=None) -> Manager:  # type: ignore[no-untyped-def]
        mgr = Manager(config_dirs=config_dirs or [cfg.root], home=home, call_limits=limits)
        for loaded in mgr.catalog.extensions.values():
            if loaded.runtime == "process":
                loaded.instance(mgr.home, limits=mgr.limits)
        made.append(mgr)
        return mgr

    yield make
    pids = []
    for mgr in made:
        for sb in mgr.list():
            try:
                mgr.teardown(sb.id)
            except Exception:  # noqa: BLE001 - best effort; the test already reported
                pass
        mgr.close()
        for loaded in mgr.catalog.extensions.values():
            inst = loaded._instance
            if isinstance(inst, ProcessExtension):
                pid = inst.pid()
                inst.close()
                if pid:
                    pids.append(pid)
    assert all(wait_gone(pid) for pid in pids), f"workers still running: {pids}"


REPO = Path(__file__).resolve().parents[2]
PACKAGES = [REPO / "examples" / "sandboxer-workspace", REPO / "tests" / "host" / "misbehaving"]


@pytest.fixture(scope="package")
def installed_examples(tmp_path_factory) -> Path:
    """The example package and the misbehaving one, pip-installed into a throwaway target dir
    put on ``sys.path`` for the tests of this package only (the shared venv is not touched, and
    no later test sees the example's shipped config); workers inherit the import path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), *map(str, PACKAGES)], check=True, timeout=240,
                   cwd=target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    importlib.invalidate_caches()
