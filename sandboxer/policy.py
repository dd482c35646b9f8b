"""The sandbox policy vocabulary, and which backend can keep which promise.

A profile says what its sandboxes may do, in one vocabulary whatever the backend:

* ``network.egress``: ``none`` (the default), ``internet``, or an allow-list of CIDRs, IP
  addresses and domain names (``*.example.com`` too); ``network.deny``: CIDRs never reached;
* ``network.expose``: ports the sandbox serves (reachability gives a URL for each);
* ``secrets``: environment variables whose values come from references, for the sandbox alone;
* ``resources.gpu``: a count and an optional type.

Each part needs an *enforcement* (:data:`ENFORCEMENTS`) that a backend declares in its manifest
(``capabilities.enforces``) only when it truly keeps it. :func:`required` says which a policy
needs; :func:`lacking` which of them a backend does not declare. The router never places a
sandbox on a backend that lacks one: the policy travels with the work, through every fallback.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandboxer.secrets import SecretRef

#: What a backend may declare it enforces, and what each means.
ENFORCEMENTS: dict[str, str] = {
    "network:none": "no network at all: loopback only, not even the host's own addresses",
    "network:internet": "unrestricted outbound network",
    "network:cidr-allowlist": "outbound only to listed CIDRs and IP addresses",
    "network:domain-allowlist": "outbound only to listed domain names (wildcards like *.example.com)",
    "network:cidr-denylist": "outbound never to listed CIDRs, whatever else is allowed",
    "expose": "ports the sandbox serves, each reachable by a URL",
    "secrets": "environment variables from secret references, given to the sandbox alone",
    "gpu": "GPUs, by count and type",
}

_DOMAIN = re.compile(r"(\*\.)?(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\.?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _destination(value: str) -> str:
    """An allow-list entry, normalised: a CIDR (``10.0.0.0/8``), an address, or a domain name."""
    text = str(value).strip()
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    name = text.lower()
    if _DOMAIN.fullmatch(name):
        return name.rstrip(".")
    raise ValueError(f"{value!r} is neither a CIDR, an IP address nor a domain name (like api.example.com "
                     f"or *.example.com)")


def is_domain(entry: str) -> bool:
    """Whether a normalised allow-list entry is a domain name (else it is a CIDR)."""
    try:
        ipaddress.ip_network(entry, strict=False)
        return False
    except ValueError:
        return True


class NetworkPolicy(_Strict):
    """What the sandbox may reach and serve."""

    egress: Union[Literal["none", "internet"], list[str]] = Field(
        default="none", description="'none' (default), 'internet', or an allow-list of CIDRs, addresses and domains")
    deny: list[str] = Field(default_factory=list, description="CIDRs never reached, whatever egress allows")
    expose: list[int] = Field(default_factory=list, description="ports the sandbox serves")

    @field_validator("egress", mode="before")
    @classmethod
    def _egress_shape(cls, v: object) -> object:
        if isinstance(v, str) and v not in ("none", "internet"):
            raise ValueError(f"expected 'none', 'internet' or a list of destinations; to allow only {v!r}, "
                             f"write [{v!r}]")
        return v

    @field_validator("egress")
    @classmethod
    def _egress(cls, v: object) -> object:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty allow-list allows nothing: say 'none'")
            return sorted(dict.fromkeys(_destination(e) for e in v))
        return v

    @field_validator("deny")
    @classmethod
    def _deny(cls, v: list[str]) -> list[str]:
        out = []
        for e in v:
            try:
                out.append(str(ipaddress.ip_network(str(e).strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{e!r} is not a CIDR or an IP address (a deny-list takes only those)") from None
        return sorted(dict.fromkeys(out))

    @field_validator("expose")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is not between 1 and 65535")
        return sorted(dict.fromkeys(v))

    @property
    def allow(self) -> list[str]:
        """The allow-list (empty for ``none`` and ``internet``)."""
        return list(self.egress) if isinstance(self.egress, list) else []

    def describe(self) -> str:
        if self.egress == "none":
            out = "no network"
        elif self.egress == "internet":
            out = "internet"
        else:
            out = "only " + ", ".join(self.egress)
        if self.deny:
            out += "; never " + ", ".join(self.deny)
        if self.expose:
            out += "; serves " + ", ".join(map(str, self.expose))
        return out


class GpuRequest(_Strict):
    """GPUs a sandbox needs."""

    count: int = Field(default=1, ge=1, le=64)
    type: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                             description="e.g. A100, T4 (the backend maps it to its own names)")


def check_secret_names(secrets: dict[str, SecretRef]) -> dict[str, SecretRef]:
    for name in secrets:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return secrets


def required(network: NetworkPolicy, secrets: Iterable[str] = (), gpu: GpuRequest | None = None) -> list[str]:
    """The enforcements a policy needs, in :data:`ENFORCEMENTS` order."""
    need: set[str] = set()
    if network.egress == "none":
        need.add("network:none")
    elif network.egress == "internet":
        need.add("network:internet")
    else:
        if any(not is_domain(e) for e in network.egress):
            need.add("network:cidr-allowlist")
        if any(is_domain(e) for e in network.egress):
            need.add("network:domain-allowlist")
    if network.deny and network.egress != "none":  # nothing to deny when nothing is allowed
        need.add("network:cidr-denylist")
    if network.expose:
        need.add("expose")
    if any(True for _ in secrets):
        need.add("secrets")
    if gpu is not None:
        need.add("gpu")
    return [e for e in ENFORCEMENTS if e in need]


def describe_lacking(lacks: Iterable[str], why: dict[str, str] | None = None) -> str:
    """``network:cidr-allowlist (on this host: needs root), expose``: what is lacking, and why where known."""
    why = why or {}
    return ", ".join(f"{e} (on this host: {why[e]})" if e in why else e for e in lacks)


def lacking(need: Iterable[str], enforces: Iterable[str]) -> list[str]:
    """Which of ``need`` a backend that declares ``enforces`` cannot keep."""
    have = set(enforces)
    return [e for e in need if e not in have]
