"""The run-wide compose leak check (tests/support/leaks.py) against the real Docker engine."""

from __future__ import annotations

import subprocess
import time
import uuid

from tests.support.leaks import ComposeWatch


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=True).stdout.strip()


def test_a_stack_that_left_only_its_network_and_volume_is_reported_and_removed(tmp_path, compose_watch,
                                                                             busybox_image):
    project = f"sbx-leakcheck-{uuid.uuid4().hex[:8]}"
    other = f"sbx-leakcheck-{uuid.uuid4().hex[:8]}"
    labels = ["--label", f"com.docker.compose.project={project}"]
    docker("network", "create", *labels, "--label", "com.docker.compose.network=default", f"{project}_default")
    docker("volume", "create", *labels, f"{project}_data")
    # what compose does: a container labelled with the project and its working dir (under this test's tmp_path)
    cid = docker("create", *labels, "--label", f"com.docker.compose.project.working_dir={tmp_path}/ws/repo",
                 "--network", f"{project}_default", busybox_image, "true")
    # another run's stack (its working dir elsewhere) is not this run's to report or remove
    oid = docker("create", "--label", f"com.docker.compose.project={other}",
                 "--label", "com.docker.compose.project.working_dir=/elsewhere/repo", busybox_image, "true")
    try:
        docker("rm", cid)  # the stack's containers went; its network and volume stayed
        deadline = time.monotonic() + 10
        while project not in compose_watch.projects(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert compose_watch.projects(tmp_path) == [project]
        assert compose_watch.check(tmp_path) == {project: [f"volume {project}_data", f"network {project}_default"]}
        assert ComposeWatch.leftovers(project) == []
        assert ComposeWatch.leftovers(other) == [f"container {oid[:12]}"]
    finally:
        docker("rm", "-f", oid)
        ComposeWatch.remove(project)
