"""Where a path a cloud SDK sent lands in a stand-in sandbox whose files are a host directory.

Shared by the E2B and Modal stand-ins. A box's ``/`` is its directory; a relative path is taken
from there too (the stand-ins start commands there); a host path under the directory (what its
commands' ``pwd`` reports) names itself. A path, or a symlink on it, that leads out of the
directory is refused: the stand-in's box is a host directory, not a machine of its own.
"""

from __future__ import annotations

import grp
import os
import posixpath
import pwd
from pathlib import Path


class Escape(Exception):
    """The path (or a symlink on it) leads out of the box's directory."""


def locate(root: Path, path: str) -> tuple[Path, str]:
    """(host path, the box's own absolute path) of ``path``; the last component is not followed.

    Raises:
        Escape: a symlink among its parent directories leads out of the box.
    """
    base = root.resolve()
    norm = posixpath.normpath(path) if path else "."
    if posixpath.isabs(norm) and (norm == str(base) or norm.startswith(str(base) + "/")):
        rel = posixpath.relpath(norm, str(base))
    else:
        rel = posixpath.normpath("/" + norm).lstrip("/")  # relative: from home, the box's root here
    if rel in ("", "."):
        return base, "/"
    parent = Path(os.path.realpath(base / posixpath.dirname(rel)))
    if parent != base and not parent.is_relative_to(base):
        raise Escape(f"{path!r} leads out of the sandbox")
    host = parent / posixpath.basename(rel)
    return host, "/" + str(host.relative_to(base))


def followed(root: Path, host: Path) -> Path:
    """``host`` with its last component followed, which must stay in the box."""
    real = Path(os.path.realpath(host))
    if real != root.resolve() and not real.is_relative_to(root.resolve()):
        raise Escape(f"{host.name!r} is a symlink out of the sandbox")
    return real


def owner_group(st: os.stat_result) -> tuple[str, str]:
    """The names of a file's owner and group (their numbers when the names are unknown), as envd and
    Modal's file tool report them."""
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return owner, group
