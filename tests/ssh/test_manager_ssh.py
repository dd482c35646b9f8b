"""The SSH backends driven through the Manager: create -> exec -> snapshot -> restore -> teardown -> gc."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from sandboxer import Manager, SandboxCreateRequest
from sandboxer.testing import request
from tests.ssh.conftest import write_config

RUN = uuid.uuid4().hex[:6]


@pytest.fixture
def cfg_dir(tmp_path, sshd_pool, known_hosts, docker_host, busybox_image, compose_repo) -> Path:
    hosts = [{**s.host_config(known_hosts), "name": f"h{i}", "capacity": 3, "docker_host": docker_host,
              "workspace_root": str(tmp_path / f"c{i}")} for i, s in enumerate(sshd_pool)]
    d = write_config(tmp_path / "cfg", "ext.test-compose", "sandboxer.extensions.compose_ssh:ComposeSSH",
                     {"hosts": hosts, "workspace_root": str(tmp_path / "c"), "snapshot_dir": str(tmp_path / "snaps"),
                      "helper_image": busybox_image},
                     profiles={"test-compose": {"extension": "ext.test-compose", "ready_timeout": 60,
                                                "inputs": {"required": ["repo"],
                                                           "defaults": {"repo": str(compose_repo)}},
                                                "options": {"exec_service": "app"}}})
    vms = {f"vm{i}": {**s.host_config(known_hosts), "workspace_root": str(tmp_path / f"v{i}")}
           for i, s in enumerate(sshd_pool)}
    write_config(d, "ext.test-vm", "sandboxer.extensions.vm_packer:VMPacker",
                 {"vms": vms, "snapshot_dir": str(tmp_path / "vsnaps")},
                 profiles={"test-vm": {"extension": "ext.test-vm", "inputs": {"defaults": {"vm": "vm0"}},
                                       "options": {"require_commands": ["sh"]}}})
    return d


@pytest.fixture
def mgr(cfg_dir, tmp_path):
    m = Manager(config_dirs=[cfg_dir], home=tmp_path / "home")
    yield m
    # a test that failed half way still removes what it made (the leak check in tests/conftest.py
    # would otherwise report, and remove, its stacks)
    try:
        for sb in m.list():
            m.teardown(sb.id)
        m.gc()
    finally:
        m.close()


def _left(project: str) -> str:
    f = f"label=com.docker.compose.project={project}"
    return subprocess.run(["docker", "ps", "-aq", "--filter", f], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.parametrize("slug,extra", [("test-compose", {}), ("test-vm", {"repo": None})])
def test_manager_full_cycle(mgr, slug, extra, compose_repo):
    inputs: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    sb = mgr.create(SandboxCreateRequest(profile=slug, inputs=inputs, consumer="me"))
    assert sb.state.value == "ready" and sb.reachability["remote_dir"]
    res = mgr.exec(sb.id, ["sh", "-c", 'echo "$X" > /tmp/sbx-note-$$; cat /tmp/sbx-note-$$'], env={"X": "a'$(b)"})
    assert res.exit_code == 0 and res.stdout == "a'$(b)\n", res.stderr
    snap = mgr.snapshot(sb.id)
    assert snap.checksum and snap.checksum.startswith("sha256:")
    sb2 = mgr.restore(snap.id)
    assert sb2.state.value == "ready" and sb2.id != sb.id
    for s in (sb, sb2):
        assert mgr.teardown(s.id).state.value == "terminated"
        assert not Path(s.reachability["remote_dir"]).exists()
        if slug == "test-compose":
            assert _left(s.reachability["compose_project"]) == ""
    mgr.delete_snapshot(snap.id)
    assert not Path(snap.data["archive"]).exists()


def test_gc_finds_and_removes_an_orphan(mgr, compose_repo):
    # gc reconciles the backends this store has used
    mgr.teardown(mgr.create(SandboxCreateRequest(profile="test-vm", consumer="me")).id)
    ext = mgr.extension("ext.test-vm")
    prof = mgr.catalog.profiles["test-vm"]
    handle = ext.provision(request(prof, {"vm": "vm0", "sandbox_id": f"orphan-{RUN}",
                                          "owner_labels": mgr.owner_labels}, None))
    report = mgr.gc()
    assert f"orphan-{RUN}" in report.orphans
    assert not Path(handle.remote_dir).exists()
