"""sandboxer-workspace: an example sand-boxer backend whose sandboxes are local directories.

:func:`config_dir` is the directory holding the package's own manifest and profile, to give
sand-boxer as a config dir (``--config`` / ``SANDBOXER_CONFIG``).
"""

from pathlib import Path


def config_dir() -> Path:
    """The package's ``config/`` directory (``extensions/ext.workspace.yaml``, ``profiles/...``)."""
    return Path(__file__).resolve().parent / "config"


__all__ = ["config_dir"]
