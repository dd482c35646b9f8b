"""The state store's part for machine images built with Packer (ext.vm-packer's build mode).

A mixin of :class:`~sandboxer.state.StateStore` (all SQL stays in this package). A build is
recorded ``building`` before ``packer build`` starts and becomes ``ready`` once its artifact is
known, so a build that fails, is interrupted or crashes never leaves a ``ready`` row behind. The
``building`` row is also the lock: at most one per template digest at a time (claimed in one write
transaction, which takes the store's write lock, so it holds across processes on one store). A
``building`` row past its deadline was left by a crashed build: a claim takes it over, and
:meth:`ImageTables.reap_stale_images` (gc) removes it.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, delete, insert, select, update

from sandboxer.state.schema import images

IMAGE_STATES = ("building", "ready")


class ImageTables:
    """Image build records (mixed into StateStore)."""

    _tx: Any  # StateStore's transaction context manager

    def claim_image_build(self, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Reuse, wait or build: in one write transaction, for ``row``'s template and variables digests.

        Args:
            row: the ``building`` row to insert (``id``, ``profile``, ``extension``, ``builder``,
                ``template``, ``template_sha256``, ``variables_sha256``, ``owner``, ``deadline_at``).

        Returns:
            ``("ready", row)`` for an artifact already built from these digests; ``("busy", row)``
            when another build of this template is under way (wait, then claim again); else
            ``("claimed", row)`` with the new ``building`` row: the caller builds, then calls
            :meth:`finish_image_build` or :meth:`drop_image_build`.
        """
        now = time.time()
        t, v = row["template_sha256"], row["variables_sha256"]
        with self._tx() as conn:
            ready = conn.execute(select(images).where(and_(
                images.c.template_sha256 == t, images.c.variables_sha256 == v,
                images.c.state == "ready"))).mappings().first()
            if ready is not None:
                return "ready", dict(ready)
            # a build of this template that outlived its deadline crashed: take its place
            conn.execute(delete(images).where(and_(images.c.template_sha256 == t, images.c.state == "building",
                                                   images.c.deadline_at < now)))
            busy = conn.execute(select(images).where(and_(
                images.c.template_sha256 == t, images.c.state == "building"))).mappings().first()
            if busy is not None:
                return "busy", dict(busy)
            new = {"artifact_id": None, "detail": {}, **row, "state": "building", "created_at": now,
                   "updated_at": now}
            conn.execute(insert(images), new)
            return "claimed", new

    def finish_image_build(self, image_id: str, artifact_id: str, *, builder: str,
                           detail: dict[str, Any]) -> dict[str, Any] | None:
        """Mark a claimed build ``ready`` with its artifact; None if the claim was lost (reaped as stale)."""
        now = time.time()
        with self._tx() as conn:
            n = conn.execute(update(images).where(and_(images.c.id == image_id, images.c.state == "building")),
                             {"state": "ready", "artifact_id": artifact_id, "builder": builder, "detail": detail,
                              "updated_at": now, "deadline_at": None}).rowcount
            if n == 0:
                return None
            row = conn.execute(select(images).where(images.c.id == image_id)).mappings().first()
            return dict(row) if row else None

    def drop_image_build(self, image_id: str) -> bool:
        """Forget a claimed build that did not finish; True if its row was still there."""
        with self._tx() as conn:
            return conn.execute(delete(images).where(and_(images.c.id == image_id,
                                                          images.c.state == "building"))).rowcount > 0

    def image_build(self, image_id: str) -> dict[str, Any] | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(images).where(images.c.id == image_id)).mappings().first()
            return dict(row) if row else None

    def list_images(self, *, states: tuple[str, ...] = IMAGE_STATES) -> list[dict[str, Any]]:
        """Image records, oldest first."""
        with self._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(
                select(images).where(images.c.state.in_(states)).order_by(images.c.created_at, images.c.id))
                .mappings()]

    def reap_stale_images(self, now: float | None = None) -> list[dict[str, Any]]:
        """Delete ``building`` rows past their deadline (left by crashed builds); returns them."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            stale = [dict(r) for r in conn.execute(select(images).where(and_(
                images.c.state == "building", images.c.deadline_at < now))).mappings()]
            if stale:
                conn.execute(delete(images).where(images.c.id.in_([r["id"] for r in stale])))
            return stale
