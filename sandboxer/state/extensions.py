"""The state store's part for installed extension bundles: their lifecycle, rollback floors and the audit trail.

A mixin of :class:`~sandboxer.state.StateStore` (all SQL stays in this package). Each installed
extension has one row, in one of the lifecycle states; a change of state and its audit event are
written in one transaction, and a change the lifecycle does not allow is refused naming the
current state.
"""

from __future__ import annotations

import time
from typing import Any

from packaging.version import InvalidVersion, Version
from sqlalchemy import bindparam, delete, insert, select, update

from sandboxer.errors import LifecycleError
from sandboxer.state.schema import audit, extension_data, extension_versions, installed_extensions

#: The lifecycle: state -> the states it may go to (None: not installed at all).
TRANSITIONS: dict[str | None, tuple[str, ...]] = {
    None: ("verified",),
    "verified": ("installed",),
    "installed": ("active",),
    "active": ("disabled",),
    "disabled": ("active",),
}
EXTENSION_STATES = ("verified", "installed", "active", "disabled")

_INSERT_AUDIT = insert(audit)
_SELECT_ONE = select(installed_extensions).where(installed_extensions.c.id == bindparam("_id"))


class ExtensionTables:
    """Installed extensions, highest versions and the audit trail (mixed into StateStore)."""

    _tx: Any  # StateStore's transaction context manager

    @staticmethod
    def _audit(conn: Any, who: str, what: str, *, extension: str | None = None, version: str | None = None,
               from_state: str | None = None, to_state: str | None = None, reason: str | None = None,
               detail: dict[str, Any] | None = None) -> None:
        conn.execute(_INSERT_AUDIT, {"ts": time.time(), "who": who, "what": what, "extension": extension,
                                     "version": version, "from_state": from_state, "to_state": to_state,
                                     "reason": reason, "detail": detail or {}})

    def record_audit(self, who: str, what: str, **kw: Any) -> None:
        """Append one audit event (a verification failure, a refusal, an install or a remove)."""
        with self._tx() as conn:
            self._audit(conn, who, what, **kw)

    def audit_events(self, extension: str | None = None) -> list[dict[str, Any]]:
        """The audit trail, oldest first (one extension's, if named)."""
        q = select(audit).order_by(audit.c.seq)
        if extension is not None:
            q = q.where(audit.c.extension == extension)
        with self._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    #: Most rows one extension keeps, and the longest key (``state:own-tables``).
    DATA_ROWS = 10_000
    DATA_KEY = 255

    def extension_data(self, ext_id: str, action: str, key: Any = None, value: Any = None) -> Any:
        """An installed extension's own rows (``state:own-tables``): ``get``, ``put``, ``delete`` a key, or ``keys``.

        Raises:
            ValueError: an unknown action, a key that is not a string of 1-255 characters, or a
                ``put`` past :attr:`DATA_ROWS` rows.
        """
        t = extension_data
        if action == "keys":
            with self._tx(write=False) as conn:
                return [r[0] for r in conn.execute(select(t.c.key).where(t.c.extension == ext_id).order_by(t.c.key))]
        if not isinstance(key, str) or not 0 < len(key) <= self.DATA_KEY:
            raise ValueError(f"{ext_id}: a state key is a string of 1-{self.DATA_KEY} characters, not {key!r:.80}")
        mine = (t.c.extension == ext_id) & (t.c.key == key)
        if action == "get":
            with self._tx(write=False) as conn:
                rows = list(conn.execute(select(t.c.value).where(mine)).mappings())  # mappings: JSON decoded
            return rows[0]["value"] if rows else None
        if action == "delete":
            with self._tx() as conn:
                conn.execute(delete(t).where(mine))
            return None
        if action != "put":
            raise ValueError(f"{ext_id}: no state action {action!r} (get, put, delete, keys)")
        from sqlalchemy import func

        with self._tx() as conn:
            if conn.execute(update(t).where(mine).values(value=value, updated_at=time.time())).rowcount:
                return None
            count = conn.execute(select(func.count()).select_from(t).where(t.c.extension == ext_id)).scalar_one()
            if count >= self.DATA_ROWS:
                raise ValueError(f"{ext_id}: it keeps {count} rows already, the most an extension may")
            conn.execute(insert(t).values(extension=ext_id, key=key, value=value, updated_at=time.time()))
        return None

    def installed_extension(self, ext_id: str) -> dict[str, Any] | None:
        with self._tx(write=False) as conn:
            row = conn.execute(_SELECT_ONE, {"_id": ext_id}).mappings().first()
            return dict(row) if row else None

    def installed_extension_list(self) -> list[dict[str, Any]]:
        with self._tx(write=False) as conn:
            return [dict(r) for r in conn.execute(select(installed_extensions).order_by(installed_extensions.c.id))
                    .mappings()]

    def installed_versions(self) -> dict[tuple[str, str], str]:
        """(publisher, extension id) -> the highest version ever installed (what :func:`verify` takes)."""
        with self._tx(write=False) as conn:
            return {(r["publisher"], r["extension"]): r["highest"]
                    for r in conn.execute(select(extension_versions)).mappings()}

    def extension_transition(self, ext_id: str, to: str, *, who: str, reason: str | None = None,
                             detail: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Move an extension to state ``to`` and audit it, in one transaction.

        Going to ``verified`` starts a row (``fields`` then give publisher and version); going
        to ``installed`` also raises the publisher's highest version if this one is higher.

        Raises:
            LifecycleError: the lifecycle does not allow it from the current state (named).
        """
        if to not in EXTENSION_STATES:
            raise ValueError(to)
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute(_SELECT_ONE, {"_id": ext_id}).mappings().first()
            state = cur["state"] if cur else None
            if to not in TRANSITIONS[state]:
                allowed = ", ".join(TRANSITIONS[state])
                raise LifecycleError(
                    f"{ext_id} is {state or 'not installed'}; it cannot become {to} (from {state or 'not installed'} "
                    f"it can only become {allowed})")
            if cur is None:
                row = {"id": ext_id, "state": to, "installed_at": now, "updated_at": now, **fields}
                conn.execute(insert(installed_extensions), row)
            else:
                row = {**dict(cur), **fields, "state": to, "updated_at": now}
                conn.execute(update(installed_extensions).where(installed_extensions.c.id == ext_id),
                             {"state": to, "updated_at": now, **fields})
            if to == "installed":
                self._raise_highest(conn, row["publisher"], ext_id, row["version"])
            self._audit(conn, who, "transition", extension=ext_id, version=row.get("version"), from_state=state,
                        to_state=to, reason=reason, detail=detail)
            return row

    @staticmethod
    def _raise_highest(conn: Any, publisher: str, ext_id: str, version: str) -> None:
        key = (extension_versions.c.publisher == publisher) & (extension_versions.c.extension == ext_id)
        have = conn.execute(select(extension_versions.c.highest).where(key)).scalar()
        if have is None:
            conn.execute(insert(extension_versions), {"publisher": publisher, "extension": ext_id, "highest": version})
            return
        try:
            higher = Version(version) > Version(have)
        except InvalidVersion:
            higher = True
        if higher:
            conn.execute(update(extension_versions).where(key), {"highest": version})

    def forget_extension(self, ext_id: str, *, who: str, what: str, reason: str | None = None,
                         detail: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Delete an extension's row (removed, upgraded away or an install undone) and audit it; the
        highest version ever installed is kept, so a later rollback is still refused."""
        with self._tx() as conn:
            cur = conn.execute(_SELECT_ONE, {"_id": ext_id}).mappings().first()
            if cur is None:
                return None
            conn.execute(delete(installed_extensions).where(installed_extensions.c.id == ext_id))
            self._audit(conn, who, what, extension=ext_id, version=cur["version"], from_state=cur["state"],
                        reason=reason, detail=detail)
            return dict(cur)
