"""Benchmark: ext.docker create -> first command output, next to a raw ``docker run``.

Both are measured in the same run, interleaved, against the same engine and
image:

* **sand-boxer**: ``Manager.create(profile)`` then ``Manager.exec(["echo", "hi"])``
  until its output is back (state store, labels, limits, readiness included);
  the teardown afterwards is not timed.
* **raw**: ``docker run --rm <image> echo hi`` until ``hi`` is read from its
  stdout (the CLI's own container removal after that is not timed).

Usage::

    .venv/bin/python bench/docker_first_output.py [--runs 10] [--image sandboxer-busybox:test]

Prints one line per sample and a summary with both medians and their ratio
(also as JSON with ``--json``). Starts dockerd and builds the image if needed
(as the tests do), so run it as root on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from tests.support.dockerd import ensure_busybox_image, ensure_dockerd  # noqa: E402

PROFILE = """\
slug: bench-docker
extension: ext.docker
isolation: container
resources: {{cpu: 1, memory_mb: 256, pids: 128}}
options:
  image: {image}
  pull: never
"""


def time_sandboxer(mgr: Manager) -> float:
    start = time.perf_counter()
    sb = mgr.create(SandboxCreateRequest(profile="bench-docker", consumer="bench"))
    try:
        out = mgr.exec(sb.id, ["echo", "hi"])
        elapsed = time.perf_counter() - start
        if out.stdout != "hi\n":
            raise RuntimeError(f"unexpected output from sand-boxer: {out!r}")
        return elapsed
    finally:
        mgr.teardown(sb.id)


def time_raw(docker_cli: str, docker_host: str, image: str) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [docker_cli, "-H", docker_host, "run", "--rm", image, "echo", "hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    _, err = proc.communicate(timeout=60)
    if line != b"hi\n" or proc.returncode != 0:
        raise RuntimeError(f"docker run failed ({proc.returncode}): {line!r} {err.decode(errors='replace')}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="samples of each (default 10)")
    ap.add_argument("--image", default="sandboxer-busybox:test")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON too")
    args = ap.parse_args()

    docker_host = ensure_dockerd()
    if args.image == "sandboxer-busybox:test":
        ensure_busybox_image(args.image)
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        print("the docker CLI is needed for the raw baseline (Debian package docker.io)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="sandboxer-bench-") as tmp:
        cfg = Path(tmp) / "cfg"
        (cfg / "profiles").mkdir(parents=True)
        (cfg / "profiles" / "profile.bench-docker.yaml").write_text(PROFILE.format(image=args.image))
        with Manager(config_dirs=[cfg], home=Path(tmp) / "home") as mgr:
            # One untimed round of each: connection set-up, page cache, first-use imports.
            time_sandboxer(mgr)
            time_raw(docker_cli, docker_host, args.image)
            ours, raw = [], []
            for i in range(args.runs):
                ours.append(time_sandboxer(mgr))
                raw.append(time_raw(docker_cli, docker_host, args.image))
                print(f"run {i + 1:>3}: sand-boxer {ours[-1] * 1000:7.1f} ms   docker run {raw[-1] * 1000:7.1f} ms")

    summary = {
        "runs": args.runs,
        "image": args.image,
        "sandboxer_p50_ms": round(statistics.median(ours) * 1000, 1),
        "docker_run_p50_ms": round(statistics.median(raw) * 1000, 1),
    }
    summary["ratio"] = round(summary["sandboxer_p50_ms"] / summary["docker_run_p50_ms"], 2)
    print(
        f"\next.docker create->first output p50 {summary['sandboxer_p50_ms']} ms; "
        f"raw `docker run --rm {args.image} echo hi` p50 {summary['docker_run_p50_ms']} ms; "
        f"ratio {summary['ratio']} (N={args.runs} each)"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
