"""docs/state.md states the store's durability settings: they must be the ones the store runs with."""

from __future__ import annotations

import re
from pathlib import Path

from sandboxer.state import StateStore

DOC = (Path(__file__).resolve().parents[2] / "docs" / "state.md").read_text()


def _row(setting: str) -> str:
    m = re.search(rf"^\| `?{setting}`? \| (.+?) \|", DOC, re.M)
    assert m, f"docs/state.md has no row for {setting}"
    return m.group(1).replace("`", "").strip()


def test_the_documented_pragmas_are_the_stores(home):
    store = StateStore(home=home)
    try:
        with store._tx(write=False) as conn:  # the raw sqlite3 connection the hot path uses
            db = conn.db
            assert db.execute("PRAGMA journal_mode").fetchone()[0].upper() == _row("journal_mode")
            assert db.execute("PRAGMA synchronous").fetchone()[0] == {"OFF": 0, "NORMAL": 1, "FULL": 2}[
                _row("synchronous").split()[0]]
            assert str(db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == _row("wal_autocheckpoint").split()[0]
            assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 60_000 and _row("busy_timeout") == "60 s"
        assert f"every {StateStore.CHECKPOINT_EVERY_S:g} s" in _row("background checkpoint")
    finally:
        store.close()
