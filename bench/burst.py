"""Benchmark: a burst of creates against a small primary with a large fallback.

1,000 requests arrive at once (one client thread each). The profile routes to a
primary ``saas-stub`` (capacity 50, 50 ms provision latency) and falls back to a
second ``saas-stub`` (capacity 1,000, same latency). Each request creates a
sandbox, runs one command, holds it for ``--hold`` seconds and tears it down.

Reported:
- makespan against the ideal bound: with unlimited orchestration speed every
  request is admitted at once (50 on the primary, the rest on the fallback), so
  the ideal is one provision latency + the hold time;
- the router's overhead per decision (route() entry to admission: ordering,
  quotes, capacity checks and the admitting intent write), p50 and p99, measured
  on the same 1,000 requests sent one after another (so it excludes queueing),
  and, separately, the time to admission inside the burst (queueing included);
- the peak number of live sandboxes on each backend, from each stub's own table
  (the check for over-admission);
- each request's exec (p50, p99, and the slowest), timed apart.

The stub's exec really runs the command under bubblewrap (about 10 ms of CPU each), so
1,000 of them at once on a small machine take seconds of their own, which the ideal bound
(one provision latency + hold) does not include. ``--no-exec`` leaves the exec out, so the
makespan measures admission, provision, hold and teardown alone; by default the exec stays
in (as before) and its times are reported next to the makespan.

    python bench/burst.py [--requests 1000] [--hold 10] [--no-exec] [--quick]

- the sandbox-policy check's share of a routing decision: the router's plan with and
  without it, interleaved, in the same run (issue 15: at most 0.1 ms at p50).

Targets (issue 5): no over-admission ever; makespan <= 1.2x ideal; decision
overhead <= 1 ms at p99.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import pct, write_config  # noqa: E402
from sandboxer import Manager, RoutingError  # noqa: E402

STUB = """
id: ext.{name}
title: burst {name}
version: 1.0.0
handler: sandboxer.extensions.saas_stub:SaasStubExtension
capabilities: {{isolation_levels: [microvm], pricing_model: metered, features: [exec, list_owned]}}
config: {{latency_s: {latency}, capacity: 100000}}
"""

PROFILE = """
slug: burst
backends:
  - {{extension: ext.primary, capacity: {primary_cap}}}
  - {{extension: ext.fallback, capacity: {fallback_cap}}}
