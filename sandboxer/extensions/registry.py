"""Which handler classes may be loaded, and how.

The rule: a ``handler`` string in YAML resolves only to

* a module shipped inside ``sandboxer.extensions`` (listed without importing
  anything, from the package directory), or
* a class an installed distribution publishes under the entry-point group
  ``sandboxer.extensions`` (named by entry-point name or by its value).

Any other ``module:Class`` is refused *before* import, because importing it
would run code named in a config file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from importlib.metadata import entry_points

import sandboxer.extensions as _pkg
from sandboxer.errors import ExtensionLoadError, MissingExtra
from sandboxer.extensions.base import SandboxExtension

ENTRY_POINT_GROUP = "sandboxer.extensions"
_NOT_BACKENDS = {"base", "registry"}

#: pip extra to install for a built-in module whose import fails on a missing dependency.
EXTRAS = {"docker": "docker", "compose_ssh": "ssh", "vm_packer": "ssh", "e2b": "e2b", "modal": "modal",
          "daytona": "daytona"}


@lru_cache(maxsize=1)
def builtin_modules() -> frozenset[str]:
    """Names of the backend modules shipped in ``sandboxer.extensions``."""
    return frozenset(
        m.name for m in pkgutil.iter_modules(_pkg.__path__) if m.name not in _NOT_BACKENDS
    )


def _entry_points() -> dict[str, object]:
    found: dict[str, object] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep
        found[ep.value] = ep
    return found


def resolve_handler(spec: str, *, where: str = "handler") -> type[SandboxExtension]:
    """Turn a manifest's ``handler`` string into a SandboxExtension subclass.

    Args:
        spec: ``sandboxer.extensions.<module>:<Class>`` or an entry point's name or value.
        where: where the string came from, for error messages (file and field).

    Raises:
        ExtensionLoadError: the handler is outside the allowed set, missing,
            or not a SandboxExtension subclass.
        MissingExtra: a built-in handler needs a pip extra that is not installed.
    """
    module, sep, attr = spec.partition(":")
    prefix = _pkg.__name__ + "."
    name = module[len(prefix):] if module.startswith(prefix) else None
    builtin = bool(sep and attr) and name in builtin_modules()
    # A built-in spec never reaches the entry points: no scan of every installed distribution
    # (the CLI's start-up), and no package can publish an entry point that shadows a built-in.
    eps = {} if builtin else _entry_points()
    if spec in eps:
        obj = eps[spec].load()  # type: ignore[attr-defined]
    else:
        if not builtin:
            allowed = ", ".join(sorted(f"{prefix}{m}:<Class>" for m in builtin_modules()))
            raise ExtensionLoadError(
                f"{where}: handler {spec!r} is not allowed and was not imported. A handler must be a "
                f"built-in module ({allowed}) or a class published under the entry-point group "
                f"{ENTRY_POINT_GROUP!r} by an installed package."
            )
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            extra = EXTRAS.get(name)
            if extra and exc.name and not exc.name.startswith("sandboxer"):
                raise MissingExtra(
                    f"{where}: handler {spec!r} needs the Python package {exc.name!r}; "
                    f"install it with: pip install 'sand-boxer[{extra}]'"
                ) from exc
            raise ExtensionLoadError(f"{where}: cannot import handler {spec!r}: {exc}") from exc
        obj = getattr(mod, attr, None)
        if obj is None:
            raise ExtensionLoadError(f"{where}: module {module!r} has no class {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, SandboxExtension)):
        raise ExtensionLoadError(f"{where}: handler {spec!r} is not a SandboxExtension subclass")
    return obj
