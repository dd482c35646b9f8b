"""The capability broker end to end: a signed test bundle (tests/trust/probe) installed and run through
the out-of-process host, whose handler probes, from inside its worker, what it can reach. It gets
what its grants allow and nothing else, each decision is an audit event, and the operator can
narrow the grants in trust.yaml."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from sandboxer import Manager
from sandboxer.errors import ConfigError, UndeclaredSecret, UnknownCapability
from sandboxer.state import StateStore
from sandboxer.trust import load_trust, sign_bundle
from sandboxer.trust.installer import Installer
from tests.trust.conftest import build_wheel

PROBE = Path(__file__).resolve().parent / "probe"

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


@pytest.fixture(scope="session")
def probe_wheel(tmp_path_factory) -> Path:
    return build_wheel(PROBE, tmp_path_factory.mktemp("probe-wheel"))


@pytest.fixture
def banner():
    """A TCP server on 127.0.0.1 that sends ``text`` to each connection: ``start(text) -> port``."""
    servers = []

    def start(text: bytes) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        srv.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except OSError:
                    continue
                with c:
                    c.sendall(text)
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        servers.append((srv, stop, t))
        return srv.getsockname()[1]

    yield start
    for srv, stop, t in servers:
        stop.set()
        t.join(5)
        srv.close()


@pytest.fixture
def install(tmp_path, probe_wheel, acme, trusted, monkeypatch):
    """``install(grants, config=None) -> Manager`` with ext.probe installed from a bundle signed by acme."""
    mgrs = []

    def make(grants: list[str], config: dict | None = None, *, narrow: list[str] | None = None,
             features: tuple[str, ...] = ("exec",)) -> Manager:
        d = tmp_path / "probe-bundle"
        d.mkdir()
        artifact = d / probe_wheel.name
        shutil.copyfile(probe_wheel, artifact)
        manifest = d / "ext.probe.yaml"
        manifest.write_text(yaml.safe_dump({
            "id": "ext.probe", "title": "Probe", "version": "0.1.0", "handler": "probe", "runtime": "process",
            "publisher": "acme", "abi": 2,
            "capabilities": {"isolation_levels": ["none"], "pricing_model": "free", "features": list(features),
                             "grants": grants},
            "dependencies": {}, "config": config or {}}, sort_keys=False))
        sign_bundle(manifest, acme, artifact)
        if narrow is not None:
            tf = trusted / "trust.yaml"
            tf.write_text(yaml.safe_dump({**yaml.safe_load(tf.read_text()), "narrow": {"ext.probe": narrow}}))
        home = tmp_path / "home"
        state = StateStore(home=home)
        Installer(home, state, load_trust([trusted]), None, who="tester").install(str(manifest))
        state.close()
        (trusted / "profiles").mkdir(exist_ok=True)
        (trusted / "profiles" / "profile.probe.yaml").write_text(
            "slug: probe\nextension: ext.probe\nready_timeout: 20s\nttl: {default: 10m, max: 1h}\n")
        mgr = Manager(config_dirs=[trusted], home=home)
        mgrs.append(mgr)
        return mgr

    yield make
    for m in mgrs:
        m.close()


def probe(mgr: Manager, sb_id: str, *argv: object):
    res = mgr.exec(sb_id, [str(a) for a in argv])
    out = json.loads(res.stdout)
    return out if res.exit_code == 0 else out["error"]


def decisions(mgr: Manager) -> list[tuple[str, str, str, str | None]]:
    return [(e["reason"], e["detail"]["op"], e["detail"]["target"], e["detail"]["grant"])
            for e in mgr.state.audit_events("ext.probe") if e["what"] == "capability"]


def test_secrets_only_those_granted_and_never_in_the_workers_environment(install, monkeypatch):
    monkeypatch.setenv("PROBE_TOKEN", "tok-3f9a")
    monkeypatch.setenv("OTHER_TOKEN", "tok-other")
    mgr = install(["secrets:read:env:PROBE_TOKEN"], {"token": {"env": "PROBE_TOKEN"}})
    sb = mgr.create(profile="probe", consumer="me")
    assert probe(mgr, sb.id, "secret", "env:PROBE_TOKEN") == "tok-3f9a"
    assert probe(mgr, sb.id, "secret", "env:OTHER_TOKEN") == (
        "GrantDenied: ext.probe: the broker refused reading the secret env:OTHER_TOKEN: no grant allows it (granted: "
        "secrets:read:env:PROBE_TOKEN); an operator allows it only by installing a bundle that declares "
        "'secrets:read:env:OTHER_TOKEN' (and not narrowing it away in trust.yaml)")
    env = probe(mgr, sb.id, "environ")
    assert "tok-3f9a" not in json.dumps(env) and "PROBE_TOKEN" not in env and "OTHER_TOKEN" not in env
    # a child process of the worker (a sandbox it runs) has no token: the broker refuses it, and says so
    answer = probe(mgr, sb.id, "token-less")
    assert answer["error"]["type"] == "GrantDenied" and "not this extension's worker" in answer["error"]["message"]
    assert decisions(mgr) == [("allowed", "secret", "env:PROBE_TOKEN", "secrets:read:env:PROBE_TOKEN"),
                              ("denied", "secret", "env:OTHER_TOKEN", None), ("denied", "request", "-", None)]
    mgr.teardown(sb.id)


def test_a_config_secret_the_grants_do_not_name_is_refused_at_load(install, trusted, tmp_path):
    mgr = install(["secrets:read:env:PROBE_TOKEN"], {"token": {"env": "PROBE_TOKEN"}})
    mgr.close()
    (trusted / "extensions").mkdir()
    override = trusted / "extensions" / "ext.probe.yaml"
    override.write_text("id: ext.probe\noverride: config\nconfig:\n  token: {env: DEPLOY_KEY}\n")
    with pytest.raises(UndeclaredSecret) as err:
        Manager(config_dirs=[trusted], home=tmp_path / "home")
    assert str(err.value) == (
        f"{override}: field 'config.token' (value 'env:DEPLOY_KEY'): ext.probe asks for a secret its bundle does not "
        f"declare (it would need the grant 'secrets:read:env:DEPLOY_KEY'); an installed bundle gets only the "
        f"secrets it declares")


def test_egress_only_to_granted_hosts_and_never_directly(install, banner):
    port = banner(b"hello from the host\n")
    mgr = install(["network:egress:127.0.0.1", "network:egress:localhost"])
    sb = mgr.create(profile="probe", consumer="me")
    assert probe(mgr, sb.id, "connect", "127.0.0.1", port) == "hello from the host\n"
    # its own network namespace: the host's loopback is not there
    assert probe(mgr, sb.id, "direct", "127.0.0.1", port).startswith("ConnectionRefusedError")
    assert probe(mgr, sb.id, "connect", "127.0.0.2", port).startswith(
        "GrantDenied: ext.probe: the broker refused a connection to 127.0.0.2:%d: no grant allows it" % port)
    # a name grant never reaches a loopback address (DNS could say anything)
    assert probe(mgr, sb.id, "connect", "localhost", port) == (
        f"GrantDenied: ext.probe: the broker refused a connection to localhost:{port}: localhost resolves to "
        f"127.0.0.1, a loopback address; a grant of a host name never reaches such an address (grant the address "
        f"itself)")
    assert probe(mgr, sb.id, "connect", "127.0.0.1", port, "ssh").startswith(
        "GrantDenied: ext.probe: the broker refused an SSH connection to 127.0.0.1")
    assert decisions(mgr) == [
        ("allowed", "egress", f"127.0.0.1:{port}", "network:egress:127.0.0.1"),
        ("denied", "egress", f"127.0.0.2:{port}", None),
        ("denied", "egress", f"localhost:{port}", "network:egress:localhost"),
        ("denied", "ssh", f"127.0.0.1:{port}", None)]
    mgr.teardown(sb.id)


def test_ssh_grants_carry_ssh_only(install, banner):
    ssh_port = banner(b"SSH-2.0-OpenSSH_9.2 test\r\n")
    http_port = banner(b"HTTP/1.1 200 OK\r\n\r\n")
    mgr = install(["ssh:connect:127.0.0.1"])
    sb = mgr.create(profile="probe", consumer="me")
    assert probe(mgr, sb.id, "connect", "127.0.0.1", ssh_port, "ssh") == "SSH-2.0-OpenSSH_9.2 test\r\n"
    assert probe(mgr, sb.id, "connect", "127.0.0.1", http_port, "ssh").startswith(
        f"GrantDenied: ext.probe: the broker closed the connection to 127.0.0.1:{http_port}: it is not an SSH "
        f"server (")
    assert probe(mgr, sb.id, "connect", "127.0.0.1", ssh_port).startswith(  # not plain egress
        "GrantDenied: ext.probe: the broker refused a connection to 127.0.0.1")
    mgr.teardown(sb.id)


def test_http_through_the_brokers_proxy(install):
    import http.server

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = f"hello {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/x?y=1"
        mgr = install(["network:egress:127.0.0.1"])
        sb = mgr.create(profile="probe", consumer="me")
        assert probe(mgr, sb.id, "http", url) == [200, "hello /x?y=1"]
        assert probe(mgr, sb.id, "noproxy", url)[0] == 407  # the proxy's credential is this process's alone
        denied = probe(mgr, sb.id, "http", url.replace("127.0.0.1", "127.0.0.3"))
        assert denied[0] == 403 and "no grant allows it" in denied[1]
        mgr.teardown(sb.id)
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_the_workers_filesystem_holds_only_what_it_is_given(install, tmp_path):
    mgr = install(["fs:write:cache"])
    sb = mgr.create(profile="probe", consumer="me")
    home = tmp_path / "home"
    assert probe(mgr, sb.id, "write", "$HOME/cache/index") == "written"
    assert probe(mgr, sb.id, "write", "$HOME/elsewhere").startswith("OSError: [Errno 30] Read-only file system")
    assert (home / "extension-host" / "ext.probe" / "home" / "cache" / "index").read_text() == "x"
    outside = tmp_path / "outside.txt"
    outside.write_text("the manager's machine")
    for hidden in (str(home / "state.db"), "/etc/shadow", "/home", "/run/docker.sock", "/var/run/docker.sock",
                   str(tmp_path / "operator" / "trust.yaml"), str(outside)):
        assert probe(mgr, sb.id, "exists", hidden) is False, hidden
    assert probe(mgr, sb.id, "exists", "/usr/bin") is True
    mgr.teardown(sb.id)


def test_docker_engine_only_under_its_grant(install, tmp_path):
    from sandboxer.trust.installed import docker_socket

    sock = docker_socket()
    if sock is None:
        pytest.skip("no Docker engine socket on this machine")
    mgr = install(["docker:engine"])
    sb = mgr.create(profile="probe", consumer="me")
    assert probe(mgr, sb.id, "exists", str(sock)) is True
    assert probe(mgr, sb.id, "environ")["DOCKER_HOST"] == f"unix://{sock}"
    mgr.teardown(sb.id)


def test_own_tables_only_under_their_grant(install, tmp_path):
    mgr = install(["state:own-tables"])
    sb = mgr.create(profile="probe", consumer="me")
    assert probe(mgr, sb.id, "state", "put", "k1", '{"n": 1}') is None
    assert probe(mgr, sb.id, "state", "get", "k1") == {"n": 1}
    assert probe(mgr, sb.id, "state", "keys") == ["k1"]
    assert mgr.state.extension_data("ext.probe", "get", "k1") == {"n": 1}
    assert mgr.state.extension_data("ext.other", "keys") == []  # its rows are its own
    mgr.teardown(sb.id)


def test_no_state_access_without_the_grant(install):
    mgr = install([])
    sb = mgr.create(profile="probe", consumer="me")
    assert probe(mgr, sb.id, "state", "keys").startswith(
        "GrantDenied: ext.probe: the broker refused state-store access (keys): no grant allows it (granted: none)")
    mgr.teardown(sb.id)


def test_the_operator_narrows_the_grants_in_trust_yaml(install, banner, monkeypatch):
    monkeypatch.setenv("PROBE_TOKEN", "tok-3f9a")
    port = banner(b"hi\n")
    mgr = install(["secrets:read:env:PROBE_TOKEN", "network:egress:127.0.0.1"], narrow=["network:egress:127.0.0.1"])
    assert mgr.catalog.extensions["ext.probe"].grants.grants == ("network:egress:127.0.0.1",)
    sb = mgr.create(profile="probe", consumer="me")
    assert probe(mgr, sb.id, "connect", "127.0.0.1", port) == "hi\n"
    assert probe(mgr, sb.id, "secret", "env:PROBE_TOKEN").startswith("GrantDenied: ext.probe: the broker refused "
                                                                     "reading the secret env:PROBE_TOKEN")
    mgr.teardown(sb.id)


def test_narrowing_never_widens(install, trusted, tmp_path):
    install(["network:egress:*.example.com"]).close()
    tf = trusted / "trust.yaml"
    tf.write_text(yaml.safe_dump({**yaml.safe_load(tf.read_text()),
                                  "narrow": {"ext.probe": ["network:egress:api.example.com", "docker:engine"]}}))
    with pytest.raises(ConfigError) as err:
        Manager(config_dirs=[trusted], home=tmp_path / "home")
    assert str(err.value) == (
        f"{tf}: field 'narrow.ext.probe.1' (value 'docker:engine'): the extension does not declare it, nor anything "
        f"it narrows (it declares: network:egress:*.example.com); narrowing can only keep less")


def test_an_unknown_capability_is_refused_at_load(install, trusted, tmp_path):
    install(["network:egress:127.0.0.1"]).close()
    (signed,) = (tmp_path / "home" / "extensions" / "ext.probe").glob("[0-9]*/bundle.yaml")
    data = yaml.safe_load(signed.read_text())
    data["capabilities"]["grants"].append("kernel:modules")
    signed.write_text(yaml.safe_dump(data))
    with pytest.raises(UnknownCapability) as err:
        Manager(config_dirs=[trusted], home=tmp_path / "home")
    assert str(err.value).startswith(f"{signed}: field 'capabilities.grants.1' (value 'kernel:modules'): unknown "
                                     f"capability; allowed: ")


def test_the_audit_command_shows_capability_decisions(install, banner, trusted, tmp_path):
    port = banner(b"hi\n")
    mgr = install(["network:egress:127.0.0.1"])
    sb = mgr.create(profile="probe", consumer="me")
    probe(mgr, sb.id, "connect", "127.0.0.2", port)
    mgr.teardown(sb.id)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SANDBOXER_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-m", "sandboxer", "--config", str(trusted), "extensions", "audit",
                          "probe"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"broker  ext.probe 0.1.0  capability  (denied: egress 127.0.0.2:{port}; no grant allows a connection " \
           f"to 127.0.0.2:{port})\n" in out.stdout, out.stdout


def test_sandboxer_ssh_reaches_a_granted_host_through_the_broker(install, tmp_path):
    from tests.support.sshd import sshd_or_skip

    server = sshd_or_skip(tmp_path / "sshd")
    try:
        known = tmp_path / "known_hosts"
        known.write_text(server.known_hosts_line())
        cfg = json.dumps(server.host_config(known))
        mgr = install(["ssh:connect:127.0.0.1", f"secrets:read:file:{server.user_key}", f"secrets:read:file:{known}"])
        sb = mgr.create(profile="probe", consumer="me")
        assert probe(mgr, sb.id, "ssh", cfg) == "over ssh\n"  # host key verified, key read through the broker
        assert [d[:2] for d in decisions(mgr)] == [("allowed", "secret"), ("allowed", "secret"), ("allowed", "ssh")]
        mgr.teardown(sb.id)
        mgr.close()
    finally:
        server.stop()


def test_ssh_to_a_host_not_granted_is_refused(install, tmp_path):
    from tests.support.sshd import sshd_or_skip

    server = sshd_or_skip(tmp_path / "sshd")
    try:
        known = tmp_path / "known_hosts"
        known.write_text(server.known_hosts_line())
        mgr = install([f"secrets:read:file:{server.user_key}", f"secrets:read:file:{known}"])
        sb = mgr.create(profile="probe", consumer="me")
        assert probe(mgr, sb.id, "ssh", json.dumps(server.host_config(known))).startswith(
            "GrantDenied: ext.probe: the broker refused an SSH connection to 127.0.0.1:")
        mgr.teardown(sb.id)
    finally:
        server.stop()
