"""The SSH backends' contract additions: resource_names, deadline, exclusive inputs, probe and handle_id.

The pure ones (names, deadlines, input checks) run against backends configured with hosts that
nothing listens on, and prove no SSH connection was opened; probe runs against real stacks and
workspaces on the test sshd servers.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from sandboxer.errors import InputError
from sandboxer.extensions.compose_ssh import ComposeHandle
from sandboxer.extensions.vm_packer import VMPacker, VmHandle
from sandboxer.loader import load_catalog
from sandboxer.models import Profile
from sandboxer.ssh import STATS
from sandboxer.testing import request
from tests.ssh.conftest import load_backend, write_config

COMPOSE = "ext.test-compose"
VM = "ext.test-vm"
RUN = uuid.uuid4().hex[:6]


def _dead_host(name: str, port: int = 1, **extra: Any) -> dict[str, Any]:
    """A host nothing listens on: any connection attempt would be counted (and fail)."""
    return {"name": name, "address": "127.0.0.1", "port": port, "user": "u", "use_agent": False,
            "insecure_accept_unknown_host_keys": True, "connect_timeout": 1, **extra}


@pytest.fixture
def offline_compose(tmp_path):
    cfg = {"workspace_root": "/srv/compose", "hosts": [
        _dead_host("h0"), _dead_host("h1", workspace_root="/srv/other"),  # one machine, entered twice
        _dead_host("h2", port=2, docker_host="tcp://127.0.0.5:2375")]}  # another machine, a shared engine
    return load_backend(write_config(tmp_path / "cc", COMPOSE, "sandboxer.extensions.compose_ssh:ComposeSSH", cfg),
                        COMPOSE)


@pytest.fixture
def offline_vm(tmp_path):
    vm = {k: v for k, v in _dead_host("x", port=2222).items() if k != "name"}
    cfg = {"workspace_root": "/srv/ws", "vms": {"vm0": vm, "vm1": {**vm, "port": 2223, "workspace_root": "/srv/v1"}},
           "target_defaults": {"insecure_accept_unknown_host_keys": True, "use_agent": False}}
    return load_backend(write_config(tmp_path / "vc", VM, "sandboxer.extensions.vm_packer:VMPacker", cfg), VM)


def cprofile(**options: Any) -> Profile:
    return Profile(slug="c", extension=COMPOSE, options=options, network={"egress": "internet"})


def vprofile(**options: Any) -> Profile:
    return Profile(slug="v", extension=VM, options=options, network={"egress": "internet"})


# ------------------------------------------------------------------ resource_names


def test_compose_names_are_the_project_as_compose_compares_it_and_the_workspace(offline_compose):
    STATS.reset()
    b = offline_compose
    base = {"repo": "/srv/git/r", "sandbox_id": "abc"}
    # names say where they live: the engine for projects, the machine for directories
    assert b.resource_names(request(cprofile(), base, "h0")) == ["compose project 127.0.0.1:1 sbx-abc",
                                                         "workspace 127.0.0.1:1:/srv/compose/abc"]
    assert b.resource_names(request(cprofile(), base, "h1")) == ["compose project 127.0.0.1:1 sbx-abc",
                                                         "workspace 127.0.0.1:1:/srv/other/abc"]
    assert b.resource_names(request(cprofile(), base, "h2")) == ["compose project tcp://127.0.0.5:2375 sbx-abc",
                                                         "workspace 127.0.0.1:2:/srv/compose/abc"]
    # another sandbox choosing the first one's default project, in any case, takes the same name
    for project in ("sbx-abc", "SBX-Abc"):
        names = b.resource_names(request(cprofile(), {**base, "sandbox_id": "other", "project": project}, "h0"))
        assert names[0] == "compose project 127.0.0.1:1 sbx-abc"
    assert b.resource_names(request(cprofile(project_prefix="t-"), base, "h0"))[0] == \
        "compose project 127.0.0.1:1 t-abc"
    with pytest.raises(InputError, match="project"):
        b.resource_names(request(cprofile(), {**base, "project": "proj\n"}, "h0"))
    assert STATS.snapshot()["connections"] == 0


def test_compose_passes_the_normalised_project_to_compose(offline_compose):
    want = offline_compose._check_inputs(request(cprofile(), {"repo": "/srv/git/r", "sandbox_id": "abc",
                                                               "project": "My-Proj"}))
    assert want["project"] == "my-proj"


def test_vm_names_are_the_workspace_on_its_target(offline_vm):
    STATS.reset()
    b = offline_vm
    assert b.resource_names(request(vprofile(), {"vm": "vm0", "sandbox_id": "s1"}, "vm0")) == [
        "workspace 127.0.0.1:2222:/srv/ws/s1"]
    # a chosen workspace_dir is the name; the same directory through ssh_target is the same name
    named = b.resource_names(request(vprofile(), {"vm": "vm0", "sandbox_id": "s2", "workspace_dir": "shared"}, "vm0"))
    via_target = b.resource_names(request(vprofile(), {"ssh_target": "u@127.0.0.1:2222", "sandbox_id": "s3",
                                                       "workspace_dir": "shared"}, "vm0"))
    assert named == via_target == ["workspace 127.0.0.1:2222:/srv/ws/shared"]
    assert b.resource_names(request(vprofile(), {"vm": "vm1", "sandbox_id": "s1"}, "vm1")) == [
        "workspace 127.0.0.1:2223:/srv/v1/s1"]
    with pytest.raises(InputError, match="workspace_dir"):
        b.resource_names(request(vprofile(), {"vm": "vm0", "sandbox_id": "s1", "workspace_dir": "ws\n"}, "vm0"))
    assert STATS.snapshot()["connections"] == 0


# ------------------------------------------------------------------ deadline


def test_shipped_compose_profile_deadline_covers_clone_up_and_ready():
    cat = load_catalog([])
    prof = cat.profiles["compose-ssh"]
    ext = cat.extensions["ext.compose-ssh"].instance()
    opts = ext.options(prof)
    assert prof.ready_timeout == 300 and opts.command_timeout == 600
    assert ext.deadline(prof) >= opts.command_timeout + prof.ready_timeout
    longer = Profile.model_validate({**prof.model_dump(), "options": {"command_timeout": 1800}})
    assert ext.deadline(longer) >= 1800 + prof.ready_timeout


def test_shipped_vm_profile_deadline_covers_clone_and_ready():
    cat = load_catalog([])
    prof = cat.profiles["vm-haskell-build"]
    ext = cat.extensions["ext.vm-packer"].instance()
    assert ext.deadline(prof) >= ext.options(prof).command_timeout + prof.ready_timeout


# ------------------------------------------------------------------ exclusive inputs


def test_vm_and_ssh_target_are_exclusive(offline_vm):
    assert frozenset({"vm", "ssh_target"}) in VMPacker.exclusive_inputs
    STATS.reset()
    both = r"inputs 'vm' \('vm0'\) and 'ssh_target' \('u@127.0.0.1:2222'\) are exclusive; give one"
    with pytest.raises(InputError, match=both):
        offline_vm.provision(request(vprofile(), {"vm": "vm0", "ssh_target": "u@127.0.0.1:2222",
                                                  "sandbox_id": "s1"}, None))
    assert STATS.snapshot()["connections"] == 0


def test_shipped_haskell_profile_takes_an_ssh_target_instead_of_its_default_vm(tmp_path):
    from sandboxer import Manager

    mgr = Manager(config_dirs=[], home=tmp_path / "home")
    try:
        merged = mgr._check_inputs(mgr.catalog.profiles["vm-haskell-build"], {"ssh_target": "me@10.0.0.9"})
    finally:
        mgr.close()
    assert merged == {"ssh_target": "me@10.0.0.9"}


# ------------------------------------------------------------------ through the Manager, real sshd


@pytest.fixture
def cfg_dir(tmp_path, sshd_pool, known_hosts, docker_host, busybox_image, compose_repo) -> Path:
    hosts = [{**s.host_config(known_hosts), "name": f"h{i}", "capacity": 3, "docker_host": docker_host,
              "workspace_root": str(tmp_path / f"c{i}")} for i, s in enumerate(sshd_pool)]
    d = write_config(tmp_path / "cfg", COMPOSE, "sandboxer.extensions.compose_ssh:ComposeSSH",
                     {"hosts": hosts, "workspace_root": str(tmp_path / "c")},
                     profiles={"test-compose": {"backends": [{"extension": COMPOSE, "hosts": ["h0"]}],
                                                "ready_timeout": 60,
                                                "inputs": {"defaults": {"repo": str(compose_repo)}}}})
    vms = {f"vm{i}": {**s.host_config(known_hosts), "workspace_root": str(tmp_path / f"v{i}")}
           for i, s in enumerate(sshd_pool)}
    write_config(d, VM, "sandboxer.extensions.vm_packer:VMPacker",
                 {"vms": vms, "workspace_root": str(tmp_path / "targets"),
                  "target_defaults": {"known_hosts": str(known_hosts), "key_file": str(sshd_pool[0].user_key),
                                      "use_agent": False}},
                 profiles={"test-vm": {"extension": VM, "inputs": {"defaults": {"vm": "vm0"}}}})
    return d


@pytest.fixture
def mgr(cfg_dir, tmp_path):
    from sandboxer import Manager

    m = Manager(config_dirs=[cfg_dir], home=tmp_path / "home")
    yield m
    for sb in m.list():
        m.teardown(sb.id)
    m.close()


def _containers(project: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.split()


def test_a_second_sandbox_cannot_take_a_live_sandboxs_project(mgr, tmp_path):
    from sandboxer import SandboxCreateRequest

    shared = f"shared-{RUN}"
    first = mgr.create(SandboxCreateRequest(profile="test-compose", consumer="me", inputs={"project": shared}))
    other = mgr.create(SandboxCreateRequest(profile="test-compose", consumer="me"))
    assert other.reachability["compose_project"] == f"sbx-{other.id}"
    running = _containers(shared)
    assert running
    # the same project, in another case (compose folds it), and another sandbox's default project
    for project, holder in ((shared, first.id), (shared.upper(), first.id), (f"sbx-{other.id}", other.id)):
        STATS.reset()
        before = {p.name for p in (tmp_path / "c0").iterdir()}
        with pytest.raises(InputError, match=f"on {COMPOSE} is already used by live sandbox {holder}"):
            mgr.create(SandboxCreateRequest(profile="test-compose", consumer="me", inputs={"project": project}))
        assert STATS.snapshot()["connections"] == 0, "a refused create reached a host"
        assert {p.name for p in (tmp_path / "c0").iterdir()} == before, "the refused sandbox left a workspace"
    assert {s.id for s in mgr.list(all=True)} == {first.id, other.id}, "a refused create was recorded"
    assert mgr.get(first.id).state.value == "ready" and mgr.get(other.id).state.value == "ready"
    assert _containers(shared) == running, "the first stack was disturbed"


def test_a_refused_input_opens_no_ssh_connection(mgr):
    from sandboxer import SandboxCreateRequest

    STATS.reset()
    for profile, inputs in (("test-compose", {"project": "proj\n"}), ("test-compose", {"ref": "main\n"}),
                            ("test-vm", {"workspace_dir": "a/b"}), ("test-vm", {"ref": "-x"})):
        with pytest.raises(InputError):
            mgr.create(SandboxCreateRequest(profile=profile, consumer="me", inputs=inputs))
    assert STATS.snapshot()["connections"] == 0
    assert mgr.list() == []


def test_an_ssh_target_replaces_the_profiles_default_vm(mgr, sshd_pool, tmp_path):
    from sandboxer import SandboxCreateRequest

    target = f"{sshd_pool[1].user}@127.0.0.1:{sshd_pool[1].port}"
    sb = mgr.create(SandboxCreateRequest(profile="test-vm", consumer="me", inputs={"ssh_target": target}))
    assert sb.reachability["remote_dir"] == str(tmp_path / "targets" / sb.id)
    assert mgr.exec(sb.id, ["pwd"]).stdout.strip() == sb.reachability["remote_dir"]


# ------------------------------------------------------------------ probe and handle_id


def test_compose_probe_sees_a_stack_removed_behind_its_back(mgr):
    from sandboxer import SandboxCreateRequest

    sb = mgr.create(SandboxCreateRequest(profile="test-compose", consumer="me"))
    ext = mgr.extension(COMPOSE)
    handle = ComposeHandle.model_validate(mgr.state.get(sb.id)["handle"])
    assert ext.probe(handle) is True
    assert ext.handle_id(handle) == f"h0/{handle.project}"
    owned = [o for o in ext.list_owned(mgr.owner_labels) if o.sandbox_id == sb.id]
    assert [ext.handle_id(o.handle) for o in owned] == [ext.handle_id(handle)]
    project = handle.project
    subprocess.run(["docker", "rm", "-f", *_containers(project)], capture_output=True, timeout=60, check=True)
    assert ext.probe(handle) is False
    assert mgr.get(sb.id, refresh=True).state.value == "lost"
    # what the stack left (workspace, named volume, network) is swept as it is found lost
    f = f"label=com.docker.compose.project={project}"
    assert [e["kind"] for e in mgr.events(sb.id)][-1] == "lost_swept"
    assert not Path(handle.remote_dir).exists()
    for kind in (("ps", "-aq"), ("volume", "ls", "-q"), ("network", "ls", "-q")):
        assert _docker(*kind, "--filter", f) == [], f"the lost stack's {kind[0]} was left"
    assert sb.id not in mgr.gc().orphans  # nothing left for gc


def _docker(*args: str) -> list[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=True).stdout.split()


def test_vm_probe_sees_a_workspace_removed_behind_its_back(mgr):
    import shutil

    from sandboxer import SandboxCreateRequest

    sb = mgr.create(SandboxCreateRequest(profile="test-vm", consumer="me"))
    ext = mgr.extension(VM)
    handle = VmHandle.model_validate(mgr.state.get(sb.id)["handle"])
    assert ext.probe(handle) is True
    assert ext.handle_id(handle) == f"vm0:{handle.remote_dir}"
    owned = [o for o in ext.list_owned(mgr.owner_labels) if o.sandbox_id == sb.id]
    assert [ext.handle_id(o.handle) for o in owned] == [ext.handle_id(handle)]
    shutil.rmtree(handle.remote_dir)
    assert ext.probe(handle) is False
    assert mgr.get(sb.id, refresh=True).state.value == "lost"


def test_probe_of_an_unreachable_host_raises_a_backend_error(offline_compose, offline_vm):
    from sandboxer.errors import BackendError

    with pytest.raises(BackendError, match="127.0.0.1"):
        offline_compose.probe(ComposeHandle(host="h0", sandbox_id="abc", project="sbx-abc", compose="v2",
                                            remote_dir="/srv/compose/abc", repo_dir="/srv/compose/abc/repo"))
    with pytest.raises(BackendError, match="127.0.0.1"):
        offline_vm.probe(VmHandle(host="vm0", vm="vm0", sandbox_id="s1", root="/srv/ws", name="s1",
                                  remote_dir="/srv/ws/s1"))


# ------------------------------------------------------------------ handles as stored


def test_handles_recorded_by_the_dict_version_load_as_models():
    """The JSON the previous (dict-handle) version stored, an extra key included, loads unchanged."""
    compose = {"host": "h0", "address": "10.0.0.5", "port": 22, "user": "u", "sandbox_id": "abc",
               "remote_dir": "/srv/compose/abc", "repo_dir": "/srv/compose/abc/repo", "project": "sbx-abc",
               "compose": "v2", "compose_file": "", "services": ["app"], "exec_service": None,
               "repo": "/srv/git/r", "ref": "", "dropped_key": 1}
    h = ComposeHandle.model_validate(compose)
    assert (h.project, h.services, h.repo_dir) == ("sbx-abc", ["app"], "/srv/compose/abc/repo")
    # a field added since (the exposed ports' forwarder) comes with its default
    assert h.model_dump(mode="json") == {**{k: v for k, v in compose.items() if k != "dropped_key"}, "forwarder": None}
    vm = {"host": "vm0", "vm": "vm0", "ssh_target": None, "ssh_port": None, "sandbox_id": "s1", "root": "/srv/ws",
          "name": "s1", "remote_dir": "/srv/ws/s1", "repo": "", "ref": "", "tunnel_port": 8080,
          "readiness": {"require_commands": ["sh"], "readiness_command": None}, "tunnel_local_port": 40001}
    v = VmHandle.model_validate(vm)
    assert (v.readiness.require_commands, v.tunnel_port, v.tunnel_local_port) == (["sh"], 8080, 40001)
    assert v.model_dump(mode="json") == {**vm, "forwarder": None, "image": None}  # fields added since: their defaults
