"""Several processes on one state store (SQLite, PostgreSQL) claiming from one pool at once: no
sandbox is ever handed to two consumers, and nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.pools.conftest import owned, pooled_ready, write_pooled

_CHECKOUT = str(Path(__file__).resolve().parents[2])

# Each process: a manager without a refill thread; at the common start time, `n` threads create at once.
_WORKER = textwrap.dedent("""
    import json, sys, threading, time
    from sandboxer import Manager
    cfg, home, url, start, n, who = sys.argv[1:7]
    mgr = Manager(config_dirs=[cfg], home=home, state_url=url or None, refill=False)
    got, errors = [], []
    def one(i):
        try:
            got.append(mgr.create(profile="warm", consumer=f"{who}-{i}").id)
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(int(n))]
    time.sleep(max(0.0, float(start) - time.time()))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    mgr.close()
    print(json.dumps({"got": got, "errors": errors}))
""")


@pytest.fixture(scope="module")
def pg_url():  # type: ignore[no-untyped-def]
    from tests.support.postgres import pg_url_or_skip

    yield from pg_url_or_skip()


def _race(cfg, home: Path, url: str | None, processes: int = 2, each: int = 4) -> list[list[str]]:  # type: ignore[no-untyped-def]
    start = time.time() + 1.5  # every process has its manager open by then
    env = {**os.environ, "PYTHONPATH": _CHECKOUT}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(cfg.root), str(home), url or "", str(start),
                               str(each), f"p{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(processes)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        res = json.loads(stdout.strip().splitlines()[-1])
        assert not res["errors"], res["errors"]
        out.append(res["got"])
    return out


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_processes_claiming_at_once_never_share_a_sandbox(store, cfg, home, pool_manager, request):  # type: ignore[no-untyped-def]
    url = request.getfixturevalue("pg_url") if store == "postgresql" else None
    write_pooled(cfg, size=6)
    mgr = pool_manager(refill=False, **({"state_url": url} if url else {}))
    pooled = set(mgr.fill_pools().made["warm"])
    assert len(pooled) == 6
    got = _race(cfg, home, url)
    every = [i for ids in got for i in ids]
    assert len(every) == len(set(every)) == 8, got  # no sandbox handed to two consumers
    assert set(every) & pooled == pooled  # each pooled one handed out exactly once; two creates went cold
    assert pooled_ready(mgr) == []
    handouts = [e for e in mgr.events() if e["kind"] == "pool_handout"]
    assert sorted(e["sandbox_id"] for e in handouts) == sorted(pooled)
    for sb in mgr.list():
        assert sb.consumer.startswith(("p0-", "p1-"))
        mgr.teardown(sb.id)
    assert owned(mgr) == set()  # and at the backend: nothing left
