"""ext.docker and ``resources.gpu``: NVIDIA device requests, claimed only where the operator says the engine has GPUs.

This machine's engine has no GPU, so no container with one is started here: the device requests
are checked where docker.py builds its create arguments (the docker SDK's own ``DeviceRequest``),
and routing is checked against the built-in ext.docker, which must not qualify here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("docker", reason="the docker extra is not installed: pip install 'sand-boxer[docker]'")

from docker.types import DeviceRequest  # noqa: E402

from sandboxer import Manager  # noqa: E402
from sandboxer.errors import ProvisionError, RoutingError  # noqa: E402
from sandboxer.extensions.docker import DockerConfig, DockerExtension  # noqa: E402
from sandboxer.extensions.docker_gpu import GPUS_OFF, gpu_create_kwargs  # noqa: E402
from sandboxer.loader import load_catalog  # noqa: E402
from sandboxer.policy import GpuRequest  # noqa: E402

REASON = "set config.gpus: true when the engine has NVIDIA GPUs and its runtime"


def test_a_gpu_request_is_an_nvidia_device_request_for_that_many_gpus():
    kw = gpu_create_kwargs(GpuRequest(count=2), DockerConfig(gpus=True), backend="ext.docker")
    assert kw == {"device_requests": [DeviceRequest(driver="nvidia", count=2, capabilities=[["gpu"]])]}
    # what goes on the wire, as the SDK serialises it into HostConfig.DeviceRequests
    assert dict(kw["device_requests"][0]) == {"Driver": "nvidia", "Count": 2, "DeviceIDs": [],
                                              "Capabilities": [["gpu"]], "Options": {}}


def test_no_gpu_asked_for_adds_nothing_to_the_create():
    assert gpu_create_kwargs(None, DockerConfig(gpus=True), backend="ext.docker") == {}
    assert gpu_create_kwargs(None, DockerConfig(), backend="ext.docker") == {}


def test_a_gpu_type_is_kept_only_when_the_engines_gpus_are_that_type():
    cfg = DockerConfig(gpus=True, gpu_type="A100")
    assert gpu_create_kwargs(GpuRequest(count=1, type="a100"), cfg, backend="ext.docker")["device_requests"]
    with pytest.raises(ProvisionError) as err:
        gpu_create_kwargs(GpuRequest(count=1, type="H100"), cfg, backend="ext.docker")
    assert str(err.value) == ("ext.docker: resources.gpu.type 'H100' is not the type of this engine's GPUs "
                              "(config.gpu_type 'A100'); another backend may have it")
    assert err.value.transient  # the router goes on to the next backend
    with pytest.raises(ProvisionError, match=r"config\.gpu_type is not set"):
        gpu_create_kwargs(GpuRequest(count=1, type="T4"), DockerConfig(gpus=True), backend="ext.docker")


def test_without_config_gpus_the_engine_cannot_keep_gpu_and_says_why():
    assert "gpu" in DockerExtension.enforces
    assert DockerExtension.unavailable(DockerConfig()) == {"gpu": REASON} == {"gpu": GPUS_OFF}
    assert "gpu" not in DockerExtension.unavailable(DockerConfig(gpus=True))
    cat = load_catalog([])
    assert cat.extensions["ext.docker"].unavailable == {"gpu": REASON}
    assert "gpu" not in cat.extensions["ext.docker"].enforces


def test_a_gpu_profile_skips_this_machines_docker_with_the_reason_in_the_attempts(cfg, home):
    cfg.write("profile.gpu-job.yaml", """
        slug: gpu-job
        backends: [{extension: ext.docker}, {extension: ext.local}]
        resources: {gpu: {count: 1}}
    """)
    with Manager(config_dirs=[cfg.root], home=home) as mgr:
        with pytest.raises(RoutingError) as err:
            mgr.create(profile="gpu-job")
        assert mgr.list(all=True) == []
    assert str(err.value) == (
        "no backend could serve profile 'gpu-job'\n"
        f"  - ext.docker (host -): CapabilityError: ext.docker does not enforce gpu (on this host: {REASON}), "
        "which the policy of profile 'gpu-job' needs (no network)\n"
        "  - ext.local (host -): CapabilityError: ext.local does not enforce gpu, which the policy of profile "
        "'gpu-job' needs (no network)")


def test_the_engine_is_sent_the_device_request_and_a_container_it_cannot_give_gpus_is_not_left(
        catalog, busybox_image, profile, owner, dclient):
    """On this machine's engine (no NVIDIA runtime) the request reaches dockerd, which cannot start it."""
    from sandboxer.testing import request
    from tests.docker.conftest import containers_of, variant

    base = catalog.extensions["ext.docker"]
    ext = DockerExtension(base.manifest, base.instance().config.model_copy(update={"gpus": True}))
    prof = variant(profile, resources={"gpu": {"count": 1}})
    sid = "t-gpu-" + owner["sandboxer.owner"][-10:]
    try:
        with pytest.raises(ProvisionError) as err:
            ext.provision(request(prof, {"sandbox_id": sid, "owner_labels": owner,
                                         "tags": {**owner, "sandboxer.sandbox_id": sid}}, None))
        # dockerd's own refusal of the device request docker.py sent
        assert 'could not select device driver "nvidia" with capabilities: [[gpu]]' in str(err.value)
        assert containers_of(dclient, sid) == []
    finally:
        for c in containers_of(dclient, sid):
            c.remove(force=True, v=True)


def test_profiles_explain_says_why_docker_cannot_keep_gpu_here(cfg, home):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg.write("profile.gpu-job.yaml", """
        slug: gpu-job
        backends: [{extension: ext.docker}]
        resources: {gpu: {count: 1}}
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, "-m", "sandboxer", "--config", str(cfg.root), "--home", str(home),
                        "profiles", "explain", "gpu-job", "--json"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 78, p.stderr  # config: no backend can keep the policy
    (docker_row,) = json.loads(p.stdout)["backends"]
    assert docker_row["qualifies"] is False and docker_row["lacks"] == ["gpu"]
    assert docker_row["unavailable_here"] == {"gpu": REASON}