"""



def policy_check_cost(mgr: Manager, slug: str, n: int = 5000) -> dict[str, float]:
    """The router's plan for ``slug`` with and without the sandbox-policy check, interleaved (p50, µs)."""
    prof = mgr.profile(slug)
    kw = dict(hosts=lambda i: mgr._hosts(prof, i),
              missing_extra=lambda i: mgr.catalog.extensions[prof.candidates[i].extension].missing_extra,
              quote=lambda i: mgr._quote(prof, i, 60.0))
    exts = mgr.catalog.extensions
    # as the manager passes them: what each backend keeps, why not on this host, and combinations it refuses
    check = dict(enforces=lambda i: exts[prof.candidates[i].extension].enforces,
                 why_not=lambda i: exts[prof.candidates[i].extension].unavailable,
                 refusals=lambda i: exts[prof.candidates[i].extension].refusals.get((prof.slug, i), []))
    with_check, without = [], []
    for _ in range(n):
        t = time.perf_counter()
        mgr.router.plan(prof, 60.0, **kw)
        without.append(time.perf_counter() - t)
        t = time.perf_counter()
        mgr.router.plan(prof, 60.0, **check, **kw)
        with_check.append(time.perf_counter() - t)
    a, b = statistics.median(with_check) * 1e6, statistics.median(without) * 1e6
    return {"plan_p50_us": round(a, 1), "plan_without_check_p50_us": round(b, 1), "policy_check_added_p50_us": round(a - b, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--hold", type=float, default=10.0, help="seconds each sandbox is held")
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--primary-cap", type=int, default=50)
    ap.add_argument("--fallback-cap", type=int, default=1000)
    ap.add_argument("--switch", type=float, default=None, help="sys.setswitchinterval for the run")
    ap.add_argument("--no-exec", action="store_true", help="no exec in the burst: create, hold, teardown only")
    ap.add_argument("--quick", action="store_true", help="--requests 200 --hold 2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.hold = 200, 2.0
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp), {
            **{f"ext.{n}.yaml": STUB.format(name=n, latency=args.latency) for n in ("primary", "fallback")},
            "profile.burst.yaml": PROFILE.format(primary_cap=args.primary_cap, fallback_cap=args.fallback_cap),
        })
        mgr = Manager(config_dirs=[cfg], home=Path(tmp) / "home")
        if args.switch:
            sys.setswitchinterval(args.switch)

        # Phase 1: the router's own cost per decision, without queueing: the same 1,000
        # requests one after another, each sandbox kept, so the primary fills and the rest
        # fall back exactly as in the burst.
        kept = [mgr.create(profile="burst", consumer="burst") for _ in range(args.requests)]
        decisions = list(mgr.router.decision_times)
        policy = policy_check_cost(mgr, "burst")
        for sb in kept:
            mgr.teardown(sb.id)
        mgr.router.decision_times.clear()
        for n in ("primary", "fallback"):
            mgr.extension(f"ext.{n}").reset_peak()

        # Phase 2: the burst. Every request arrives at once, on its own thread.
        served, refused, errors, exec_times = [], [], [], []
        gate = threading.Barrier(args.requests + 1)

        def one() -> None:
            gate.wait()
            try:
                sb = mgr.create(profile="burst", consumer="burst")
            except RoutingError as exc:
                refused.append(exc)
                return
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                return
            try:
                if not args.no_exec:
                    e0 = time.perf_counter()
                    mgr.exec(sb.id, ["echo", "hi"])
                    exec_times.append(time.perf_counter() - e0)
                time.sleep(args.hold)
            finally:
                mgr.teardown(sb.id)
            served.append(sb.extension)

        threads = [threading.Thread(target=one) for _ in range(args.requests)]
        for t in threads:
            t.start()
        gate.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        makespan = time.perf_counter() - t0
        ideal = args.latency + args.hold
        admissions = list(mgr.router.decision_times)
        peaks = {n: mgr.extension(f"ext.{n}").live()["peak"] for n in ("primary", "fallback")}
        leftovers = {n: len(mgr.extension(f"ext.{n}").live()["live"]) for n in ("primary", "fallback")}
        result = {
            "requests": args.requests, "served": len(served), "refused": len(refused), "errors": len(errors),
            "served_by": {n: served.count(f"ext.{n}") for n in ("primary", "fallback")},
            "hold_s": args.hold, "makespan_s": round(makespan, 3), "ideal_s": round(ideal, 3),
            "ratio": round(makespan / ideal, 3),
            "decision_p50_ms": round(statistics.median(decisions) * 1000, 3),
            "decision_p99_ms": round(pct(decisions, 99) * 1000, 3),
            "burst_admission_p50_ms": round(statistics.median(admissions) * 1000, 1),
            "burst_admission_p99_ms": round(pct(admissions, 99) * 1000, 1),
            "peak_live": peaks, "capacity": {"primary": args.primary_cap, "fallback": args.fallback_cap},
            "over_admitted": peaks["primary"] > args.primary_cap or peaks["fallback"] > args.fallback_cap,
            "leftovers": leftovers, "live_records_after": len(mgr.list()), **policy,
            "exec": not args.no_exec,
            **({"exec_p50_ms": round(statistics.median(exec_times) * 1000, 1),
                "exec_p99_ms": round(pct(exec_times, 99) * 1000, 1),
                "exec_max_ms": round(max(exec_times) * 1000, 1)} if exec_times else {}),
        }
        mgr.close()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['requests']} requests: served {result['served']} ({result['served_by']}), refused "
          f"{result['refused']}, errors {result['errors']}")
    print(f"makespan {result['makespan_s']} s vs ideal {result['ideal_s']} s: ratio {result['ratio']}"
          f" ({'exec included, not in the ideal' if result['exec'] else 'no exec'})")
    if "exec_p50_ms" in result:
        print(f"exec in the burst (bwrap, timed apart): p50 {result['exec_p50_ms']} ms, p99 {result['exec_p99_ms']} ms, "
              f"max {result['exec_max_ms']} ms")
    print(f"router decision overhead (sequential): p50 {result['decision_p50_ms']} ms, p99 {result['decision_p99_ms']} ms")
    print(f"sandbox-policy check in the router's plan: p50 {result['plan_p50_us']} us with it, "
          f"{result['plan_without_check_p50_us']} us without: adds {result['policy_check_added_p50_us']} us "
          f"(target <= 100 us)")
    print(f"time to admission in the burst (queueing included): p50 {result['burst_admission_p50_ms']} ms, "
          f"p99 {result['burst_admission_p99_ms']} ms")
    print(f"peak live: {peaks} (capacity {result['capacity']}), over-admitted: {result['over_admitted']}, "
          f"left over: {leftovers}, live records after: {result['live_records_after']}")


if __name__ == "__main__":
    main()
