"""Benchmark: the same handler in-process and out-of-process (runtime: process), side by side.

Two manifests name one handler (a zero-latency ext.saas-stub); the only difference is
``runtime``. Calls are interleaved, one of each in turn, so both see the same machine. For each
call it reports p50/p99 of each runtime and the p50 difference: what the extension host adds
per call. The whole measurement is repeated ``--runs`` times; the table gives the median of the
runs' figures and the range (min..max) of the added p50.

Calls measured:
- ``probe`` and ``meter_actual``: the handler does one lookup in its table, microseconds of its
  own work, so the difference is the extension host's cost. The verdict uses these rows.
- ``ping`` (out-of-process only): the protocol's round trip that runs no handler code at all;
  its p50 is the bare host cost, reported for reference (in-process there is nothing to call).
- ``exec (streamed)`` and ``Manager.exec``: the stub really runs ``echo`` under bubblewrap
  (about 10 ms, varying by milliseconds from call to call), so a sub-millisecond difference is
  lost in bwrap's noise; they are reported, not judged. The protocol has no streamed call that
  spawns no process, so the streamed path is measured only here.

    python bench/extension_host.py [--n 2000] [--n-exec 200] [--runs 3] [--quick] [--json]

Target (issue 9): out-of-process adds <= 0.5 ms per call at p50 (judged on probe and meter_actual).
"""

from __future__ import annotations

import argparse
import json
import statistics
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
#: The rows the verdict uses: calls whose handler work is tiny, so the difference is the host's.
JUDGED = ("probe", "meter_actual")

EXT = """
    id: ext.{name}
    title: bench {name}
    version: 0.1.0
    handler: sandboxer.extensions.saas_stub:SaasStubExtension
    runtime: {runtime}
    capabilities:
      isolation_levels: [microvm]
      pricing_model: metered
      features: [exec, metering, list_owned]
    config: {{latency_s: 0, capacity: 1000}}
"""

PROFILE = """
    slug: {name}
    extension: ext.{name}
    ready_timeout: 10s
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="calls of each cheap kind per runtime and run")
    ap.add_argument("--n-exec", type=int, default=200, help="exec calls (bwrap, ~10 ms each) per runtime and run")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of the whole measurement")
    ap.add_argument("--quick", action="store_true", help="--n 500 --n-exec 50 (runs unchanged)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.n_exec = 500, 50
    runs: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, runtime in (("inproc", "in-process"), ("outproc", "process")):
            files[f"ext.{name}.yaml"] = EXT.format(name=name, runtime=runtime)
            files[f"profile.{name}.yaml"] = PROFILE.format(name=name)
        cfg = write_config(Path(tmp), files)
        with Manager(config_dirs=[cfg], home=Path(tmp) / "home") as mgr:
            try:
                for _ in range(args.runs):
                    runs.append(run(mgr, args.n, args.n_exec))
            finally:
                close = getattr(mgr.extension("ext.outproc"), "close", None)
                if close:
                    close()
    results = summarise(runs)
    print(f"extension host: the same handler in-process vs out-of-process, interleaved; {args.runs} runs of "
          f"{args.n} calls each ({args.n_exec} for exec rows); median of the runs, added p50 range min..max")
    print(f"{'call':<18}{'in p50 ms':>10}{'out p50 ms':>11}{'in p99':>9}{'out p99':>9}{'added p50':>11}"
          f"{'range':>17}  verdict")
    for call, r in results.items():
        role = "judged" if call in JUDGED else "reference" if call == "ping" else "reported (bwrap-dominated)"
        inp = f"{r['in_p50']:>10.3f}" if r["in_p50"] is not None else f"{'-':>10}"
        in99 = f"{r['in_p99']:>9.3f}" if r["in_p99"] is not None else f"{'-':>9}"
        print(f"{call:<18}{inp}{r['out_p50']:>11.3f}{in99}{r['out_p99']:>9.3f}{r['added_p50']:>11.3f}"
              f"{r['added_min']:>8.3f}..{r['added_max']:<7.3f}  {role}")
    judged = {c: results[c]["added_p50"] for c in JUDGED}
    ok = all(v <= TARGET_MS for v in judged.values())
    print(f"verdict uses {', '.join(JUDGED)} (handler work of microseconds, so the difference is the host's); "
          "exec rows run echo under bubblewrap, whose ~10 ms varies by more than the target")
    print(f"target: out-of-process adds <= {TARGET_MS} ms per call at p50: {'met' if ok else 'NOT met'} "
          f"({', '.join(f'{c} {v:.3f} ms' for c, v in judged.items())})")
    if args.json:
        print(json.dumps({"runs": runs, "summary": results}, indent=2))
    return 0


def summarise(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """The median over runs of each figure, and the range of the added p50."""
    out: dict[str, dict[str, Any]] = {}
    for call in runs[0]:
        rows = [r[call] for r in runs]
        med = {k: (statistics.median(x[k] for x in rows) if rows[0][k] is not None else None) for k in rows[0]}
        added = [x["added_p50"] for x in rows]
        out[call] = {**med, "added_min": min(added), "added_max": max(added)}
    return out


def run(mgr: Manager, n: int, n_exec: int) -> dict[str, dict[str, float]]:
    exts = {k: mgr.extension(f"ext.{k}") for k in ("inproc", "outproc")}
    boxes = {k: mgr.create(profile=k) for k in exts}
    handles = {k: exts[k].Handle.model_validate(mgr.state.get(boxes[k].id)["handle"]) for k in exts}
    sink: list[str] = []
    calls: dict[str, tuple[int, Callable[[str], Any]]] = {
        "probe": (n, lambda k: exts[k].probe(handles[k])),
        "meter_actual": (n, lambda k: exts[k].meter_actual(handles[k])),
        "ping": (n, lambda k: exts[k].ping() if k == "outproc" else None),
        "exec (streamed)": (n_exec, lambda k: exts[k].exec(handles[k], ["echo", "hi"],
                                                           on_output=lambda s, t: sink.append(t))),
        "Manager.exec": (n_exec, lambda k: mgr.exec(boxes[k].id, ["echo", "hi"])),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (count, fn) in calls.items():
        for k in exts:  # warm up: worker started, caches filled
            for _ in range(min(50, count)):
                fn(k)
        times: dict[str, list[float]] = {k: [] for k in exts}
        for _ in range(count):
            for k in exts:
                t0 = time.perf_counter()
                fn(k)
                times[k].append((time.perf_counter() - t0) * 1000)
        in50, out50 = pct(times["inproc"], 50), pct(times["outproc"], 50)
        if name == "ping":  # nothing in-process: the whole round trip is what the host adds
            out[name] = {"in_p50": None, "out_p50": out50, "in_p99": None, "out_p99": pct(times["outproc"], 99),
                         "added_p50": out50}
        else:
            out[name] = {"in_p50": in50, "out_p50": out50, "in_p99": pct(times["inproc"], 99),
                         "out_p99": pct(times["outproc"], 99), "added_p50": out50 - in50}
        sink.clear()
    for k in exts:
        mgr.teardown(boxes[k].id)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
