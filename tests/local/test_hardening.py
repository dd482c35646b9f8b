"""ext.local gives a sandbox nothing from the manager (issue 8): no environment, no host sockets,
limits for the sandbox as a whole (or an exact account of what is not enforced), exec deadlines
that end a whole process tree, and a probe that tells a live sandbox from a gone one."""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest

import sandboxer.extensions.local as local
from sandboxer.extensions import local_cgroup

TOOLS = ["bwrap", "unshare"]
MINIMAL_ENV = {"PATH", "HOME", "LANG", "TERM", "TMPDIR", "PWD"}  # PWD: bwrap --chdir sets it


def run(mgr, sb, script, **kw):
    return mgr.exec(sb.id, ["sh", "-c", script], **kw)


def _tool(mgr, monkeypatch, tool):
    if shutil.which(tool) is None:
        if os.geteuid() == 0:
            pytest.fail(f"{tool} is missing; `make test` installs it as root")
        pytest.skip(f"{tool} not installed")
    monkeypatch.setattr(mgr.extension("ext.local"), "_tool", tool)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _pids_running(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(pid))
    return found


def _wait_gone(marker: str, timeout: float = 5) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _pids_running(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _profile(cfg, slug, **resources):
    res = {"cpu": 1, "memory_mb": 1024, "disk_mb": 1024, "pids": 256, **resources}
    body = "".join(f"  {k}: {v}\n" for k, v in res.items())
    cfg.write(f"profile.{slug}.yaml", f"slug: {slug}\nextension: ext.local\nisolation: process\n"
                                      f"ready_timeout: 10s\nresources:\n{body}")


# ------------------------------------------------------------------ 1. environment


@pytest.mark.parametrize("tool", TOOLS)
def test_no_manager_environment_reaches_the_sandbox(make_manager, monkeypatch, tool):
    sentinel = f"sentinel-{uuid.uuid4().hex}"
    monkeypatch.setenv("E2B_API_KEY", sentinel)
    monkeypatch.setenv("SANDBOXER_TEST_SENTINEL", sentinel)
    mgr = make_manager()
    _tool(mgr, monkeypatch, tool)
    sb = mgr.create(profile="local")
    try:
        r = run(mgr, sb, "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done; echo; echo count=$(ls -d /proc/[0-9]* | wc -l)",
                env={"ASKED": "yes"})
        assert sentinel not in r.stdout and "E2B_API_KEY" not in r.stdout
        assert "ASKED=yes" in r.stdout and int(r.stdout.split("count=")[1]) >= 2  # it really read them
        handle = mgr.state.get(sb.id)["handle"]
        for pid in {handle["pid"], handle["outer_pid"]}:  # the init, and bwrap/unshare on the host side
            env = _environ(pid)
            assert set(env) <= MINIMAL_ENV, (pid, env)
            assert env["HOME"] == handle["workspace"]
    finally:
        mgr.teardown(sb.id)


def test_probe_and_helpers_start_from_a_minimal_environment(make_manager, monkeypatch):
    seen = []
    real_popen = local.subprocess.Popen
    real_run = local.subprocess.run

    def popen(argv, *a, **kw):
        seen.append((argv[0], kw.get("env")))
        return real_popen(argv, *a, **kw)

    def run_(argv, *a, **kw):
        seen.append((argv[0], kw.get("env")))
        return real_run(argv, *a, **kw)

    monkeypatch.setenv("SANDBOXER_TEST_SENTINEL", "leak")
    monkeypatch.setattr(local.subprocess, "Popen", popen)
    monkeypatch.setattr(local.subprocess, "run", run_)
    mgr = make_manager()
    sb = mgr.create(profile="local")
    run(mgr, sb, "true")
    mgr.teardown(sb.id)
    assert seen and all(env is not None and set(env) <= MINIMAL_ENV for _, env in seen), seen


# ---------------------------------------------------------------- 2. host sockets


@pytest.mark.parametrize("tool", TOOLS)
def test_host_unix_sockets_are_not_reachable(make_manager, monkeypatch, tool):
    mgr = make_manager()
    _tool(mgr, monkeypatch, tool)
    listeners, paths = [], []
    for d in ("/tmp", "/run"):
        path = f"{d}/sandboxer-test-{uuid.uuid4().hex[:8]}.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        os.chmod(path, 0o777)
        s.listen(4)
        listeners.append(s)
        paths.append(path)
    shm = Path(f"/dev/shm/sandboxer-test-{uuid.uuid4().hex[:8]}")
    shm.write_text("host")
    sb = mgr.create(profile="local")
    try:
        probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"
        for path in paths:
            r = mgr.exec(sb.id, ["sh", "-c", 'test -e "$1" && echo exists; python3 -c "$2" "$1" 2>&1 | tail -1',
                                 "sh", path, probe])
            assert "exists" not in r.stdout and "connected" not in r.stdout
            assert "FileNotFoundError" in r.stdout, r.stdout
            with socket.socket(socket.AF_UNIX) as c:  # while on the host it is reachable
                c.connect(path)
        r = run(mgr, sb, f"ls -A /tmp /run /dev/shm; test -e {shm} && echo shm-visible; echo $TMPDIR; "
                         "echo t > $TMPDIR/f && cat $TMPDIR/f")
        assert "shm-visible" not in r.stdout and "sandboxer-test" not in r.stdout
        assert r.stdout.split()[-2:] == ["/tmp", "t"]
    finally:
        mgr.teardown(sb.id)
        for s, path in zip(listeners, paths):
            s.close()
            os.unlink(path)
        shm.unlink()


# ------------------------------------------------------------------- 3. limits


def test_limits_are_accounted_exactly(make_manager):
    mgr = make_manager()
    sb = mgr.create(profile="local")
    try:
        limits = sb.reachability["limits"]
        assert set(limits) == {"memory", "pids", "cpu", "disk", "shm"}
        hier = mgr.extension("ext.local")._hierarchies()
        if hier.has("memory"):
            assert limits["memory"] in ("cgroup v2 memory.max=1024M", "cgroup v1 memory.limit_in_bytes=1024M")
        else:
            assert limits["memory"].startswith("not enforced: ")
        if hier.has("cpu"):
            assert limits["cpu"] in ("cgroup v2 cpu.max=100000/100000", "cgroup v1 cpu.cfs_quota_us=100000/100000")
        assert limits["shm"] == "tmpfs size=64M"
        if os.geteuid() == 0:
            assert limits["disk"] == "tmpfs size=1024M on the workspace (and /tmp)"
    finally:
        mgr.teardown(sb.id)


def test_without_cgroups_the_status_says_not_enforced(make_manager, monkeypatch):
    mgr = make_manager()
    monkeypatch.setattr(mgr.extension("ext.local"), "_cgroups",
                        local_cgroup.Hierarchies.unavailable("disabled by the test"))
    sb = mgr.create(profile="local")
    try:
        limits = sb.reachability["limits"]
        assert limits["memory"] == ("not enforced: disabled by the test; only RLIMIT_AS=1024M per process")
        assert limits["cpu"] == "not enforced: disabled by the test; only RLIMIT_CPU=600s per process"
        if os.geteuid() == 0:
            assert limits["pids"] == "RLIMIT_NPROC=256 for the sandbox's own uid"
        assert mgr.get(sb.id).reachability["limits"] == limits
    finally:
        mgr.teardown(sb.id)


def test_processes_together_cannot_exceed_memory_mb(cfg, make_manager):
    _profile(cfg, "small-mem", memory_mb=160)
    mgr = make_manager()
    sb = mgr.create(profile="small-mem")
    try:
        script = ("for i in 1 2 3 4 5 6; do python3 -c \"import time; b=bytearray(60<<20); "
                  "time.sleep(1.5); print('survived', flush=True)\" & done; wait")
        r = run(mgr, sb, script, timeout=60)
        survived = r.stdout.split().count("survived")
        if sb.reachability["limits"]["memory"].startswith("not enforced"):
            pytest.skip("no cgroup memory controller here: " + sb.reachability["limits"]["memory"])
        assert survived <= 2, r.stdout  # 6 x 60 MiB cannot fit in 160 MiB together
    finally:
        mgr.teardown(sb.id)


def test_disk_mb_is_enforced_on_workspace_and_tmp(cfg, make_manager):
    _profile(cfg, "small-disk", disk_mb=8)
    mgr = make_manager()
    sb = mgr.create(profile="small-disk")
    try:
        if sb.reachability["limits"]["disk"].startswith("not enforced"):
            assert os.geteuid() != 0
            return
        r = run(mgr, sb, "head -c 12M /dev/zero > big; echo rc=$?; rm -f big; head -c 12M /dev/zero > /tmp/big; echo rc=$?; rm /tmp/big")
        assert r.stdout.split() == ["rc=1", "rc=1"] and r.stderr.count("No space left on device") == 2
        assert run(mgr, sb, "head -c 4M /dev/zero > ok && wc -c < ok").stdout.strip() == str(4 << 20)
    finally:
        mgr.teardown(sb.id)


@pytest.mark.parametrize("tool", TOOLS)
def test_dev_shm_is_bounded(make_manager, monkeypatch, tool):
    mgr = make_manager()
    _tool(mgr, monkeypatch, tool)
    sb = mgr.create(profile="local")
    try:
        r = run(mgr, sb, "head -c 100M /dev/zero > /dev/shm/x; echo rc=$?; du -m /dev/shm/x | cut -f1")
        assert "No space left on device" in r.stderr and r.stdout.split()[0] == "rc=1"
        assert int(r.stdout.split()[1]) <= 64
    finally:
        mgr.teardown(sb.id)


def test_pids_limit_counts_the_whole_sandbox(cfg, make_manager):
    _profile(cfg, "few-pids", pids=16)
    mgr = make_manager()
    sb = mgr.create(profile="few-pids")
    try:
        forker = ("import os, time\nn = 0\nfor i in range(40):\n    try:\n        pid = os.fork()\n"
                  "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n"
                  "    n += 1\nprint(n)")
        r = mgr.exec(sb.id, ["python3", "-c", forker], timeout=30)
        assert 3 <= int(r.stdout) < 16, r  # every process of the sandbox counts, this one included
    finally:
        mgr.teardown(sb.id)


def test_teardown_removes_cgroups_and_mounts(make_manager):
    mgr = make_manager()
    sb = mgr.create(profile="local")
    run(mgr, sb, "sleep 300 >/dev/null 2>&1 & echo x > f")
    handle = mgr.state.get(sb.id)["handle"]
    cg = handle.get("cgroup") or {}
    dirs = [Path(d) for d in cg.get("dirs", [])]
    if mgr.extension("ext.local")._hierarchies().has("memory"):
        assert dirs and all(d.is_dir() for d in dirs)
    ws = handle["workspace"]
    mgr.teardown(sb.id)
    assert not any(d.exists() for d in dirs)
    assert ws not in Path("/proc/self/mounts").read_text().split()
    assert not Path(ws).exists()


# -------------------------------------------------------------- 4. exec deadlines


@pytest.mark.parametrize("mode", ["cgroup", "cgroup2-kill", "no-cgroup"])
def test_exec_deadline_ends_the_whole_tree(make_manager, monkeypatch, mode):
    mgr = make_manager()
    ext = mgr.extension("ext.local")
    hier = ext._hierarchies()
    cgroups = mode != "no-cgroup"
    if mode == "no-cgroup":
        monkeypatch.setattr(ext, "_cgroups", local_cgroup.Hierarchies.unavailable("disabled by the test"))
    elif mode == "cgroup2-kill":  # exec cgroups in cgroup2, ended by cgroup.kill (v1: pids.max=0 + SIGKILL)
        if hier.v2 is None:
            pytest.skip("no writable cgroup2 here")
        monkeypatch.setattr(ext, "_cgroups", local_cgroup.Hierarchies(v2=hier.v2))
    elif hier.track is None:
        pytest.skip("no writable cgroup here")
    sb = mgr.create(profile="local")
    tag = str(40000 + os.getpid() % 10000)
    try:
        # ignores SIGTERM; a setsid child still in the tree; with cgroups, also a daemon that left it
        script = (f"trap '' TERM; setsid sleep {tag}1 >/dev/null 2>&1 & "
                  + (f"setsid -f sleep {tag}2 >/dev/null 2>&1; " if cgroups else "")
                  + f"echo started; sleep {tag}3")
        t = time.monotonic()
        r = run(mgr, sb, script, timeout=1)
        assert (r.exit_code, r.timed_out, r.stdout) == (124, True, "started\n")
        assert time.monotonic() - t < 5
        assert _wait_gone(f"sleep {tag}") == []
        assert run(mgr, sb, "echo alive").stdout == "alive\n"  # the sandbox itself lives on
    finally:
        mgr.teardown(sb.id)


def test_background_processes_outlive_a_normal_exec(make_manager):
    mgr = make_manager()
    sb = mgr.create(profile="local")
    try:
        run(mgr, sb, "setsid sleep 4322 >/dev/null 2>&1 &", timeout=5)
        time.sleep(0.2)
        assert "sleep 4322" in run(mgr, sb, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    finally:
        mgr.teardown(sb.id)


# ------------------------------------------------------------------- 5. probe


@pytest.mark.parametrize("tool", TOOLS)
def test_probe_tells_live_from_gone(make_manager, monkeypatch, tool):
    import signal

    mgr = make_manager()
    _tool(mgr, monkeypatch, tool)
    ext = mgr.extension("ext.local")
    sb = mgr.create(profile="local")
    stored = mgr.state.get(sb.id)["handle"]
    handle = local.LocalHandle.model_validate(stored)
    assert ext.probe(handle) is True
    assert ext.probe(handle.model_copy(update={"starttime": "1"})) is False  # same pid, another process: not ours
    os.kill(handle.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while ext.probe(handle) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ext.probe(handle) is False
    mgr.teardown(sb.id)


def test_probe_with_isolation_none(cfg, make_manager):
    cfg.write("profile.insecure.yaml", "slug: insecure\nextension: ext.local\nisolation: none\nnetwork: {egress: internet}\n")
    mgr = make_manager()
    ext = mgr.extension("ext.local")
    sb = mgr.create(profile="insecure")
    handle = local.LocalHandle.model_validate(mgr.state.get(sb.id)["handle"])
    assert ext.probe(handle) is True
    mgr.teardown(sb.id)
    assert ext.probe(handle) is False


@pytest.mark.parametrize("tool", TOOLS)
def test_network_sandbox_keeps_a_resolv_conf_that_lives_in_run(cfg, make_manager, monkeypatch, tool, tmp_path):
    # systemd-resolved hosts: /etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf
    run_dir = Path(f"/run/sandboxer-test-{uuid.uuid4().hex[:8]}")
    run_dir.mkdir()
    (run_dir / "resolv.conf").write_text("nameserver 127.0.0.53\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(run_dir / "resolv.conf")
    monkeypatch.setattr(local, "RESOLV_CONF", str(link))
    cfg.write("profile.net.yaml", "slug: net\nextension: ext.local\nisolation: process\noptions: {network: true}\n"
                                  "network: {egress: internet}\n")
    mgr = make_manager()
    _tool(mgr, monkeypatch, tool)
    sb = mgr.create(profile="net")
    try:
        r = run(mgr, sb, f"cat {run_dir}/resolv.conf; ls -A {run_dir} /run | sort -u; echo x > {run_dir}/resolv.conf")
        assert r.stdout.splitlines()[0] == "nameserver 127.0.0.53"
        assert "Read-only file system" in r.stderr
    finally:
        mgr.teardown(sb.id)
        shutil.rmtree(run_dir)


def test_cpu_limit_holds_for_processes_together(cfg, make_manager):
    _profile(cfg, "slow-cpu", cpu=0.25)
    mgr = make_manager()
    sb = mgr.create(profile="slow-cpu")
    try:
        spin = ("import os, resource, time\nfor _ in range(3):\n    if os.fork() == 0:\n        end = time.time() + 1.5\n"
                "        while time.time() < end:\n            pass\n        os._exit(0)\n"
                "for _ in range(3):\n    os.wait()\nr = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
                "print(r.ru_utime + r.ru_stime)")
        used = float(mgr.exec(sb.id, ["python3", "-c", spin], timeout=30).stdout)
        if sb.reachability["limits"]["cpu"].startswith("not enforced"):
            pytest.skip("no cgroup cpu controller here: " + sb.reachability["limits"]["cpu"])
        assert sb.reachability["limits"]["cpu"].endswith("=25000/100000")
        assert used < 0.25 * 1.5 + 0.3, used  # 3 spinning processes share a quarter of a cpu
    finally:
        mgr.teardown(sb.id)


def test_exec_cgroups_of_ended_background_processes_are_pruned(make_manager):
    mgr = make_manager()
    sb = mgr.create(profile="local")
    try:
        track = (mgr.state.get(sb.id)["handle"].get("cgroup") or {}).get("track")
        if not track:
            pytest.skip("no writable cgroup here")
        for _ in range(40):
            run(mgr, sb, "sleep 0.05 >/dev/null 2>&1 &")  # each leaves its exec cgroup busy for a moment
        time.sleep(0.2)
        run(mgr, sb, "true")
        assert len([n for n in os.listdir(track) if n.startswith("e-")]) <= 33
    finally:
        mgr.teardown(sb.id)


@pytest.mark.parametrize("tool", TOOLS)
def test_dev_holds_only_a_minimal_set_of_devices(make_manager, monkeypatch, tool):
    mgr = make_manager()
    _tool(mgr, monkeypatch, tool)
    sb = mgr.create(profile="local")
    try:
        r = run(mgr, sb, "ls -A /dev | grep -v '^core$'; echo x > /dev/null && head -c 4 /dev/urandom | wc -c; "
                         "python3 -c 'import os; m, s = os.openpty(); print(os.ttyname(s))'")
        lines = r.stdout.split()
        assert lines[:-2] == sorted(["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                                     "stdout", "tty", "urandom", "zero"]), r
        assert lines[-2] == "4" and lines[-1].startswith("/dev/pts/")
    finally:
        mgr.teardown(sb.id)


def test_restore_larger_than_disk_mb_fails_and_leaves_nothing(cfg, make_manager):
    from sandboxer import SnapshotError

    _profile(cfg, "small-disk", disk_mb=8)
    mgr = make_manager()
    sb = mgr.create(profile="local")
    run(mgr, sb, "head -c 12M /dev/urandom > big")
    snap = mgr.snapshot(sb.id)
    mgr.teardown(sb.id)
    if os.geteuid() != 0:
        pytest.skip("disk_mb is not enforced without root")
    with pytest.raises(SnapshotError, match="No space left on device"):
        mgr.restore(snap.id, profile="small-disk")
    assert mgr.list() == []
    mgr.delete_snapshot(snap.id)


@pytest.mark.parametrize("tool", TOOLS)
def test_cgroup_paths_of_the_manager_are_not_visible(make_manager, monkeypatch, tool):
    mgr = make_manager()
    _tool(mgr, monkeypatch, tool)
    sb = mgr.create(profile="local")
    own = {line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()} - {"/"}
    try:
        r = run(mgr, sb, "cat /proc/self/cgroup /proc/1/cgroup")
        assert r.exit_code == 0 and r.stdout
        assert "sandboxer" not in r.stdout and sb.id not in r.stdout, r.stdout  # a cgroup namespace of its own
        assert not any(path in r.stdout for path in own), r.stdout
    finally:
        mgr.teardown(sb.id)


@pytest.mark.parametrize("tool", TOOLS)
def test_manager_home_and_var_tmp_are_not_visible(cfg, monkeypatch, tool, tmp_path):
    from sandboxer import Manager

    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    home = Path(f"/var/lib/sandboxer-test-home-{uuid.uuid4().hex[:8]}")  # outside the private /tmp
    home.mkdir(mode=0o755)
    (home / "secret").write_text("manager state")
    os.chmod(home / "secret", 0o644)
    var_tmp = Path(f"/var/tmp/sandboxer-test-{uuid.uuid4().hex[:8]}")
    var_tmp.write_text("host")
    mgr = Manager(config_dirs=[cfg.root], home=home)
    ext = mgr.extension("ext.local")
    monkeypatch.setattr(ext, "_tool", tool)
    monkeypatch.setattr(ext.config, "root", str(home / "local"))  # the workspaces live under it too
    sb = None
    try:
        sb = mgr.create(profile="local")
        r = run(mgr, sb, f"ls -A {home}; cat {home}/secret; ls {var_tmp}; touch {home}/x; "
                         "echo ok > f && cat f; pwd")
        assert "manager state" not in r.stdout and "secret" not in r.stdout
        assert "No such file" in r.stderr and "Read-only file system" in r.stderr
        assert r.stdout.split()[-2:] == ["ok", sb.reachability["workspace"]]
        assert sb.reachability["workspace"].startswith(f"{home}/local/")
    finally:
        if sb is not None:
            mgr.teardown(sb.id)
        mgr.close()
        var_tmp.unlink()
        shutil.rmtree(home)
