"""Shared fixtures: an isolated home and config directory per test, and a Manager over them."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Callable

import pytest

from sandboxer import Manager
from tests.support.leaks import ComposeWatch, describe_leaks, host_network_leftovers


def run_threads(target: Callable[[], None], n: int, *, timeout: float = 60) -> None:
    """Start ``target`` on ``n`` threads at once and wait (bounded) for all of them."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout}s"


@pytest.fixture(scope="session", autouse=True)
def compose_watch(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Fails the run if a compose project of its own is left on the Docker engine (a network too)."""
    watch = ComposeWatch(tmp_path_factory.getbasetemp())
    watch.start()
    yield watch
    try:
        leaked = watch.check()
    finally:
        watch.stop()
    assert not leaked, f"compose projects left on the Docker engine by this run (now removed): {describe_leaks(leaked)}"


_CHECKOUT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="session", autouse=True)
def _no_host_network_leak_in_the_run():  # type: ignore[no-untyped-def]
    """The run leaves no sandbox network namespace, nftables table, interface or port forwarder."""
    before = host_network_leftovers(_CHECKOUT)
    yield
    left = host_network_leftovers(_CHECKOUT) - before
    assert not left, f"left on this host by this run: {sorted(left)}"


@pytest.fixture
def no_host_network_leak():  # type: ignore[no-untyped-def]
    """For the tests that make them: the test leaves none of what the run-wide check looks for.
    (Per test only there: the host is shared with any other run going on at the same time.)"""
    before = host_network_leftovers(_CHECKOUT)
    yield
    left = host_network_leftovers(_CHECKOUT) - before
    assert not left, f"left on this host by this test: {sorted(left)}"


@pytest.fixture(autouse=True)
def _no_compose_leak(request: pytest.FixtureRequest, compose_watch: ComposeWatch):  # type: ignore[no-untyped-def]
    """A compose stack under a test's own tmp_path must be gone, network and volumes too, when the test ends."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    compose_watch.start()  # the engine may have come up since (tests/support/dockerd.py starts it on demand)
    yield
    if tmp is None:
        return
    compose_watch.start()
    leaked = compose_watch.check(tmp)
    assert not leaked, f"compose projects left on the Docker engine by this test (now removed): {describe_leaks(leaked)}"


class ConfigDir:
    """A throwaway config directory; ``write`` drops YAML into it."""

    def __init__(self, root: Path):
        self.root = root
        (root / "extensions").mkdir(parents=True, exist_ok=True)
        (root / "profiles").mkdir(parents=True, exist_ok=True)

    def write(self, name: str, text: str) -> Path:
        sub = "extensions" if name.startswith("ext.") else "profiles" if name.startswith("profile.") else ""
        path = self.root / sub / name
        path.write_text(textwrap.dedent(text))
        return path


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigDir:
    return ConfigDir(tmp_path / "config")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


FAKE_EXT = """
    id: ext.fake
    title: Fake
    version: 1.0.0
    handler: sandboxer.extensions.fake:FakeExtension
    capabilities:
      isolation_levels: [none]
      pricing_model: free
      features: [exec, snapshots, list_owned]
"""

FAKE_PROFILE = """
    slug: fake
    extension: ext.fake
    ttl: {default: 10m, max: 1h}
    ready_timeout: 5s
    inputs:
      defaults: {color: blue}
"""


@pytest.fixture
def make_manager(cfg: ConfigDir, home: Path) -> Callable[..., Manager]:
    made: list[Manager] = []

    def make(**kw) -> Manager:  # type: ignore[no-untyped-def]
        mgr = Manager(config_dirs=[cfg.root], home=home, **kw)
        made.append(mgr)
        return mgr

    yield make
    leaked = []
    for m in made:
        for sb in m.list():
            try:
                m.teardown(sb.id)
            except Exception:  # noqa: BLE001 - best effort; the test already reported
                pass
        # ext.local keeps its workspaces in one system-wide root: anything of this manager's
        # still there is a leak, which fails the test (after cleaning it up).
        local = m.extension("ext.local") if "ext.local" in m.catalog.extensions else None
        for item in local.list_owned(m.owner_labels) if local else []:
            leaked.append(item.sandbox_id)
            local.teardown(item.handle)
        m.close()
    assert not leaked, f"local sandboxes leaked by this test: {leaked}"


@pytest.fixture
def fake_mgr(cfg: ConfigDir, make_manager) -> Manager:  # type: ignore[no-untyped-def]
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.fake.yaml", FAKE_PROFILE)
    return make_manager()
