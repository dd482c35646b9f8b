"""Benchmark: create -> exec -> teardown through the Manager vs the raw extension calls.

Runs on ext.local and on a zero-latency ext.saas-stub, interleaving managed and
raw runs so both see the same machine. Reports p50/p99, operations per second,
the manager's added time per lifecycle (p50 difference) and the ratio, and the
time from create to the first command output.

The stub's exec really runs the command under bubblewrap (about 10 ms, varying by
milliseconds), which would drown the manager's sub-millisecond overhead. So each
lifecycle is timed in parts: create (provision + ready) and teardown, with the exec
between them timed apart. The overhead figure ("overhead p50") is measured on
create + teardown without the exec, managed vs raw in the same run; the exec's own
managed and raw p50 and their difference are reported separately, as is the whole
lifecycle with the exec. ``--no-exec`` skips the exec altogether (then there is no
first-output figure).

Warm pools (issue 11, docs/pools.md) side by side with the cold path: create -> first output
of a sandbox handed out from a filled pool, interleaved with cold creates of the same profile
without a pool. The pool is filled between samples, untimed (no refill thread runs while a
sample is timed); the hand-out alone (``create`` from the pool) is reported apart from the exec.
On ext.local always; on ext.docker with ``--docker`` (starts dockerd and builds the busybox
image as the tests do; root). ``--no-pool`` skips them.

    python bench/lifecycle.py [--n-local 40] [--n-stub 300] [--n-pool 40] [--docker] [--n-docker 15]
                              [--no-exec] [--no-pool] [--quick]

Targets (issue 2): the manager adds <= 1 ms at p50 per lifecycle (judged on create +
teardown, the exec apart); on ext.local, create -> first output <= 20 ms at p50.
Targets (issue 11): create -> first output from a warm pool p50 <= 5 ms on ext.local,
<= 50 ms on ext.docker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import pct, write_config  # noqa: E402
from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.testing import request  # noqa: E402

STUB = """
id: ext.bench-stub
title: zero-latency stub
version: 1.0.0
handler: sandboxer.extensions.saas_stub:SaasStubExtension
capabilities: {isolation_levels: [microvm], pricing_model: metered, features: [exec, list_owned]}
config: {latency_s: 0, capacity: 100000}
"""



def managed(mgr: Manager, profile: str, do_exec: bool) -> tuple[float, float, float]:
    """(create + teardown, create -> first output, exec) in seconds."""
    t0 = time.perf_counter()
    sb = mgr.create(SandboxCreateRequest(profile=profile, consumer="bench"))
    t1 = time.perf_counter()
    out = mgr.exec(sb.id, ["echo", "hi"]) if do_exec else None
    t2 = time.perf_counter()
    mgr.teardown(sb.id)
    t3 = time.perf_counter()
    assert out is None or out.stdout == "hi\n", out
    return (t1 - t0) + (t3 - t2), t2 - t0, t2 - t1


def raw(mgr: Manager, profile: str, do_exec: bool) -> tuple[float, float, float]:
    """The same with the extension's own calls."""
    prof = mgr.profile(profile)
    eff = mgr.effective_profile(prof, 0)
    ext = mgr.extension(eff.extension)
    sid = "raw-" + uuid.uuid4().hex[:12]
    req = request(eff, {}, None, sandbox_id=sid, owner_labels={"sandboxer.owner": "bench-raw"}, tags={}, ttl=600.0)
    t0 = time.perf_counter()
    h = ext.provision(req)
    ext.wait_ready(h, timeout=eff.ready_timeout)
    t1 = time.perf_counter()
    out = ext.exec(h, ["echo", "hi"]) if do_exec else None
    t2 = time.perf_counter()
    ext.teardown(h)
    t3 = time.perf_counter()
    assert out is None or out.stdout == "hi\n", out
    return (t1 - t0) + (t3 - t2), t2 - t0, t2 - t1


