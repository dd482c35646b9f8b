"""A warm pool on ext.docker: containers made ahead, handed out, and none left on the engine."""

from __future__ import annotations

import pytest

from sandboxer import Manager
from sandboxer.pools import POOL_LABEL
from tests.docker.test_docker_manager import EXT, PROFILE
from tests.support.docker_fixtures import busybox_image, docker_host  # noqa: F401 - fixtures

docker = pytest.importorskip("docker", reason="the docker extra is not installed")
pytestmark = pytest.mark.root


def test_a_docker_pool(tmp_path, busybox_image):  # type: ignore[no-untyped-def]  # noqa: F811
    cfg = tmp_path / "cfg"
    (cfg / "extensions").mkdir(parents=True)
    (cfg / "profiles").mkdir()
    (cfg / "extensions" / "ext.test-docker.yaml").write_text(EXT)
    (cfg / "profiles" / "profile.test-docker.yaml").write_text(
        PROFILE.format(suffix="", image=busybox_image) + "pool: {size: 2, max_age: 5m}\n")
    mgr = Manager(config_dirs=[cfg], home=tmp_path / "home", refill=False)
    client = docker.DockerClient(base_url=mgr.extension("ext.test-docker").engine)
    owner = [f"{k}={v}" for k, v in mgr.owner_labels.items()]
    try:
        pooled = mgr.fill_pools().made["test-docker"]
        assert len(pooled) == 2
        for c in client.containers.list(filters={"label": owner}):  # the engine's resources carry the pool's label
            assert c.labels[POOL_LABEL] == "test-docker" and c.labels["sandboxer.consumer"] == "sandboxer.pool"
        sb = mgr.create(profile="test-docker", consumer="alice")
        assert sb.id in pooled and mgr.exec(sb.id, ["echo", "hi"]).stdout == "hi\n"
        mgr.teardown(sb.id)
        assert mgr.pools.drain().removed["test-docker"] == [i for i in pooled if i != sb.id]
        assert client.containers.list(all=True, filters={"label": owner}) == []  # nothing left on the engine
    finally:
        for c in client.containers.list(all=True, filters={"label": owner}):
            c.remove(force=True, v=True)
        client.close()
        mgr.close()
