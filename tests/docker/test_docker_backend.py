"""ext.docker against a real dockerd: the full cycle, isolation, limits, faults and hostile input."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid

import pytest

from sandboxer.policy import NetworkPolicy

from sandboxer.contract import TeardownReport
from sandboxer.errors import (AuthError, ExecError, InputError, ProfileError, ProvisionError, RateLimited,
                              ReadinessTimeout, SnapshotError)
from sandboxer.extensions.docker import DockerConfig, DockerExtension, DockerHandle
from sandboxer.loader import load_catalog
from sandboxer.models import SnapshotMeta
from sandboxer.testing import request
from tests.docker.conftest import containers_of, variant
from tests.support.docker_fixtures import wait_gone

pytestmark = pytest.mark.root

HOSTILE = {
    "SUBST": "$(touch /tmp/pwned)",
    "TICKS": "`touch /tmp/pwned`",
    "QUOTES": "it's \"quoted\" ; touch /tmp/pwned",
    "NEWLINE": "line1\nline2; touch /tmp/pwned",
}


def _meta(ext, handle, out) -> SnapshotMeta:
    return SnapshotMeta(
        id="snap-test", sandbox_id=handle.sandbox_id, extension=ext.id, profile="docker",
        created_at="2026-11-21T00:00:00Z", size_bytes=out.size_bytes, checksum=out.checksum, data=out.data,
    )


def test_full_cycle_leaves_nothing_behind(ext, profile, make, owner, dclient):
    handle = make()
    reach = ext.wait_ready(handle, timeout=30)
    assert reach.container == handle.container and reach.network == "none"
    assert (reach.host, reach.docker_host, reach.address) == (ext.engine, ext.engine, None)
    # what the state store keeps comes back as the same handle (a key a later version dropped is ignored)
    assert DockerHandle.model_validate({**handle.model_dump(mode="json"), "dropped": 1}) == handle

    res = ext.exec(handle, ["sh", "-c", "echo state > /work/kept; pwd; echo oops >&2; exit 7"])
    assert (res.exit_code, res.stdout, res.stderr) == (7, "/work\n", "oops\n")

    out = ext.snapshot(handle)
    image = dclient.images.get(out.data["image"])
    assert out.checksum == image.id and out.size_bytes > 0
    meta = _meta(ext, handle, out)

    restored = ext.restore_from_snapshot(
        request(profile, {"sandbox_id": f"r-{uuid.uuid4().hex[:8]}", "owner_labels": owner, "tags": owner}, None), meta
    )
    ext.wait_ready(restored, timeout=30)
    assert ext.exec(restored, ["cat", "/work/kept"]).stdout == "state\n"
    assert restored.container_id != handle.container_id

    for h in (handle, restored):
        assert ext.teardown(h).removed == [h.container_id]
        assert containers_of(dclient, h.sandbox_id) == []
    ext.delete_snapshot(meta)
    ext.delete_snapshot(meta)  # idempotent
    assert not dclient.images.list(name=out.data["image"])
    with pytest.raises(SnapshotError, match="no longer on the Docker engine"):
        ext.restore_from_snapshot(request(profile, {"sandbox_id": "gone-snap", "owner_labels": owner}, None), meta)


def test_no_network_by_default(ext, make, dclient):
    handle = make()
    ext.wait_ready(handle, timeout=30)
    assert ext.exec(handle, ["ls", "/sys/class/net"]).stdout.split() == ["lo"]
    assert dclient.api.inspect_container(handle.container_id)["HostConfig"]["NetworkMode"] == "none"


def test_named_network_when_the_profile_allows_it(ext, profile, make, dclient):
    net = dclient.networks.create(f"sbtest-{uuid.uuid4().hex[:8]}", driver="bridge")
    try:
        allowed = variant(profile, network=net.name).model_copy(update={"network": NetworkPolicy(egress="internet")})
        handle = make(allowed)
        reach = ext.wait_ready(handle, timeout=30)
        assert "eth0" in ext.exec(handle, ["ls", "/sys/class/net"]).stdout.split()
        assert reach.ip_address is None or reach.network == net.name
        ext.teardown(handle)
    finally:
        net.remove()


def test_host_network_is_refused_at_load_time(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "profile.test-docker-hostnet.yaml").write_text(
        "slug: test-docker-hostnet\nextension: ext.docker\noptions:\n  network: host\n"
    )
    with pytest.raises(ProfileError, match=r"profile.test-docker-hostnet.yaml: field 'options.network'.*'host'"):
        load_catalog([tmp_path])


def test_resource_limits_and_labels_visible_in_inspect(ext, profile, make, owner, dclient):
    prof = variant(profile, resources={"cpu": 0.5, "memory_mb": 64, "pids": 32})
    handle = make(prof, tags={"team": "blue"})
    info = dclient.api.inspect_container(handle.container_id)
    host = info["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["MemorySwap"], host["PidsLimit"]) == (
        500_000_000, 64 * 2**20, 64 * 2**20, 32)
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    labels = info["Config"]["Labels"]
    assert labels["sandboxer.sandbox_id"] == handle.sandbox_id
    assert labels["sandboxer.owner"] == owner["sandboxer.owner"]
    assert labels["team"] == "blue" and labels["sandboxer.extension"] == "ext.docker"


def test_pids_limit_is_enforced(ext, profile, make):
    handle = make(variant(profile, resources={"pids": 16}))
    ext.wait_ready(handle, timeout=30)
    res = ext.exec(handle, ["sh", "-c", "for i in $(seq 40); do sleep 5 & done; wait"], timeout=20)
    assert "can't fork" in res.stderr or "Resource temporarily unavailable" in res.stderr


def test_teardown_of_an_already_removed_container_succeeds(ext, make, dclient):
    handle = make()
    dclient.containers.get(handle.container_id).remove(force=True)
    assert ext.teardown(handle) == TeardownReport(already_gone=True, removed=[], detail={"container": handle.container})
    never = DockerHandle(container_id="0" * 64, container="sandboxer-never-made", sandbox_id="never-made")
    assert ext.teardown(never).already_gone is True


def test_teardown_removes_anonymous_volumes(ext, profile, make, dclient, busybox_image):
    tag = "sandboxer-busybox-volume:test"
    dclient.images.build(fileobj=io.BytesIO(f"FROM {busybox_image}\nVOLUME /data\n".encode()), tag=tag, rm=True)
    handle = make(variant(profile, image=tag))
    mounts = dclient.api.inspect_container(handle.container_id)["Mounts"]
    volume = next(m["Name"] for m in mounts if m["Destination"] == "/data")
    ext.teardown(handle)
    assert not [v for v in dclient.volumes.list() if v.name == volume]


def test_list_owned_finds_an_orphan_and_only_ours(ext, make, owner):
    handle = make()
    other = {"sandboxer.owner": "someone-else"}
    found = ext.list_owned(owner)
    assert [o.sandbox_id for o in found] == [handle.sandbox_id]
    assert ext.list_owned(other) == []
    ext.teardown(found[0].handle)  # the handle list_owned gives is enough to reap it
    assert ext.list_owned(owner) == []


def test_hostile_env_and_argv_are_delivered_literally(ext, make):
    handle = make(env=HOSTILE)
    ext.wait_ready(handle, timeout=30)
    container_env = ext.exec(handle, ["env"]).stdout
    exec_env = ext.exec(handle, ["env"], env={"E_" + k: v for k, v in HOSTILE.items()}).stdout
    for k, v in HOSTILE.items():
        assert f"{k}={v}\n" in container_env
        assert f"E_{k}={v}\n" in exec_env
    argv = ["echo", "$(touch /tmp/pwned)", "a'b\"c", "x\ny", "; touch /tmp/pwned"]
    assert ext.exec(handle, argv).stdout == " ".join(argv[1:]) + "\n"
    assert ext.exec(handle, ["ls", "/tmp"]).stdout == ""  # the marker file never appeared


def test_bad_env_names_and_unknown_inputs_are_refused(ext, make, owner, dclient):
    with pytest.raises(InputError, match="'BAD NAME'"):
        make(env={"BAD NAME": "x"})
    with pytest.raises(InputError, match="field 'inputs.repo'.*unknown field"):
        make(repo="https://example.org/x.git")
    with pytest.raises(InputError, match="sandbox_id"):
        make(sandbox_id="a;rm -rf ~")
    # a trailing newline is not a valid name (re.match(r"...$") would accept it)
    with pytest.raises(InputError, match="'A\\\\n'"):
        make(env={"A\n": "x"})
    with pytest.raises(InputError, match="sandbox_id"):
        make(sandbox_id="abc\n")
    assert ext.list_owned(owner) == []


def test_exec_stdin_timeout_and_output_cap(ext, profile, make, catalog):
    handle = make()
    ext.wait_ready(handle, timeout=30)
    assert ext.exec(handle, ["cat"], stdin=b"from stdin\n").stdout == "from stdin\n"

    seen = []
    res = ext.exec(handle, ["sh", "-c", "echo a; echo b >&2"], on_output=lambda s, t: seen.append((s, t)))
    assert sorted(seen) == [("stderr", "b\n"), ("stdout", "a\n")] and res.exit_code == 0

    start = time.monotonic()
    res = ext.exec(handle, ["sh", "-c", "echo started; sleep 60 & sleep 61"], timeout=1.5)
    assert res.timed_out and res.exit_code == 124 and res.stdout == "started\n"
    assert time.monotonic() - start < 6
    assert "sleep 6" not in ext.exec(handle, ["ps"]).stdout  # the whole tree was killed

    small = DockerExtension(catalog.extensions["ext.docker"].manifest, DockerConfig(max_output_bytes=1000))
    res = small.exec(handle, ["sh", "-c", "yes | head -c 100000"])
    assert res.stdout == "y\n" * 500 and res.truncated and res.exit_code == 0

    # A quiet command outlasting the API call timeout is not an error; only `timeout` ends it.
    patient = DockerExtension(catalog.extensions["ext.docker"].manifest, DockerConfig(api_timeout=1))
    res = patient.exec(handle, ["sh", "-c", "sleep 2.5; echo done"])
    assert (res.exit_code, res.stdout, res.timed_out) == (0, "done\n", False)

    with pytest.raises(InputError):
        ext.exec(handle, [])
    ext.teardown(handle)
    with pytest.raises(ExecError, match=handle.sandbox_id):
        ext.exec(handle, ["true"])


@pytest.mark.parametrize("script", ['trap "" TERM; sleep 60', "setsid sleep 60 & sleep 60",
                                    "(setsid sleep 60 &); sleep 60"],
                         ids=["ignores-TERM", "setsid-child", "setsid-orphan"])
def test_deadline_kills_every_process_of_the_exec(ext, make, script):
    handle = make()
    ext.wait_ready(handle, timeout=30)
    mark = uuid.uuid4().hex
    start = time.monotonic()
    res = ext.exec(handle, ["sh", "-c", script], env={"SBX_TEST_MARK": mark}, timeout=1)
    assert (res.exit_code, res.timed_out) == (124, True) and time.monotonic() - start < 6
    assert wait_gone("SBX_TEST_MARK", mark) == [], "a process of the exec outlived its deadline"
    assert "sleep 60" not in ext.exec(handle, ["ps"]).stdout


def test_deadline_kills_inside_the_container_when_the_engine_is_elsewhere(ext, make, monkeypatch):
    """An engine on another machine: its pids are not ours to signal, so a sweep runs inside the container."""
    import sandboxer.extensions.docker_exec as mod

    monkeypatch.setattr(mod, "in_container", lambda pid, container_id: False)
    handle = make()
    ext.wait_ready(handle, timeout=30)
    mark = uuid.uuid4().hex
    res = ext.exec(handle, ["sh", "-c", "(setsid sleep 60 &); sleep 60"], env={"SBX_TEST_MARK": mark}, timeout=1)
    assert (res.exit_code, res.timed_out) == (124, True)
    assert wait_gone("SBX_TEST_MARK", mark) == []


def test_probe_sees_a_container_removed_or_stopped_behind_its_back(ext, make, owner, dclient):
    handle = make()
    ext.wait_ready(handle, timeout=30)
    assert ext.probe(handle) is True
    assert ext.handle_id(handle) == handle.container_id
    owned = [o for o in ext.list_owned(owner) if o.sandbox_id == handle.sandbox_id]
    assert [ext.handle_id(o.handle) for o in owned] == [handle.container_id]
    dclient.containers.get(handle.container_id).remove(force=True)
    assert ext.probe(handle) is False

    stopped = make()
    ext.wait_ready(stopped, timeout=30)
    dclient.containers.get(stopped.container_id).kill()
    assert ext.probe(stopped) is False, "a container that no longer runs cannot serve its sandbox"


def test_probe_of_an_unreachable_engine_raises(catalog, tmp_path):
    from sandboxer.errors import BackendError

    ext = DockerExtension(catalog.extensions["ext.docker"].manifest,
                          DockerConfig(docker_host=f"unix://{tmp_path}/no.sock", api_timeout=5))
    with pytest.raises(BackendError, match="cannot reach the Docker engine"):
        ext.probe(DockerHandle(container_id="0" * 64, container="x", sandbox_id="x"))


def test_missing_image_is_an_input_error_and_leaves_nothing(ext, profile, make, owner):
    with pytest.raises(InputError, match="'sandboxer-no-such-image:1'.*not on the Docker engine"):
        make(variant(profile, image="sandboxer-no-such-image:1", pull="never"))
    assert ext.list_owned(owner) == []


def test_failed_start_removes_the_container(ext, profile, make, owner):
    with pytest.raises(ProvisionError) as err:
        make(variant(profile, command=["/no/such/binary"], init=False))
    assert not err.value.transient
    assert ext.list_owned(owner) == []


def _exited(dclient, handle) -> None:
    """Wait (bounded) until the engine reports the container stopped."""
    for _ in range(200):
        if dclient.containers.get(handle.container_id).attrs["State"]["Status"] == "exited":
            return
        time.sleep(0.05)
    raise AssertionError(f"{handle.container} still runs after 10s")


def test_container_that_exited_is_not_ready_and_says_why(ext, profile, make, dclient):
    handle = make(variant(profile, command=["sh", "-c", "echo bye; exit 3"]))
    _exited(dclient, handle)  # it has gone before anyone asks: no race with the first inspect
    start = time.monotonic()
    with pytest.raises(ReadinessTimeout, match=r"exited with code 3.*bye"):
        ext.wait_ready(handle, timeout=30)
    assert time.monotonic() - start < 10


def test_container_that_exits_while_its_ready_command_is_polled_says_why(ext, profile, make):
    # Running at the first inspect, gone while the ready command still fails: the message is
    # the exit and its output, not "not ready within 30s", and it comes at once.
    handle = make(variant(profile, command=["sh", "-c", "echo bye; sleep 1; exit 3"],
                          ready_command=["test", "-e", "/tmp/never"]))
    start = time.monotonic()
    with pytest.raises(ReadinessTimeout, match=r"exited with code 3.*bye"):
        ext.wait_ready(handle, timeout=30)
    assert time.monotonic() - start < 10


def test_ready_command_must_pass(ext, profile, make):
    handle = make(variant(profile, ready_command=["test", "-e", "/tmp/go"]))
    with pytest.raises(ReadinessTimeout):
        ext.wait_ready(handle, timeout=1.5)
    ext.exec(handle, ["touch", "/tmp/go"])
    assert ext.wait_ready(handle, timeout=10).container == handle.container


def test_same_sandbox_id_twice_is_a_non_transient_conflict(ext, make):
    make(sandbox_id="twice-1")
    with pytest.raises(ProvisionError, match="409") as err:
        make(sandbox_id="twice-1")
    assert not err.value.transient


def test_unreachable_engine_is_transient_and_fast(catalog, profile, tmp_path):
    manifest = catalog.extensions["ext.docker"].manifest
    ext = DockerExtension(manifest, DockerConfig(docker_host=f"unix://{tmp_path}/no.sock", api_timeout=5))
    start = time.monotonic()
    with pytest.raises(ProvisionError, match="cannot reach the Docker engine") as err:
        ext.provision(request(profile, {"sandbox_id": "x1"}, None))
    assert err.value.transient and time.monotonic() - start < 5


def _api_error(status: int):
    import docker.errors
    import requests

    resp = requests.Response()
    resp.status_code = status
    return docker.errors.APIError("boom", response=resp, explanation="engine trouble")


def _failing_engine(ext: DockerExtension, monkeypatch, exc: Exception) -> None:
    """Fault injection at the SDK seam: the client finds every image, and every other call raises ``exc``."""
    from types import SimpleNamespace

    def boom(*args, **kwargs):
        raise exc

    client = SimpleNamespace(images=SimpleNamespace(get=lambda ref: object()),
                             containers=SimpleNamespace(create=boom),
                             api=SimpleNamespace(exec_create=boom, remove_container=boom, inspect_container=boom))
    monkeypatch.setattr(ext, "client", lambda: client)


@pytest.mark.parametrize("status, transient", [(500, True), (503, True), (409, False), (400, False)])
def test_engine_5xx_is_transient_and_409_is_not(catalog, profile, monkeypatch, status, transient):
    """The translation, not the engine, is under test: by the SDK's public status_code and explanation."""
    ext = DockerExtension(catalog.extensions["ext.docker"].manifest, DockerConfig(docker_host="unix:///x"))
    _failing_engine(ext, monkeypatch, _api_error(status))
    with pytest.raises(ProvisionError) as err:
        ext.provision(request(profile, {"sandbox_id": "sdk-fault"}))
    assert err.value.transient is transient
    assert str(err.value) == (f"ext.docker on unix:///x: creating the container for sandbox sdk-fault failed: "
                              f"engine answered {status}: engine trouble")
    # raised outside the except block: the SDK's exception travels neither as cause nor as context
    assert err.value.__cause__ is None and err.value.__context__ is None


