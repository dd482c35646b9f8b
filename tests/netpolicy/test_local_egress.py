"""ext.local keeps a network policy for real: test hosts in network namespaces of their own.

Two hosts (tests/support/netns.py) serve their names on veth pairs into this machine. A sandbox
allowed one of them reaches it and not the other; ``none`` reaches neither, nor this machine's
127.0.0.1; ``internet`` reaches both. The sandbox is root in its own user namespace and tries to
undo its rules; it cannot. Exposed ports are reached at the URLs the reachability gives.
"""

from __future__ import annotations

import os
import re
import time
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sandboxer import Manager
from sandboxer.errors import CapabilityError
from sandboxer.extensions import egress
from tests.support.netns import PORT, PY_PROBE, banner_from, loopback_banner, make_test_hosts, require_netns

pytestmark = pytest.mark.usefixtures("netns_ok", "no_host_network_leak")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def netns_ok():
    require_netns()


@pytest.fixture(scope="module")
def hosts():
    with make_test_hosts(2) as made:
        yield made


@pytest.fixture
def policy(cfg, home, make_manager):
    """A manager whose profile ``net`` (ext.local) has the given network policy."""

    def make(network: dict | None, tool: str | None = None, **profile) -> Manager:
        body = {"slug": "net", "extension": "ext.local", **profile}
        if network is not None:
            body["network"] = network
        cfg.write("profile.net.yaml", yaml.safe_dump(body))
        mgr = make_manager()
        if tool:  # bubblewrap or util-linux unshare starts the init (both are installed by `make test`)
            mgr.extension("ext.local")._tool = tool
        return mgr

    return make


def probe(mgr: Manager, sid: str, address: str) -> str:
    r = mgr.exec(sid, [*PY_PROBE, address], timeout=30)
    assert r.exit_code == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("tool", ["bwrap", "unshare"])
def test_an_allow_list_reaches_the_allowed_host_only(policy, hosts, tool):
    a, b = hosts
    mgr = policy({"egress": [a.address]}, tool)
    sb = mgr.create(profile="net", consumer="t")
    try:
        assert probe(mgr, sb.id, a.address) == "host-a"
        assert probe(mgr, sb.id, b.address) == "unreachable"
        with loopback_banner(bind="0.0.0.0"):  # this machine, on every address it has
            gateway = mgr.get(sb.id).reachability["address"].rsplit(".", 1)[0]
            gateway += "." + str(int(mgr.get(sb.id).reachability["address"].rsplit(".", 1)[1]) - 1)
            assert [probe(mgr, sb.id, h) for h in ("127.0.0.1", gateway, a.address.rsplit(".", 1)[0] + ".1")] == ["unreachable"] * 3
        assert mgr.get(sb.id).policy["network"]["egress"] == [f"{a.address}/32"]
    finally:
        mgr.teardown(sb.id)
    assert egress.table_name(sb.id) not in egress.tables()


def test_a_cidr_allow_list_with_a_deny_list(policy, hosts):
    a, b = hosts
    mgr = policy({"egress": ["10.250.0.0/16"], "deny": [f"{b.address}/32"]})
    sb = mgr.create(profile="net", consumer="t")
    try:
        assert probe(mgr, sb.id, a.address) == "host-a"
        assert probe(mgr, sb.id, b.address) == "unreachable"
    finally:
        mgr.teardown(sb.id)


def test_none_reaches_neither_host_nor_the_machines_loopback(policy, hosts):
    a, b = hosts
    mgr = policy(None)
    sb = mgr.create(profile="net", consumer="t")
    try:
        with loopback_banner():
            assert [probe(mgr, sb.id, h) for h in (a.address, b.address, "127.0.0.1")] == ["unreachable"] * 3
    finally:
        mgr.teardown(sb.id)


def test_internet_reaches_both(policy, hosts):
    a, b = hosts
    mgr = policy({"egress": "internet"})
    sb = mgr.create(profile="net", consumer="t")
    try:
        assert [probe(mgr, sb.id, h.address) for h in hosts] == ["host-a", "host-b"]
    finally:
        mgr.teardown(sb.id)


