"""Running SQLAlchemy Core statements on plain ``sqlite3`` connections (the SQLite hot path)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from typing import Any, Iterator

from sqlalchemy import JSON

from sandboxer.state.schema import metadata

JSON_COLUMNS = frozenset(c.name for t in metadata.tables.values() for c in t.columns if isinstance(c.type, JSON))


class Result:
    """The slice of SQLAlchemy's Result API the store uses, over fetched DBAPI rows."""

    def __init__(self, names: list[str], rows: list[tuple], rowcount: int):
        self._names = names
        self._rows = rows
        self.rowcount = rowcount

    def _dicts(self) -> list[dict[str, Any]]:
        return [{n: (json.loads(v) if n in JSON_COLUMNS and isinstance(v, str) else v)
                 for n, v in zip(self._names, row)} for row in self._rows]

    def mappings(self) -> "Mappings":
        return Mappings(self._dicts())

    def first(self) -> tuple | None:
        return self._rows[0] if self._rows else None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise RuntimeError(f"expected one row, got {len(self._rows)}")
        return self._rows[0][0]


class Mappings(list):
    """Rows as dicts, like SQLAlchemy's MappingResult."""

    def first(self) -> dict[str, Any] | None:
        return self[0] if self else None

    def all(self) -> list[dict[str, Any]]:
        return list(self)


class RawSQLite:
    """Runs SQLAlchemy Core statements on a plain ``sqlite3`` connection.

    SQLAlchemy's per-statement work (cache keys, result processing) costs far more
    than SQLite itself on the lifecycle's hot path. The statements stay Core
    statements, compiled by SQLAlchemy's SQLite dialect once and cached here;
    only their execution skips the engine. Other databases use the engine.
    """

    def __init__(self, db: sqlite3.Connection, dialect: Any, cache: "OrderedDict[Any, Any]", lock: threading.Lock):
        self.db = db
        self._dialect = dialect
        self._cache = cache
        self._cache_lock = lock

    def _compiled(self, stmt: Any, keys: frozenset[str]) -> Any:
        key = (id(stmt), keys)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] is stmt:  # the strong ref below keeps id() unique while cached
                self._cache.move_to_end(key)
                return hit[1]
        column_keys = list(keys) if getattr(stmt, "is_dml", False) and not getattr(stmt, "is_delete", False) else None
        compiled = stmt.compile(dialect=self._dialect, column_keys=column_keys)
        json_binds = frozenset(n for n, b in compiled.binds.items() if isinstance(b.type, JSON))
        entry = (str(compiled), compiled, json_binds, bool(compiled.post_compile_params))
        with self._cache_lock:
            self._cache[key] = (stmt, entry)
            while len(self._cache) > 512:
                self._cache.popitem(last=False)
        return entry

    def execute(self, stmt: Any, params: dict[str, Any] | None = None) -> Result:
        params = params or {}
        sql, compiled, json_binds, expanding = self._compiled(stmt, frozenset(params))
        if expanding:  # IN (...) lists are rendered per call
            state = compiled.construct_expanded_state(params)
            sql, values, names = state.statement, state.parameters, state.positiontup
        else:
            values, names = compiled.construct_params(params), compiled.positiontup
        args = tuple(json.dumps(values[n]) if n in json_binds and values[n] is not None else values[n] for n in names)
        cur = self.db.execute(sql, args)
        rows = cur.fetchall() if cur.description else []
        names = [d[0] for d in cur.description] if cur.description else []
        return Result(names, rows, cur.rowcount)
