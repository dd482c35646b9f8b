"""The conformance kit run against every built-in backend, each against its real component or stand-in.

The fixtures that start those components are the other test folders' own, imported here (the
sshd servers and compose repo of tests/ssh, the Docker engine and busybox image of
tests/support, the E2B and Modal stand-in servers of tests/cloud). Each backend is configured
the way an operator does it: the shipped manifest with an ``override: config`` file pointing it
at the component, and its shipped profile (a profile of our own only where the shipped one
needs tools the test hosts lack).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from sandboxer.manager import Manager
from sandboxer.testing import Target
from sandboxer.testing.plugin import conformance_report, conformance_step  # noqa: F401 - the kit's fixtures
from tests.support.docker_fixtures import busybox_image, docker_host  # noqa: F401 - fixtures
from tests.ssh.conftest import compose_repo, known_hosts, ssh_home, sshd_pool  # noqa: F401 - fixtures

#: The per-stream exec output cap every backend is configured with here (the kit checks it).
CAP = 1 << 20

#: Every built-in backend, in the order they run.
BACKENDS = ["ext.local", "ext.saas-stub", "ext.docker", "ext.compose-ssh", "ext.vm-packer", "ext.e2b", "ext.modal",
            "ext.daytona"]

#: (backend, step) -> why it fails today. Strict, so a fix shows up as XPASS and its entry must go.
XFAIL: dict[tuple[str, str], str] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None or "conformance_target" not in spec.params:
            continue
        reason = XFAIL.get((spec.params["conformance_target"], spec.params.get("conformance_step")))
        if reason:
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))


def override(cfg: Path, ext_id: str, config: dict[str, Any]) -> None:
    """An operator's ``override: config`` file for a shipped manifest."""
    (cfg / "extensions").mkdir(parents=True, exist_ok=True)
    (cfg / "profiles").mkdir(parents=True, exist_ok=True)
    (cfg / "extensions" / f"{ext_id}.yaml").write_text(
        yaml.safe_dump({"id": ext_id, "override": "config", "config": config}))


def _local(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    override(cfg, "ext.local", {"max_output_bytes": CAP})
    return {"output_cap": CAP}


def _stub(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    override(cfg, "ext.saas-stub", {"output_cap": CAP})
    return {"output_cap": CAP}


def _docker(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    pytest.importorskip("docker", reason="the docker extra is not installed")
    req.getfixturevalue("busybox_image")
    override(cfg, "ext.docker", {"docker_host": req.getfixturevalue("docker_host"), "max_output_bytes": CAP})
    return {"output_cap": CAP}


def _compose(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    server = req.getfixturevalue("sshd_pool")[0]
    root = cfg.parent / "compose"
    override(cfg, "ext.compose-ssh", {
        "workspace_root": str(root), "snapshot_dir": str(cfg.parent / "compose-snaps"),
        "helper_image": req.getfixturevalue("busybox_image"),
        "hosts": [{**server.host_config(req.getfixturevalue("known_hosts")), "name": "h0", "capacity": 8,
                   "workspace_root": str(root), "docker_host": req.getfixturevalue("docker_host"),
                   "output_cap_bytes": CAP}]})
    return {"inputs": {"repo": str(req.getfixturevalue("compose_repo"))}, "output_cap": CAP}


def _vm(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    server = req.getfixturevalue("sshd_pool")[0]
    known = req.getfixturevalue("known_hosts")
    override(cfg, "ext.vm-packer", {
        "workspace_root": str(cfg.parent / "vm"), "snapshot_dir": str(cfg.parent / "vm-snaps"),
        "target_defaults": {"known_hosts": str(known), "key_file": str(server.user_key), "use_agent": False},
        "vms": {"vm0": server.host_config(known, output_cap_bytes=CAP)}})
    # the shipped vm-haskell-build profile needs ghc and cabal, which the test host lacks
    (cfg / "profiles" / "profile.conformance-vm.yaml").write_text(yaml.safe_dump({
        "slug": "conformance-vm", "extension": "ext.vm-packer", "inputs": {"defaults": {"vm": "vm0"}},
        "ready_timeout": "60s", "network": {"egress": "internet"}}))
    return {"profile": "conformance-vm", "output_cap": CAP}


def _e2b(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    pytest.importorskip("e2b", reason="the e2b extra is not installed")
    from tests.cloud.conftest_e2b import KEY_ENV
    from tests.cloud.e2b_standin import E2BStandIn

    key = "e2b_conformance_" + os.urandom(8).hex()
    server = E2BStandIn([key]).start()
    req.addfinalizer(server.stop)
    _env(req, {KEY_ENV: key})
    override(cfg, "ext.e2b", {"api_key": {"env": KEY_ENV}, "api_url": server.url, "sandbox_url": server.url,
                              "request_timeout": 10, "max_output_bytes": CAP})
    return {"output_cap": CAP}


def _modal(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    pytest.importorskip("modal", reason="the modal extra is not installed")
    from tests.cloud.modal_standin import ModalStandIn
    from tests.cloud.test_modal import SENTINEL, TOKEN_ID  # also keeps any ~/.modal.toml out

    server = ModalStandIn(TOKEN_ID, SENTINEL).start()
    req.addfinalizer(server.stop)
    _env(req, {"SBX_CONFORMANCE_MODAL_ID": TOKEN_ID, "SBX_CONFORMANCE_MODAL_SECRET": SENTINEL})
    override(cfg, "ext.modal", {"server_url": server.url, "token_id": {"env": "SBX_CONFORMANCE_MODAL_ID"},
                                "token_secret": {"env": "SBX_CONFORMANCE_MODAL_SECRET"}, "max_output_bytes": CAP})
    return {"output_cap": CAP}


def _daytona(req: pytest.FixtureRequest, cfg: Path) -> dict[str, Any]:
    pytest.importorskip("daytona", reason="the daytona extra is not installed")
    from tests.cloud.conftest_daytona import KEY_ENV
    from tests.cloud.daytona_standin import DaytonaStandIn

    key = "dtn_conformance_" + os.urandom(8).hex()
    server = DaytonaStandIn([key]).start()
    req.addfinalizer(server.stop)
    _env(req, {KEY_ENV: key})
    override(cfg, "ext.daytona", {"api_key": {"env": KEY_ENV}, "api_url": server.api_url, "request_timeout": 10,
                                  "max_output_bytes": CAP})
    return {"output_cap": CAP}


def _env(req: pytest.FixtureRequest, values: dict[str, str]) -> None:
    mp = pytest.MonkeyPatch()
    req.addfinalizer(mp.undo)
    for k, v in values.items():
        mp.setenv(k, v)


SETUP: dict[str, Callable[[pytest.FixtureRequest, Path], dict[str, Any]]] = {
    "ext.local": _local, "ext.saas-stub": _stub, "ext.docker": _docker, "ext.compose-ssh": _compose,
    "ext.vm-packer": _vm, "ext.e2b": _e2b, "ext.modal": _modal,
    "ext.daytona": _daytona,
}


@pytest.fixture(scope="module", params=BACKENDS)
def conformance_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One built-in backend, configured against its component, over a throwaway state store."""
    ext_id = request.param
    root = tmp_path_factory.mktemp(ext_id.replace(".", "-"))
    cfg = root / "config"
    (cfg / "extensions").mkdir(parents=True)
    (cfg / "profiles").mkdir(parents=True)
    extra = SETUP[ext_id](request, cfg)
    mgr = Manager(config_dirs=[cfg], home=root / "home")
    try:
        yield Target(mgr, ext_id, extra.get("profile"), extra.get("inputs", {}), extra.get("output_cap"))
    finally:
        mgr.close()
