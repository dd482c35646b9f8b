"""Reads of a SQLite state store with ``sqlite3`` alone: what a short-lived process (the CLI's
``list``, ``status``, the look-up before an ``exec``) needs, without loading SQLAlchemy.

The statements are the store's own, written out: :mod:`tests.unit.test_state_reader` checks that
every one returns exactly what :class:`~sandboxer.state.store.StateStore` returns for the same
database, and that the JSON columns named here are the schema's. A store this reader cannot
answer for (another schema version, a server database, no file yet) gets ``None`` from
:func:`open_reader`, and the caller opens the full store, which migrates or explains.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sandboxer.state.version import LIVE_STATES, SCHEMA_VERSION

#: The ``sandboxes`` columns of JSON type (checked against the schema by a test).
SANDBOX_JSON = frozenset({"handle", "reachability", "labels", "resources", "inputs", "policy"})
_LIVE = ", ".join("?" * len(LIVE_STATES))


class Reader:
    """Read-only queries over one SQLite file (``mode=ro``: it never creates or changes one)."""

    def __init__(self, path: Path):
        self.path = path
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=60000")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, args)
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        return [{n: (json.loads(v) if n in SANDBOX_JSON and isinstance(v, str) else v) for n, v in zip(names, row)}
                for row in rows]

    def schema_version(self) -> int | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error:  # no meta table: a new, or not a, store
            return None
        return int(row[0]) if row else None

    def get(self, sandbox_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,))
        return rows[0] if rows else None

    def get_by_name(self, name: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT * FROM sandboxes WHERE name = ? AND state IN ({_LIVE})", (name, *LIVE_STATES))
        return rows[0] if rows else None

    def list(self, *, states: tuple[str, ...] | None = LIVE_STATES, where: dict[str, Any] | None = None,
             fields: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        cols = ", ".join(_column(f) for f in fields) if fields else "*"
        conds, args = [], []
        if states is not None:
            conds.append(f"state IN ({', '.join('?' * len(states))})")
            args += list(states)
        for key, value in (where or {}).items():
            conds.append(f"{_column(key)} = ?")
            args.append(value)
        sql = f"SELECT {cols} FROM sandboxes" + (f" WHERE {' AND '.join(conds)}" if conds else "")
        return self._rows(sql + " ORDER BY created_at", tuple(args))


_COLUMNS = frozenset({"id", "name", "profile", "extension", "host", "state", "consumer", "created_at", "ready_at",
                      "expires_at", "terminated_at", "last_seen_at", "last_error", "attempts", "deadline_at",
                      "teardown_started_at"}) | SANDBOX_JSON


def _column(name: str) -> str:
    """A column name, refused unless it is one: names are written into the SQL text."""
    if name not in _COLUMNS:
        raise ValueError(f"no column {name!r} in sandboxes")
    return name


def open_reader(path: Path) -> Reader | None:
    """A reader of the SQLite store at ``path`` if it is this version's, else None."""
    if not path.is_file():
        return None
    try:
        reader = Reader(path)
    except sqlite3.Error:
        return None
    try:
        version = reader.schema_version()
    except sqlite3.Error:
        version = None
    if version != SCHEMA_VERSION:
        reader.close()
        return None
    return reader