@pytest.mark.parametrize("tool", ["bwrap", "unshare"])
def test_root_in_the_sandbox_cannot_undo_its_rules(policy, hosts, tool):
    a, b = hosts
    mgr = policy({"egress": [a.address]}, tool)
    sb = mgr.create(profile="net", consumer="t")
    try:
        tries = ("nft flush ruleset; ip route replace default dev eth0; ip addr add 10.250.99.9/8 dev eth0; "
                 "ip link set eth0 down; ip link set eth0 up; echo tried")
        r = mgr.exec(sb.id, ["sh", "-c", "{ " + tries + "; } 2>&1"], timeout=30)
        said = r.stdout.splitlines()
        assert said[-1] == "tried" and "Error: Could not process rule: Operation not permitted" in said
        assert said.count("RTNETLINK answers: Operation not permitted") == 4, said
        assert probe(mgr, sb.id, b.address) == "unreachable"
        assert probe(mgr, sb.id, a.address) == "host-a"
    finally:
        mgr.teardown(sb.id)


def test_an_exposed_port_is_reached_at_its_url_from_this_machine(policy, hosts, cfg):
    mgr = policy({"egress": "none", "expose": [PORT]})
    sb = mgr.create(profile="net", consumer="t")
    try:
        url = mgr.get(sb.id).reachability["urls"][str(PORT)]
        address = url.removeprefix("http://").rsplit(":", 1)[0]
        assert url == f"http://{address}:{PORT}" and address.startswith("10.213.")
        server = ["python3", "-c", "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)"
                  f"\ns.bind(('0.0.0.0',{PORT})); s.listen(1); print('up', flush=True)\nc,_=s.accept(); c.sendall(b'served\\n')"]
        proc = subprocess.Popen([sys.executable, "-m", "sandboxer", "--config", str(cfg.root),
                                 "--home", str(mgr.home), "exec", sb.id, "--", *server],
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert proc.stdout.readline().strip() == b"up"
            assert banner_from(address) == "served"
        finally:
            proc.kill()
            proc.wait(30)
        # and it still reaches nothing itself
        assert probe(mgr, sb.id, hosts[0].address) == "unreachable"
    finally:
        mgr.teardown(sb.id)


def test_teardown_leaves_no_namespace_interface_table_or_slot(policy, hosts, home):
    mgr = policy({"egress": [hosts[0].address]})
    sb = mgr.create(profile="net", consumer="t")
    handle = mgr.get(sb.id)
    mgr.teardown(sb.id)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"sandboxer-{sb.id}" not in netns
    assert "sbx" + sb.id.replace("-", "")[-12:] not in links
    assert egress.table_name(sb.id) not in egress.tables()
    assert handle.state.value == "ready"


def test_isolation_none_cannot_keep_no_network(cfg, home):
    cfg.write("profile.bare.yaml", "slug: bare\nextension: ext.local\nisolation: none\n")
    mgr = Manager(config_dirs=[cfg.root], home=home)
    with pytest.raises(CapabilityError, match=r"ext\.local cannot keep the policy of profile 'bare': 'isolation: none' "
                                              r"runs commands on the host, with its network, so it cannot keep "
                                              r"network\.egress 'none'"):
        mgr.create(profile="bare", consumer="t")
    assert mgr.list() == []


def test_without_root_an_allow_list_is_not_claimed_and_says_why(cfg, home, monkeypatch):
    """Where the host cannot keep an allow-list (here: not root), ext.local does not claim it, and
    the router and `profiles explain` say why. (The euid is the one fact faked: the suite runs as root.)"""
    cfg.write("profile.net.yaml", yaml.safe_dump({"slug": "net", "extension": "ext.local",
                                                  "network": {"egress": ["10.250.0.0/16"]}}))
    monkeypatch.setattr(egress.os, "geteuid", lambda: 1000)
    mgr = Manager(config_dirs=[cfg.root], home=home)
    local = mgr.catalog.extensions["ext.local"]
    assert "network:cidr-allowlist" not in local.enforces and "network:none" in local.enforces
    why = "needs root for nftables rules and a network interface of its own (running as uid 1000)"
    assert local.unavailable == {"network:cidr-allowlist": why, "network:cidr-denylist": why, "expose": why}
    with pytest.raises(CapabilityError, match=re.escape(f"ext.local does not enforce network:cidr-allowlist (on this "
                                                        f"host: {why}), which the policy of profile 'net' needs")):
        mgr.create(profile="net", consumer="t")
    assert mgr.list() == []


def test_a_namespace_left_by_a_crash_is_found_by_list_owned_and_removed(policy, hosts, monkeypatch):
    """A crash after the namespace and its rules were made, before the init started (the process
    died: no cleanup ran): list_owned finds the sandbox, and its teardown removes all of it."""
    from sandboxer.extensions.local import LocalExtension
    from sandboxer.testing import request

    mgr = policy({"egress": [hosts[0].address]})
    ext = mgr.extension("ext.local")

    def crash(*a, **k):
        raise KeyboardInterrupt("the process died here")

    with monkeypatch.context() as m:
        m.setattr(LocalExtension, "_start_init", crash)
        m.setattr(LocalExtension, "teardown", lambda self, handle: None)  # a dead process cleans nothing
        with pytest.raises(KeyboardInterrupt):
            ext.provision(request(mgr.profile("net"), {"sandbox_id": "sb-crashed0001", "owner_labels": {"o": "crash"}},
                                  None))
    assert "sandboxer-sb-crashed0001" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert egress.table_name("sb-crashed0001") in egress.tables()
    [found] = [o for o in ext.list_owned({"o": "crash"}) if o.sandbox_id == "sb-crashed0001"]
    report = ext.teardown(found.handle)
    assert "netns sandboxer-sb-crashed0001" in report.removed
    assert "sandboxer-sb-crashed0001" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                            text=True).stdout
    assert egress.table_name("sb-crashed0001") not in egress.tables()


