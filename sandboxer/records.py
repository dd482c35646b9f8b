"""State-store rows as the typed models the API returns, and the one way errors are summarised in them."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sandboxer.models import SandboxState, SandboxStatus, SnapshotMeta


def dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc) if ts is not None else None


#: The columns :func:`status_of` reads: what a listing asks the state store for (not the handle,
#: inputs or resources, whose JSON it would only decode to drop).
STATUS_FIELDS = ("id", "name", "profile", "extension", "host", "state", "reachability", "consumer", "labels",
                 "created_at", "ready_at", "expires_at", "terminated_at", "last_error", "policy")


def status_of(row: dict[str, Any]) -> SandboxStatus:
    return SandboxStatus(
        id=row["id"], name=row["name"], profile=row["profile"], extension=row["extension"], host=row["host"],
        state=SandboxState(row["state"]), reachability=row["reachability"] or {}, consumer=row["consumer"],
        labels=row["labels"] or {}, created_at=dt(row["created_at"]), ready_at=dt(row["ready_at"]),
        expires_at=dt(row["expires_at"]), terminated_at=dt(row["terminated_at"]), last_error=row["last_error"],
        policy=row.get("policy") or {},
    )


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def snapshot_meta(row: dict[str, Any]) -> SnapshotMeta:
    return SnapshotMeta(
        id=row["id"], sandbox_id=row["sandbox_id"], extension=row["extension"], profile=row["profile"],
        consumer=row["consumer"], created_at=dt(row["created_at"]), size_bytes=row["size_bytes"],
        checksum=row["checksum"], data=row["data"] or {}, inputs=row["inputs"] or {},
    )
