"""Ctrl-C during `sandboxer exec` on ext.docker: the command's processes in the container are gone."""

from __future__ import annotations

import json
import time

import pytest

from tests.cli.conftest import Sbx
from tests.cli.test_exec import _pids, interrupt_exec
from tests.support.docker_fixtures import busybox_image, docker_host  # noqa: F401 - fixtures

pytest.importorskip("docker", reason="the docker extra is not installed")


def test_ctrl_c_during_exec_on_docker_kills_the_command_in_the_container(home, cfg, docker_host, busybox_image):
    sbx = Sbx(home, cfg.root)
    sbx.env["DOCKER_HOST"] = docker_host
    sb = json.loads(sbx("create", "docker", "--quiet", "--json", check=0).stdout)
    try:
        tag = str(time.monotonic_ns())[-9:]
        p = interrupt_exec(sbx, sb["id"], tag)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130 and err == "error: interrupted\n", (p.returncode, out, err)
        deadline = time.monotonic() + 10
        while _pids(f"^sleep [34]{tag}$") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pids(f"^sleep [34]{tag}$") == []
        assert sbx("exec", sb["id"], "--", "echo", "ok", check=0).stdout == "ok\n"
    finally:
        sbx("teardown", sb["id"], check=0)
