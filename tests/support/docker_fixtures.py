"""pytest fixtures for a real Docker engine and the local busybox test image.

Use them from a test directory's ``conftest.py``::

    from tests.support.docker_fixtures import busybox_image, docker_host  # noqa: F401

Running as root, a daemon or image that cannot be provided is a test ERROR
(CI runs as root and must not skip silently); otherwise the test is skipped
with the reason.
"""

from __future__ import annotations

import os
import time

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


def pids_with_env(name: str, value: str) -> list[int]:
    """Pids on this machine (sshd "hosts" and local containers included) whose environment has ``name=value``.

    A test sets a unique value in a command's environment; whatever the command spawns inherits it,
    ``setsid`` children too, so this finds every process a timed-out command left behind.
    """
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def wait_gone(name: str, value: str, within: float = 5.0) -> list[int]:
    """:func:`pids_with_env` once they are all gone, or what is left after ``within`` seconds."""
    deadline = time.monotonic() + within
    while (left := pids_with_env(name, value)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