def run(mgr: Manager, profile: str, n: int, do_exec: bool = True) -> dict:
    for _ in range(3):  # warm-up: imports, probes, sqlite pages
        managed(mgr, profile, do_exec)
        raw(mgr, profile, do_exec)
    m, r, m_first, r_first, m_exec, r_exec = [], [], [], [], [], []
    wall_m = wall_r = 0.0
    for _ in range(n):
        a, af, ae = managed(mgr, profile, do_exec)
        b, bf, be = raw(mgr, profile, do_exec)
        m.append(a), m_first.append(af), m_exec.append(ae), r.append(b), r_first.append(bf), r_exec.append(be)
        wall_m += a
        wall_r += b
    ms = lambda x: round(x * 1000, 3)  # noqa: E731
    med = statistics.median
    out = {
        "profile": profile, "n": n, "exec": do_exec,
        "managed_p50_ms": ms(med(m)), "managed_p99_ms": ms(pct(m, 99)),
        "raw_p50_ms": ms(med(r)), "raw_p99_ms": ms(pct(r, 99)),
        "managed_ops_per_s": round(n / wall_m, 1), "raw_ops_per_s": round(n / wall_r, 1),
        "overhead_p50_ms": ms(med(m) - med(r)),
        "ratio_p50": round(med(m) / med(r), 3),
    }
    if do_exec:
        whole_m = [a + e for a, e in zip(m, m_exec)]
        whole_r = [b + e for b, e in zip(r, r_exec)]
        out.update({
            "exec_managed_p50_ms": ms(med(m_exec)), "exec_raw_p50_ms": ms(med(r_exec)),
            "exec_added_p50_ms": ms(med(m_exec) - med(r_exec)),
            "with_exec_managed_p50_ms": ms(med(whole_m)), "with_exec_raw_p50_ms": ms(med(whole_r)),
            "with_exec_overhead_p50_ms": ms(med(whole_m) - med(whole_r)),
            "create_to_first_output_p50_ms": ms(med(m_first)),
            "raw_to_first_output_p50_ms": ms(med(r_first)),
        })
    return out


def pool_profiles(shipped: str, name: str) -> dict[str, str]:
    """The shipped profile ``shipped`` twice: ``<name>-cold`` as it is, ``<name>-warm`` with a pool."""
    import yaml

    from sandboxer.loader import builtin_dir

    base = yaml.safe_load((builtin_dir("profiles") / f"profile.{shipped}.yaml").read_text())
    return {f"profile.{name}-{kind}.yaml": yaml.safe_dump({**base, "slug": f"{name}-{kind}", **extra})
            for kind, extra in (("cold", {}), ("warm", {"pool": {"size": 2, "max_age": "10m"}}))}


def first_output(mgr: Manager, profile: str) -> tuple[float, float, str]:
    """(create -> first output, create alone, sandbox id); the teardown after is not timed."""
    t0 = time.perf_counter()
    sb = mgr.create(SandboxCreateRequest(profile=profile, consumer="bench"))
    t1 = time.perf_counter()
    first: list[float] = []
    out = mgr.exec(sb.id, ["echo", "hi"], on_output=lambda stream, text: first or first.append(time.perf_counter()))
    t2 = first[0] if first else time.perf_counter()
    assert out.stdout == "hi\n", out
    mgr.teardown(sb.id)
    return t2 - t0, t1 - t0, sb.id


