"""Fixtures for the extension host: a Manager whose extension runs in a worker process.

Every worker a test starts is stopped at its end (and checked gone), so no test leaks a process.
"""

from __future__ import annotations

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
def host_manager(make_manager) -> Callable[..., Manager]:  # type: ignore[no-untyped-def]
    """``make(limits=None)``: a Manager whose process extensions are bound to its call limits."""
    made: list[Manager] = []

    def make(limits: CallLimits | None = None) -> Manager:
        mgr = make_manager(call_limits=limits) if limits else make_manager()
        for loaded in mgr.catalog.extensions.values():
            if loaded.runtime == "process":
                loaded.instance(mgr.home, limits=mgr.limits)
        made.append(mgr)
        return mgr

    yield make
    pids = []
    for mgr in made:
        for loaded in mgr.catalog.extensions.values():
            inst = loaded._instance
            if isinstance(inst, ProcessExtension):
                pid = inst.pid()
                inst.close()
                if pid:
                    pids.append(pid)
    assert all(wait_gone(pid) for pid in pids), f"workers still running: {pids}"
