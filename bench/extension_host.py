"""Benchmark: the same handler in-process and out-of-process (runtime: process), side by side.

Two manifests name one handler (a zero-latency ext.saas-stub); the only difference is
``runtime``. Calls are interleaved, one of each in turn, so both see the same machine. For each
call (probe, exec with streamed output, Manager.exec) it reports p50/p99 of each runtime and
the p50 difference: what the extension host adds per call.

    python bench/extension_host.py [--n 2000] [--json]

Target (issue 9): out-of-process adds <= 0.5 ms per call at p50.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import pct, write_config  # noqa: E402
from sandboxer import Manager  # noqa: E402

TARGET_MS = 0.5

EXT = """
    id: ext.{name}
    title: bench {name}
    version: 0.1.0
    handler: sandboxer.extensions.saas_stub:SaasStubExtension
    runtime: {runtime}
    capabilities:
      isolation_levels: [microvm]
      pricing_model: metered
      features: [exec, list_owned]
    config: {{latency_s: 0, capacity: 1000}}
"""

PROFILE = """
    slug: {name}
    extension: ext.{name}
    ready_timeout: 10s
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="calls of each kind per runtime")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, runtime in (("inproc", "in-process"), ("outproc", "process")):
            files[f"ext.{name}.yaml"] = EXT.format(name=name, runtime=runtime)
            files[f"profile.{name}.yaml"] = PROFILE.format(name=name)
        cfg = write_config(Path(tmp), files)
        with Manager(config_dirs=[cfg], home=Path(tmp) / "home") as mgr:
            try:
                results = run(mgr, args.n)
            finally:
                close = getattr(mgr.extension("ext.outproc"), "close", None)
                if close:
                    close()
    print(f"extension host: the same handler in-process vs out-of-process, {args.n} calls each, interleaved")
    print(f"{'call':<22}{'in p50 ms':>11}{'out p50 ms':>12}{'in p99':>9}{'out p99':>9}{'added p50':>11}")
    ok = True
    for call, r in results.items():
        print(f"{call:<22}{r['in_p50']:>11.3f}{r['out_p50']:>12.3f}{r['in_p99']:>9.3f}{r['out_p99']:>9.3f}"
              f"{r['added_p50']:>11.3f}")
        ok &= r["added_p50"] <= TARGET_MS
    print(f"target: out-of-process adds <= {TARGET_MS} ms per call at p50: {'met' if ok else 'NOT met'}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def run(mgr: Manager, n: int) -> dict[str, dict[str, float]]:
    exts = {k: mgr.extension(f"ext.{k}") for k in ("inproc", "outproc")}
    boxes = {k: mgr.create(profile=k) for k in exts}
    handles = {k: mgr.state.get(boxes[k].id)["handle"] for k in exts}
    sink: list[str] = []
    calls: dict[str, Callable[[str], Any]] = {
        "probe": lambda k: exts[k].probe(handles[k]),
        "exec (streamed)": lambda k: exts[k].exec(handles[k], ["echo", "hi"], on_output=lambda s, t: sink.append(t)),
        "Manager.exec": lambda k: mgr.exec(boxes[k].id, ["echo", "hi"]),
    }
    out: dict[str, dict[str, float]] = {}
    for name, fn in calls.items():
        for k in exts:  # warm up: worker started, caches filled
            for _ in range(50):
                fn(k)
        times: dict[str, list[float]] = {k: [] for k in exts}
        for _ in range(n):
            for k in exts:
                t0 = time.perf_counter()
                fn(k)
                times[k].append((time.perf_counter() - t0) * 1000)
        in50, out50 = pct(times["inproc"], 50), pct(times["outproc"], 50)
        out[name] = {"in_p50": in50, "out_p50": out50, "in_p99": pct(times["inproc"], 99),
                     "out_p99": pct(times["outproc"], 99), "added_p50": out50 - in50}
        sink.clear()
    for k in exts:
        mgr.teardown(boxes[k].id)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
