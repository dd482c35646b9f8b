"""The only package that touches the state store (all SQL is here).

SQLAlchemy Core over SQLite by default (WAL, file mode 0600), or any server
database by URL. Rules kept here:

* JSON columns for structured data, never pickles;
* a schema version in ``meta`` and explicit, ordered migrations;
* every state change and its audit event are written in one transaction;
* every write transaction takes the write lock up front (``BEGIN IMMEDIATE``
  on SQLite, an advisory lock on PostgreSQL), so "count, then insert" in
  :meth:`StateStore.insert_intent` is atomic across threads and processes.

This package's front is light: the store (and SQLAlchemy) loads on first use of a name that
needs it (PEP 562), and :mod:`sandboxer.state.reader` answers a short-lived process's reads of
a SQLite store with ``sqlite3`` alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from sandboxer.lazy import lazy_names
from sandboxer.state.version import LIVE_STATES, SCHEMA_VERSION


class NameTaken(Exception):
    """A live sandbox already has that name; ``existing_id`` says which."""

    def __init__(self, existing_id: str):
        super().__init__(existing_id)
        self.existing_id = existing_id


class OverCapacity(Exception):
    """Admission refused: every candidate was full. ``refusals`` holds ``(position, scope, limit)``.

    ``clashes`` holds ``(position, scope, name, holder sandbox id)`` for candidates refused because a
    live sandbox holds one of their names.
    """

    def __init__(self, refusals: list[tuple[int, str, int]],
                 clashes: list[tuple[int, str, str, str]] | None = None):
        parts = [f"{scope} is full ({limit} live sandboxes)" for _, scope, limit in refusals]
        parts += [f"{name!r} on {scope} is held by live sandbox {holder}" for _, scope, name, holder in clashes or []]
        super().__init__("; ".join(parts))
        self.refusals = refusals
        self.clashes = clashes or []


def default_home() -> Path:
    env = os.environ.get("SANDBOXER_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sandboxer"



#: Names served by submodules, loaded on first use.
_LAZY = {
    "StateStore": "store", "MIGRATIONS": "schema", "claims": "schema", "events": "schema", "exports": "schema",
    "meta": "schema", "metadata": "schema", "sandboxes": "schema", "snapshots": "schema", "usage": "schema",
    "EXTENSION_STATES": "extensions", "TRANSITIONS": "extensions", "ExtensionTables": "extensions",
    "IMAGE_STATES": "images", "ImageTables": "images", "RawSQLite": "sqlite",
}
__getattr__ = lazy_names(__name__, {name: f"sandboxer.state.{module}" for name, module in _LAZY.items()})

__all__ = ["LIVE_STATES", "SCHEMA_VERSION", "NameTaken", "OverCapacity", "default_home", *sorted(_LAZY)]
