"""Fixtures for the ext.daytona tests: the stand-in server and config dirs pointing at it.

Imported explicitly by tests/cloud/test_daytona*.py (not a conftest.py, so the other cloud
tests in the same folder are not affected).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from sandboxer.loader import load_catalog
from tests.cloud.daytona_standin import DaytonaStandIn

OWNER = {"sandboxer.owner": "owner-test"}
KEY_ENV = "SBX_TEST_DAYTONA_KEY"
ALICE_ENV = "SBX_TEST_DAYTONA_ALICE_KEY"
PROFILE = "test-daytona"
EXT = "ext.test-daytona"


@pytest.fixture
def sentinel() -> str:
    """The operator's API key: a value that must never leak anywhere."""
    return "dtn_SENTINEL" + secrets.token_hex(12)


@pytest.fixture
def standin(sentinel: str) -> Iterator[DaytonaStandIn]:
    server = DaytonaStandIn([sentinel]).start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.unimplemented, f"the SDK called routes the stand-in lacks: {server.unimplemented}"


@pytest.fixture
def config_dir(tmp_path: Path, standin: DaytonaStandIn, sentinel: str, monkeypatch: pytest.MonkeyPatch):
    """Writes ext.test-daytona.yaml (+ profile.test-daytona.yaml) pointing at the stand-in; returns a writer."""
    monkeypatch.setenv(KEY_ENV, sentinel)
    for name in ("DAYTONA_API_KEY", "DAYTONA_API_URL", "DAYTONA_TARGET", "DAYTONA_JWT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # the SDK reads a .env in the working directory: let it find none
    cfg = tmp_path / "cfg"

    def write(profile: dict[str, Any] | None = None, **config: Any) -> Path:
        (cfg / "extensions").mkdir(parents=True, exist_ok=True)
        (cfg / "profiles").mkdir(parents=True, exist_ok=True)
        manifest = yaml.safe_load((Path(__file__).parents[2] / "extensions" / "ext.daytona.yaml").read_text())
        manifest["id"] = EXT
        manifest["config"] = {"api_key": {"env": KEY_ENV}, "api_url": standin.api_url, "request_timeout": 10,
                              **config}
        (cfg / "extensions" / f"{EXT}.yaml").write_text(yaml.safe_dump(manifest))
        prof = {"slug": PROFILE, "extension": EXT, "ttl": {"default": "10m", "max": "2h"}, "ready_timeout": 10,
                "resources": {"cpu": 2, "memory_mb": 2048, "disk_mb": 5120}, **(profile or {})}
        (cfg / "profiles" / f"profile.{PROFILE}.yaml").write_text(yaml.safe_dump(prof))
        return cfg

    return write


@pytest.fixture
def make_ext(config_dir):
    def make(profile: dict[str, Any] | None = None, **config: Any):
        catalog = load_catalog([config_dir(profile, **config)], builtins=False)
        return catalog.extensions[EXT].instance(), catalog.profiles[PROFILE]

    return make


def inputs(sandbox_id: str, consumer: str = "bob", ttl: float = 600.0, **extra: Any) -> dict[str, Any]:
    """What the manager gives provision (reserved keys mixed in, for sandboxer.testing.request)."""
    return {
        "sandbox_id": sandbox_id, "owner_labels": dict(OWNER), "ttl": ttl,
        "tags": {**OWNER, "sandboxer.sandbox_id": sandbox_id, "sandboxer.consumer": consumer,
                 "sandboxer.profile": PROFILE},
        **extra,
    }
