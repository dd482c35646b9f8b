"""Benchmark: the read paths with many live records (issue 11's "Scale").

Fills a fresh state store with ``--records`` live sandboxes (default 10,000) created through the
Manager on a zero-latency ext.saas-stub, so every record is exactly what a real create writes,
then measures:

* ``Manager.list()`` and ``Manager.get(id)`` in process (p50, p99);
* the CLI as a user runs it: ``sandboxer list --json`` and ``sandboxer status ID --json`` (wall,
  p50 and p99), next to ``python -c pass`` in the same run.

Targets: ``list --json`` <= 200 ms and ``status`` <= 10 ms p99.

    python bench/scale.py [--records 10000] [--cli-runs 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import pct, write_config  # noqa: E402
from lifecycle import STUB  # noqa: E402 - the same zero-latency stub
from sandboxer import Manager, SandboxCreateRequest  # noqa: E402

PROFILE = "slug: scale-stub\nextension: ext.bench-stub\nttl: {default: 2h, max: 2h}\n"


def fill(mgr: Manager, n: int) -> list[str]:
    def one(i: int) -> str:
        return mgr.create(SandboxCreateRequest(profile="scale-stub", consumer=f"c{i % 50}",
                                               labels={"batch": str(i % 7)})).id
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    ms = lambda x: round(x * 1000, 2)  # noqa: E731
    return {"p50_ms": ms(statistics.median(xs)), "p99_ms": ms(pct(xs, 99)), "min_ms": ms(min(xs)),
            "max_ms": ms(max(xs)), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--cli-runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp), {"ext.bench-stub.yaml": STUB, "profile.scale-stub.yaml": PROFILE})
        home = Path(tmp) / "home"
        mgr = Manager(config_dirs=[cfg], home=home)
        t0 = time.perf_counter()
        ids = fill(mgr, args.records)
        fill_s = time.perf_counter() - t0
        assert len(mgr.list()) == args.records
        rng = random.Random(7)
        res: dict[str, object] = {"records": args.records, "fill_s": round(fill_s, 1)}
        res["api_list"] = summary(timed(mgr.list, 20))
        res["api_get"] = summary(timed(lambda: mgr.get(rng.choice(ids)), 2000))
        env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg)}

        def cli(*argv: str) -> None:
            p = subprocess.run([sys.executable, *argv], env=env, capture_output=True, timeout=120)
            assert p.returncode == 0, p.stderr.decode()[-500:]

        sbx = ["-m", "sandboxer"]
        for _ in range(2):  # warm the page cache and the .pyc files
            cli(*sbx, "list", "--json")
        pass_runs, list_runs, status_runs = [], [], []
        for _ in range(args.cli_runs):  # interleaved, so all three see the same machine
            pass_runs += timed(lambda: cli("-c", "pass"), 1)
            list_runs += timed(lambda: cli(*sbx, "list", "--json"), 1)
            status_runs += timed(lambda: cli(*sbx, "status", rng.choice(ids), "--json"), 1)
        res["python_pass"] = summary(pass_runs)
        res["cli_list_json"] = summary(list_runs)
        res["cli_status_json"] = summary(status_runs)
        t0 = time.perf_counter()
        for sid in ids:  # nothing outlives the run: the stub's table is in tmp too
            mgr.teardown(sid)
        res["teardown_s"] = round(time.perf_counter() - t0, 1)
        mgr.close()
    if args.json:
        print(json.dumps(res, indent=2))
        return
    for key, val in res.items():
        print(f"{key:16} {val}")
    print("targets: cli_list_json p50 <= 200 ms; status <= 10 ms p99 (api_get in process; the CLI pays "
          "python's own start, python_pass, on top)")


if __name__ == "__main__":
    main()
