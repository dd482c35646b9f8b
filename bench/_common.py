"""Helpers shared by the benchmarks: a throwaway config directory and percentiles."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_config(root: Path, files: dict[str, str]) -> Path:
    """Write ``{"ext.x.yaml": text, "profile.y.yaml": text}`` into a config dir under ``root``."""
    cfg = root / "cfg"
    for sub in ("extensions", "profiles"):
        (cfg / sub).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        sub = "extensions" if name.startswith("ext.") else "profiles"
        (cfg / sub / name).write_text(textwrap.dedent(text))
    return cfg


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``xs``."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
