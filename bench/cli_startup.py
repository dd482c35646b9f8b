"""Benchmark: the CLI's start-up as an agent calling it in a loop pays it (issue 11's "Speed").

Times, wall clock, interleaved so all see the same machine:

* ``python -c pass`` (the interpreter's own start, the floor);
* ``sandboxer list`` on a home with one live ext.local sandbox;
* ``sandboxer exec ID -- true`` on that sandbox.

Target: ``list`` and ``exec`` <= 150 ms p50 on ext.local.

    python bench/cli_startup.py [--runs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import pct  # noqa: E402


def run(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, timeout=120)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv} exited {p.returncode}: {p.stderr.decode()[-400:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    sbx = [py, "-m", "sandboxer"]
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "SANDBOXER_HOME": home, "SANDBOXER_CONFIG": ""}
        created = subprocess.run([*sbx, "create", "local", "--consumer", "bench", "--ttl", "30m", "--quiet"],
                                 env=env, capture_output=True, text=True, timeout=120, check=True)
        sid = created.stdout.split()[0]
        try:
            for _ in range(3):  # .pyc files and the page cache
                run([*sbx, "list"], env)
                run([*sbx, "exec", sid, "--", "true"], env)
            times: dict[str, list[float]] = {"python -c pass": [], "sandboxer list": [], "sandboxer exec": []}
            for _ in range(args.runs):
                times["python -c pass"].append(run([py, "-c", "pass"], env))
                times["sandboxer list"].append(run([*sbx, "list"], env))
                times["sandboxer exec"].append(run([*sbx, "exec", sid, "--", "true"], env))
        finally:
            subprocess.run([*sbx, "teardown", sid], env=env, capture_output=True, timeout=120)
    ms = lambda x: round(x * 1000, 1)  # noqa: E731
    out = {k: {"p50_ms": ms(statistics.median(v)), "p90_ms": ms(pct(v, 90)), "min_ms": ms(min(v)),
               "max_ms": ms(max(v))} for k, v in times.items()}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in out.items():
        print(f"{k:16} p50 {v['p50_ms']:7.1f} ms  p90 {v['p90_ms']:7.1f}  range {v['min_ms']}-{v['max_ms']}")
    print("target: sandboxer list and exec <= 150 ms p50 on ext.local")


if __name__ == "__main__":
    main()
