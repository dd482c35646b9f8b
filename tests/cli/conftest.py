"""The real ``sandboxer`` command, as a user runs it: a subprocess with its own home and config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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


def stub(cfg: Any, name: str, *, latency: float = 0.0, faults: str = "[]") -> None:
    """A saas-stub backend ``ext.<name>`` (faults as YAML flow text)."""
    cfg.write(f"ext.{name}.yaml", f"""
        id: ext.{name}
        title: stub {name}
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {{isolation_levels: [microvm], pricing_model: metered, features: [exec, snapshots, metering, list_owned]}}
        pricing: {{per_vcpu_second: 0.00001, source: test, as_of: "2026-11-01"}}
        config: {{latency_s: {latency}, faults: {faults}}}
    """)


def profile(cfg: Any, slug: str, *backends: str, ttl: str = "{default: 10m, max: 1h}") -> None:
    lines = "\n".join(f"  - {{extension: {b}}}" for b in backends)
    cfg.write(f"profile.{slug}.yaml", f"slug: {slug}\nttl: {ttl}\nresources: {{cpu: 1}}\nbackends:\n{lines}\n")
