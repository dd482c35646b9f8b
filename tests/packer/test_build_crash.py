"""vm-packer's build mode when the process running a build dies outright (SIGKILL): Packer dies with it
(the watchdog), and what it left (its ``building`` row, private directories, lock) is removed by the
next build or gc of that home, Manager.gc included; builds of one template in two processes run once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sandboxer.state import StateStore
from tests.packer.conftest import build_profile, builds
from tests.packer.test_build import left_in, packer_processes, sha

REPO = Path(__file__).resolve().parents[2]
CREATE_SCRIPT = """
import sys
from sandboxer import Manager
mgr = Manager(config_dirs=[sys.argv[1]], home=sys.argv[2])
print("creating", flush=True)
sb = mgr.create(profile=sys.argv[3])
print("made", mgr.exec(sb.id, ["mytool"]).stdout.strip(), flush=True)
mgr.teardown(sb.id)
mgr.close()
"""


def start_create(tmp_path: Path, profile: str) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CREATE_SCRIPT, str(tmp_path / "cfg0"), str(tmp_path / "home"),
                             profile], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(check, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


def images_in(home: Path) -> list[dict]:
    store = StateStore(home=home)
    try:
        return store.list_images(states=("building", "ready"))
    finally:
        store.close()


def crashed_row(template: Path, record_id: str, deadline: float) -> dict:
    return {"id": record_id, "profile": "tool", "extension": "ext.test-vm", "builder": "null",
            "template": str(template), "template_sha256": sha(template), "variables_sha256": record_id * 4,
            "owner": "gone:1", "deadline_at": deadline}


def test_sigkill_of_the_manager_mid_build_ends_packer_and_the_next_create_cleans_up(make_mgr, template, vm_bin,
                                                                                   tmp_path):
    make_mgr({"slow": build_profile(template, vm_bin, pause=60)}).close()
    home = tmp_path / "home"
    proc = start_create(tmp_path, "slow")
    try:
        assert wait_for(lambda: packer_processes(home) or proc.poll() is not None, 30) and proc.poll() is None, (
            "the build never started")
        assert wait_for(lambda: any(b"sleep" in Path(f"/proc/{p}/cmdline").read_bytes()
                                    for p in packer_processes(home) if Path(f"/proc/{p}").exists()), 30), (
            "the shell-local provisioner never ran")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
    t0 = time.monotonic()
    assert wait_for(lambda: not packer_processes(home), 15), (
        f"packer outlived the SIGKILLed manager: {packer_processes(home)}")
    assert time.monotonic() - t0 < 15
    [row] = images_in(home)
    assert row["state"] == "building" and row["artifact_id"] is None  # never reused: not an artifact
    assert left_in(home), "the dead build left nothing to clean up (so this test proves nothing)"

    mgr = make_mgr({"slow": build_profile(template, vm_bin, pause=60), "tool": build_profile(template, vm_bin)})
    sb = mgr.create(profile="tool")  # the same template: not held up by the dead build's row
    assert mgr.exec(sb.id, ["mytool"]).stdout == "tool 1\n"
    assert [i["state"] for i in mgr.state.list_images()] == ["ready"]
    assert left_in(home) == []
    assert not list(Path("/tmp").glob(f"sandboxer-packer-{row['id']}"))
    # the killed process's own create record: gc's to fail once past its deadline (made so here)
    [dead] = [s for s in mgr.list() if s.state.value == "provisioning"]
    mgr.state.transition(dead.id, "test_deadline_passed", deadline_at=time.time() - 3600)
    assert mgr.gc().stale_provisioning == [dead.id]


def test_manager_gc_reaps_dead_builds_as_images_gc_does(make_mgr, template, vm_bin, tmp_path):
    mgr = make_mgr({"tool": build_profile(template, vm_bin)})
    root = tmp_path / "home" / "packer"
    assert mgr.state.claim_image_build(crashed_row(template, "pastdead", time.time() - 1))[0] == "claimed"
    (root / "pastdead").mkdir(parents=True)
    # a build of this home whose process was killed: its lock is free, its deadline far off
    other = crashed_row(template, "killed01", time.time() + 3600)
    other["template_sha256"] = "1" * 64
    assert mgr.state.claim_image_build(other)[0] == "claimed"
    (root / "killed01").mkdir()
    (root / "killed01.lock").touch()
    # a build running in another process: its lock is held
    live = crashed_row(template, "running1", time.time() + 3600)
    live["template_sha256"] = "2" * 64
    assert mgr.state.claim_image_build(live)[0] == "claimed"
    (root / "running1").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'w');"
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(root / "running1.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        report = mgr.gc()
        assert sorted(report.images) == ["killed01", "pastdead"] and not report.errors, report
        assert [r["id"] for r in mgr.state.list_images()] == ["running1"]
        assert left_in(tmp_path / "home") == ["running1", "running1.lock"]
    finally:
        holder.kill()
        holder.wait(10)
    assert mgr.gc().images == ["running1"]
    assert mgr.state.list_images() == [] and left_in(tmp_path / "home") == []


def test_two_processes_creating_from_one_template_build_it_once(make_mgr, template, vm_bin, tmp_path):
    make_mgr({"tool": build_profile(template, vm_bin, pause=3)}).close()
    procs = [start_create(tmp_path, "tool") for _ in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "made tool 1" in out
    assert builds(tmp_path) == 1, "two processes built the same template"
    assert [i["state"] for i in images_in(tmp_path / "home")] == ["ready"]
