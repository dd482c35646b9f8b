"""Fixtures for the warm-pool tests: a pooled ext.local profile, and a manager whose pools are
drained (and checked empty at the backend) when the test ends."""

from __future__ import annotations

import textwrap
import time
from typing import Callable

import pytest

from sandboxer import Manager

POOLED = """
    slug: warm
    extension: ext.local
    isolation: process
    ttl: {{default: 10m, max: 1h}}
    ready_timeout: 10s
    inputs: {{defaults: {{ref: main}}}}
    pool: {{size: {size}, max_age: {max_age}}}
"""


def write_pooled(cfg, size: int = 2, max_age: str = "5m", extra: str = "") -> None:  # type: ignore[no-untyped-def]
    cfg.write("profile.warm.yaml", textwrap.dedent(POOLED.format(size=size, max_age=max_age)) + extra)


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout}s")


def pooled_ready(mgr: Manager, slug: str = "warm") -> list[str]:
    return [s.id for s in mgr.list(pooled=True) if s.consumer == "sandboxer.pool" and s.profile == slug
            and s.state.value == "ready"]


def owned(mgr: Manager) -> set[str]:
    """The sandboxes ext.local holds for this manager's owner (the backend's own view)."""
    local = mgr.extension("ext.local")
    return {o.sandbox_id for o in local.list_owned(mgr.owner_labels)}


@pytest.fixture
def pool_manager(make_manager):  # type: ignore[no-untyped-def]
    """``make(**kw)``: a manager over the test's config; at the end its pools are drained, every
    sandbox it handed out torn down, and ext.local must hold nothing of it."""
    made: list[Manager] = []

    def make(**kw) -> Manager:  # type: ignore[no-untyped-def]
        mgr = make_manager(**kw)
        made.append(mgr)
        return mgr

    yield make
    for mgr in made:
        mgr.pools.stop()
        mgr.pools.drain()
        for sb in mgr.list(pooled=True):
            mgr.teardown(sb.id)
        left = owned(mgr)
        assert not left, f"sandboxes left at ext.local: {left}"
