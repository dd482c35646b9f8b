"""ext.docker's networks for a sandbox policy narrower than the internet, and its exposed ports.

``network.egress: none`` is ``network_mode: none`` and ``internet`` the ``bridge`` network (see
docker.py). An allow-list, a deny-list, or exposed ports without the internet, need more: the
sandbox gets a bridge network of its own (``<name_prefix><sandbox id>``, its bridge interface
named by us), and the nftables table of :mod:`sandboxer.extensions.egress` on the engine's host
keeps the policy for every packet from that bridge. The table is installed before the container
is created, so nothing runs unfiltered; the container runs without NET_ADMIN in its namespace and
has none in the host's. Exposed ports are published on the engine host's 127.0.0.1 only.

Both need the engine on this machine (the rules are this host's), root and nftables:
:func:`unavailable` says what is missing.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from sandboxer.errors import ProvisionError
from sandboxer.extensions import egress
from sandboxer.models import Profile


class OwnNetwork(BaseModel):
    """A sandbox's own bridge network and its rules (stored in the handle)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    bridge: str
    table: str
    subnet: str | None = None
    #: iptables FORWARD accept rules were added for ``bridge``
    iptables: bool = False


def unavailable(docker_host: str | None) -> str | None:
    """Why allow-lists (and exposed ports) cannot be kept for the engine at ``docker_host``."""
    url = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not url.startswith("unix://"):
        return (f"the engine ({url.split('://', 1)[0]}://...) is not on this machine, and the rules must be on "
                f"the engine's host")
    return egress.unavailable()


def wants_own_network(profile: Profile, network_option: str) -> bool:
    """Whether the policy needs a network of the sandbox's own: an allow-list, or exposed ports
    without the internet (unless ``options.network: none`` narrowed it to nothing)."""
    net = profile.network
    if net.egress == "internet" or network_option != "none":
        return False
    return isinstance(net.egress, list) or bool(net.expose)


def create(client: Any, engine: Callable, name: str, sandbox_id: str, labels: dict[str, str],
           profile: Profile, *, backend: str) -> OwnNetwork:
    """Make the sandbox's network and install its rules; on failure remove what was made.

    ``engine(action, call)`` runs one SDK call with its errors translated (docker.py's boundary).
    """
    tag = sandbox_id.replace("-", "")[-12:]
    own = OwnNetwork(name=name, bridge=f"sbd{tag}", table=egress.table_name(sandbox_id))
    why = egress.unavailable()
    if why:
        raise ProvisionError(f"{backend}: sandbox {sandbox_id}: its policy ({profile.network.describe()}) {why}",
                             backend=backend)
    net = engine("creating the sandbox's network", lambda: client.networks.create(
        name, driver="bridge", labels=labels, check_duplicate=True,
        options={"com.docker.network.bridge.name": own.bridge, "com.docker.network.bridge.enable_icc": "false"}))
    try:
        net.reload()
        subnets = [c.get("Subnet") for c in (net.attrs.get("IPAM") or {}).get("Config") or [] if c.get("Subnet")]
        subnet = next((s for s in subnets if ":" not in s), None)
        egress.ensure_forwarding(backend=backend)
        egress.apply(own.table, egress.ruleset(own.table, own.bridge, profile.network.allow, profile.network.deny,
                                               subnet), backend=backend)
        return own.model_copy(update={"subnet": subnet,
                                      "iptables": egress.open_forwarding(own.bridge, backend=backend)})
    except BaseException:
        remove(client, engine, own)
        raise


def remove(client: Any, engine: Callable, own: OwnNetwork) -> list[str]:
    """Remove the network (after its container) and its rules; what was removed. A part already
    gone is no error."""
    import docker.errors as derr

    removed = []

    def drop() -> bool:
        try:
            client.api.remove_network(own.name)
        except derr.NotFound:
            return False
        return True

    if engine("removing the sandbox's network", drop):
        removed.append(f"network {own.name}")
    if egress.remove(own.table):
        removed.append(f"nft table inet {own.table}")
    with contextlib.suppress(Exception):
        egress.close_forwarding(own.bridge)
    return removed


def owned(client: Any, engine: Callable, label_filters: list[str], sandbox_label: str) -> dict[str, OwnNetwork]:
    """The sandboxes' own networks carrying all of ``label_filters``, by sandbox id (a network
    whose container was never made, after a crash between the two, is found here too)."""
    nets = engine("listing networks", lambda: client.api.networks(filters={"label": label_filters}))
    out = {}
    for n in nets:
        sid = (n.get("Labels") or {}).get(sandbox_label)
        bridge = (n.get("Options") or {}).get("com.docker.network.bridge.name")
        if sid and bridge and n.get("Name"):
            out[sid] = OwnNetwork(name=n["Name"], bridge=bridge, table=egress.table_name(sid))
    return out


def port_bindings(expose: list[int]) -> dict[str, tuple[str, None]] | None:
    """Each exposed port published on the engine host's loopback, at a port the engine picks."""
    return {f"{p}/tcp": ("127.0.0.1", None) for p in expose} or None


def urls(attrs: dict[str, Any], expose: list[int]) -> dict[str, str]:
    """port -> ``http://127.0.0.1:<published port>``, from a running container's attributes."""
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    out = {}
    for p in expose:
        bound = [b for b in ports.get(f"{p}/tcp") or [] if b.get("HostPort")]
        if bound:
            out[str(p)] = f"http://{bound[0].get('HostIp') or '127.0.0.1'}:{bound[0]['HostPort']}"
    return out
