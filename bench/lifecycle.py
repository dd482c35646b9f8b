"""Benchmark: create -> exec -> teardown through the Manager vs the raw extension calls.

Runs on ext.local and on a zero-latency ext.saas-stub, interleaving managed and
raw runs so both see the same machine. Reports p50/p99, operations per second,
the manager's added time per lifecycle (p50 difference) and the ratio, and on
ext.local the time from create to the first command output.

    python bench/lifecycle.py [--n-local 40] [--n-stub 300]

Targets (issue 2): the manager adds <= 1 ms at p50 per lifecycle; on ext.local,
create -> first output <= 20 ms at p50.
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



def managed(mgr: Manager, profile: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    sb = mgr.create(SandboxCreateRequest(profile=profile, consumer="bench"))
    out = mgr.exec(sb.id, ["echo", "hi"])
    t1 = time.perf_counter()
    mgr.teardown(sb.id)
    t2 = time.perf_counter()
    assert out.stdout == "hi\n", out
    return t2 - t0, t1 - t0


def raw(mgr: Manager, profile: str) -> tuple[float, float]:
    prof = mgr.profile(profile)
    eff = mgr.effective_profile(prof, 0)
    ext = mgr.extension(eff.extension)
    sid = "raw-" + uuid.uuid4().hex[:12]
    req = request(eff, {}, None, sandbox_id=sid, owner_labels={"sandboxer.owner": "bench-raw"}, tags={}, ttl=600.0)
    t0 = time.perf_counter()
    h = ext.provision(req)
    ext.wait_ready(h, timeout=eff.ready_timeout)
    out = ext.exec(h, ["echo", "hi"])
    t1 = time.perf_counter()
    ext.teardown(h)
    t2 = time.perf_counter()
    assert out.stdout == "hi\n", out
    return t2 - t0, t1 - t0


def run(mgr: Manager, profile: str, n: int) -> dict:
    for _ in range(3):  # warm-up: imports, probes, sqlite pages
        managed(mgr, profile)
        raw(mgr, profile)
    m, r, m_first, r_first = [], [], [], []
    wall_m = wall_r = 0.0
    for _ in range(n):
        a, af = managed(mgr, profile)
        b, bf = raw(mgr, profile)
        m.append(a), m_first.append(af), r.append(b), r_first.append(bf)
        wall_m += a
        wall_r += b
    ms = lambda x: round(x * 1000, 3)  # noqa: E731
    return {
        "profile": profile, "n": n,
        "managed_p50_ms": ms(statistics.median(m)), "managed_p99_ms": ms(pct(m, 99)),
        "raw_p50_ms": ms(statistics.median(r)), "raw_p99_ms": ms(pct(r, 99)),
        "managed_ops_per_s": round(n / wall_m, 1), "raw_ops_per_s": round(n / wall_r, 1),
        "overhead_p50_ms": ms(statistics.median(m) - statistics.median(r)),
        "ratio_p50": round(statistics.median(m) / statistics.median(r), 3),
        "create_to_first_output_p50_ms": ms(statistics.median(m_first)),
        "raw_to_first_output_p50_ms": ms(statistics.median(r_first)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-local", type=int, default=40)
    ap.add_argument("--n-stub", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp), {"ext.bench-stub.yaml": STUB,
                                       "profile.bench-stub.yaml": "slug: bench-stub\nextension: ext.bench-stub\n"})
        mgr = Manager(config_dirs=[cfg], home=Path(tmp) / "home")
        results = [run(mgr, "bench-stub", args.n_stub), run(mgr, "local", args.n_local)]
        mgr.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['profile']:<11} n={r['n']:<4} managed p50 {r['managed_p50_ms']:.2f} ms p99 {r['managed_p99_ms']:.2f} ms "
              f"({r['managed_ops_per_s']} ops/s) | raw p50 {r['raw_p50_ms']:.2f} ms p99 {r['raw_p99_ms']:.2f} ms "
              f"({r['raw_ops_per_s']} ops/s) | overhead p50 {r['overhead_p50_ms']:.3f} ms, ratio {r['ratio_p50']}")
        print(f"{'':<11} create -> first output p50: managed {r['create_to_first_output_p50_ms']:.2f} ms, "
              f"raw {r['raw_to_first_output_p50_ms']:.2f} ms")


if __name__ == "__main__":
    main()
