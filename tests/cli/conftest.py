"""The real ``sandboxer`` command, as a user runs it: a subprocess with its own home and config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_router import profile as router_profile, stub  # noqa: F401 - re-exported

ROOT = str(Path(__file__).resolve().parents[2])


class Sbx:
    def __init__(self, home: Path, cfg_root: Path):
        self.env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg_root),
                    "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.env.pop("SANDBOXER_DEBUG", None)

    def __call__(self, *args: str, check: int | None = None, input: str | None = None,
                 timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, text=True,
                           env={**self.env, **(env or {})}, timeout=timeout, input=input,
                           stdin=subprocess.DEVNULL if input is None else None)
        if check is not None:
            assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
        return p

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """Started, not waited for (to send it a signal); stdout and stderr are pipes."""
        return subprocess.Popen([sys.executable, "-m", "sandboxer", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)


@pytest.fixture
def sbx(home: Path, cfg: Any) -> Sbx:
    return Sbx(home, cfg.root)


def profile(cfg: Any, slug: str, *backends: str) -> None:
    """A profile ``slug`` over ``backends`` (extension ids), in that order."""
    router_profile(cfg, slug, [f"{{extension: {b}}}" for b in backends])
