"""ext.local against the real kernel: namespaces, read-only host, rlimits, and nothing left after teardown."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import run_threads

from sandboxer import ProvisionError
from sandboxer.models import SandboxState


@pytest.fixture
def mgr(make_manager):
    return make_manager()


@pytest.fixture
def sb(mgr):
    s = mgr.create(profile="local", consumer="tester")
    yield s
    mgr.teardown(s.id)


def run(mgr, sb, script, **kw):
    return mgr.exec(sb.id, ["sh", "-c", script], **kw)


def test_echo_and_exit_code(mgr, sb):
    r = run(mgr, sb, "echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_no_network(mgr, sb):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        r = run(mgr, sb, f"ip -o link show | cut -d: -f2; "
                         f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\" 2>&1 | tail -1")
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    links, error = r.stdout.strip().split("\n")
    assert links.strip() == "lo"  # a network namespace of its own, with nothing but loopback
    assert "Error" in error


def test_cannot_see_host_pids(mgr, sb):
    r = run(mgr, sb, "ls /proc | grep -E '^[0-9]+$' | wc -l; test -d /proc/%d && echo SEES-HOST || echo isolated" % os.getpid())
    count, verdict = r.stdout.split()
    assert verdict == "isolated" and int(count) < 10


def test_cannot_write_outside_workspace(mgr, sb, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(tmp_path, 0o777)
    os.chmod(outside, 0o777)
    target = outside / "marker"
    r = run(mgr, sb, f"echo x > {target}; echo y > /etc/sandboxer-marker; touch /tmp/sandboxer-marker; "
                     f"echo inside > ./ok && cat ./ok")
    assert not target.exists() and not Path("/etc/sandboxer-marker").exists()
    assert not Path("/tmp/sandboxer-marker").exists()
    assert "Read-only file system" in r.stderr and r.stdout.strip().endswith("inside")
    assert (Path(sb.reachability["workspace"]) / "ok").read_text() == "inside\n"


def test_env_values_are_delivered_literally(mgr, sb, tmp_path):
    tricky = "$(touch /tmp/pwned) `id` 'single' \"double\"\nnewline ; rm -rf ~"
    r = mgr.exec(sb.id, ["printenv", "TRICKY"], env={"TRICKY": tricky})
    assert r.stdout == tricky + "\n"
    assert not Path("/tmp/pwned").exists()


def test_rlimits_from_profile(mgr, sb):
    r = run(mgr, sb, "ulimit -v; ulimit -t")
    mem_kb, cpu = r.stdout.split()
    assert int(mem_kb) == 1024 * 1024 and cpu == "600"


def test_exec_timeout_kills_the_command(mgr, sb):
    t = time.monotonic()
    r = run(mgr, sb, "echo started; sleep 30; echo never", timeout=0.5)
    assert r.timed_out and r.exit_code == 124 and r.stdout == "started\n"
    assert time.monotonic() - t < 10


def test_streaming_output(mgr, sb):
    seen = []
    r = run(mgr, sb, "echo one; sleep 0.2; echo two", on_output=lambda k, t: seen.append((k, t)))
    assert "".join(t for k, t in seen if k == "stdout") == r.stdout == "one\ntwo\n"


def test_teardown_leaves_no_process_and_no_workspace(mgr):
    sb = mgr.create(profile="local")
    run(mgr, sb, "sleep 300 >/dev/null 2>&1 & sleep 300 >/dev/null 2>&1 & echo started")
    handle = mgr.state.get(sb.id)["handle"]
    ws = Path(handle["workspace"])
    init = handle["pid"]
    assert ws.is_dir() and Path(f"/proc/{init}").exists()
    mgr.teardown(sb.id)
    assert not ws.exists()
    assert not Path(f"/proc/{init}").exists()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        assert not cwd.startswith(str(ws)), f"process {pid} survived in {cwd}"


def test_processes_persist_between_execs(mgr, sb):
    run(mgr, sb, "sleep 4321 >/dev/null 2>&1 &")
    r = run(mgr, sb, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert "sleep 4321" in r.stdout  # the background process of the first command is still there


def test_isolation_none_is_explicit_and_works(cfg, make_manager):
    cfg.write("profile.insecure.yaml", "slug: insecure\nextension: ext.local\nisolation: none\nnetwork: {egress: internet}\n")
    mgr = make_manager()
    sb = mgr.create(profile="insecure")
    assert sb.reachability["isolation"] == "none"
    r = run(mgr, sb, "sleep 300 >/dev/null 2>&1 & echo $PWD")
    ws = r.stdout.strip()
    assert ws == sb.reachability["workspace"]
    mgr.teardown(sb.id)
    assert not Path(ws).exists()


def test_no_isolation_available_is_a_clear_error(cfg, make_manager, monkeypatch):
    mgr = make_manager()
    ext = mgr.extension("ext.local")
    monkeypatch.setattr(ext, "_probe", lambda: (None, "bwrap not found; unshare failed: Operation not permitted"))
    monkeypatch.setattr(ext, "_tool", None)
    with pytest.raises(ProvisionError, match="no namespace isolation is available here.*isolation: none"):
        mgr.create(profile="local")
    assert mgr.list() == [] and mgr.state.list(states=None)[0]["state"] == "failed"


@pytest.mark.parametrize("tool", ["unshare", "bwrap"])
def test_both_isolation_tools(mgr, tool, monkeypatch):
    import shutil

    if shutil.which(tool) is None:
        if os.geteuid() == 0:
            pytest.fail(f"{tool} is missing; `make test` installs it as root")
        pytest.skip(f"{tool} not installed")
    ext = mgr.extension("ext.local")
    monkeypatch.setattr(ext, "_tool", tool)
    sb = mgr.create(profile="local")
    assert sb.reachability["isolation"] == tool
    r = run(mgr, sb, "echo hi > f; cat f; ls /proc | grep -cE '^[0-9]+$'; echo x > /etc/x 2>/dev/null || echo ro")
    lines = r.stdout.split()
    assert lines[0] == "hi" and int(lines[1]) < 10 and lines[2] == "ro"
    mgr.teardown(sb.id)
    assert mgr.get(sb.id).state is SandboxState.TERMINATED


def test_snapshot_and_restore_workspace(mgr, sb):
    run(mgr, sb, "mkdir -p d && echo state > d/file")
    snap = mgr.snapshot(sb.id)
    assert snap.checksum.startswith("sha256:") and snap.size_bytes > 0
    sb2 = mgr.restore(snap.id)
    try:
        assert run(mgr, sb2, "cat d/file").stdout == "state\n"
    finally:
        mgr.teardown(sb2.id)
    mgr.delete_snapshot(snap.id)
    assert not Path(snap.data["path"]).exists()


def test_concurrent_local_sandboxes(mgr):
    ids, errors = [], []

    def work():
        try:
            s = mgr.create(profile="local")
            assert run(mgr, s, "echo ok").stdout == "ok\n"
            mgr.teardown(s.id)
            ids.append(s.id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads(work, 10)
    assert errors == [] and len(ids) == 10 and mgr.list() == []


def test_commands_have_no_capabilities_and_cannot_remount(mgr, sb, tmp_path):
    r = run(mgr, sb, "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; mount -o remount,rw / 2>&1 || echo refused")
    caps = dict(line.split(":\t") for line in r.stdout.splitlines() if line.startswith("Cap"))
    assert set(caps.values()) == {"0000000000000000"}
    assert r.stdout.strip().endswith("refused")
    assert "Read-only" in run(mgr, sb, "touch /etc/x").stderr


@pytest.mark.parametrize("tool", ["bwrap", "unshare"])
def test_processes_end_at_the_ttl_even_without_gc(mgr, monkeypatch, tool):
    import shutil

    import sandboxer.extensions.local as local

    if shutil.which(tool) is None and os.geteuid() != 0:
        pytest.skip(f"{tool} not installed")
    monkeypatch.setattr(local, "TTL_GRACE_S", 0)
    monkeypatch.setattr(mgr.extension("ext.local"), "_tool", tool)
    sb = mgr.create(profile="local", ttl=1)
    init = mgr.state.get(sb.id)["handle"]["pid"]
    run(mgr, sb, "sleep 300 >/dev/null 2>&1 &")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{init}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{init}").exists(), "the sandbox's init outlived its TTL"
    report = mgr.gc()
    assert report.expired == [sb.id] and not Path(sb.reachability["workspace"]).exists()


def test_a_character_split_across_chunks_arrives_whole(mgr, sb):
    from tests.unit.test_execution import check_split

    check_split(lambda argv, on_output: mgr.exec(sb.id, argv, on_output=on_output))


def test_output_over_the_cap_is_cut_and_flagged(mgr, sb, monkeypatch):
    monkeypatch.setattr(mgr.extension("ext.local").config, "max_output_bytes", 4096)
    seen = []
    r = run(mgr, sb, "head -c 100000 /dev/zero | tr '\\0' y; echo err >&2", on_output=lambda k, t: seen.append(t))
    assert r.exit_code == 0 and r.truncated and r.stdout == "y" * 4096 and r.stderr == "err\n"
    assert "".join(seen) == "y" * 4096 + "err\n"
    assert not run(mgr, sb, "echo small").truncated


def test_argv_with_a_nul_byte_is_refused_by_name(mgr, sb):
    from sandboxer.errors import InputError

    with pytest.raises(InputError, match=r"argv\[1\] 'a\\x00b' holds a NUL byte"):
        mgr.exec(sb.id, ["echo", "a\0b"])
