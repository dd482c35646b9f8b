"""The closed vocabulary of broker grants (``grants:`` of registry/capabilities.yaml), and its check.

A template is a literal (``docker:engine``) or a literal prefix ending in one ``<parameter>``
(``network:egress:<host-pattern>``). The parameters are typed here, so a wildcard is accepted only
where the vocabulary shows one: ``*.example.com`` for egress, never for SSH or a path.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sandboxer.errors import ConfigError, UnknownCapability

_HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_ENV = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]{0,127}")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text))


def _ref(text: str) -> str | None:
    if _ENV.fullmatch(text):
        return None
    if text.startswith("file:/") and "\0" not in text and ".." not in text[5:].split("/"):
        return None
    return f"{text!r} is not env:NAME or file:/absolute/path"


def _host_pattern(text: str) -> str | None:
    if _is_host(text) or (text.startswith("*.") and _HOSTNAME.fullmatch(text[2:]) and "." in text[2:]):
        return None
    return f"{text!r} is not a host name, an IP address or *.domain"


def _host(text: str) -> str | None:
    return None if _is_host(text) else f"{text!r} is not a host name or an IP address"


def _path_under_home(text: str) -> str | None:
    parts = text.split("/")
    if all(_SEGMENT.fullmatch(p) and p not in (".", "..") for p in parts):
        return None
    return f"{text!r} is not a relative path under the extension's home (no '..', no leading '/')"


#: Each parameter a template may end in, and its check (None: fine; else why not).
PARAMETERS: dict[str, Callable[[str], str | None]] = {
    "ref": _ref, "host-pattern": _host_pattern, "host": _host, "path-under-home": _path_under_home}
_TEMPLATE = re.compile(r"([a-z][a-z0-9-]*(?::[a-z][a-z0-9-]*)*)(?::<([a-z-]+)>)?")


@dataclass(frozen=True)
class Grants:
    """The grant vocabulary: template -> what it allows."""

    templates: dict[str, str]

    def why_not(self, grant: str) -> str | None:
        """None if ``grant`` is in the vocabulary, else why it is not."""
        for template in self.templates:
            m = _TEMPLATE.fullmatch(template)
            assert m is not None  # checked by load_grants
            literal, param = m.group(1), m.group(2)
            if param is None:
                if grant == literal:
                    return None
            elif grant.startswith(literal + ":"):
                return PARAMETERS[param](grant[len(literal) + 1:])
        return "unknown capability"

    def check(self, grants: Iterable[str], source: str, field: str = "capabilities.grants") -> None:
        """Refuse the first grant outside the vocabulary.

        Raises:
            UnknownCapability: naming ``source``, the field (with its index), the value, why, and
                the whole vocabulary.
        """
        for i, grant in enumerate(grants):
            why = self.why_not(grant)
            if why is not None:
                raise UnknownCapability(f"{source}: field '{field}.{i}' (value {grant!r}): {why}; "
                                        f"allowed: {', '.join(self.templates)}", path=source)


def load_grants(path: Path | None = None) -> Grants:
    """The vocabulary from ``path`` (default: the shipped registry/capabilities.yaml).

    Raises:
        ConfigError: the ``grants`` mapping is missing or a template is malformed or has an unknown parameter.
    """
    from sandboxer.loader import builtin_dir, read_yaml

    path = path or builtin_dir("registry") / "capabilities.yaml"
    data = read_yaml(path, ConfigError).get("grants")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: field 'grants': expected a mapping of grant templates to what each allows")
    for template in data:
        m = _TEMPLATE.fullmatch(str(template))
        if m is None or (m.group(2) is not None and m.group(2) not in PARAMETERS):
            raise ConfigError(f"{path}: field 'grants' (value {template!r}): not a grant template "
                              f"(a:b or a:b:<parameter>, parameters: {', '.join(PARAMETERS)})")
    return Grants({str(k): str(v) for k, v in data.items()})


def _param(grant: str, prefix: str) -> str | None:
    return grant[len(prefix):] if grant.startswith(prefix) else None


def host_matches(pattern: str, host: str) -> bool:
    """Whether ``host`` (a name or an address, as the worker asked) is ``pattern`` or, for ``*.domain``, under it."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    try:
        return ipaddress.ip_address(pattern) == ipaddress.ip_address(host)
    except ValueError:
        return pattern.lower() == host


