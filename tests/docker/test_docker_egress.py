"""ext.docker keeps a network policy for real, against the real engine and test hosts of our own.

Two hosts (tests/support/netns.py) serve their names on veth pairs into this machine. A container
allowed one of them reaches it and not the other; ``none`` reaches neither, nor this machine;
``internet`` reaches both. An exposed port is published on 127.0.0.1 and reached at its URL.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest

from sandboxer.extensions import egress
from sandboxer.models import Profile
from tests.support.netns import PORT, SH_PROBE, loopback_banner, make_test_hosts, require_netns

pytestmark = pytest.mark.usefixtures("no_host_network_leak")


@pytest.fixture(scope="module")
def hosts():
    require_netns()
    with make_test_hosts(2) as made:
        yield made


def with_network(profile: Profile, network: dict) -> Profile:
    data = profile.model_dump()
    data["network"] = network
    return Profile.model_validate(data)


@pytest.fixture
def sandbox(ext, make, profile, dclient):
    """``sandbox(network)``: a ready container under that policy; torn down (and checked) at the end."""
    made = []

    def _sandbox(network: dict):
        handle = make(with_network(profile, network))
        made.append(handle)
        return handle, ext.wait_ready(handle, timeout=30)

    yield _sandbox
    for handle in made:
        ext.teardown(handle)
        if handle.own_network:
            assert egress.table_name(handle.sandbox_id) not in egress.tables()
            assert not dclient.networks.list(names=[handle.own_network.name])


def probe(ext, handle, address: str) -> str:
    r = ext.exec(handle, [*SH_PROBE, address], timeout=30)
    return r.stdout.strip()


def test_an_allow_list_reaches_the_allowed_host_only(ext, sandbox, hosts):
    a, b = hosts
    handle, reach = sandbox({"egress": [a.address]})
    assert handle.own_network is not None and reach.address
    assert probe(ext, handle, a.address) == "host-a"
    assert probe(ext, handle, b.address) == "unreachable"
    gateway = reach.address.rsplit(".", 1)[0] + ".1"  # the engine host, on the sandbox's bridge
    with loopback_banner(bind="0.0.0.0"):
        assert probe(ext, handle, gateway) == "unreachable"


def test_a_deny_list_inside_an_allow_list(ext, sandbox, hosts):
    a, b = hosts
    handle, _ = sandbox({"egress": ["10.250.0.0/16"], "deny": [b.address]})
    assert probe(ext, handle, a.address) == "host-a"
    assert probe(ext, handle, b.address) == "unreachable"


def test_none_reaches_neither_host(ext, sandbox, hosts):
    handle, _ = sandbox({"egress": "none"})
    assert handle.own_network is None and handle.network == "none"
    assert [probe(ext, handle, h.address) for h in hosts] == ["unreachable", "unreachable"]


def test_internet_reaches_both(ext, sandbox, hosts):
    handle, _ = sandbox({"egress": "internet"})
    assert [probe(ext, handle, h.address) for h in hosts] == ["host-a", "host-b"]


def test_an_exposed_port_without_internet_is_published_on_loopback(ext, sandbox, hosts):
    handle, reach = sandbox({"egress": "none", "expose": [PORT]})
    url = reach.urls[str(PORT)]
    assert url.startswith("http://127.0.0.1:")
    ext.exec(handle, ["sh", "-c", f"mkdir -p /tmp/www && echo served > /tmp/www/index.html && "
                                  f"httpd -p {PORT} -h /tmp/www"], timeout=30)
    body = None
    for _ in range(50):  # bounded: httpd forks into the background
        try:
            body = urllib.request.urlopen(url + "/index.html", timeout=2).read().decode().strip()
            break
        except OSError:
            time.sleep(0.1)
    assert body == "served"
    assert probe(ext, handle, hosts[0].address) == "unreachable"  # it serves, and still reaches nothing


def test_a_failed_create_leaves_no_network_or_rules(ext, make, profile, dclient, monkeypatch):
    """A fault between the network and the container (the engine refuses the container): the
    network and its rules are removed before the error is raised."""
    from sandboxer.errors import ProvisionError

    def refuse(*a, **k):
        raise ProvisionError("ext.docker: injected: the engine refused the container", backend="ext.docker")

    monkeypatch.setattr(type(ext), "_created", refuse)
    before = set(egress.tables())
    with pytest.raises(ProvisionError, match="injected"):
        make(with_network(profile, {"egress": ["10.250.0.0/16"]}), sandbox_id="t-refused1")
    assert set(egress.tables()) == before
    assert not dclient.networks.list(names=["sandboxer-t-refused1"])
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "sbdtrefused1" not in links


def test_a_network_left_by_a_crash_before_its_container_is_found_and_removed(ext, profile, owner, dclient):
    """A crash between the network and the container (the first step done, the process gone):
    list_owned finds the network, and tearing it down removes it and its rules."""
    from sandboxer.extensions import docker_net
    from sandboxer.extensions.docker import LABEL_EXTENSION, LABEL_SANDBOX

    sid = "t-crashed01"
    labels = {**owner, LABEL_SANDBOX: sid, LABEL_EXTENSION: "ext.docker"}
    docker_net.create(ext.client(), lambda action, call: call(), f"sandboxer-{sid}", sid, labels,
                      with_network(profile, {"egress": ["10.250.0.0/16"]}), backend="ext.docker")
    assert egress.table_name(sid) in egress.tables()
    found = [o for o in ext.list_owned(owner) if o.sandbox_id == sid]
    assert len(found) == 1 and found[0].handle.own_network.name == f"sandboxer-{sid}"
    report = ext.teardown(found[0].handle)
    assert report.already_gone and f"network sandboxer-{sid}" in report.removed
    assert egress.table_name(sid) not in egress.tables()
    assert not dclient.networks.list(names=[f"sandboxer-{sid}"])
