"""Test hosts in network namespaces of their own, for the network policy tests.

:func:`make_test_hosts` makes two hosts, each a network namespace joined to this machine by a veth
pair on a /24 of its own in 10.250.0.0/16, each serving a one-line TCP banner (its name) on
:data:`PORT`. Sandboxes reach them through this machine, as they would any host of the network.
:func:`loopback_banner` serves a banner on this machine's 127.0.0.1 (or every address), which no
sandbox with a network policy other than ``internet`` may reach.

Everything is removed on exit, servers killed first; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

PORT = 8077
_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[3].encode() + b"\n")
    c.close()
"""


@dataclass(frozen=True)
class TestHost:
    name: str
    address: str
    netns: str

    __test__ = False


def require_netns() -> None:
    """Skip unless this process may make network namespaces (root, with ``ip`` and ``nft``)."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("network policy tests need root, iproute2 and nftables")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _serve(prefix: list[str], address: str, banner: str) -> subprocess.Popen:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", _SERVER, address, str(PORT), banner],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": os.environ["PATH"]})
    line = proc.stdout.readline() if proc.stdout else b""  # type: ignore[union-attr]
    if line.strip() != b"listening":
        proc.kill()
        raise RuntimeError(f"test server for {banner} did not start")
    return proc


@contextlib.contextmanager
def make_test_hosts(count: int = 2) -> Iterator[list[TestHost]]:
    """``count`` hosts (``host-a``, ``host-b``, ...) on veth pairs, each serving its name."""
    require_netns()
    tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
    hosts: list[TestHost] = []
    servers: list[subprocess.Popen] = []
    links: list[str] = []
    # a /24 of 10.250.0.0/16 each, distinct, and none this machine already has an address in
    taken = set(re.findall(r"inet 10\.250\.(\d+)\.", subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True,
                                                                    text=True, timeout=30).stdout))
    thirds = random.sample([n for n in range(1, 251) if str(n) not in taken], count)
    try:
        for i, third in enumerate(thirds):
            name = f"host-{chr(ord('a') + i)}"
            ns, link = f"sbxtest-{tag}-{i}", f"sbxt{tag}{i}"
            outer, inner = f"10.250.{third}.1", f"10.250.{third}.2"
            _run("ip", "netns", "add", ns)
            hosts.append(TestHost(name, inner, ns))
            _run("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            links.append(link)
            _run("ip", "addr", "add", f"{outer}/24", "dev", link)
            _run("ip", "link", "set", link, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{inner}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", outer)
            servers.append(_serve(["ip", "netns", "exec", ns], inner, name))
        for h in hosts:  # this machine reaches each of them: the test's own premise
            got = banner_from(h.address)
            if got != h.name:
                routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=30).stdout
                raise AssertionError(f"test host {h.name} at {h.address} answered {got!r} from this machine; "
                                     f"routes:\n{routes}")
        yield hosts
    finally:
        for s in servers:
            s.kill()
            s.wait(10)
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        for h in hosts:
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True, timeout=30)


@contextlib.contextmanager
def loopback_banner(banner: str = "host-loopback", bind: str = "127.0.0.1") -> Iterator[str]:
    """A banner served by this machine on ``bind``:PORT (``0.0.0.0``: on every address it has);
    yields the address bound."""
    proc = _serve([], bind, banner)
    try:
        yield bind
    finally:
        proc.kill()
        proc.wait(10)


def banner_from(address: str, timeout: float = 3.0) -> str | None:
    """The banner served at ``address``:PORT, from this machine (None: not reachable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, PORT), timeout=1.0) as c:
                return c.makefile().readline().strip()
        except OSError:
            time.sleep(0.05)
    return None


#: A command for a sandbox with Python (ext.local): prints the banner at $1:PORT, or "unreachable".
PY_PROBE = ["python3", "-c",
            "import socket,sys\n"
            "try:\n"
            f"    c=socket.create_connection((sys.argv[1],{PORT}),timeout=2); print(c.makefile().readline().strip())\n"
            "except OSError as e:\n"
            "    print('unreachable')"]
#: The same for a busybox container (ext.docker).
SH_PROBE = ["sh", "-c", f"nc -w 2 \"$0\" {PORT} </dev/null 2>/dev/null || echo unreachable"]
