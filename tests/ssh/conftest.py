"""Fixtures for the SSH backends: real sshd servers on 127.0.0.1 (several = several hosts),
the real Docker engine and busybox image, and a local git repo holding a compose stack."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from sandboxer.loader import load_catalog
from tests.support.docker_fixtures import busybox_image, docker_host  # noqa: F401
from tests.support.sshd import SSHD, sshd_or_skip, user_key

pytest.importorskip("paramiko", reason="the ssh extra (paramiko) is not installed")

IMAGE = "sandboxer-busybox:test"


@pytest.fixture(scope="session")
def ssh_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("sshd")
    (home / "bin").mkdir()
    return home


@pytest.fixture(scope="session")
def sshd_pool(ssh_home: Path) -> Iterator[list[SSHD]]:
    """Two sshd servers (two "hosts"), each with its own host key, one shared user key."""
    key = user_key(ssh_home / "user")
    servers: list[SSHD] = []
    try:
        for i in range(2):
            servers.append(sshd_or_skip(ssh_home / f"host{i}", key=key, path_prepend=[str(ssh_home / "bin")]))
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="session")
def known_hosts(ssh_home: Path, sshd_pool: list[SSHD]) -> Path:
    path = ssh_home / "known_hosts"
    path.write_text("".join(s.known_hosts_line() for s in sshd_pool))
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """A path that must never be created: proof that a hostile input ran nothing."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), f"hostile input ran a command: {path} exists"


def write_config(cfg_dir: Path, ext_id: str, handler: str, config: dict[str, Any],
                 profiles: dict[str, dict[str, Any]] | None = None, features: list[str] | None = None) -> Path:
    """A config dir with ``extensions/<ext_id>.yaml`` and its profiles, as an operator writes them."""
    (cfg_dir / "extensions").mkdir(parents=True, exist_ok=True)
    (cfg_dir / "profiles").mkdir(parents=True, exist_ok=True)
    manifest = {"id": ext_id, "title": "test", "version": "0.1.0", "handler": handler,
                "capabilities": {"isolation_levels": ["container" if "compose" in handler else "vm"],
                                 "pricing_model": "self-hosted",
                                 "features": features or ["exec", "snapshots", "list_owned"]},
                "config": config}
    (cfg_dir / "extensions" / f"{ext_id}.yaml").write_text(yaml.safe_dump(manifest))
    for slug, body in (profiles or {}).items():
        # an SSH backend runs with its host's network: the only policy it can keep (docs/policy.md)
        body = {"network": {"egress": "internet"}, **body}
        (cfg_dir / "profiles" / f"profile.{slug}.yaml").write_text(yaml.safe_dump({"slug": slug, **body}))
    return cfg_dir


def load_backend(cfg_dir: Path, ext_id: str) -> Any:
    return load_catalog([cfg_dir]).extensions[ext_id].instance()


COMPOSE_YML = textwrap.dedent(f"""\
    services:
      app:
        image: {IMAGE}
        command: ["sh", "-c", "echo started > /data/boot; exec sleep 3600"]
        volumes: ["data:/data"]
        healthcheck:
          test: ["CMD", "test", "-f", "/data/boot"]
          interval: 1s
          timeout: 2s
          retries: 30
      web:
        image: {IMAGE}
        command: ["sh", "-c", "mkdir -p /www && echo hello-web > /www/index.html; exec httpd -f -p 8080 -h /www"]
        ports: ["127.0.0.1::8080"]
    volumes:
      data: {{}}
""")


@pytest.fixture(scope="session")
def compose_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository on this machine (the "remote" host) holding a two-service compose stack."""
    repo = tmp_path_factory.mktemp("repo") / "stack"
    repo.mkdir()
    (repo / "docker-compose.yml").write_text(COMPOSE_YML)
    (repo / "README").write_text("test stack\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "."], ["git", "commit", "-q", "-m", "stack"],
                 ["git", "tag", "v1"]):
        subprocess.run(argv, cwd=repo, check=True, env=env, timeout=30)
    return repo
