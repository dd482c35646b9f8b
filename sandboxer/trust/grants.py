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
from typing import Callable, Iterable

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
