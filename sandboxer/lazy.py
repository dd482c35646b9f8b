"""Names a package serves on first use (PEP 562): its ``__init__`` stays light to import."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[attr]`` (a module path) on first
    use of ``attr``, and keeps the value in the package so the next use is a plain look-up."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(module)
        # every name that module serves, at once: importing a submodule sets the package's attribute
        # of its name (``sandboxer.trust.verify``), which would then hide the function of that name
        for other, where in names.items():
            if where == module:
                setattr(sys.modules[package], other, getattr(loaded, other))
        return getattr(loaded, name)

    return __getattr__
