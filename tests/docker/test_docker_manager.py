"""ext.docker through the Manager: a user-config extension and profile, the full cycle, gc of an orphan."""

from __future__ import annotations

import pytest

from sandboxer import Manager, SandboxCreateRequest
from sandboxer.errors import InputError
from sandboxer.testing import request
from tests.docker.conftest import containers_of

pytestmark = pytest.mark.root

EXT = """\
id: ext.test-docker
title: Docker containers (test config)
version: 0.1.0
handler: sandboxer.extensions.docker:DockerExtension
capabilities:
  isolation_levels: [container]
  pricing_model: self-hosted
  features: [exec, snapshots, list_owned]
config:
  name_prefix: sbtest-
  snapshot_repository: sandboxer-test-snapshot
"""

PROFILE = """\
slug: test-docker{suffix}
extension: ext.test-docker
isolation: container
ready_timeout: 30s
resources: {{cpu: 0.5, memory_mb: 128, pids: 64}}
options:
  image: {image}
  pull: never
"""


@pytest.fixture
def mgr(tmp_path, busybox_image, dclient):
    cfg = tmp_path / "cfg"
    (cfg / "extensions").mkdir(parents=True)
    (cfg / "profiles").mkdir()
    (cfg / "extensions" / "ext.test-docker.yaml").write_text(EXT)
    (cfg / "profiles" / "profile.test-docker.yaml").write_text(PROFILE.format(suffix="", image=busybox_image))
    (cfg / "profiles" / "profile.test-docker-missing.yaml").write_text(
        PROFILE.format(suffix="-missing", image="sandboxer-no-such-image:1")
    )
    m = Manager(config_dirs=[cfg], home=tmp_path / "home")
    yield m
    owner = [f"{k}={v}" for k, v in m.owner_labels.items()]
    for c in dclient.containers.list(all=True, filters={"label": owner}):
        c.remove(force=True, v=True)
    m.close()


def test_manager_full_cycle(mgr, dclient):
    sb = mgr.create(SandboxCreateRequest(profile="test-docker", consumer="me", labels={"team": "blue"}))
    assert sb.state.value == "ready" and sb.reachability["container"].startswith("sbtest-")
    labels = dclient.api.inspect_container(sb.reachability["container_id"])["Config"]["Labels"]
    assert labels["sandboxer.sandbox_id"] == sb.id and labels["sandboxer.consumer"] == "me"
    assert labels["team"] == "blue" and labels["sandboxer.owner"] == mgr.owner_labels["sandboxer.owner"]

    weird = "$(touch /tmp/pwned) 'q\" \nnext"
    res = mgr.exec(sb.id, ["sh", "-c", 'printf %s "$W" > /work/w; cat /work/w'], env={"W": weird})
    assert res.stdout == weird and res.exit_code == 0

    snap = mgr.snapshot(sb.id)
    assert snap.checksum.startswith("sha256:") and snap.size_bytes > 0
    restored = mgr.restore(snap.id)
    assert mgr.exec(restored.id, ["cat", "/work/w"]).stdout == weird

    for sid in (sb.id, restored.id):
        assert mgr.teardown(sid).state.value == "terminated"
        assert mgr.teardown(sid).state.value == "terminated"  # idempotent
        assert containers_of(dclient, sid) == []
    mgr.delete_snapshot(snap.id)
    assert not dclient.images.list(name=snap.data["image"])


def test_gc_reaps_an_orphan_container(mgr, dclient):
    sb = mgr.create(SandboxCreateRequest(profile="test-docker"))
    mgr.teardown(sb.id)
    ext = mgr.extension("ext.test-docker")
    # A container the store never heard of, as a crash between create and record would leave.
    orphan = ext.provision(request(
        mgr.profile("test-docker"),
        {"sandbox_id": "sb-orphan1", "owner_labels": mgr.owner_labels, "tags": dict(mgr.owner_labels)},
        None,
    ))
    report = mgr.gc()
    assert "sb-orphan1" in report.orphans
    assert containers_of(dclient, "sb-orphan1") == []
    assert orphan.container == "sbtest-sb-orphan1"


def test_create_with_a_missing_image_leaves_nothing(mgr, dclient):
    with pytest.raises(InputError, match="sandboxer-no-such-image:1"):
        mgr.create(SandboxCreateRequest(profile="test-docker-missing"))
    owner = [f"{k}={v}" for k, v in mgr.owner_labels.items()]
    assert dclient.containers.list(all=True, filters={"label": owner}) == []
    assert [s.state.value for s in mgr.list(all=True)] == ["failed"]
