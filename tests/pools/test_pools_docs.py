"""docs/pools.md's profile loads as pasted, and its Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from sandboxer.loader import load_catalog

DOC = Path(__file__).resolve().parents[2] / "docs" / "pools.md"


def _block(lang: str, title: str | None = None) -> str:
    info = f'{lang} title="{title}"' if title else lang
    m = re.search(rf"^```{re.escape(info)}\n(.*?)^```\n", DOC.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert m, f"{DOC}: no ```{info} block"
    return m.group(1)


def test_the_documented_profile_and_example_work(cfg, home, monkeypatch):  # type: ignore[no-untyped-def]
    (cfg.root / "profiles" / "profile.warm.yaml").write_text(_block("yaml", "profiles/profile.warm.yaml"))
    pool = load_catalog([cfg.root]).profiles["warm"].pool
    assert pool is not None and pool.size == 2 and pool.max_age == 600
    monkeypatch.setenv("SANDBOXER_CONFIG", str(cfg.root))
    monkeypatch.setenv("SANDBOXER_HOME", str(home))
    lines: list[str] = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    exec(compile(_block("python"), str(DOC), "exec"), {})  # noqa: S102 - the documented example, as pasted
    assert lines == ["hi\n"]
    from sandboxer import Manager

    with Manager(refill=False) as mgr:  # what the example's pool left idle: drained, and nothing at the backend
        mgr.pools.drain()
        assert mgr.list(pooled=True, all=False) == []
        assert mgr.extension("ext.local").list_owned(mgr.owner_labels) == []
