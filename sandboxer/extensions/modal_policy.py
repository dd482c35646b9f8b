"""ext.modal's sandbox policy: a profile's network, exposed ports and GPUs as ``Sandbox.create`` arguments.

What it owns, and the rules it keeps (what modal 1.6.4 sends and Modal documents):

* egress ``none``: ``block_network=True``; ``internet``: ``False``; an allow-list:
  ``outbound_cidr_allowlist`` and ``outbound_domain_allowlist`` ("List of CIDRs the sandbox is
  allowed to access", "blocking all other outbound traffic"). Modal has no deny-list;
* ``network.expose``: ``encrypted_ports`` (TLS tunnels); the URL of each is its tunnel's
  (``Sandbox.tunnels()``). The SDK refuses open ports beside ``block_network`` ("Cannot specify
  open ports when `block_network` is enabled"), so a sandbox with no egress that serves ports
  gets an outbound allow-list naming nothing instead. A tunnel's URL is public unless the
  profile's ``options.inbound_cidr_allowlist`` limits who may connect ("List of CIDRs allowed
  to connect inbound to the sandbox (encrypted tunnels and connection tokens)");
* ``resources.gpu``: ``gpu="TYPE"`` or ``"TYPE:COUNT"`` (no type: ``ANY``); a type Modal does
  not list is refused when the profile is loaded.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sandboxer.errors import ProfileError, ProvisionError
from sandboxer.models import Profile
from sandboxer.policy import GpuRequest, is_domain

#: The GPU types Modal's GPU guide lists for ``gpu=`` (modal.com/docs/guide/gpu; ``A10G`` is
#: ``A10``'s older name, ``ANY`` any type), as the SDK sends them: upper-cased. ``H100!`` and
#: ``B200+`` are not GPU type names ``resources.gpu.type`` can spell.
GPU_TYPES = frozenset({"T4", "L4", "A10", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000",
                       "H100", "H200", "B200", "ANY"})


def gpu_arg(gpu: GpuRequest | None) -> str | None:
    """``Sandbox.create``'s ``gpu=`` for ``resources.gpu``: ``"A100:2"``, ``"T4"``, ``"ANY"`` (None: no GPU)."""
    if gpu is None:
        return None
    kind = (gpu.type or "any").upper()
    return kind if gpu.count == 1 else f"{kind}:{gpu.count}"


def check_gpu(profile: Profile) -> None:
    """Refuse a ``resources.gpu.type`` Modal does not know.

    Raises:
        ProfileError: naming the profile, the field and the value, and listing what Modal accepts.
    """
    gpu = profile.resources.gpu
    if gpu is not None and gpu.type is not None and gpu.type.upper() not in GPU_TYPES:
        raise ProfileError(
            f"field 'resources.gpu.type' (value {gpu.type!r}): Modal has no such GPU; "
            f"it accepts {', '.join(sorted(GPU_TYPES))} (any case); name one of them, or leave the type out for "
            "any GPU")


def cidrs(values: list[str] | None) -> list[str] | None:
    """``options.inbound_cidr_allowlist`` normalised (``203.0.113.7`` is ``203.0.113.7/32``); a bad one is refused."""
    return None if values is None else [str(ipaddress.ip_network(str(v).strip(), strict=False)) for v in values]


def network_args(profile: Profile, block_network: bool, inbound: list[str] | None) -> dict[str, Any]:
    """``Sandbox.create``'s network and port arguments for the profile's policy.

    Args:
        profile: whose policy.
        block_network: the options' value after ``ModalExtension.options`` (True for egress none).
        inbound: the options' ``inbound_cidr_allowlist`` (None: anyone may reach the tunnels).
    """
    allow, expose = profile.network.allow, list(profile.network.expose)
    if block_network and expose:
        # an allow-list of nothing: no outbound traffic, and ports Modal will open
        out: dict[str, Any] = {"block_network": False, "outbound_cidr_allowlist": [], "outbound_domain_allowlist": []}
    elif block_network or not allow:
        out = {"block_network": block_network}
    else:
        out = {"block_network": False, "outbound_cidr_allowlist": [e for e in allow if not is_domain(e)],
               "outbound_domain_allowlist": [e for e in allow if is_domain(e)]}
    if expose:
        out["encrypted_ports"] = expose
        if inbound is not None:
            out["inbound_cidr_allowlist"] = list(inbound)
    return out


def port_urls(tunnels: dict[int, Any], ports: list[int], *, where: str, backend: str) -> dict[str, str]:
    """Each exposed port's URL: its tunnel's (``Sandbox.tunnels()``; TLS, so ``https://``).

    Raises:
        ProvisionError: Modal has no tunnel for one of them (transient: another sandbox may get one).
    """
    missing = [str(p) for p in ports if p not in tunnels]
    if missing:
        raise ProvisionError(f"{where}: Modal opened no tunnel for port(s) {', '.join(missing)} of network.expose",
                             transient=True, backend=backend)
    return {str(port): tunnels[port].url for port in ports}
