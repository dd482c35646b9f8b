"""A throwaway PostgreSQL server on 127.0.0.1 for the state store's server-database path.

Uses Debian's ``postgresql`` binaries; as root the server runs as the ``postgres`` user
(initdb refuses root). The data directory and socket live in a temporary directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class PostgresUnavailable(RuntimeError):
    pass


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise PostgresUnavailable(f"{name} not found (Debian package postgresql)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield its SQLAlchemy URL; stop it and remove its files."""
    root = Path(tempfile.mkdtemp(prefix="sandboxer-pg-"))
    os.chmod(root, 0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_pg: list[str] = []
    if os.geteuid() == 0:
        as_pg = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    try:
        subprocess.run(as_pg + [_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(as_pg + [_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60",
                                "start"], check=True, capture_output=True, timeout=90)
    except (subprocess.SubprocessError, OSError) as exc:
        log = (root / "log").read_text(errors="replace")[-2000:] if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"cannot start PostgreSQL: {exc} {getattr(exc, 'stderr', b'')!r} {log}") from exc
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_pg + [_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def pg_url_or_skip() -> Iterator[str]:
    """Body of a module-scoped ``pg_url`` fixture: a server's URL; skipped without psycopg, or without
    PostgreSQL when not root (as root, `make test` installed it, so a failure to start fails)."""
    import os

    import pytest

    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg not installed (pip install 'sand-boxer[test]')")
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as exc:
        if os.geteuid() == 0:
            pytest.fail(f"PostgreSQL could not start; `make test` installs it as root: {exc}")
        pytest.skip(str(exc))
