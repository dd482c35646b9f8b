"""ext.e2b's network: the profile's policy as ``Sandbox.create`` arguments, and the URLs of exposed ports.

What it owns, and the rules it keeps (what e2b 2.63 sends and E2B documents):

* egress ``none``: ``allow_internet_access=False`` ("the same as setting network ``deny_out`` to
  ``[0.0.0.0/0]``"); ``internet``: ``True``, a deny-list as ``network.deny_out``; an allow-list:
  ``network.allow_out`` with ``deny_out: [0.0.0.0/0]``. E2B lets allowed entries win over denied
  ones, so a deny-list beside an allow-list is cut out of its CIDRs, and beside a domain refused;
* no port is public: every create says ``network.allow_public_traffic=False``, so E2B answers a
  request to any of the sandbox's URLs only when it carries the sandbox's traffic access token
  (header ``e2b-traffic-access-token``). E2B hands that token out on create and connect only; it
  is never kept here, in a handle, or in a reachability. The consumer, holding the E2B key, gets
  it with ``e2b.Sandbox.connect(e2b_sandbox_id).traffic_access_token``;
* ``network.expose``: each port's URL is ``https://`` + the SDK's ``Sandbox.get_host(port)``.
"""

from __future__ import annotations

import importlib
import ipaddress
from typing import Any, Iterable

from sandboxer.errors import ProvisionError
from sandboxer.models import Profile
from sandboxer.policy import NetworkPolicy, is_domain


def network_args(backend: str, profile: Profile, allow_internet_access: bool | None) -> dict[str, Any]:
    """``Sandbox.create``'s ``allow_internet_access`` and ``network`` for the profile's policy.

    Args:
        backend: the extension id, for messages.
        profile: whose policy.
        allow_internet_access: the options' value after ``E2BExtension.options`` (False: none,
            True: internet, None: the allow-list).

    Raises:
        ProvisionError: the policy allows domains and denies CIDRs (not transient).
    """
    return _with_private_ports(_egress_args(backend, profile, allow_internet_access))


def _with_private_ports(args: dict[str, Any]) -> dict[str, Any]:
    # E2B: "When allowPublicTraffic is set to a falsy value, all requests to the sandbox's public
    # URLs must include the e2b-traffic-access-token header"; commands (envd) still work without it.
    return {**args, "network": {**(args.get("network") or {}), "allow_public_traffic": False}}


def refusals(profile: Profile) -> list[str]:
    """What of the profile's network policy E2B cannot keep in combination (see
    :meth:`SandboxExtension.policy_refusals`): allowed domains beside a deny-list."""
    policy: NetworkPolicy = profile.network
    domains = [e for e in policy.allow if is_domain(e)]
    if domains and policy.deny:
        return [f"network.deny cannot be kept with domain names in network.egress ({', '.join(domains)}): E2B lets "
                "an allowed domain through whatever deny_out says (allowed entries take precedence); allow "
                "addresses or CIDRs instead of those domains, or drop network.deny"]
    return []


def _egress_args(backend: str, profile: Profile, access: bool | None) -> dict[str, Any]:
    policy: NetworkPolicy = profile.network
    if access is False:
        return {"allow_internet_access": False}
    if access:
        return {"allow_internet_access": True, **({"network": {"deny_out": list(policy.deny)}} if policy.deny
                                                  else {})}
    domains = [e for e in policy.allow if is_domain(e)]
    refused = refusals(profile)
    if refused:  # the router never places this here (policy_refusals); a direct call still refuses
        raise ProvisionError(f"{backend}: profile {profile.slug!r}: {refused[0]}", transient=False, backend=backend)
    cidrs = _without([e for e in policy.allow if not is_domain(e)], policy.deny)
    if not cidrs and not domains:
        return {"allow_internet_access": False}  # the deny-list takes away all that was allowed
    all_traffic = importlib.import_module("e2b.sandbox.network").ALL_TRAFFIC
    return {"allow_internet_access": None,
            "network": {"allow_out": sorted(cidrs + domains), "deny_out": [all_traffic]}}


def port_urls(sandbox: Any, ports: Iterable[int]) -> dict[str, str]:
    """Each exposed port's URL (``Reachability.urls``), from the SDK sandbox's public ``get_host``."""
    return {str(port): f"https://{sandbox.get_host(port)}" for port in ports}


def _without(allowed: list[str], denied: list[str]) -> list[str]:
    """The CIDRs ``allowed`` with every address of ``denied`` taken out (collapsed, as strings)."""
    nets: list[Any] = [ipaddress.ip_network(a) for a in allowed]
    for d in (ipaddress.ip_network(x) for x in denied):
        out: list[Any] = []
        for n in nets:
            if n.version != d.version or not n.overlaps(d):
                out.append(n)
            elif not n.subnet_of(d):
                out.extend(n.address_exclude(d))
        nets = out
    return [str(n) for version in (4, 6)
            for n in ipaddress.collapse_addresses(n for n in nets if n.version == version)]
