"""ext.compose-ssh against real sshd servers and the real Docker engine (two "hosts" on this machine)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from sandboxer.errors import CapacityUnavailable, HostKeyError, InputError, ProvisionError, TeardownError
from sandboxer.models import Profile, SnapshotMeta
from sandboxer.testing import request
from tests.ssh.conftest import load_backend, write_config
from tests.support.docker_fixtures import wait_gone

EXT = "ext.test-compose"
# unique per run: several test runs may share this machine's Docker engine at once
RUN = uuid.uuid4().hex[:6]
OWNER = {"sandboxer.owner": "test-compose"}


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def leftovers(project: str) -> str:
    f = f"label=com.docker.compose.project={project}"
    return (docker("ps", "-aq", "--filter", f) + docker("volume", "ls", "-q", "--filter", f)
            + docker("network", "ls", "-q", "--filter", f)).strip()


@pytest.fixture
def pool_cfg(tmp_path, sshd_pool, known_hosts, docker_host, busybox_image) -> dict[str, Any]:
    roots = [tmp_path / f"root{i}" for i in range(len(sshd_pool))]
    return {
        "workspace_root": str(roots[0]),
        "snapshot_dir": str(tmp_path / "snapshots"),
        "helper_image": busybox_image,
        "hosts": [{**s.host_config(known_hosts), "name": f"h{i}", "capacity": 2, "workspace_root": str(roots[i]),
                   "docker_host": docker_host} for i, s in enumerate(sshd_pool)],
    }


@pytest.fixture
def backend(tmp_path, pool_cfg):
    cfg_dir = write_config(tmp_path / "cfg", EXT, "sandboxer.extensions.compose_ssh:ComposeSSH", pool_cfg,
                           profiles={"test-compose": {"extension": EXT, "inputs": {"required": ["repo"]}}})
    b = load_backend(cfg_dir, EXT)
    yield b
    b._cache.close_all()


def profile(**options: Any) -> Profile:
    return Profile(slug="test-compose", extension=EXT, options=options)


def sid(name: str) -> str:
    return f"{name}-{RUN}"


def inputs(repo: Path, name: str, **more: Any) -> dict[str, Any]:
    return {"repo": str(repo), "sandbox_id": sid(name), "owner_labels": OWNER, **more}


def test_full_cycle_provision_ready_exec_snapshot_restore_teardown(backend, compose_repo, tmp_path, marker):
    handle = backend.provision(request(profile(), inputs(compose_repo, "cyc1", ref="v1"), None))
    restored = None
    try:
        assert handle.host == "h0" and handle.project == f"sbx-{sid('cyc1')}"
        assert sorted(handle.services) == ["app", "web"]
        reach = backend.wait_ready(handle, timeout=60)
        assert reach.compose_project == handle.project and reach.remote_dir == handle.remote_dir
        assert reach.ssh.startswith("ssh -p ") and reach.host == "h0"
        assert reach.services["app"].health == "healthy"
        port = reach.services["web"].ports["8080/tcp"][0].host_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.read() == b"hello-web\n"

        # exec: a shell in the workspace, and a named service, env delivered literally
        env = {"V": f"$(touch {marker}) 'q' \"d\"\nnext"}
        res = backend.exec(handle, ["sh", "-c", 'printf %s "$V"; ls'], env=env)
        assert res.exit_code == 0 and res.stdout.startswith(env["V"]) and "docker-compose.yml" in res.stdout
        res = backend.exec_in_service(handle, "app", ["sh", "-c", 'printf %s "$V" > /data/note; cat /data/note'],
                                      env=env)
        assert res.exit_code == 0 and res.stdout == env["V"], res.stderr
        assert backend.exec_in_service(handle, "app", ["cat"], stdin=b"via stdin").stdout == "via stdin"

        snap = backend.snapshot(handle)
        assert snap.checksum.startswith("sha256:") and snap.size_bytes > 0
        meta = SnapshotMeta(id="s1", sandbox_id=sid("cyc1"), extension=EXT, profile="test-compose",
                            created_at=datetime.now(timezone.utc), **snap.model_dump())
        # restore on the other host
        restored = backend.restore_from_snapshot(
            request(profile(), {"sandbox_id": sid("cyc2"), "owner_labels": OWNER}, "h1"), meta)
        assert restored.host == "h1" and restored.project == f"sbx-{sid('cyc2')}"
        backend.wait_ready(restored, timeout=60)
        res = backend.exec_in_service(restored, "app", ["cat", "/data/note"])
        assert res.stdout == env["V"], "the named volume did not come back"
        assert backend.exec(restored, ["cat", "README"]).stdout == "test stack\n"

        owned = {o.sandbox_id for o in backend.list_owned(OWNER)}
        assert owned == {sid("cyc1"), sid("cyc2")}
        assert backend.list_owned({"sandboxer.owner": "someone-else"}) == []

        backend.delete_snapshot(meta)
        assert not Path(snap.data["archive"]).exists()
    finally:
        for h in (handle, restored):
            if h:
                report = backend.teardown(h)
                assert report.removed == [h.remote_dir] and not report.already_gone
                assert not Path(h.remote_dir).exists() and leftovers(h.project) == ""
    # idempotent
    backend.teardown(handle)


def test_teardown_succeeds_when_the_host_lost_the_workspace(backend, compose_repo):
    handle = backend.provision(request(profile(), inputs(compose_repo, "lost1"), None))
    subprocess.run(["rm", "-rf", handle.remote_dir], check=True, timeout=30)
    backend.teardown(handle)
    assert leftovers(handle.project) == ""


def test_capacity_exhausted_on_every_host(tmp_path, pool_cfg, compose_repo):
    for h in pool_cfg["hosts"]:
        h["capacity"] = 1
        Path(h["workspace_root"], "occupied").mkdir(parents=True)
    b = load_backend(write_config(tmp_path / "cfg", EXT, "sandboxer.extensions.compose_ssh:ComposeSSH", pool_cfg),
                     EXT)
    with pytest.raises(CapacityUnavailable, match=r"every host is at capacity: h0: full \(1/1\); h1: full"):
        b.provision(request(profile(), inputs(compose_repo, "cap1"), None))
    for h in pool_cfg["hosts"]:
        assert [p.name for p in Path(h["workspace_root"]).iterdir() if p.is_dir()] == ["occupied"]


def test_unreachable_host_is_skipped_for_the_next_one(tmp_path, pool_cfg, compose_repo):
    pool_cfg["hosts"][0]["port"] = 1  # nothing listens there
    pool_cfg["hosts"][0]["connect_timeout"] = 2
    b = load_backend(write_config(tmp_path / "cfg", EXT, "sandboxer.extensions.compose_ssh:ComposeSSH", pool_cfg),
                     EXT)
    start = time.monotonic()
    handle = b.provision(request(profile(), inputs(compose_repo, "skip1"), None))
    try:
        assert handle.host == "h1" and time.monotonic() - start < 60
    finally:
        b.teardown(handle)


def test_host_key_mismatch_refused_before_any_command(tmp_path, pool_cfg, sshd_pool, compose_repo):
    bad = tmp_path / "bad_known_hosts"
    bad.write_text(f"[127.0.0.1]:{sshd_pool[0].port} {sshd_pool[1].host_pub}\n")
    pool_cfg["hosts"][0]["known_hosts"] = str(bad)
    b = load_backend(write_config(tmp_path / "cfg", EXT, "sandboxer.extensions.compose_ssh:ComposeSSH", pool_cfg),
                     EXT)
    with pytest.raises(HostKeyError, match="nothing was run"):
        b.provision(request(profile(), inputs(compose_repo, "hk1"), "h0"))
    assert not Path(pool_cfg["hosts"][0]["workspace_root"]).exists(), "a command ran on an unverified host"


@pytest.mark.parametrize("bad", [
    {"repo": "--upload-pack=touch {marker}"},
    {"repo": "ext::sh -c touch% {marker}"},
    {"sandbox_id": "a;rm -rf ~"},
    {"sandbox_id": "a;touch {marker}"},
    {"project": "a;rm -rf ~"},
    {"project": "a;touch {marker}"},
    {"compose_file": "../../etc/passwd"},
    {"ref": "--output={marker}"},
    {"services": ["app;touch {marker}"]},
    {"unexpected": "x"},
    # a trailing newline is not a plain name (re.match(r"...$") would accept it)
    {"project": "proj\n"},
    {"ref": "main\n"},
    {"services": ["app\n"]},
    {"compose_file": "docker-compose.yml\n"},
    {"sandbox_id": "abc\n"},
    {"repo": "/srv/git/stack\n"},
])
def test_hostile_inputs_are_refused_and_run_nothing(backend, compose_repo, pool_cfg, marker, bad):
    values = {k: (v.replace("{marker}", str(marker)) if isinstance(v, str) else
                  [x.replace("{marker}", str(marker)) for x in v]) for k, v in bad.items()}
    with pytest.raises(InputError) as info:
        handle = backend.provision(request(profile(), {**inputs(compose_repo, "hostile1"), **values}, None))
        backend.teardown(handle)  # accepted after all: the test fails, leaving nothing behind
    assert list(bad)[0] in str(info.value) or "sandbox_id" in str(info.value) or "project" in str(info.value)
    for h in pool_cfg["hosts"]:
        assert not Path(h["workspace_root"]).exists() or not any(Path(h["workspace_root"]).iterdir())


def test_clone_failure_cleans_up_and_is_not_transient(backend, tmp_path, pool_cfg):
    with pytest.raises(ProvisionError, match="git clone") as info:
        backend.provision(request(profile(), inputs(tmp_path / "no-such-repo", "nr1"), None))
    assert not info.value.transient
    assert not Path(pool_cfg["hosts"][0]["workspace_root"], "nr1").exists()


def test_hung_exec_is_killed_at_its_deadline(backend, compose_repo):
    handle = backend.provision(request(profile(), inputs(compose_repo, "hang1", services=["web"]), None))
    try:
        start = time.monotonic()
        res = backend.exec(handle, ["sleep", "300"], timeout=1)
        assert res.timed_out and time.monotonic() - start < 6
        # on the host, and inside a service: nothing of the command is left, setsid children included
        for run in (backend.exec, lambda h, argv, **kw: backend.exec_in_service(h, "web", argv, **kw)):
            mark = uuid.uuid4().hex
            res = run(handle, ["sh", "-c", "trap '' TERM; (setsid sleep 60 &); setsid sleep 60 & sleep 60"],
                      env={"SBX_TEST_MARK": mark}, timeout=1)
            assert (res.exit_code, res.timed_out) == (124, True), res
            assert wait_gone("SBX_TEST_MARK", mark) == [], "a process of the exec outlived its deadline"
    finally:
        backend.teardown(handle)


def test_config_refuses_passwords_and_bad_roots(tmp_path, pool_cfg):
    from sandboxer.errors import ManifestError

    pool_cfg["hosts"][0]["password"] = "hunter2"
    with pytest.raises(ManifestError, match="passwords are not accepted") as info:
        load_backend(write_config(tmp_path / "a", EXT, "sandboxer.extensions.compose_ssh:ComposeSSH", pool_cfg), EXT)
    assert "hunter2" not in str(info.value)
    del pool_cfg["hosts"][0]["password"]
    pool_cfg["workspace_root"] = "/"
    with pytest.raises(ManifestError, match="workspace_root"):
        load_backend(write_config(tmp_path / "b", EXT, "sandboxer.extensions.compose_ssh:ComposeSSH", pool_cfg), EXT)


def test_builtin_manifest_and_profile_load(tmp_path):
    from sandboxer.loader import load_catalog

    cat = load_catalog([])
    assert "compose-ssh" in cat.profiles and "ext.compose-ssh" in cat.extensions
    assert json.dumps(cat.extensions["ext.compose-ssh"].config.model_dump(mode="json"))


def test_teardown_fails_naming_a_network_it_could_not_remove(backend, compose_repo, busybox_image):
    handle = backend.provision(request(profile(), inputs(compose_repo, "net1", services=["web"]), None))
    net = f"{handle.project}_default"
    guest = None
    try:
        # a container that is not the project's, attached to its network: the network cannot be removed
        guest = docker("run", "-d", "--rm", "--network", net, busybox_image, "sleep", "120").strip()
        with pytest.raises(TeardownError, match=f"teardown incomplete: left behind: network {net} "
                                                r"\(.*has active endpoints"):
            backend.teardown(handle)
        assert docker("network", "ls", "-q", "--filter", f"name=^{net}$").strip(), "the network is gone after all"
    finally:
        if guest:
            docker("rm", "-f", guest)
        # the retry (what gc does with a teardown_failed sandbox) finishes the job
        report = backend.teardown(handle)
    assert not report.already_gone and leftovers(handle.project) == ""


def test_teardown_of_a_stack_that_left_only_its_network_removes_it(backend, compose_repo):
    handle = backend.provision(request(profile(), inputs(compose_repo, "net2"), None))
    f = f"label=com.docker.compose.project={handle.project}"
    # the workspace, the containers and the volume went behind its back; the network stayed
    subprocess.run(["rm", "-rf", handle.remote_dir], check=True, timeout=30)
    docker("rm", "-f", *docker("ps", "-aq", "--filter", f).split())
    docker("volume", "rm", *docker("volume", "ls", "-q", "--filter", f).split())
    assert docker("network", "ls", "-q", "--filter", f).strip()
    report = backend.teardown(handle)
    assert not report.already_gone, "a network of the stack was removed: it was not already gone"
    assert leftovers(handle.project) == ""
