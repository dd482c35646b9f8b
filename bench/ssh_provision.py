"""Benchmark: ext.compose-ssh provision -> ready, against a hand-written ``ssh`` script.

Both sides do the same steps on the same host (a real sshd on 127.0.0.1 in
front of this machine's Docker engine): create the workspace, clone the repo,
``docker compose up -d``, then poll until every service is running and
healthy. Reported: median wall time of each, their ratio (target <= 1.1), and
SSH connections / round trips per provision (target: fewer connections than
the script). Run as root (it starts sshd and, if needed, dockerd)::

    .venv/bin/python bench/ssh_provision.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandboxer.extensions.compose_ssh import ComposeSSH  # noqa: E402
from sandboxer.models import ExtensionManifest, Profile  # noqa: E402
from sandboxer.ssh import STATS  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.support.dockerd import ensure_busybox_image, ensure_dockerd  # noqa: E402
from tests.support.sshd import start_sshd  # noqa: E402

COMPOSE = """\
services:
  app:
    image: sandboxer-busybox:test
    command: ["sh", "-c", "echo started > /data/boot; exec sleep 3600"]
    volumes: ["data:/data"]
    healthcheck: {test: ["CMD", "test", "-f", "/data/boot"], interval: 1s, timeout: 2s, retries: 30}
  web:
    image: sandboxer-busybox:test
    command: ["sh", "-c", "mkdir -p /www && echo hi > /www/index.html; exec httpd -f -p 8080 -h /www"]
    ports: ["127.0.0.1::8080"]
volumes:
  data: {}
"""

# The same steps with plain ssh, one connection per command, as an operator would write them.
SCRIPT = r"""
set -eu
S="ssh -q -p $PORT -i $KEY -o BatchMode=yes -o UserKnownHostsFile=$KH -o StrictHostKeyChecking=yes $USER_@127.0.0.1"
S="count $S"
count() { echo . >> "$COUNT"; "$@"; }
$S "mkdir -p $ROOT && mkdir $ROOT/$ID"
$S "git clone -q $REPO $ROOT/$ID/repo"
$S "cd $ROOT/$ID/repo && docker-compose -p $PROJECT up -d" >/dev/null 2>&1
n=0
until $S "docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' \$(docker ps -aq --filter label=com.docker.compose.project=$PROJECT) | grep -qv -e '^running healthy$' -e '^running $' && exit 1 || test \$(docker ps -q --filter label=com.docker.compose.project=$PROJECT | wc -l) -eq 2"; do
  n=$((n+1)); [ $n -lt 240 ] || exit 1; sleep 0.25
done
"""


def make_repo(base: Path) -> Path:
    repo = base / "stack"
    repo.mkdir()
    (repo / "docker-compose.yml").write_text(COMPOSE)
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for argv in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "s"]):
        subprocess.run(argv, cwd=repo, check=True, env=env, timeout=30)
    return repo


def down(project: str) -> None:
    f = f"label=com.docker.compose.project={project}"
    for kind in ("container", "volume", "network"):
        ids = subprocess.run(["docker", kind, "ls", "-aq" if kind == "container" else "-q", "--filter", f],
                             capture_output=True, text=True, timeout=60).stdout.split()
        if ids:
            subprocess.run(["docker", kind, "rm", "-f", *ids] if kind != "network" else ["docker", kind, "rm", *ids],
                           capture_output=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    docker_host = ensure_dockerd()
    ensure_busybox_image()
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-"))
    sshd = start_sshd(tmp / "sshd")
    try:
        kh = tmp / "known_hosts"
        kh.write_text(sshd.known_hosts_line())
        repo = make_repo(tmp)
        root = tmp / "root"
        manifest = ExtensionManifest(id="ext.bench-compose", title="bench", version="0.1.0",
                                     handler="sandboxer.extensions.compose_ssh:ComposeSSH",
                                     capabilities={"isolation_levels": ["container"], "pricing_model": "self-hosted",
                                                   "features": ["exec"]})
        cfg = ComposeSSH.Config.model_validate({
            "workspace_root": str(root), "compose_command": "auto",
            "hosts": [{**sshd.host_config(kh), "name": "h0", "capacity": 100, "docker_host": docker_host}]})
        backend = ComposeSSH(manifest, cfg)
        profile = Profile(slug="bench", extension=manifest.id)
        ours, theirs, conns, trips, script_conns = [], [], [], [], []
        run = uuid.uuid4().hex[:6]
        for i in range(args.runs):
            # sandboxer: a fresh backend-level connection cache per provision, as in a new process
            backend._cache.close_all()
            sid = f"b{i}-{run}"
            STATS.reset()
            t0 = time.perf_counter()
            handle = backend.provision(request(profile, {"repo": str(repo)}, None, sandbox_id=sid))
            backend.wait_ready(handle, timeout=120)
            ours.append(time.perf_counter() - t0)
            snap = STATS.snapshot()
            conns.append(snap["connections"])
            trips.append(snap["round_trips"])
            backend.teardown(handle)

            sid = f"s{i}-{run}"
            env = {**os.environ, "PORT": str(sshd.port), "KEY": str(sshd.user_key), "KH": str(kh),
                   "USER_": sshd.user, "ROOT": shlex.quote(str(root)), "ID": sid, "REPO": shlex.quote(str(repo)),
                   "PROJECT": f"sh-{sid}", "DOCKER_HOST": docker_host, "COUNT": str(tmp / f"count-{sid}")}
            t0 = time.perf_counter()
            out = subprocess.run(["bash", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
            theirs.append(time.perf_counter() - t0)
            if out.returncode != 0:
                print(f"script failed: {out.stderr}", file=sys.stderr)
                return 1
            script_conns.append(len((tmp / f"count-{sid}").read_text().split()))
            down(f"sh-{sid}")
            subprocess.run(["rm", "-rf", str(root / sid)], timeout=60)
        backend._cache.close_all()
    finally:
        sshd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
    result = {
        "runs": args.runs,
        "sandboxer_provision_to_ready_s_p50": round(m_ours, 3),
        "ssh_script_provision_to_ready_s_p50": round(m_theirs, 3),
        "ratio": round(m_ours / m_theirs, 3),
        "sandboxer_ssh_connections_p50": statistics.median(conns),
        "sandboxer_round_trips_p50": statistics.median(trips),
        "script_ssh_connections_p50": statistics.median(script_conns),
        "script_round_trips_p50": statistics.median(script_conns),
        "samples": {"sandboxer": [round(x, 3) for x in ours], "script": [round(x, 3) for x in theirs]},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:40} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
