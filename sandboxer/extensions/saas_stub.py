"""ext.saas-stub: a metered stand-in backend for tests, demos and capacity drills.

It behaves like a small SaaS: configurable latency, a capacity beyond which
it raises CapacityUnavailable, a price per second (the manifest's pricing),
and fault injection per stage. It keeps its own table of live sandboxes in a
file (locked with ``flock``, so threads and processes agree), which outlives
the manager process: a leak shows up there. The table also records the peak
number of live sandboxes, so a drill can check that nothing over-admitted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
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
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.models import ExecResult, Profile, SnapshotMeta


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


class StubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(default=0.0, ge=0)
    capacity: int = Field(default=100, ge=0)
    table: str | None = Field(default=None, description="live-sandbox table file; default <home>/saas-stub/<id>.json")
    faults: list[Fault] = Field(default_factory=list)
    seed: int | None = None


class SaasStubExtension(SandboxExtension):
    Config = StubConfig
    features = frozenset({"exec", "snapshots", "metering", "list_owned"})

    def __init__(self, manifest, config):  # type: ignore[no-untyped-def]
        super().__init__(manifest, config)
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)

    @property
    def table_path(self) -> Path:
        return Path(self.config.table) if self.config.table else self.home / "saas-stub" / f"{self.id}.json"

    @contextlib.contextmanager
    def _table(self) -> Iterator[dict[str, Any]]:
        """The table, locked against other threads and processes; written back on exit."""
        path = self.table_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            raw = fh.read()
            data = json.loads(raw) if raw else {"live": {}, "peak": 0, "created": 0}
            yield data
            new = json.dumps(data)
            if new != raw:  # reads leave the file alone
                fh.seek(0)
                fh.truncate()
                fh.write(new)

    def live(self) -> dict[str, Any]:
        """The stub's own view: ``{"live": {...}, "peak": n, "created": n}``."""
        with self._table() as t:
            return json.loads(json.dumps(t))

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

    def _add(self, inputs: dict[str, Any], profile: Profile, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        stub_id = "stub-" + uuid.uuid4().hex[:12]
        with self._table() as t:
            if len(t["live"]) >= self.config.capacity:
                raise CapacityUnavailable(
                    f"{self.id}: at capacity ({self.config.capacity} live sandboxes)", backend=self.id)
            t["live"][stub_id] = {
                "sandbox_id": inputs.get("sandbox_id"), "owner_labels": inputs.get("owner_labels", {}),
                "tags": inputs.get("tags", {}), "created": time.time(), "profile": profile.slug, **(extra or {}),
            }
            t["created"] += 1
            t["peak"] = max(t["peak"], len(t["live"]))
        return {"stub_id": stub_id, "sandbox_id": inputs.get("sandbox_id"), "host": "stub"}

    # ------------------------------------------------------------ contract

    def provision(self, profile: Profile, inputs: dict[str, Any], host: str | None) -> dict[str, Any]:
        if self.config.latency_s:
            time.sleep(self.config.latency_s)
        fault = self._fault("provision", inputs)
        if fault is not None:
            if fault.late_success:
                if fault.late_after_s:
                    timer = threading.Timer(fault.late_after_s, self._add, (inputs, profile, {"late": True}))
                    timer.daemon = True
                    timer.start()
                else:
                    self._add(inputs, profile, {"late": True})
            self._raise(fault, "provision")
        return self._add(inputs, profile)

    def wait_ready(self, handle: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        fault = self._fault("ready")
        if fault is not None:
            self._raise(fault, "ready")
        with self._table() as t:
            if handle["stub_id"] not in t["live"]:
                raise ReadinessTimeout(f"{self.id}: {handle['stub_id']} vanished", backend=self.id)
        return {"host": "stub", "url": f"stub://{handle['stub_id']}"}

    def teardown(self, handle: dict[str, Any]) -> dict[str, Any]:
        fault = self._fault("teardown")
        if fault is not None:
            self._raise(fault, "teardown")
        with self._table() as t:
            gone = t["live"].pop(handle["stub_id"], None) is None
        return {"already_gone": gone}

    def exec(self, handle: dict[str, Any], argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        with self._table() as t:
            if handle["stub_id"] not in t["live"]:
                raise ExecError(f"{self.id}: {handle['stub_id']} is not running", backend=self.id)
        if argv[0] == "echo":
            out = " ".join(argv[1:]) + "\n"
        elif argv[0] == "cat" and stdin is not None:
            out = stdin.decode(errors="replace")
        else:
            out = ""
        if on_output and out:
            on_output("stdout", out)
        return ExecResult(exit_code=1 if argv[0] == "false" else 0, stdout=out)

    def list_owned(self, owner_labels: dict[str, str]) -> list[dict[str, Any]]:
        with self._table() as t:
            return [
                {"sandbox_id": rec["sandbox_id"], "handle": {"stub_id": sid, "sandbox_id": rec["sandbox_id"], "host": "stub"}}
                for sid, rec in t["live"].items()
                if all(rec.get("owner_labels", {}).get(k) == v for k, v in owner_labels.items())
            ]

    def snapshot(self, handle: dict[str, Any]) -> dict[str, Any]:
        fault = self._fault("snapshot")
        if fault is not None:
            self._raise(fault, "snapshot")
        return {"data": {"stub_snapshot": "ss-" + uuid.uuid4().hex[:10], "source": handle["stub_id"]},
                "size_bytes": 0, "checksum": None}

    def restore_from_snapshot(self, profile: Profile, snapshot_meta: SnapshotMeta, inputs: dict[str, Any],
                              host: str | None) -> dict[str, Any]:
        handle = self.provision(profile, inputs, host)
        return {**handle, "restored_from": snapshot_meta.data.get("stub_snapshot")}

    def meter_actual(self, handle: dict[str, Any]) -> dict[str, Any] | None:
        with self._table() as t:
            rec = t["live"].get(handle["stub_id"])
        return {"seconds": time.time() - rec["created"]} if rec else None
