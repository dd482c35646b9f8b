"""Outbound allow-lists for sandboxes on this machine: nftables on the host, outside the sandbox.

ext.local and ext.docker keep ``network.egress`` allow-lists, ``network.deny`` and (with them)
``network.expose`` this way. A sandbox that needs them gets an interface of its own on the host:

* ext.local: a network namespace of its own (``ip netns``), joined to the host by a veth pair
  (:class:`Link`): the sandbox's end is ``eth0`` with the second address of a /30 taken from a
  pool, its default route is the host's end;
* ext.docker: a bridge network of its own, whose bridge interface is named by us.

One nftables table per sandbox (``inet sandboxer_<id>``, :func:`ruleset`) filters every packet
that comes from that interface, forwarded or addressed to the host itself: replies to what the
sandbox opened pass; ``deny`` is dropped; the allow-list passes; everything else (IPv6 too) is
dropped. Nothing from outside the host starts a connection into the sandbox; the host itself
can (that is how an exposed port is reached). The table lives in the host's network namespace,
which no process of the sandbox has a capability over (its user namespace is its own, and a
container runs without NET_ADMIN in the host's), so a determined process inside cannot remove
it. Forwarded traffic is masqueraded, so a destination needs no route back to the pool.

This needs root, ``nft`` (Debian ``nftables``) and ``ip`` (``iproute2``); :func:`unavailable`
says which is missing. IPv4 forwarding is switched on (``net.ipv4.ip_forward``) when it is off,
as Docker does; where another firewall drops forwarded packets by default (Docker's iptables
``FORWARD`` policy), one accept rule per sandbox interface is added there and removed with it.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from sandboxer.errors import ProvisionError

#: The nftables tables we make: ``sandboxer_`` + the sandbox id (``-`` as ``_``).
TABLE_PREFIX = "sandboxer_"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def unavailable() -> str | None:
    """Why allow-lists cannot be enforced on this host, or None when they can."""
    if os.geteuid() != 0:
        return f"needs root for nftables rules and a network interface of its own (running as uid {os.geteuid()})"
    missing = [tool for tool, pkg in (("nft", "nftables"), ("ip", "iproute2")) if shutil.which(tool) is None]
    if missing:
        return "needs " + " and ".join(f"`{t}`" for t in missing) + " (Debian: apt-get install " + \
            " ".join(pkg for t, pkg in (("nft", "nftables"), ("ip", "iproute2")) if t in missing) + ")"
    return None


def table_name(sandbox_id: str) -> str:
    return TABLE_PREFIX + sandbox_id.replace("-", "_")


def _run(argv: list[str], *, backend: str, what: str, stdin: str | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, env=_ENV, cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        raise ProvisionError(f"{backend}: {what}: {exc}", backend=backend) from None
    if check and proc.returncode != 0:
        raise ProvisionError(f"{backend}: {what}: {' '.join(argv[:3])} said: {proc.stderr.strip()[-400:]}",
                             backend=backend)
    return proc.stdout if proc.returncode == 0 else ""


def _set(name: str, entries: list[str]) -> str:
    nets = [str(ipaddress.ip_network(e, strict=False)) for e in entries]
    v4 = [n for n in nets if ipaddress.ip_network(n).version == 4]
    elements = f" elements = {{ {', '.join(v4)} }};" if v4 else ""
    return f"  set {name} {{ type ipv4_addr; flags interval; auto-merge;{elements} }}\n"


def ruleset(table: str, iface: str, allow: list[str], deny: list[str], masquerade: str | None) -> str:
    """The nftables table that keeps one sandbox's egress policy.

    Args:
        table: the table's name (:func:`table_name`).
        iface: the sandbox's interface on the host (its veth end, or its bridge).
        allow: CIDRs and addresses it may reach (empty: nothing; IPv6 entries reach nothing,
            as the sandbox has no IPv6).
        deny: CIDRs it never reaches, whatever ``allow`` says.
        masquerade: the sandbox's source network to masquerade when forwarded (None: not).
    """
    nat = ("  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
           f"    ip saddr {masquerade} oifname != \"{iface}\" masquerade\n  }}\n") if masquerade else ""
    return (
        f"table inet {table} {{\n"
        + _set("allow", allow) + _set("deny", deny)
        + "  chain from_sandbox {\n"
          "    ct state established,related accept\n"
          "    meta nfproto != ipv4 drop\n"
          "    ip daddr @deny drop\n"
          "    ip daddr @allow accept\n"
          "    drop\n  }\n"
          "  chain forward {\n    type filter hook forward priority filter - 10; policy accept;\n"
          f"    iifname \"{iface}\" jump from_sandbox\n"
          f"    oifname \"{iface}\" ct state established,related accept\n"
          f"    oifname \"{iface}\" drop\n  }}\n"
          "  chain input {\n    type filter hook input priority filter - 10; policy accept;\n"
          f"    iifname \"{iface}\" jump from_sandbox\n  }}\n"
        + nat + "}\n"
    )


def apply(table: str, text: str, *, backend: str) -> None:
    """Replace table ``table`` with ``text`` in one transaction (an existing one is dropped first)."""
    remove(table)
    _run(["nft", "-f", "-"], backend=backend, what=f"installing the egress rules ({table})", stdin=text)


def remove(table: str) -> bool:
    """Delete one sandbox's table; True if it existed. Never raises for a table already gone."""
    try:
        proc = subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, text=True,
                              timeout=30, env=_ENV, cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def tables() -> list[str]:
    """The sandbox tables now installed (``[]`` when nft cannot be asked)."""
    try:
        out = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True, timeout=30,
                             env=_ENV, cwd="/").stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [w for line in out.splitlines() for w in line.split()[2:3] if w.startswith(TABLE_PREFIX)]