def covers(declared: str, kept: str) -> bool:
    """Whether the operator's ``kept`` grant is ``declared`` or a narrower form of it.

    ``network:egress:*.example.com`` covers ``network:egress:api.example.com`` (and ``*.eu.example.com``);
    ``fs:write:cache`` covers ``fs:write:cache/index``. Nothing else is narrower than itself.
    """
    if declared == kept:
        return True
    for prefix in ("network:egress:",):
        d, k = _param(declared, prefix), _param(kept, prefix)
        if d is not None and k is not None and d.startswith("*."):
            return host_matches(d, k[2:] if k.startswith("*.") else k)
    d, k = _param(declared, "fs:write:"), _param(kept, "fs:write:")
    return d is not None and k is not None and k.startswith(d + "/")


@dataclass(frozen=True)
class GrantSet:
    """What one extension's worker may be given: its bundle's grants, as the operator narrowed them."""

    grants: tuple[str, ...] = ()
    #: the grants the bundle declared, before narrowing (for messages)
    declared: tuple[str, ...] = ()

    @classmethod
    def of(cls, declared: Iterable[str], kept: Iterable[str] | None = None, *, source: str = "trust.yaml",
           field: str = "narrow") -> "GrantSet":
        """The grants in effect: ``declared``, or just ``kept`` (the operator's narrowing) if given.

        Raises:
            ConfigError: an entry of ``kept`` is no declared grant nor a narrower form of one
                (narrowing never widens), naming ``source``, the field and the value.
        """
        declared = tuple(declared)
        if kept is None:
            return cls(declared, declared)
        out = []
        for i, grant in enumerate(kept):
            if not any(covers(d, grant) for d in declared):
                raise ConfigError(f"{source}: field '{field}.{i}' (value {grant!r}): the extension does not declare "
                                  f"it, nor anything it narrows (it declares: {', '.join(declared) or 'nothing'}); "
                                  f"narrowing can only keep less")
            out.append(grant)
        return cls(tuple(out), declared)

    def _params(self, prefix: str) -> list[str]:
        return [p for g in self.grants if (p := _param(g, prefix)) is not None]

    @property
    def secret_refs(self) -> list[str]:
        """The secret references granted (``env:NAME``, ``file:/path``)."""
        return self._params("secrets:read:")

    @property
    def writable(self) -> list[str]:
        """The paths under the extension's home it may write (relative)."""
        return self._params("fs:write:")

    @property
    def docker(self) -> bool:
        return "docker:engine" in self.grants

    @property
    def own_tables(self) -> bool:
        return "state:own-tables" in self.grants

    def egress(self, host: str) -> str | None:
        """The grant that lets the worker open a connection to ``host``, if one does."""
        return next((f"network:egress:{p}" for p in self._params("network:egress:") if host_matches(p, host)), None)

    def ssh(self, host: str) -> str | None:
        """The grant that lets the worker open an SSH connection to ``host``, if one does."""
        return next((f"ssh:connect:{p}" for p in self._params("ssh:connect:") if host_matches(p, host)), None)

    def describe(self) -> str:
        return ", ".join(self.grants) or "none"


def config_secret_refs(config: Any, field: str = "config") -> list[tuple[str, str]]:
    """(field, ``env:NAME`` or ``file:/path``) of each secret reference in a raw manifest ``config``.

    A reference is a mapping of ``env`` or ``file`` (and at most a ``prefix``), as
    :class:`~sandboxer.secrets.SecretRef` and ``HeaderSecret`` read them.
    """
    out: list[tuple[str, str]] = []
    if isinstance(config, dict):
        keys = set(config)
        for kind in ("env", "file"):
            if kind in keys and keys <= {kind, "prefix"} and isinstance(config[kind], str):
                return [(field, f"{kind}:{config[kind]}")]
        for k, v in config.items():
            out += config_secret_refs(v, f"{field}.{k}")
    elif isinstance(config, list):
        for i, v in enumerate(config):
            out += config_secret_refs(v, f"{field}.{i}")
    return out


def check_config_secrets(config: Any, grants: Iterable[str], source: str) -> None:
    """Refuse a bundle whose config references a secret no ``secrets:read:<ref>`` grant names.

    Raises:
        UndeclaredSecret: naming ``source``, the field, the reference and the grant that would allow it.
    """
    from sandboxer.errors import UndeclaredSecret

    granted = set(GrantSet.of(grants).secret_refs)
    for where, ref in config_secret_refs(config):
        if ref not in granted:
            raise UndeclaredSecret(f"{source}: field '{where}' (value {ref!r}): the config asks for a secret its "
                                   f"grants do not declare (capabilities.grants would need 'secrets:read:{ref}'); "
                                   f"an installed bundle gets only the secrets it declares", path=source)
