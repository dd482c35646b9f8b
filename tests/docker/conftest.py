"""Fixtures for the ext.docker tests: a real dockerd, the busybox image, and cleanup by owner label."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

import pytest

from sandboxer.extensions.docker import DockerHandle
from sandboxer.loader import Catalog, load_catalog
from sandboxer.models import Profile
from sandboxer.testing import request
from tests.support.docker_fixtures import busybox_image, docker_host  # noqa: F401 - fixtures

docker = pytest.importorskip("docker", reason="the docker extra is not installed")


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog([])


@pytest.fixture(scope="session")
def dclient(docker_host: str):
    client = docker.DockerClient(base_url=docker_host)
    yield client
    client.close()


@pytest.fixture
def ext(catalog: Catalog, busybox_image: str):
    return catalog.extensions["ext.docker"].instance()


@pytest.fixture
def profile(catalog: Catalog) -> Profile:
    return catalog.profiles["docker"]


def variant(profile: Profile, resources: dict[str, Any] | None = None, **options: Any) -> Profile:
    """The profile with some options (and resources) changed, validated like a loaded one."""
    data = profile.model_dump()
    data["options"] = {**data["options"], **options}
    data["resources"] = {**data["resources"], **(resources or {})}
    return Profile.model_validate(data)


@pytest.fixture
def owner() -> dict[str, str]:
    """Owner labels unique to one test, so its leftovers are easy to find and remove."""
    return {"sandboxer.owner": f"test-{uuid.uuid4().hex[:10]}"}


@pytest.fixture
def make(ext, profile: Profile, owner: dict[str, str], dclient) -> Iterator[Callable[..., DockerHandle]]:
    """``make(profile=None, **inputs)`` provisions a sandbox owned by this test; all are removed at the end."""

    def _make(prof: Profile | None = None, **inputs: Any) -> DockerHandle:
        sid = inputs.pop("sandbox_id", None) or f"t-{uuid.uuid4().hex[:10]}"
        tags = {**owner, "sandboxer.sandbox_id": sid, **inputs.pop("tags", {})}
        return ext.provision(request(prof or profile, {"sandbox_id": sid, "owner_labels": owner, "tags": tags,
                                                       **inputs}, None))

    yield _make
    for c in dclient.containers.list(all=True, filters={"label": [f"{k}={v}" for k, v in owner.items()]}):
        c.remove(force=True, v=True)


def containers_of(dclient, sandbox_id: str) -> list:
    return dclient.containers.list(all=True, filters={"label": f"sandboxer.sandbox_id={sandbox_id}"})
