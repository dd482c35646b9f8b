"""ext.vm-packer (attach mode) against real sshd servers standing in for two pre-built VMs."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from sandboxer.errors import HostKeyError, InputError, ProvisionError, ReadinessTimeout
from sandboxer.loader import load_catalog
from sandboxer.models import Profile, SnapshotMeta
from sandboxer.testing import request
from sandboxer.ssh import local_ports_free
from tests.ssh.conftest import load_backend, write_config
from tests.support.docker_fixtures import wait_gone

EXT = "ext.test-vm"
HANDLER = "sandboxer.extensions.vm_packer:VMPacker"
OWNER = {"sandboxer.owner": "test-vm"}
RUN = uuid.uuid4().hex[:6]


def sid(name: str) -> str:
    return f"{name}-{RUN}"


@pytest.fixture
def vm_cfg(tmp_path, sshd_pool, known_hosts) -> dict[str, Any]:
    return {
        "workspace_root": str(tmp_path / "ws-default"),
        "snapshot_dir": str(tmp_path / "snapshots"),
        "target_defaults": {"known_hosts": str(known_hosts), "key_file": str(sshd_pool[0].user_key),
                            "use_agent": False, "connect_timeout": 5},
        "vms": {f"vm{i}": {**s.host_config(known_hosts), "workspace_root": str(tmp_path / f"vm{i}")}
                for i, s in enumerate(sshd_pool)},
    }


@pytest.fixture
def backend(tmp_path, vm_cfg) -> Iterator[Any]:
    b = load_backend(write_config(tmp_path / "cfg", EXT, HANDLER, vm_cfg), EXT)
    yield b
    for s in list(b._tunnels):
        b._close_tunnel(s)
    b._cache.close_all()


def profile(**options: Any) -> Profile:
    return Profile(slug="test-vm", extension=EXT, options=options)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP service on the "VM" (this machine) that upper-cases what it gets."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.settimeout(5)
                c.sendall(c.recv(100).upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


def through(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"ping")
        return c.recv(100)


def test_full_cycle_with_repo_tunnel_snapshot_restore(backend, compose_repo, tmp_path, echo_port, marker):
    inputs = {"vm": "vm0", "repo": str(compose_repo), "ref": "v1", "tunnel_port": echo_port,
              "sandbox_id": sid("full"), "owner_labels": OWNER}
    handle = backend.provision(request(
        profile(require_commands=["sh", "git"], readiness_command=["test", "-f", "README"]), inputs, None))
    restored = None
    try:
        ws = Path(handle.remote_dir)
        assert ws == tmp_path / "vm0" / sid("full") and (ws / "README").read_text() == "test stack\n"
        reach = backend.wait_ready(handle, timeout=30)
        assert reach.remote_dir == str(ws) and reach.host == "vm0" and reach.ssh.startswith("ssh -p ")
        local_port = reach.tunnel.local_port
        assert through(local_port) == b"PING"

        env = {"V": f"$(touch {marker})\n'\"x"}
        res = backend.exec(handle, ["sh", "-c", 'printf %s "$V" > note; cat note; pwd'], env=env)
        assert res.stdout == env["V"] + str(ws) + "\n", res.stderr
        with pytest.raises(InputError, match="outside the workspace"):
            backend.exec(handle, ["pwd"], cwd="../..")

        snap = backend.snapshot(handle)
        meta = SnapshotMeta(id="s", sandbox_id=sid("full"), extension=EXT, profile="test-vm",
                            created_at=datetime.now(timezone.utc), **snap.model_dump())
        restored = backend.restore_from_snapshot(
            request(profile(), {"sandbox_id": sid("back"), "owner_labels": OWNER}, "vm1"), meta)
        assert restored.host == "vm1"
        backend.wait_ready(restored, timeout=30)
        assert backend.exec(restored, ["cat", "note"]).stdout == env["V"]
        assert {o.sandbox_id for o in backend.list_owned(OWNER)} == {sid("full"), sid("back")}
    finally:
        for h in (handle, restored):
            if h:
                report = backend.teardown(h)
                assert not Path(h.remote_dir).exists()
                assert not Path(h.root, f".sandboxer-{h.name}.json").exists()
    assert report.removed == [restored.remote_dir] and not report.already_gone
    assert local_ports_free(local_port), "the tunnel outlived its sandbox"
    assert backend.list_owned(OWNER) == []
    assert backend.teardown(handle).already_gone  # idempotent


def test_ssh_target_input(backend, sshd_pool, vm_cfg):
    target = f"{sshd_pool[1].user}@127.0.0.1:{sshd_pool[1].port}"
    handle = backend.provision(request(profile(), {"ssh_target": target, "sandbox_id": sid("tgt")}, None))
    try:
        assert handle.remote_dir == f"{vm_cfg['workspace_root']}/{sid('tgt')}"
        assert backend.wait_ready(handle, timeout=20).address == "127.0.0.1"
        assert backend.exec(handle, ["pwd"]).stdout.strip() == handle.remote_dir
    finally:
        backend.teardown(handle)


def test_haskell_profile_names_missing_tools_then_passes_when_present(tmp_path, vm_cfg, ssh_home):
    cat = load_catalog([write_config(tmp_path / "cfg", EXT, HANDLER, vm_cfg)])
    builtin = cat.profiles["vm-haskell-build"]
    # the built-in profile's options, served by the test inventory
    prof = Profile(slug="test-hs", extension=EXT, options=builtin.options)
    b = cat.extensions[EXT].instance()
    handle = b.provision(request(prof, {"vm": "vm0", "sandbox_id": sid("hs")}, None))
    try:
        start = time.monotonic()
        with pytest.raises(ReadinessTimeout, match="missing on PATH: ghc, cabal"):
            b.wait_ready(handle, timeout=60)
        assert time.monotonic() - start < 10, "a missing toolchain must not wait out the deadline"
        for tool in ("ghc", "cabal"):
            path = ssh_home / "bin" / tool
            path.write_text("#!/bin/sh\necho 9.4.8\n")
            path.chmod(0o755)
        assert b.wait_ready(handle, timeout=20).remote_dir == handle.remote_dir
    finally:
        for tool in ("ghc", "cabal"):
            (ssh_home / "bin" / tool).unlink(missing_ok=True)
        b.teardown(handle)
        b._cache.close_all()


def test_failing_readiness_command_times_out_with_its_output(backend):
    handle = backend.provision(request(profile(readiness_command=["sh", "-c", "echo not yet >&2; exit 3"]),
                                       {"vm": "vm0", "sandbox_id": sid("rc")}, None))
    try:
        with pytest.raises(ReadinessTimeout, match="exited 3: not yet"):
            backend.wait_ready(handle, timeout=2)
    finally:
        backend.teardown(handle)


def test_workspace_lost_before_teardown(backend):
    handle = backend.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("lost")}, None))
    shutil.rmtree(handle.remote_dir)
    backend.teardown(handle)
    assert not Path(handle.root, f".sandboxer-{handle.name}.json").exists()


def test_teardown_never_touches_the_rest_of_the_vm(backend, tmp_path):
    root = tmp_path / "vm0"
    root.mkdir()
    (root / "keep").write_text("other tenant")
    handle = backend.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("keep")}, None))
    backend.teardown(handle)
    assert (root / "keep").read_text() == "other tenant" and [p.name for p in root.iterdir()] == ["keep"]


@pytest.mark.parametrize("bad", [
    {"workspace_dir": "../../etc"},
    {"workspace_dir": "a/b"},
    {"workspace_dir": "a;rm -rf ~"},
    {"repo": "--upload-pack=touch {marker}"},
    {"repo": "ext::sh -c touch% {marker}"},
    {"ssh_target": "root@127.0.0.1;touch {marker}", "vm": None},
    {"ssh_target": "-oProxyCommand=touch {marker}", "vm": None},
    {"vm": "no-such-vm"},
    {"tunnel_port": "22; touch {marker}"},
    {"sandbox_id": "a;rm -rf ~"},
    {"workspace_dir": "ws\n"},
    {"ref": "main\n", "repo": "/srv/git/r"},
    {"ssh_target": "root@127.0.0.1\n", "vm": None},
    {"sandbox_id": "abc\n"},
])
def test_hostile_inputs_are_refused_and_run_nothing(backend, tmp_path, marker, bad):
    values = {k: v.replace("{marker}", str(marker)) if isinstance(v, str) else v for k, v in bad.items()}
    inputs = {"vm": "vm0", "sandbox_id": sid("bad"), **values}
    with pytest.raises(InputError):
        backend.provision(request(profile(), {k: v for k, v in inputs.items() if v is not None}, None))
    assert not (tmp_path / "vm0").exists(), "something ran on the VM"


def test_symlink_out_of_the_root_is_refused(backend, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "vm0"
    root.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(InputError, match="symlink"):
        backend.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("sym"), "workspace_dir": "evil",
                                              "repo": "/nonexistent"}, None))
    assert list(outside.iterdir()) == [] and (root / "evil").is_symlink()
    assert not (root / ".sandboxer-evil.json").exists()


def test_host_key_mismatch_is_refused_before_any_command(tmp_path, vm_cfg, sshd_pool):
    bad = tmp_path / "bad"
    bad.write_text(f"[127.0.0.1]:{sshd_pool[0].port} {sshd_pool[1].host_pub}\n")
    vm_cfg["vms"]["vm0"]["known_hosts"] = str(bad)
    b = load_backend(write_config(tmp_path / "cfg", EXT, HANDLER, vm_cfg), EXT)
    with pytest.raises(HostKeyError):
        b.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("hk")}, None))
    assert not (tmp_path / "vm0").exists()


def test_unreachable_vm_fails_fast_and_transient(tmp_path, vm_cfg):
    vm_cfg["vms"]["vm0"].update(port=1, connect_timeout=2)
    b = load_backend(write_config(tmp_path / "cfg", EXT, HANDLER, vm_cfg), EXT)
    start = time.monotonic()
    with pytest.raises(ProvisionError) as info:
        b.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("down")}, None))
    assert info.value.transient and time.monotonic() - start < 3


def test_exec_deadline_kills_every_process_of_the_command(backend):
    handle = backend.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("dl")}, None))
    try:
        mark = uuid.uuid4().hex
        res = backend.exec(handle, ["sh", "-c", "trap '' TERM; (setsid sleep 60 &); sleep 60"],
                           env={"SBX_TEST_MARK": mark}, timeout=1)
        assert (res.exit_code, res.timed_out) == (124, True), res
        assert wait_gone("SBX_TEST_MARK", mark) == []
    finally:
        backend.teardown(handle)


def test_a_character_split_across_packets_arrives_whole(backend):
    from sandboxer.errors import InputError
    from tests.unit.test_execution import check_split

    handle = backend.provision(request(profile(), {"vm": "vm0", "sandbox_id": sid("utf8")}, None))
    try:
        check_split(lambda argv, on_output: backend.exec(handle, argv, on_output=on_output))
        with pytest.raises(InputError, match=r"ext\.\S+: exec needs a non-empty argv"):
            backend.exec(handle, [])
    finally:
        backend.teardown(handle)
