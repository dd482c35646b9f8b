"""A ``runtime: process`` extension runs in a worker process and behaves like the same handler in-process."""

from __future__ import annotations

import os

import pytest

from sandboxer.contract import Handle
from sandboxer.testing import request

from sandboxer.errors import BackendError, ExecError, ExtensionLoadError
from sandboxer.host.client import ProcessExtension
from tests.host.conftest import STUB_PROCESS, STUB_PROFILE


@pytest.fixture
def mgr(cfg, host_manager):  # type: ignore[no-untyped-def]
    cfg.write("ext.stubproc.yaml", STUB_PROCESS)
    cfg.write("profile.stubproc.yaml", STUB_PROFILE)
    return host_manager()


def test_create_exec_teardown_through_a_worker(mgr) -> None:
    ext = mgr.extension("ext.stubproc")
    assert isinstance(ext, ProcessExtension)
    sb = mgr.create(profile="stubproc")
    assert sb.state.value == "ready"
    pid = ext.pid()
    assert pid and pid != os.getpid()
    seen: list[tuple[str, str]] = []
    res = mgr.exec(sb.id, ["echo", "hello"], on_output=lambda s, t: seen.append((s, t)))
    assert res.exit_code == 0
    assert "hello" in res.stdout
    assert seen and seen[0][0] == "stdout"
    assert mgr.teardown(sb.id).state.value == "terminated"
    assert ext.pid() == pid  # one worker served every call


def test_errors_cross_as_the_same_classes(mgr) -> None:
    ext = mgr.extension("ext.stubproc")
    with pytest.raises(ExecError, match=r"^ext\.stubproc: stub-gone is not running$") as err:
        ext.exec(Handle(stub_id="stub-gone"), ["true"])
    assert err.value.backend == "ext.stubproc"
    # a handle that does not fit the handler's model is refused in the worker, naming both
    with pytest.raises(BackendError) as err2:
        ext.exec(Handle(no="stub_id"), ["true"])
    assert type(err2.value) is BackendError
    assert str(err2.value) == ("ext.stubproc: the recorded handle does not fit ext.stubproc's StubHandle: stub_id: "
                               "Field required; the record was written by another version of ext.stubproc")


def test_the_worker_gets_a_minimal_environment(mgr, monkeypatch) -> None:
    monkeypatch.setenv("SANDBOXER_SECRET_OF_THE_MANAGER", "do-not-leak")
    ext = mgr.extension("ext.stubproc")
    ext.ping()
    with open(f"/proc/{ext.pid()}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if kv)
    assert set(env) == {b"PATH", b"HOME", b"LANG", b"PYTHONPATH"}
    assert env[b"HOME"] == str(ext.private_dir).encode()
    assert os.readlink(f"/proc/{ext.pid()}/cwd") == str(ext.private_dir)
    fds = os.listdir(f"/proc/{ext.pid()}/fd")
    assert sorted(int(f) for f in fds)[:3] == [0, 1, 2] and len(fds) <= 5  # stdio + the protocol copy


def test_an_abi_mismatch_is_refused(mgr, monkeypatch) -> None:
    ext = mgr.extension("ext.stubproc")
    monkeypatch.setattr(ext, "abi_version", 99)
    with pytest.raises(ExtensionLoadError, match=r"ext\.stubproc: the manager speaks extension-host ABI 99, "
                                                 r"this worker speaks 2"):
        ext.ping()


def test_only_the_secrets_its_config_references_reach_the_worker(cfg, host_manager, monkeypatch) -> None:
    monkeypatch.setenv("STUB_TEST_KEY", "key-for-the-stub")
    monkeypatch.setenv("UNRELATED_TOKEN", "not-for-the-worker")
    cfg.write("ext.stubproc.yaml", STUB_PROCESS.replace("config: {capacity: 5}",
                                                        "config: {capacity: 5, api_key: {env: STUB_TEST_KEY}}"))
    cfg.write("profile.stubproc.yaml", STUB_PROFILE)
    mgr = host_manager()
    sb = mgr.create(profile="stubproc")  # the stub refuses a create without its key
    assert sb.state.value == "ready"
    ext = mgr.extension("ext.stubproc")
    with open(f"/proc/{ext.pid()}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if kv)
    assert env[b"STUB_TEST_KEY"] == b"key-for-the-stub"
    assert set(env) == {b"PATH", b"HOME", b"LANG", b"PYTHONPATH", b"STUB_TEST_KEY"}
    assert "key-for-the-stub" not in repr(ext) and "key-for-the-stub" not in ext.stderr.tail()


def test_an_unset_secret_is_refused_in_the_worker_naming_the_reference(cfg, host_manager, monkeypatch) -> None:
    from sandboxer.errors import AuthError

    monkeypatch.delenv("STUB_TEST_KEY", raising=False)
    cfg.write("ext.stubproc.yaml", STUB_PROCESS.replace("config: {capacity: 5}",
                                                        "config: {capacity: 5, api_key: {env: STUB_TEST_KEY}}"))
    cfg.write("profile.stubproc.yaml", STUB_PROFILE)
    mgr = host_manager()
    ext = mgr.extension("ext.stubproc")
    with pytest.raises(AuthError) as err:
        ext.provision(request(mgr.profile("stubproc"), sandbox_id="sb-x1", ttl=60))
    assert err.value.credential == "env STUB_TEST_KEY"
    assert "STUB_TEST_KEY" in str(err.value)


def test_an_unknown_runtime_is_refused_at_load_naming_the_file(cfg) -> None:
    from sandboxer.errors import ManifestError
    from sandboxer.loader import load_catalog

    path = cfg.write("ext.stubproc.yaml", STUB_PROCESS.replace("runtime: process", "runtime: thread"))
    with pytest.raises(ManifestError) as err:
        load_catalog([cfg.root])
    assert str(err.value) == (f"{path}: field 'runtime' (value 'thread'): Input should be 'in-process' or "
                              "'process'")


def test_what_a_process_extension_cannot_keep_is_known_without_importing_it(cfg, home) -> None:
    """policy_refusals (and unavailable) of a ``runtime: process`` handler are asked in its describe
    worker: the router refuses as it does for an in-process one."""
    from sandboxer import Manager
    from sandboxer.errors import CapabilityError

    cfg.write("ext.localproc.yaml", """
        id: ext.localproc
        title: ext.local, out of process
        version: 0.1.0
        handler: sandboxer.extensions.local:LocalExtension
        runtime: process
        capabilities:
          isolation_levels: [process, none]
          pricing_model: self-hosted
          features: [exec, snapshots, list_owned]
    """)
    cfg.write("profile.bareproc.yaml", "slug: bareproc\nextension: ext.localproc\nisolation: none\n")
    mgr = Manager(config_dirs=[cfg.root], home=home)
    loaded = mgr.catalog.extensions["ext.localproc"]
    assert loaded.handler is None  # never imported here
    assert loaded.refusals[("bareproc", 0)][0].startswith("'isolation: none' runs commands on the host")
    assert "network:cidr-allowlist" in loaded.enforces and loaded.unavailable == {}
    with pytest.raises(CapabilityError, match=r"ext\.localproc cannot keep the policy of profile 'bareproc'"):
        mgr.create(profile="bareproc", consumer="t")
    assert mgr.list() == []
    mgr.close()
