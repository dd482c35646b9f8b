"""pytest fixtures for a real Docker engine and the local busybox test image.

Use them from a test directory's ``conftest.py``::

    from tests.support.docker_fixtures import busybox_image, docker_host  # noqa: F401

Running as root, a daemon or image that cannot be provided is a test ERROR
(CI runs as root and must not skip silently); otherwise the test is skipped
with the reason.
"""

from __future__ import annotations

import os

import pytest

from tests.support.dockerd import DEFAULT_IMAGE, DockerdUnavailable, ensure_busybox_image, ensure_dockerd


def _unavailable(exc: DockerdUnavailable) -> None:
    if os.geteuid() == 0:
        pytest.fail(f"Docker engine unavailable while running as root: {exc}", pytrace=False)
    pytest.skip(f"Docker engine unavailable: {exc}")


@pytest.fixture(scope="session")
def docker_host() -> str:
    """The DOCKER_HOST url of a running engine (started if needed, never stopped)."""
    try:
        return ensure_dockerd()
    except DockerdUnavailable as exc:
        _unavailable(exc)
        raise  # pragma: no cover - pytest.fail/skip raise


@pytest.fixture(scope="session")
def busybox_image(docker_host: str) -> str:
    """The tag of the ``FROM scratch`` busybox image (built once, locally)."""
    try:
        ensure_busybox_image(DEFAULT_IMAGE)
    except DockerdUnavailable as exc:
        _unavailable(exc)
    return DEFAULT_IMAGE
