"""ext.compose-ssh's exposed ports: a port the stack publishes on its host, forwarded over SSH to
127.0.0.1 here by a process of its own (sandboxer/forward.py), gone with the teardown."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from sandboxer import forward
from sandboxer.models import Profile
from sandboxer.ssh import local_ports_free
from sandboxer.testing import request
from tests.ssh.test_compose_ssh import EXT, OWNER, backend, pool_cfg, sid  # noqa: F401 - fixtures
from tests.ssh.conftest import IMAGE

pytestmark = pytest.mark.usefixtures("no_host_network_leak")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _repo(tmp_path: Path, port: int) -> Path:
    repo = tmp_path / "web-stack"
    repo.mkdir()
    (repo / "docker-compose.yml").write_text(f"""version: "2.4"
services:
  web:
    image: {IMAGE}
    command: ["sh", "-c", "mkdir -p /www && echo hello-web > /www/index.html; exec httpd -f -p 8080 -h /www"]
    ports: ["127.0.0.1:{port}:8080"]
""")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "."], ["git", "commit", "-q", "-m", "web"]):
        subprocess.run(argv, cwd=repo, check=True, env=env, timeout=30)
    return repo


def test_a_published_port_is_exposed_at_a_local_url(backend, tmp_path):
    port = _free_port()
    prof = Profile.model_validate({"slug": "test-compose", "extension": EXT,
                                   "network": {"egress": "internet", "expose": [port]}})
    handle = backend.provision(request(prof, {"repo": str(_repo(tmp_path, port)), "sandbox_id": sid("expose1"),
                                              "owner_labels": OWNER}, None))
    try:
        assert forward.alive(handle.forwarder)
        reach = backend.wait_ready(handle, timeout=60)
        url = reach.urls[str(port)]
        local = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{local}" and local != port
        body = None
        for _ in range(50):  # bounded: httpd starts with the container
            try:
                body = urllib.request.urlopen(url + "/index.html", timeout=2).read().decode().strip()
                break
            except OSError:
                time.sleep(0.1)
        assert body == "hello-web"
    finally:
        backend.teardown(handle)
    assert not forward.alive(handle.forwarder) and local_ports_free(local)
