"""ext.saas-stub: a metered stand-in backend for tests, demos and capacity drills.

It behaves like a small SaaS: configurable latency, a capacity beyond which
it raises CapacityUnavailable, a price per second (the manifest's pricing),
and fault injection per stage. It keeps its own table of live sandboxes in a
small SQLite file (one locked transaction per call, so threads and processes
agree), which outlives the manager process: a leak shows up there. The table also records the peak
number of live sandboxes, so a drill can check that nothing over-admitted.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandboxer.errors import (
    AuthError,
    CapacityUnavailable,
    ExecError,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    SnapshotError,
    TeardownError,
)
from sandboxer.execution import OutputCollector, check_argv
from sandboxer.contract import Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult, TeardownReport
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.models import ExecResult, SnapshotMeta
from sandboxer.secrets import SecretRef


class Fault(BaseModel):
    """Inject an error at a stage, at a rate or when a named input is set."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["provision", "ready", "teardown", "snapshot"]
    error: Literal["capacity", "quota", "rate_limited", "auth", "transient", "fatal", "timeout"] = "transient"
    rate: float = Field(default=0.0, ge=0, le=1)
    when_input: str | None = None
    retry_after: float | None = Field(default=None, ge=0)
    late_success: bool = Field(default=False, description="provision raises, yet the sandbox appears anyway")
    late_after_s: float = Field(default=0.0, ge=0, description="how long after the error the late sandbox appears")


class StubHandle(Handle):
    """A stub sandbox: its row in the stub's table."""

    model_config = ConfigDict(extra="ignore")

    stub_id: str
    sandbox_id: str | None = None
    restored_from: str | None = None


class StubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(default=0.0, ge=0)
    capacity: int = Field(default=100, ge=0)
    table: str | None = Field(default=None, description="live-sandbox table file; default <home>/saas-stub/<id>.json")
    faults: list[Fault] = Field(default_factory=list)
    seed: int | None = None
    api_key: SecretRef | None = Field(default=None, description="a key every create must present (drills)")
    consumer_keys: dict[str, SecretRef] = Field(default_factory=dict, description="a consumer's own key")
    refuse_keys_with_prefix: str | None = Field(default=None, description="keys the stub 'provider' refuses")
    duplicate_creates: bool = Field(default=False, description="ignore idempotency: each create makes two")


