"""The state store's part for warm pools: handing a pooled sandbox to one consumer (sandboxer/pools.py).

A mixin of :class:`~sandboxer.state.StateStore` (all SQL stays in this package). A pooled sandbox
is an ordinary record whose consumer is :data:`~sandboxer.models.POOL_CONSUMER`. It is handed out
by one conditional ``UPDATE ... WHERE id = :id AND state = 'ready' AND consumer = <pool>``: of any
number of threads and processes on one store, exactly one sees a row count of 1 for a given
sandbox, so no sandbox is ever handed to two consumers (this holds even without the store's write
lock, which every write transaction also takes).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, bindparam, select, update

from sandboxer.models import POOL_CONSUMER
from sandboxer.state.schema import sandboxes, usage

#: The oldest few ready, young-enough pooled sandboxes of a profile (candidates to claim).
_POOLED = (select(sandboxes.c.id).where(and_(
    sandboxes.c.profile == bindparam("_profile"), sandboxes.c.consumer == bindparam("_pool"),
    sandboxes.c.state == bindparam("_ready"), sandboxes.c.created_at >= bindparam("_born_after"),
    sandboxes.c.expires_at >= bindparam("_lives_until"))).order_by(sandboxes.c.created_at).limit(4))
#: The claim itself: conditional on the sandbox still being a ready, unclaimed pooled one.
_CLAIM = update(sandboxes).where(and_(
    sandboxes.c.id == bindparam("_id"), sandboxes.c.state == bindparam("_ready"),
    sandboxes.c.consumer == bindparam("_pool")))
_USAGE_TO = update(usage).where(and_(usage.c.sandbox_id == bindparam("_id"), usage.c.stopped_at.is_(None)))
_SELECT_BY_ID = select(sandboxes).where(sandboxes.c.id == bindparam("_id"))


class PoolTables:
    """Hand-out of pooled sandboxes (mixed into StateStore)."""

    _tx: Any  # StateStore's transaction context manager
    _event: Any  # StateStore._event

    def claim_pooled(self, profile: str, *, consumer: str, labels: dict[str, str], inputs: dict[str, Any],
                     expires_at: float, now: float, born_after: float, lives_until: float) -> dict[str, Any] | None:
        """Give the oldest ready pooled sandbox of ``profile`` to ``consumer``, in one write transaction.

        The record becomes the consumer's (``labels``, ``inputs``, ``expires_at``), its open usage
        interval too, and a ``pool_handout`` event records it.

        Args:
            born_after: only a sandbox created at or after this (younger than the pool's max_age).
            lives_until: only a sandbox whose recorded end is at or after this (a backend that
                cannot move its end must still have the consumer's TTL left).

        Returns:
            The claimed row as it now is, or None when the pool has none to give.
        """
        with self._tx() as conn:
            ids = [r[0] for r in conn.execute(_POOLED, {
                "_profile": profile, "_pool": POOL_CONSUMER, "_ready": "ready", "_born_after": born_after,
                "_lives_until": lives_until})]
            for sandbox_id in ids:
                n = conn.execute(_CLAIM, {"_id": sandbox_id, "_ready": "ready", "_pool": POOL_CONSUMER,
                                          "consumer": consumer, "labels": labels, "inputs": inputs,
                                          "expires_at": expires_at}).rowcount
                if n != 1:  # another claim took it first
                    continue
                conn.execute(_USAGE_TO, {"_id": sandbox_id, "consumer": consumer})
                row = dict(conn.execute(_SELECT_BY_ID, {"_id": sandbox_id}).mappings().first())
                self._event(conn, sandbox_id, "pool_handout", from_state="ready", to_state="ready",
                            consumer=consumer, extension=row["extension"], ts=now,
                            detail={"pool": profile, "age_s": round(now - row["created_at"], 3)})
                return row
        return None

    def retire_pooled(self, sandbox_id: str, *, now: float, reason: str) -> dict[str, Any] | None:
        """Start the teardown of a pooled sandbox, only if it is still a ready, unclaimed one
        (so a sandbox handed out meanwhile is never torn down by the pool's upkeep).

        Returns:
            The row, now ``tearing_down``, or None if it was claimed or moved meanwhile.
        """
        with self._tx() as conn:
            n = conn.execute(_CLAIM, {"_id": sandbox_id, "_ready": "ready", "_pool": POOL_CONSUMER,
                                      "state": "tearing_down", "teardown_started_at": now}).rowcount
            if n != 1:
                return None
            row = dict(conn.execute(_SELECT_BY_ID, {"_id": sandbox_id}).mappings().first())
            self._event(conn, sandbox_id, "teardown_started", from_state="ready", to_state="tearing_down",
                        consumer=row["consumer"], extension=row["extension"], ts=now, detail={"reason": reason})
            return row