def test_a_sandbox_found_lost_is_swept_of_what_it_left(policy, hosts):
    """Its init killed behind the manager's back (the OOM killer, an operator): the probe finds it
    gone, the sandbox becomes lost, and what it left (workspace, namespace, rules) is removed."""
    import signal

    mgr = policy({"egress": [hosts[0].address]})
    sb = mgr.create(profile="net", consumer="t")
    handle = mgr.state.get(sb.id)["handle"]
    os.kill(handle["pid"], signal.SIGKILL)
    for _ in range(100):  # bounded: the kernel reaps it at once
        if not os.path.exists(f"/proc/{handle['pid']}"):
            break
        time.sleep(0.02)
    assert mgr.get(sb.id, refresh=True).state.value == "lost"
    assert not Path(handle["workspace"]).exists()
    assert f"sandboxer-{sb.id}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert egress.table_name(sb.id) not in egress.tables()
    assert [e["kind"] for e in mgr.events(sb.id)][-1] == "lost_swept"


def test_the_suites_leak_check_sees_what_a_policy_leaves():
    """tests/conftest.py fails a test that leaves any of these: the check must see each kind."""
    from tests.support.leaks import host_network_leftovers

    subprocess.run(["ip", "netns", "add", "sandboxer-sb-leakcheck"], check=True, timeout=30)
    subprocess.run(["nft", "add", "table", "inet", "sandboxer_sb_leakcheck"], check=True, timeout=30)
    try:
        assert {"netns sandboxer-sb-leakcheck", "nft table sandboxer_sb_leakcheck"} <= host_network_leftovers()
    finally:
        subprocess.run(["ip", "netns", "del", "sandboxer-sb-leakcheck"], timeout=30)
        subprocess.run(["nft", "delete", "table", "inet", "sandboxer_sb_leakcheck"], timeout=30)
    assert not {"netns sandboxer-sb-leakcheck", "nft table sandboxer_sb_leakcheck"} & host_network_leftovers()