class SaasStubExtension(SandboxExtension):
    Config = StubConfig
    features = frozenset({"exec", "snapshots", "metering", "list_owned"})
    # its "machine" has no network (a stand-in: nothing it runs reaches out)
    enforces = frozenset({"network:none"})
    Handle = StubHandle

    def __init__(self, manifest, config):  # type: ignore[no-untyped-def]
        super().__init__(manifest, config)
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._rng = random.Random(config.seed)

    @property
    def table_path(self) -> Path:
        return Path(self.config.table) if self.config.table else self.home / "saas-stub" / f"{self.id}.db"

    @contextlib.contextmanager
    def _db(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """The stub's own table (its "provider side"), in one locked transaction.

        A small SQLite file of its own, not the manager's state store: it stands for
        the remote service, so it must outlive and stay independent of the manager.
        Threads queue on a lock (SQLite's busy handler would make a burst convoy);
        other processes meet SQLite's own locking.
        """
        with self._db_lock:
            if self._conn is None:
                path = self.table_path
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("CREATE TABLE IF NOT EXISTS live (stub_id TEXT PRIMARY KEY, sandbox_id TEXT, record TEXT)")
                conn.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)")
                self._conn = conn
            db = self._conn
            if not write:  # one SELECT: autocommit is consistent enough
                yield db
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _counter(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    @staticmethod
    def _set_counter(db: sqlite3.Connection, name: str, value: int) -> None:
        db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = ?",
                   (name, value, value))

    def _record(self, stub_id: str) -> dict[str, Any] | None:
        with self._db(write=False) as db:
            row = db.execute("SELECT record FROM live WHERE stub_id = ?", (stub_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def reset_peak(self) -> None:
        """Start a new drill: the peak becomes the number live now."""
        with self._db() as db:
            self._set_counter(db, "peak", db.execute("SELECT count(*) FROM live").fetchone()[0])

    def live(self) -> dict[str, Any]:
        """The stub's own view: ``{"live": {stub_id: record}, "peak": n, "created": n}``."""
        with self._db() as db:
            rows = db.execute("SELECT stub_id, record FROM live").fetchall()
            return {"live": {k: json.loads(v) for k, v in rows}, "peak": self._counter(db, "peak"),
                    "created": self._counter(db, "created")}

    def _fault(self, stage: str, inputs: dict[str, Any] | None = None) -> Fault | None:
        for f in self.config.faults:
            if f.stage != stage:
                continue
            if f.when_input is not None:
                if inputs and inputs.get(f.when_input):
                    return f
                continue
            with self._lock:
                if f.rate and self._rng.random() < f.rate:
                    return f
        return None

    def _raise(self, f: Fault, what: str) -> None:
        msg = f"{self.id}: injected {f.error} at {what}"
        kw: dict[str, Any] = {"backend": self.id}
        if f.error == "capacity":
            raise CapacityUnavailable(msg, **kw)
        if f.error == "quota":
            raise QuotaExceeded(msg, **kw)
        if f.error == "rate_limited":
            raise RateLimited(msg, retry_after=f.retry_after, **kw)
        if f.error == "auth":
            raise AuthError(msg, **kw)
        if f.error == "timeout":
            raise ReadinessTimeout(msg, **kw)
        if what == "teardown":
            raise TeardownError(msg, **kw)
        if what == "snapshot":
            raise SnapshotError(msg, **kw)
        raise ProvisionError(msg, transient=f.error == "transient", **kw)

    def _add(self, request: ProvisionRequest, extra: dict[str, Any] | None = None) -> StubHandle:
        stub_id = "stub-" + uuid.uuid4().hex[:12]
        record = {"sandbox_id": request.sandbox_id, "owner_labels": request.owner_labels,
                  "tags": request.tags, "created": time.time(), "profile": request.profile.slug, **(extra or {})}
        with self._db() as db:
            n = db.execute("SELECT count(*) FROM live").fetchone()[0]
            if n >= self.config.capacity:
                raise CapacityUnavailable(
                    f"{self.id}: at capacity ({self.config.capacity} live sandboxes)", backend=self.id)
            db.execute("INSERT INTO live (stub_id, sandbox_id, record) VALUES (?, ?, ?)",
                       (stub_id, record["sandbox_id"], json.dumps(record)))
            self._set_counter(db, "created", self._counter(db, "created") + 1)
            self._set_counter(db, "peak", max(self._counter(db, "peak"), n + 1))
        return StubHandle(stub_id=stub_id, sandbox_id=request.sandbox_id, host="stub")

    def _key_ref(self, consumer: str | None) -> SecretRef | None:
        return self.config.consumer_keys.get(consumer or "", self.config.api_key)

    def _check_key(self, consumer: str | None) -> None:
        ref = self._key_ref(consumer)
        if ref is None:
            return
        value = ref.resolve(backend=self.id)
        prefix = self.config.refuse_keys_with_prefix
        if prefix and value.startswith(prefix):
            raise AuthError(f"{self.id}: the key from {ref.describe()} was refused; fix or rotate it",
                            backend=self.id, credential=ref.reference())

    def credential_key(self, consumer: str | None) -> str | None:
        ref = self._key_ref(consumer)
        return ref.fingerprint() if ref is not None else None

    def kill(self, stub_id: str) -> None:
        """Drill: the "provider" ends a sandbox behind the manager's back."""
        with self._db() as db:
            db.execute("DELETE FROM live WHERE stub_id = ?", (stub_id,))

    # ------------------------------------------------------------ contract

    def provision(self, request: ProvisionRequest) -> StubHandle:
        if self.config.latency_s:
            time.sleep(self.config.latency_s)
        self._check_key(request.tags.get("sandboxer.consumer"))
        if self.config.duplicate_creates:
            self._add(request, {"duplicate": True})  # a retried create the provider did not dedupe
        fault = self._fault("provision", request.inputs)
        if fault is not None:
            if fault.late_success:
                if fault.late_after_s:
                    timer = threading.Timer(fault.late_after_s, self._add, (request, {"late": True}))
                    timer.daemon = True
                    timer.start()
                else:
                    self._add(request, {"late": True})
            self._raise(fault, "provision")
        return self._add(request)

    def wait_ready(self, handle: StubHandle, timeout: float = 60.0) -> Reachability:
        fault = self._fault("ready")
        if fault is not None:
            self._raise(fault, "ready")
        if self._record(handle.stub_id) is None:
            raise ReadinessTimeout(f"{self.id}: {handle.stub_id} vanished", backend=self.id)
        return Reachability(host="stub", url=f"stub://{handle.stub_id}")

    def teardown(self, handle: StubHandle) -> TeardownReport:
        fault = self._fault("teardown")
        if fault is not None:
            self._raise(fault, "teardown")
        with self._db() as db:
            gone = db.execute("DELETE FROM live WHERE stub_id = ?", (handle.stub_id,)).rowcount == 0
        return TeardownReport(already_gone=gone, removed=[] if gone else [handle.stub_id])

    def exec(self, handle: StubHandle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        argv = check_argv(argv, backend=self.id)
        if self._record(handle.stub_id) is None:
            raise ExecError(f"{self.id}: {handle.stub_id} is not running", backend=self.id)
        out = OutputCollector(on_output)
        if argv[0] == "echo":
            out.feed_text("stdout", " ".join(argv[1:]) + "\n")
        elif argv[0] == "cat" and stdin is not None:
            out.feed("stdout", stdin)
        return out.result(1 if argv[0] == "false" else 0)

    def probe(self, handle: StubHandle) -> bool | None:
        return self._record(handle.stub_id) is not None

    def handle_id(self, handle: StubHandle) -> str | None:
        return handle.stub_id

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        return [
            OwnedSandbox(sandbox_id=rec["sandbox_id"],
                         handle=StubHandle(stub_id=sid, sandbox_id=rec["sandbox_id"], host="stub"))
            for sid, rec in self.live()["live"].items()
            if all(rec.get("owner_labels", {}).get(k) == v for k, v in owner_labels.items())
        ]

    def snapshot(self, handle: StubHandle) -> SnapshotResult:
        fault = self._fault("snapshot")
        if fault is not None:
            self._raise(fault, "snapshot")
        return SnapshotResult(data={"stub_snapshot": "ss-" + uuid.uuid4().hex[:10], "source": handle.stub_id},
                              size_bytes=0)

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> StubHandle:
        handle = self.provision(request)
        return handle.model_copy(update={"restored_from": snapshot.data.get("stub_snapshot")})

    def meter_actual(self, handle: StubHandle) -> dict[str, Any] | None:
        rec = self._record(handle.stub_id)
        return {"seconds": time.time() - rec["created"]} if rec else None