def ensure_forwarding(*, backend: str) -> None:
    """Switch IPv4 forwarding on (as Docker does); the sandbox's packets leave the host through it."""
    try:
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1\n")
    except OSError as exc:
        raise ProvisionError(f"{backend}: cannot switch IPv4 forwarding on ({IP_FORWARD}): {exc.strerror}",
                             backend=backend) from None


def _iptables_drops_forwarded() -> bool:
    if shutil.which("iptables") is None:
        return False
    try:
        out = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, timeout=30,
                             env=_ENV, cwd="/").stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "-P FORWARD DROP" in out.splitlines()


def _iptables_rules(iface: str) -> list[list[str]]:
    tag = ["-m", "comment", "--comment", f"sandboxer {iface}"]
    return [["FORWARD", "-i", iface, *tag, "-j", "ACCEPT"], ["FORWARD", "-o", iface, *tag, "-j", "ACCEPT"]]


def open_forwarding(iface: str, *, backend: str) -> bool:
    """Where iptables drops forwarded packets by default (Docker's doing), accept ``iface``'s there:
    the nftables table does the filtering. True if rules were added (:func:`close_forwarding`)."""
    if not _iptables_drops_forwarded():
        return False
    for rule in _iptables_rules(iface):
        _run(["iptables", "-I", *rule], backend=backend, what=f"letting {iface}'s packets through iptables FORWARD")
    return True


def close_forwarding(iface: str) -> None:
    """Remove what :func:`open_forwarding` added (nothing when it added nothing)."""
    if shutil.which("iptables") is None:
        return
    for rule in _iptables_rules(iface):
        for _ in range(4):  # bounded: a rule added twice is removed twice
            if subprocess.run(["iptables", "-D", *rule], capture_output=True, timeout=30, env=_ENV,
                              cwd="/").returncode != 0:
                break


# ------------------------------------------------------------------ a namespace of its own (ext.local)


class Link(BaseModel):
    """A sandbox's network namespace and the veth pair joining it to the host (stored in its handle)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    netns: str
    host_if: str
    host_addr: str
    sandbox_addr: str
    network: str
    table: str
    slot: int
    #: iptables FORWARD accept rules were added for ``host_if``
    iptables: bool = False

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"


def plan_link(sandbox_id: str, pool: str, registry: Path, *, backend: str) -> Link:
    """Take a /30 of ``pool`` for a sandbox (a marker file in ``registry``, made with O_EXCL, so no
    two sandboxes of any process share one) and name its namespace, interface and table."""
    net = ipaddress.ip_network(pool)
    slots = net.num_addresses // 4
    registry.mkdir(parents=True, exist_ok=True, mode=0o700)
    tag = sandbox_id.replace("-", "")[-12:]
    for _ in range(200):
        slot = random.randrange(slots)
        try:
            os.close(os.open(registry / str(slot), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            continue
        base = net.network_address + slot * 4
        return Link(netns=f"sandboxer-{sandbox_id}", host_if=f"sbx{tag}", host_addr=str(base + 1),
                    sandbox_addr=str(base + 2), network=f"{base}/30", table=table_name(sandbox_id), slot=slot)
    raise ProvisionError(f"{backend}: no free /30 left in egress pool {pool} ({registry})", backend=backend)


def make_link(link: Link, allow: list[str], deny: list[str], registry: Path, *, backend: str) -> Link:
    """Make the namespace, the veth pair and the rules (in that order: the rules are in place before
    anything runs in the namespace). On failure, undo what was made and raise ProvisionError."""
    ns = link.netns
    try:
        ensure_forwarding(backend=backend)
        _run(["ip", "netns", "add", ns], backend=backend, what=f"making network namespace {ns}")
        apply(link.table, ruleset(link.table, link.host_if, allow, deny, link.network), backend=backend)
        steps = [
            ["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", "eth0", "netns", ns],
            ["ip", "addr", "add", f"{link.host_addr}/30", "dev", link.host_if],
            ["ip", "link", "set", link.host_if, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "addr", "add", f"{link.sandbox_addr}/30", "dev", "eth0"],
            ["ip", "-n", ns, "link", "set", "eth0", "up"],
            ["ip", "-n", ns, "route", "add", "default", "via", link.host_addr],
        ]
        for argv in steps:
            _run(argv, backend=backend, what=f"joining network namespace {ns} to the host")
        return link.model_copy(update={"iptables": open_forwarding(link.host_if, backend=backend)})
    except BaseException:
        remove_link(link, registry)
        raise


def remove_link(link: Link, registry: Path) -> list[str]:
    """Remove the rules, the veth pair and the namespace, and give the /30 back; what was removed.
    Never raises for a part already gone."""
    removed = []
    if remove(link.table):
        removed.append(f"nft table inet {link.table}")
    close_forwarding(link.host_if)
    for argv, what in ((["ip", "link", "del", link.host_if], f"veth {link.host_if}"),
                       (["ip", "netns", "del", link.netns], f"netns {link.netns}")):
        try:
            if subprocess.run(argv, capture_output=True, timeout=30, env=_ENV, cwd="/").returncode == 0:
                removed.append(what)
        except (OSError, subprocess.SubprocessError):
            pass
    (registry / str(link.slot)).unlink(missing_ok=True)
    return removed
