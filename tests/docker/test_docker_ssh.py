"""ext.docker to an engine reached over ``ssh://``: a real sshd in front of the real dockerd.

The docker SDK reads ``~/.ssh/config`` and ``~/.ssh/known_hosts``, so the
tests point HOME at a private directory instead of touching the real ones.
"""

from __future__ import annotations

import time

import pytest

from sandboxer.errors import HostKeyError, ProvisionError
from sandboxer.extensions.docker import DockerConfig, DockerExtension
from sandboxer.testing import request
from tests.docker.conftest import containers_of
from tests.support.sshd import sshd_or_skip

pytestmark = pytest.mark.root


@pytest.fixture
def sshd(tmp_path, docker_host):
    server = sshd_or_skip(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.fixture
def ssh_home(tmp_path, monkeypatch, sshd):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(f"Host 127.0.0.1\n  IdentityFile {sshd.user_key}\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


def _ext(catalog, sshd) -> DockerExtension:
    url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    return DockerExtension(catalog.extensions["ext.docker"].manifest, DockerConfig(docker_host=url, api_timeout=20))


def test_full_cycle_over_ssh(catalog, profile, sshd, ssh_home, owner, dclient, busybox_image):
    (ssh_home / ".ssh" / "known_hosts").write_text(sshd.known_hosts_line())
    ext = _ext(catalog, sshd)
    handle = ext.provision(request(profile, {"sandbox_id": "over-ssh-1", "owner_labels": owner, "tags": owner}, None))
    try:
        assert handle.host == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
        ext.wait_ready(handle, timeout=30)
        res = ext.exec(handle, ["sh", "-c", "cat; echo ok >&2"], stdin=b"via ssh\n", timeout=20)
        assert (res.exit_code, res.stdout, res.stderr) == (0, "via ssh\n", "ok\n")
        assert [o.sandbox_id for o in ext.list_owned(owner)] == ["over-ssh-1"]
    finally:
        ext.teardown(handle)
    assert containers_of(dclient, "over-ssh-1") == []


def test_mismatched_host_key_is_refused_before_anything_runs(catalog, profile, sshd, ssh_home, owner, dclient):
    # known_hosts holds another key for this host:port: paramiko's RejectPolicy must refuse.
    (ssh_home / ".ssh" / "known_hosts").write_text(
        f"[127.0.0.1]:{sshd.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
    )
    ext = _ext(catalog, sshd)
    start = time.monotonic()
    with pytest.raises(HostKeyError, match="SSH key does not match known_hosts; nothing was run"):
        ext.provision(request(profile, {"sandbox_id": "over-ssh-2", "owner_labels": owner}, None))
    assert time.monotonic() - start < 20
    assert containers_of(dclient, "over-ssh-2") == []


def test_host_missing_from_known_hosts_is_refused(catalog, profile, sshd, ssh_home, owner, dclient):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    with pytest.raises(ProvisionError, match="known_hosts") as err:
        _ext(catalog, sshd).provision(request(profile, {"sandbox_id": "over-ssh-3", "owner_labels": owner}, None))
    assert not err.value.transient
    assert containers_of(dclient, "over-ssh-3") == []
