"""Fixtures for the ext.e2b tests: the stand-in server and config dirs pointing at it.

Imported explicitly by tests/cloud/test_e2b*.py (not a conftest.py, so the
Modal tests in the same folder are not affected).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from sandboxer.loader import load_catalog
from tests.cloud.e2b_standin import E2BStandIn

OWNER = {"sandboxer.owner": "owner-test"}
KEY_ENV = "SBX_TEST_E2B_KEY"
ALICE_ENV = "SBX_TEST_E2B_ALICE_KEY"


@pytest.fixture
def sentinel() -> str:
    """The operator's API key: a value that must never leak anywhere."""
    return "e2b_SENTINEL" + secrets.token_hex(12)


@pytest.fixture
def standin(sentinel: str) -> Iterator[E2BStandIn]:
    server = E2BStandIn([sentinel]).start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.unimplemented, f"the SDK called routes the stand-in lacks: {server.unimplemented}"


@pytest.fixture
def config_dir(tmp_path: Path, standin: E2BStandIn, sentinel: str, monkeypatch: pytest.MonkeyPatch):
    """Writes ext.test-e2b.yaml (+ profile.test-e2b.yaml) pointing at the stand-in; returns a writer."""
    monkeypatch.setenv(KEY_ENV, sentinel)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    cfg = tmp_path / "cfg"

    def write(**config: Any) -> Path:
        (cfg / "extensions").mkdir(parents=True, exist_ok=True)
        (cfg / "profiles").mkdir(parents=True, exist_ok=True)
        manifest = yaml.safe_load((Path(__file__).parents[2] / "extensions" / "ext.e2b.yaml").read_text())
        manifest["id"] = "ext.test-e2b"
        manifest["config"] = {
            "api_key": {"env": KEY_ENV}, "api_url": standin.url, "sandbox_url": standin.url,
            "request_timeout": 10, "plan_max_ttl": "1h", **config,
        }
        (cfg / "extensions" / "ext.test-e2b.yaml").write_text(yaml.safe_dump(manifest))
        profile = {
            "slug": "test-e2b", "extension": "ext.test-e2b", "ttl": {"default": "10m", "max": "2h"},
            "ready_timeout": 10, "resources": {"cpu": 2, "memory_mb": 1024}, "options": {"template": "base"},
        }
        (cfg / "profiles" / "profile.test-e2b.yaml").write_text(yaml.safe_dump(profile))
        return cfg

    return write


@pytest.fixture
def make_ext(config_dir):
    def make(**config: Any):
        catalog = load_catalog([config_dir(**config)], builtins=False)
        return catalog.extensions["ext.test-e2b"].instance(), catalog.profiles["test-e2b"]

    return make


def inputs(sandbox_id: str, consumer: str = "bob", **extra: Any) -> dict[str, Any]:
    """What the manager gives provision (reserved keys mixed in, for sandboxer.testing.request):
    the TTL is the test profile's default, 10m."""
    return {
        "sandbox_id": sandbox_id, "owner_labels": dict(OWNER), "ttl": 600.0,
        "tags": {**OWNER, "sandboxer.sandbox_id": sandbox_id, "sandboxer.consumer": consumer,
                 "sandboxer.profile": "test-e2b"},
        **extra,
    }
