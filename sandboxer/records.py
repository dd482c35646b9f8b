"""State-store rows as the typed models the API returns, and the one way errors are summarised in them;
what a create reports as it goes (``on_progress``), and whether a named create asks for the sandbox it names."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Callable

from sandboxer.errors import NameConflict
from sandboxer.models import SandboxCreateRequest, SandboxState, SandboxStatus, SnapshotMeta, format_duration

#: ``on_progress(stage, detail)`` of :meth:`Manager.create <sandboxer.manager.Manager.create>`.
Progress = Callable[[str, dict[str, Any]], None]

log = logging.getLogger("sandboxer")


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


def reporter(on_progress: Progress | None) -> Progress:
    """``on_progress`` guarded: a callback that raises is logged, never breaks the create."""
    def report(stage: str, detail: dict[str, Any]) -> None:
        if on_progress is None:
            return
        try:
            on_progress(stage, detail)
        except Exception as exc:  # noqa: BLE001 - progress is for display only
            log.warning("on_progress(%r) raised: %s", stage, exc)
    return report


def same_request(row: dict[str, Any], req: SandboxCreateRequest, profile: str, ttl: float) -> None:
    """A create named like a live sandbox must ask for it as it was made.

    Raises:
        NameConflict: naming the sandbox and each parameter that differs (was -> asked).
    """
    had_ttl = row["expires_at"] - row["created_at"]
    diffs = [f"{what} {was!r} -> {asked!r}" for what, was, asked in (
        ("profile", row["profile"], profile), ("consumer", row["consumer"], req.consumer),
        ("inputs", row["inputs"] or {}, req.inputs), ("labels", row["labels"] or {}, req.labels)) if was != asked]
    if abs(had_ttl - ttl) > 1.0:
        diffs.append(f"ttl {format_duration(round(had_ttl))} -> {format_duration(ttl)}")
    if diffs:
        raise NameConflict(f"sandbox name {req.name!r} is taken by live sandbox {row['id']}, created with other "
                           f"parameters ({'; '.join(diffs)}); use another name, or tear {row['id']} down first")