def pool_run(mgr: Manager, name: str, n: int) -> dict:
    """Cold vs warm create -> first output, interleaved; the pool refilled untimed before each warm sample."""
    cold, warm, handout, misses = [], [], [], 0
    for i in range(n + 2):  # two warm-up rounds
        pooled = set(mgr.pools.fill(f"{name}-warm").made.get(f"{name}-warm", []))
        pooled |= {s.id for s in mgr.list(pooled=True) if s.consumer == "sandboxer.pool"}
        c, _, _ = first_output(mgr, f"{name}-cold")
        w, h, sid = first_output(mgr, f"{name}-warm")
        if sid not in pooled:
            misses += 1
        if i >= 2:
            cold.append(c), warm.append(w), handout.append(h)
    mgr.pools.drain()
    ms = lambda x: round(x * 1000, 3)  # noqa: E731
    med = statistics.median
    return {"backend": name, "n": n, "cold_first_output_p50_ms": ms(med(cold)),
            "cold_first_output_min_max_ms": [ms(min(cold)), ms(max(cold))],
            "warm_first_output_p50_ms": ms(med(warm)), "warm_first_output_min_max_ms": [ms(min(warm)), ms(max(warm))],
            "warm_first_output_p99_ms": ms(pct(warm, 99)), "warm_handout_p50_ms": ms(med(handout)),
            "pool_misses": misses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-local", type=int, default=40)
    ap.add_argument("--n-stub", type=int, default=300)
    ap.add_argument("--no-exec", action="store_true", help="create and teardown only: no exec at all")
    ap.add_argument("--quick", action="store_true", help="--n-local 15 --n-stub 100 --n-pool 15")
    ap.add_argument("--n-pool", type=int, default=40, help="warm vs cold samples on ext.local")
    ap.add_argument("--no-pool", action="store_true", help="skip the warm-pool comparison")
    ap.add_argument("--docker", action="store_true", help="warm vs cold on ext.docker too (starts dockerd; root)")
    ap.add_argument("--n-docker", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n_local, args.n_stub, args.n_pool = 15, 100, 15
    files = {"ext.bench-stub.yaml": STUB, "profile.bench-stub.yaml": "slug: bench-stub\nextension: ext.bench-stub\n",
             **pool_profiles("local", "local")}
    if args.docker:
        from tests.support.dockerd import ensure_busybox_image, ensure_dockerd

        ensure_dockerd()
        ensure_busybox_image("sandboxer-busybox:test")
        files.update(pool_profiles("docker", "docker"))
    pools: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp), files)
        # no refill thread: the bench fills the pools itself, between samples, untimed
        mgr = Manager(config_dirs=[cfg], home=Path(tmp) / "home", refill=False)
        results = [run(mgr, "bench-stub", args.n_stub, not args.no_exec),
                   run(mgr, "local", args.n_local, not args.no_exec)]
        if not args.no_pool and not args.no_exec:
            pools.append(pool_run(mgr, "local", args.n_pool))
            if args.docker:
                pools.append(pool_run(mgr, "docker", args.n_docker))
        mgr.close()
    if args.json:
        print(json.dumps(results + pools, indent=2))
        return
    for r in results:
        print(f"{r['profile']:<11} n={r['n']:<4} create+teardown{' (exec timed apart)' if r['exec'] else ''}: "
              f"managed p50 {r['managed_p50_ms']:.2f} ms p99 {r['managed_p99_ms']:.2f} ms "
              f"({r['managed_ops_per_s']} ops/s) | raw p50 {r['raw_p50_ms']:.2f} ms p99 {r['raw_p99_ms']:.2f} ms "
              f"({r['raw_ops_per_s']} ops/s) | overhead p50 {r['overhead_p50_ms']:.3f} ms, ratio {r['ratio_p50']}")
        if r["exec"]:
            print(f"{'':<11} exec alone p50: managed {r['exec_managed_p50_ms']:.2f} ms, raw {r['exec_raw_p50_ms']:.2f} ms"
                  f" (added {r['exec_added_p50_ms']:.3f} ms) | whole lifecycle with exec p50: managed "
                  f"{r['with_exec_managed_p50_ms']:.2f} ms, raw {r['with_exec_raw_p50_ms']:.2f} ms "
                  f"(overhead {r['with_exec_overhead_p50_ms']:.3f} ms)")
            print(f"{'':<11} create -> first output p50: managed {r['create_to_first_output_p50_ms']:.2f} ms, "
                  f"raw {r['raw_to_first_output_p50_ms']:.2f} ms")
    for p in pools:
        print(f"{p['backend']:<11} n={p['n']:<4} create -> first output p50: warm pool {p['warm_first_output_p50_ms']:.2f} ms "
              f"(min {p['warm_first_output_min_max_ms'][0]:.2f}, max {p['warm_first_output_min_max_ms'][1]:.2f}, "
              f"hand-out alone {p['warm_handout_p50_ms']:.2f} ms) | cold {p['cold_first_output_p50_ms']:.2f} ms "
              f"(min {p['cold_first_output_min_max_ms'][0]:.2f}, max {p['cold_first_output_min_max_ms'][1]:.2f})"
              + (f" | {p['pool_misses']} creates missed the pool" if p["pool_misses"] else ""))
    print("overhead target (<= 1 ms p50) is judged on create+teardown; the exec figures are reported apart")


if __name__ == "__main__":
    main()