def test_engine_errors_keep_the_class_of_what_was_being_done(catalog, profile, monkeypatch):
    import requests

    ext = DockerExtension(catalog.extensions["ext.docker"].manifest, DockerConfig(docker_host="unix:///x"))
    handle = DockerHandle(container_id="c" * 64, container="sandboxer-sdk-fault", sandbox_id="sdk-fault")
    _failing_engine(ext, monkeypatch, _api_error(401))
    with pytest.raises(AuthError, match=r"^ext.docker on unix:///x: exec 'true' for sandbox sdk-fault: the Docker "
                                        r"engine refused the credentials \(401\)$"):
        ext.exec(handle, ["true"])
    _failing_engine(ext, monkeypatch, _api_error(429))
    with pytest.raises(RateLimited, match="removing the container for sandbox sdk-fault: the Docker engine asked"):
        ext.teardown(handle)
    _failing_engine(ext, monkeypatch, requests.exceptions.ConnectionError("refused"))
    with pytest.raises(ExecError, match=r"exec 'true' for sandbox sdk-fault failed: cannot reach the Docker engine "
                                        r"\(ConnectionError: refused\)") as err:
        ext.exec(handle, ["true"])
    assert err.value.transient
    import docker.errors

    _failing_engine(ext, monkeypatch, docker.errors.NotFound("No such container"))
    assert ext.probe(handle) is False  # NotFound: the container is gone, which is an answer


def test_manifest_loads_without_the_docker_sdk():
    code = (
        "import sys; sys.modules['docker'] = None\n"
        "from sandboxer.loader import load_catalog\n"
        "c = load_catalog([])\n"
        "assert 'docker' in c.profiles and c.extensions['ext.docker'].handler.requires == ('docker', 'docker')\n"
        "assert sys.modules['docker'] is None\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_a_character_split_across_frames_arrives_whole(ext, make):
    from tests.unit.test_execution import check_split

    handle = make()
    ext.wait_ready(handle, timeout=30)
    check_split(lambda argv, on_output: ext.exec(handle, argv, on_output=on_output))
    # past the cap: cut on a character boundary (3-byte €, cap 1000 -> 333 whole), and flagged
    small = DockerExtension(ext.manifest, DockerConfig(max_output_bytes=1000))
    res = small.exec(handle, ["sh", "-c", "i=0; while [ $i -lt 400 ]; do printf '\\342\\202\\254'; i=$((i+1)); done"])
    assert (res.exit_code, res.stdout, res.truncated) == (0, "€" * 333, True)
    with pytest.raises(InputError, match=r"argv\[0\] must be a string"):
        ext.exec(handle, [None])
