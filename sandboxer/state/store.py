"""The state store itself: :class:`StateStore` (``sandboxer.state`` is its light front).
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import (
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from sandboxer.errors import StateStoreError
from sandboxer.state import NameTaken, OverCapacity, default_home
from sandboxer.state.schema import (  # noqa: F401 - the schema is part of this module's API
    LIVE_STATES,
    MIGRATIONS,
    SCHEMA_VERSION,
    claims,
    events,
    exports,
    meta,
    metadata,
    sandboxes,
    snapshots,
    usage,
)
from sandboxer.state.extensions import EXTENSION_STATES, TRANSITIONS, ExtensionTables, LifecycleError  # noqa: F401
from sandboxer.state.images import IMAGE_STATES, ImageTables  # noqa: F401
from sandboxer.state.pools import PoolTables
from sandboxer.state.sqlite import RawSQLite

# Hot-path statements are built once: SQLAlchemy memoises a statement object's
# cache key, so executing a prebuilt statement skips most per-call compilation.
_SELECT_BY_ID = select(sandboxes).where(sandboxes.c.id == bindparam("_id"))
_UPDATE_BY_ID = update(sandboxes).where(sandboxes.c.id == bindparam("_id"))
_UPDATE_IF_STATE = update(sandboxes).where(and_(sandboxes.c.id == bindparam("_id"),
                                                sandboxes.c.state == bindparam("_state")))
_INSERT_EVENT = insert(events)
_INSERT_USAGE = insert(usage)
_SELECT_USAGE = select(usage).where(usage.c.sandbox_id == bindparam("_id"))
_UPDATE_USAGE = update(usage).where(usage.c.sandbox_id == bindparam("_id"))
_INSERT_SANDBOX = insert(sandboxes)


# IN over fixed bound values (not an "expanding" IN), so executing it needs no per-call rendering.
_IS_LIVE = sandboxes.c.state.in_([bindparam(f"_live{i}", s) for i, s in enumerate(LIVE_STATES)])
_LIVE_BY_NAME = select(sandboxes.c.id).where(and_(sandboxes.c.name == bindparam("_name"), _IS_LIVE))
_CLAIM_HOLDER = (select(claims.c.sandbox_id).join(sandboxes, sandboxes.c.id == claims.c.sandbox_id)
                 .where(and_(claims.c.scope == bindparam("_scope"), claims.c.name == bindparam("_name"), _IS_LIVE)))
_INSERT_CLAIM = insert(claims)
_COUNT_LIVE: dict[frozenset[str], Any] = {}


def _count_live_stmt(columns: frozenset[str]) -> Any:
    """``count(*)`` of live sandboxes matching ``columns`` (bound as ``_<column>``), built once per shape."""
    stmt = _COUNT_LIVE.get(columns)
    if stmt is None:
        conds = [_IS_LIVE] + [sandboxes.c[k] == bindparam(f"_{k}") for k in sorted(columns)]
        stmt = _COUNT_LIVE.setdefault(columns, select(func.count()).select_from(sandboxes).where(and_(*conds)))
    return stmt


class StateStore(ExtensionTables, ImageTables, PoolTables):
    """Durable record of sandboxes, events, snapshots and usage."""

    #: Run SQLite transactions on plain sqlite3 connections (see RawSQLite); tests turn it off
    #: to exercise the engine path that other databases take.
    raw_sqlite = True
    RAW_POOL_SIZE = 16

    def __init__(self, url: str | None = None, *, home: Path | None = None):
        if url is None:
            home = Path(home) if home else default_home()
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = home / "state.db"
            if not path.exists():
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
            os.chmod(path, 0o600)
            url = f"sqlite:///{path}"
        self.engine: Engine = create_engine(url, future=True, **self._engine_args(url))
        #: The URL for messages and ``repr``: a password in it is masked.
        self.url = self.engine.url.render_as_string(hide_password=True)
        self._write_lock: threading.Lock | None = None
        self._raw_path: str | None = None
        try:
            self._open()
        except (DBAPIError, sqlite3.Error) as exc:
            self.close()
            raise self._open_error(exc) from None

    def _open(self) -> None:
        if self.engine.dialect.name == "sqlite":
            self._sqlite_setup(self.engine)
            self._write_lock = threading.Lock()
            database = self.engine.url.database
            if self.raw_sqlite and database and database != ":memory:":
                self._raw_path = database
                self._raw_idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
                self._raw_slots = threading.BoundedSemaphore(self.RAW_POOL_SIZE)
                self._raw_cache: OrderedDict[Any, Any] = OrderedDict()
                self._raw_cache_lock = threading.Lock()
                # Commits never checkpoint the WAL (a checkpoint syncs the database file, which
                # would stall every queued writer); a background thread does it instead, and
                # SQLite checkpoints when the last connection closes.
                self._stop = threading.Event()
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sandboxer-wal",
                                                      daemon=True)
                self._checkpointer.start()
        self._migrate()
        self.owner_id = self._owner_id()

    #: SQLite's primary result codes for a file that is not, or no longer, a sound database
    _DAMAGED_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

    def _open_error(self, exc: BaseException) -> StateStoreError:
        """One line naming the store and what to do; a damaged SQLite file is copied aside first."""
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            where = self.engine.url.render_as_string(hide_password=True)
            return StateStoreError(f"state store {where}: cannot open it: {detail}; check the URL, the server "
                               f"and the credentials (SANDBOXER_STATE_URL or --state-url)")
        path = Path(database)
        code = getattr(orig, "sqlite_errorcode", None)
        if code is None or code & 0xFF not in self._DAMAGED_CODES:
            return StateStoreError(f"state store {path}: cannot open it: {detail}; check the file's permissions "
                               f"and the free space of its disk")
        try:
            kept = f"a copy is kept at {self._keep_copy(path)}"
        except OSError as copy_exc:
            kept = f"no copy could be made ({copy_exc.strerror or copy_exc}), so copy it yourself first"
        # The original stays exactly where and as it is: what to salvage from it is the user's call.
        return StateStoreError(
            f"state store {path} is damaged ({detail}); {kept}. To go on, move the damaged file aside or "
            f"put back a backup, then run again: a new, empty store is created. Sandboxes it recorded may "
            f"still be running on their backends (tear them down there); sqlite3's .recover may salvage "
            f"rows from the copy"
        )

    @staticmethod
    def _digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    @staticmethod
    def _copy_new(src: Path, dst: Path) -> None:
        """Copy ``src`` to a new file ``dst`` (mode 0600); FileExistsError if ``dst`` exists."""
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())

    @staticmethod
    def _keep_copy(path: Path) -> Path:
        """Copy a damaged database (and its WAL) to ``<name>.corrupt-<UTC time>`` next to it.

        A copy of the same bytes kept by an earlier start is reused, so running again and
        again does not fill the disk. Nothing is ever overwritten.
        """
        size, digest = path.stat().st_size, StateStore._digest(path)
        for prior in sorted(path.parent.glob(f"{path.name}.corrupt-*")):
            if prior.name.endswith("-wal") or prior.stat().st_size != size:
                continue
            if StateStore._digest(prior) == digest:
                return prior
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(100):
            copy = path.with_name(f"{path.name}.corrupt-{stamp}" + (f".{n}" if n else ""))
            try:
                StateStore._copy_new(path, copy)
            except FileExistsError:
                continue
            wal = path.with_name(path.name + "-wal")
            if wal.is_file() and wal.stat().st_size:
                # named so that SQLite opening the copy reads the WAL's transactions too
                StateStore._copy_new(wal, copy.with_name(copy.name + "-wal"))
            return copy
        raise FileExistsError(f"100 copies named {path.name}.corrupt-{stamp}* exist already")

    # ------------------------------------------------------------- engine

    @staticmethod
    def _engine_args(url: str) -> dict[str, Any]:
        if url.startswith("sqlite"):
            # every _tx() ends in commit or rollback, so the pool need not roll back again on return
            return {"connect_args": {"check_same_thread": False, "timeout": 60}, "pool_size": 8, "max_overflow": 32,
                    "pool_reset_on_return": None}
        return {"pool_pre_ping": True}

    @staticmethod
    def _sqlite_setup(engine: Engine) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            # Writes take the lock up front; a read runs in autocommit (one consistent statement).
            if conn.info.get("write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    @contextmanager
    def _tx(self, write: bool = True, *, engine: bool = False) -> Iterator[Any]:
        # SQLite has one writer at a time. Queueing this process's writers on a lock, rather
        # than letting them all spin in SQLite's busy handler (which sleeps with backoff),
        # keeps a burst of threads from convoying; other processes still meet busy_timeout.
        if write and self._write_lock is not None:
            with self._write_lock:
                with self._tx_unlocked(write, engine) as conn:
                    yield conn
            return
        with self._tx_unlocked(write, engine) as conn:
            yield conn

    @contextmanager
    def _tx_unlocked(self, write: bool, engine: bool) -> Iterator[Any]:
        if self._raw_path is not None and not engine:
            with self._raw_tx(write) as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            conn.info["write"] = write
            with conn.begin():
                if write and self.engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7261001)"))
                yield conn

    @contextmanager
    def _raw_tx(self, write: bool) -> Iterator[RawSQLite]:
        with self._raw_slots:
            try:
                db = self._raw_idle.get_nowait()
            except queue.Empty:
                db = sqlite3.connect(self._raw_path, timeout=60, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA busy_timeout=60000")
                db.execute("PRAGMA wal_autocheckpoint=0")
            try:
                if write:
                    db.execute("BEGIN IMMEDIATE")
                try:
                    yield RawSQLite(db, self.engine.dialect, self._raw_cache, self._raw_cache_lock)
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                if db.in_transaction:
                    db.execute("COMMIT")
            except BaseException:
                db.close()
                raise
            self._raw_idle.put(db)

    CHECKPOINT_EVERY_S = 1.0

    def _checkpoint_loop(self) -> None:
        db = sqlite3.connect(self._raw_path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            while not self._stop.wait(self.CHECKPOINT_EVERY_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:  # busy or locked: the next round will do it
                    continue
        finally:
            db.close()

    def _migrate(self) -> None:
        with self._tx(engine=True) as conn:  # DDL goes through the engine
            meta.create(conn, checkfirst=True)
            row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
            current = int(row) if row else 0
            if current > SCHEMA_VERSION:
                raise StateStoreError(
                    f"state store {self.url} has schema version {current}, newer than this sand-boxer "
                    f"({SCHEMA_VERSION}); upgrade sand-boxer"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version](conn)
            if current != SCHEMA_VERSION:
                self._set_meta(conn, "schema_version", str(SCHEMA_VERSION))

    @staticmethod
    def _set_meta(conn: Connection, key: str, value: str) -> None:
        if conn.execute(select(meta.c.key).where(meta.c.key == key)).first():
            conn.execute(update(meta).where(meta.c.key == key).values(value=value))
        else:
            conn.execute(insert(meta).values(key=key, value=value))

    def _owner_id(self) -> str:
        with self._tx() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == "owner_id")).scalar()
            if not value:
                value = uuid.uuid4().hex[:16]
                self._set_meta(conn, "owner_id", value)
            return value

    def schema_version(self) -> int:
        with self._tx(write=False) as conn:
            return int(conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one())

    def close(self) -> None:
        if self._raw_path is not None:
            self._stop.set()
            self._checkpointer.join(5)
            while True:
                try:
                    self._raw_idle.get_nowait().close()
                except queue.Empty:
                    break
        self.engine.dispose()

    # ---------------------------------------------------------- sandboxes

    @staticmethod
    def _event(conn: Connection, sandbox_id: str | None, kind: str, *, from_state: str | None = None,
               to_state: str | None = None, consumer: str | None = None, extension: str | None = None,
               detail: dict[str, Any] | None = None, ts: float | None = None) -> None:
        conn.execute(_INSERT_EVENT, {
            "ts": ts or time.time(), "sandbox_id": sandbox_id, "kind": kind, "from_state": from_state,
            "to_state": to_state, "consumer": consumer, "extension": extension, "detail": detail or {},
        })

    def insert_intent(self, row: dict[str, Any], *, limits: list[tuple[str, int, dict[str, Any]]] = (),
                      detail: dict[str, Any] | None = None) -> None:
        """Record one sandbox in state ``provisioning`` before any side effect (see :meth:`admit`)."""
        self.admit([(row, list(limits))], detail=detail)

    def admit(self, candidates: list[tuple[Any, ...]], *,
              detail: dict[str, Any] | None = None) -> tuple[int, list[tuple[int, str, int]]]:
        """Record the intent on the first candidate with room, in one locked transaction.

        Args:
            candidates: ``(row, limits[, claims])`` in preference order; each limit is
                ``(scope, limit, column filter)``: the candidate is refused if the live
                sandboxes matching the filter already number ``limit``. A third item, if
                given, lists ``(scope, name)`` backend-side names the candidate takes: it is
                refused if a live sandbox holds one, and they are recorded with it otherwise.
            detail: extra detail for the ``create_intent`` event.

        Returns:
            The position of the admitted candidate, and ``(position, scope, limit)``
            for each candidate refused before it.

        Raises:
            NameTaken: a live sandbox already has the rows' ``name``.
            OverCapacity: every candidate is full or clashes (``.refusals``, ``.clashes``).
        """
        refusals: list[tuple[int, str, int]] = []
        clashes: list[tuple[int, str, str, str]] = []
        try:
            with self._tx() as conn:
                name = candidates[0][0].get("name") if candidates else None
                if name:
                    existing = conn.execute(_LIVE_BY_NAME, {"_name": name}).scalar()
                    if existing:
                        raise NameTaken(existing)
                for pos, (row, limits, *more) in enumerate(candidates):
                    wanted: list[tuple[str, str]] = more[0] if more else []
                    full = None
                    for scope, limit, where in limits:
                        n = conn.execute(_count_live_stmt(frozenset(where)),
                                         {f"_{k}": v for k, v in where.items()}).scalar_one()
                        if n >= limit:
                            full = (pos, scope, limit)
                            break
                    if full is not None:
                        refusals.append(full)
                        continue
                    clash = next(((pos, scope, name, holder) for scope, name in wanted
                                  for holder in [conn.execute(_CLAIM_HOLDER, {"_scope": scope, "_name": name}).scalar()]
                                  if holder), None)
                    if clash is not None:
                        clashes.append(clash)
                        continue
                    conn.execute(_INSERT_SANDBOX, row)
                    for scope, name in wanted:
                        conn.execute(_INSERT_CLAIM, {"scope": scope, "name": name, "sandbox_id": row["id"]})
                    event_detail = {"profile": row["profile"], "host": row.get("host"), **(detail or {})}
                    if refusals:
                        event_detail["admission_refused"] = [f"{scope} is full ({limit})" for _, scope, limit in refusals]
                    self._event(conn, row["id"], "create_intent", to_state=row["state"], consumer=row["consumer"],
                                extension=row["extension"], ts=row["created_at"], detail=event_detail)
                    return pos, refusals
        except IntegrityError:
            name = candidates[0][0].get("name")
            existing = self.get_by_name(name) if name else None
            if existing:
                raise NameTaken(existing["id"]) from None
            raise
        raise OverCapacity(refusals, clashes)

    def transition(self, sandbox_id: str, kind: str, *, expect: tuple[str, ...] | None = None,
                   detail: dict[str, Any] | None = None, also: Callable[[Connection, dict[str, Any]], None] | None = None,
                   known: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any] | None:
        """Update a sandbox and append its event in one transaction.

        ``also(conn, row)`` runs in the same transaction with the updated row (usage records).
        ``known`` is the row as the caller last wrote it; with it (and at most one expected
        state) the update is conditional on the state and the row is not read back.

        Returns:
            The updated row, or None if the sandbox is missing or not in ``expect``.
        """
        with self._tx() as conn:
            if known is not None and (expect is None or len(expect) == 1):
                if expect:
                    n = conn.execute(_UPDATE_IF_STATE, {"_id": sandbox_id, "_state": expect[0], **fields}).rowcount
                else:
                    n = conn.execute(_UPDATE_BY_ID, {"_id": sandbox_id, **fields}).rowcount
                if n == 0:
                    return None
                cur = {**known, "state": expect[0] if expect else known["state"]}
            else:
                cur = conn.execute(_SELECT_BY_ID, {"_id": sandbox_id}).mappings().first()
                if cur is None or (expect is not None and cur["state"] not in expect):
                    return None
                if fields:
                    conn.execute(_UPDATE_BY_ID, {"_id": sandbox_id, **fields})
            self._event(conn, sandbox_id, kind, from_state=cur["state"], to_state=fields.get("state", cur["state"]),
                        consumer=cur["consumer"], extension=cur["extension"], detail=detail)
            row = {**cur, **fields}
            if also is not None:
                also(conn, row)
            return row

    def record_event(self, sandbox_id: str | None, kind: str, **kw: Any) -> None:
        with self._tx() as conn:
            self._event(conn, sandbox_id, kind, **kw)

    def get(self, sandbox_id: str) -> dict[str, Any] | None:
        with self._tx(write=False) as conn:
            row = conn.execute(_SELECT_BY_ID, {"_id": sandbox_id}).mappings().first()
            return dict(row) if row else None

    def get_by_name(self, name: str) -> dict[str, Any] | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(sandboxes).where(and_(
                sandboxes.c.name == name, sandboxes.c.state.in_(LIVE_STATES)))).mappings().first()
            return dict(row) if row else None

    def list(self, *, states: tuple[str, ...] | None = LIVE_STATES, where: dict[str, Any] | None = None,
             fields: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Sandbox rows by creation time; ``fields``: only these columns (default: all)."""
        q = select(*(sandboxes.c[f] for f in fields) if fields else (sandboxes,)).order_by(sandboxes.c.created_at)
        if states is not None:
            q = q.where(sandboxes.c.state.in_(states))
        for k, v in (where or {}).items():
            q = q.where(sandboxes.c[k] == v)
        with self._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def extensions_used(self) -> list[str]:
        """Every extension a sandbox was ever recorded on (gc reconciles only those)."""
        with self._tx(write=False) as conn:
            return sorted(r[0] for r in conn.execute(select(sandboxes.c.extension).distinct()))

    def count_live(self, **where: Any) -> int:
        conds = [sandboxes.c.state.in_(LIVE_STATES)] + [sandboxes.c[k] == v for k, v in where.items()]
        with self._tx(write=False) as conn:
            return conn.execute(select(func.count()).select_from(sandboxes).where(and_(*conds))).scalar_one()

    def claims_of(self, sandbox_id: str) -> list[tuple[str, str]]:
        with self._tx(write=False) as conn:
            return [(r[0], r[1]) for r in conn.execute(
                select(claims.c.scope, claims.c.name).where(claims.c.sandbox_id == sandbox_id))]

    def purge_claims(self) -> int:
        """Forget claims of sandboxes that are no longer live (gc); admission ignores them anyway."""
        with self._tx() as conn:
            live = select(sandboxes.c.id).where(sandboxes.c.state.in_(LIVE_STATES))
            return conn.execute(delete(claims).where(claims.c.sandbox_id.not_in(live))).rowcount

    def touch(self, sandbox_ids: list[str], ts: float | None = None) -> None:
        """Note that these sandboxes were seen alive (closes usage intervals after a crash)."""
        if sandbox_ids:
            with self._tx() as conn:
                conn.execute(update(sandboxes).where(sandboxes.c.id.in_(sandbox_ids)).values(last_seen_at=ts or time.time()))

    def events(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        q = select(events).order_by(events.c.seq)
        if sandbox_id is not None:
            q = q.where(events.c.sandbox_id == sandbox_id)
        with self._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    # -------------------------------------------------------------- usage

    @staticmethod
    def open_usage(conn: Any, row: dict[str, Any], price: dict[str, Any], currency: str) -> None:
        """Open a sandbox's usage interval at its ``ready_at`` (inside its ``ready`` transition)."""
        conn.execute(_INSERT_USAGE, {
            "sandbox_id": row["id"], "consumer": row["consumer"], "profile": row["profile"],
            "extension": row["extension"], "resources": row["resources"], "price": price,
            "started_at": row["ready_at"], "stopped_at": None, "amount": None, "currency": currency,
        })

    @staticmethod
    def close_usage(conn: Any, sandbox_id: str, ts: float, amount: Callable[[dict[str, Any], float], float],
                    reported: dict[str, Any] | None = None) -> None:
        """Close a sandbox's open interval at ``ts`` (never before it started), priced by ``amount(usage, stop)``."""
        u = conn.execute(_SELECT_USAGE, {"_id": sandbox_id}).mappings().first()
        if u is None or u["stopped_at"] is not None:
            return
        stop = max(ts, u["started_at"])
        conn.execute(_UPDATE_USAGE, {"_id": sandbox_id, "stopped_at": stop, "amount": round(amount(u, stop), 6),
                                     "reported": reported})

    def close_abandoned_usage(self, amount: Callable[[dict[str, Any], float], float]) -> None:
        """Close the intervals of sandboxes that ended while nobody was watching: at the last time
        each was seen alive, else when it was found ended."""
        with self._tx() as conn:
            rows = conn.execute(
                select(usage, sandboxes.c.terminated_at, sandboxes.c.last_seen_at)
                .join(sandboxes, sandboxes.c.id == usage.c.sandbox_id)
                .where(and_(usage.c.stopped_at.is_(None), sandboxes.c.state.not_in(LIVE_STATES)))
            ).mappings().all()
            for r in rows:
                stop = max(r["started_at"], r["last_seen_at"] or r["terminated_at"] or r["started_at"])
                conn.execute(_UPDATE_USAGE, {"_id": r["sandbox_id"], "stopped_at": stop,
                                             "amount": round(amount(r, stop), 6), "reported": None})

    def usage(self, since: float | None = None) -> list[dict[str, Any]]:
        """Usage intervals still open or closed at or after ``since``."""
        q = select(usage)
        if since is not None:
            q = q.where((usage.c.stopped_at.is_(None)) | (usage.c.stopped_at >= since))
        with self._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    # ------------------------------------------------------------ exports

    def queue_exports(self, sink: str, records: list[dict[str, Any]]) -> int:
        """Add records not yet queued for ``sink`` to its outbox; returns how many were new."""
        now = time.time()
        queued = 0
        with self._tx() as conn:
            have = {r for (r,) in conn.execute(select(exports.c.record_id).where(exports.c.sink == sink))}
            for rec in records:
                if rec["id"] not in have:
                    conn.execute(insert(exports).values(record_id=rec["id"], sink=sink, record=rec, state="pending",
                                                        attempts=0, updated_at=now))
                    queued += 1
        return queued

    def pending_exports(self, sink: str) -> list[dict[str, Any]]:
        with self._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(select(exports).where(and_(
                exports.c.sink == sink, exports.c.state == "pending")).order_by(exports.c.record_id)).mappings()]

    def mark_exports(self, sink: str, pending: list[dict[str, Any]], error: str | None) -> None:
        """Record a delivery attempt of ``pending``: delivered, or still pending with ``error``."""
        with self._tx() as conn:
            for p in pending:
                values: dict[str, Any] = {"attempts": p["attempts"] + 1, "updated_at": time.time(), "last_error": error}
                if error is None:
                    values["state"] = "delivered"
                conn.execute(update(exports).where(and_(exports.c.record_id == p["record_id"],
                                                        exports.c.sink == sink)).values(**values))

    # ---------------------------------------------------------- snapshots

    def insert_snapshot(self, row: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(insert(snapshots).values(**row))
            self._event(conn, row["sandbox_id"], "snapshot_intent", consumer=row["consumer"],
                        extension=row["extension"], detail={"snapshot_id": row["id"]})

    def update_snapshot(self, snapshot_id: str, kind: str, **fields: Any) -> None:
        with self._tx() as conn:
            cur = conn.execute(select(snapshots).where(snapshots.c.id == snapshot_id)).mappings().first()
            if cur is None:
                return
            conn.execute(update(snapshots).where(snapshots.c.id == snapshot_id).values(**fields))
            self._event(conn, cur["sandbox_id"], kind, consumer=cur["consumer"], extension=cur["extension"],
                        detail={"snapshot_id": snapshot_id, **({"error": fields["error"]} if fields.get("error") else {})})

    def get_snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(snapshots).where(snapshots.c.id == snapshot_id)).mappings().first()
            return dict(row) if row else None

    def list_snapshots(self, *, states: tuple[str, ...] = ("ready",)) -> list[dict[str, Any]]:
        with self._tx(write=False) as conn:
            q = select(snapshots).where(snapshots.c.state.in_(states)).order_by(snapshots.c.created_at)
            return [dict(r) for r in conn.execute(q).mappings()]

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._tx() as conn:
            cur = conn.execute(select(snapshots).where(snapshots.c.id == snapshot_id)).mappings().first()
            conn.execute(delete(snapshots).where(snapshots.c.id == snapshot_id))
            if cur is not None:
                self._event(conn, cur["sandbox_id"], "snapshot_deleted", consumer=cur["consumer"],
                            extension=cur["extension"], detail={"snapshot_id": snapshot_id})
