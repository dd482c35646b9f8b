"""Rewriting a profile file a test wrote, as an operator edits one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def set_policy(path: Path, network: dict[str, Any] | None = None, **options: Any) -> None:
    """Give the profile at ``path`` this ``network`` policy (if any) and these backend ``options``."""
    profile = yaml.safe_load(path.read_text())
    profile.setdefault("options", {}).update(options)
    if network is not None:
        profile["network"] = network
    path.write_text(yaml.safe_dump(profile))
