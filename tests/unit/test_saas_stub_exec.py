"""ext.saas-stub's exec runs the command for real, confined by bubblewrap in a sandbox directory of its own.

Against the real stub (its own table) and the real bwrap; the only mock is the missing-bwrap seam.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sandboxer.contract import ProvisionRequest
from sandboxer.errors import CapabilityError, ExecError, InputError
from sandboxer.extensions import saas_stub
from sandboxer.extensions.local import UID_REGISTRY
from sandboxer.extensions.saas_stub import SaasStubExtension, StubConfig
from sandboxer.models import ExtensionManifest, Profile, SnapshotMeta

MANIFEST = Path(__file__).resolve().parents[2] / "extensions" / "ext.saas-stub.yaml"

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


@pytest.fixture
def ext(tmp_path: Path):
    manifest = ExtensionManifest.model_validate(yaml.safe_load(MANIFEST.read_text()))
    e = SaasStubExtension(manifest, StubConfig(latency_s=0, output_cap=4096))
    e.home = tmp_path / "home"
    yield e
    for stub_id in e.live()["live"]:  # what a test left: its directory and its uid (as root) go
        e.kill(stub_id)


def provision(ext: SaasStubExtension, sandbox_id: str = "sb-1"):
    return ext.provision(ProvisionRequest(profile=Profile(slug="stub", extension=ext.id), sandbox_id=sandbox_id))


def test_the_command_gets_a_minimal_environment_not_the_managers(ext, monkeypatch):
    monkeypatch.setenv("SBX_STUB_SENTINEL", "leaked-from-the-manager")
    h = provision(ext)
    res = ext.exec(h, ["sh", "-c", "env"], env={"MINE": "x y"})
    assert res.exit_code == 0, res
    env = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert "SBX_STUB_SENTINEL" not in env and "leaked-from-the-manager" not in res.stdout
    assert env["MINE"] == "x y"
    assert env["HOME"] == ext.sandbox_dir(h) and env["LANG"] == "C.UTF-8" and "/usr/bin" in env["PATH"]


def test_cwd_is_the_sandbox_dir_or_a_dir_inside_it(ext):
    h = provision(ext)
    home = ext.sandbox_dir(h)
    assert Path(home).is_dir() and Path(home).is_relative_to(ext.home)
    assert ext.exec(h, ["pwd", "-P"]).stdout == os.path.realpath(home) + "\n"
    assert ext.exec(h, ["mkdir", "sub"]).exit_code == 0
    assert ext.exec(h, ["pwd", "-P"], cwd="sub").stdout == os.path.realpath(home) + "/sub\n"
    assert ext.exec(h, ["pwd", "-P"], cwd=f"{home}/sub").stdout == os.path.realpath(home) + "/sub\n"
    with pytest.raises(InputError, match="cwd '/etc' is outside sandbox sb-1's directory"):
        ext.exec(h, ["pwd"], cwd="/etc")
    with pytest.raises(InputError, match=r"cwd '\.\./\.\.' is outside"):
        ext.exec(h, ["pwd"], cwd="../..")


def test_exit_codes_stderr_and_stdin(ext):
    h = provision(ext)
    assert ext.exec(h, ["sh", "-c", "exit 7"]).exit_code == 7
    assert ext.exec(h, ["false"]).exit_code == 1
    res = ext.exec(h, ["sh", "-c", "echo out; echo err >&2"])
    assert (res.stdout, res.stderr) == ("out\n", "err\n")
    data = "é\n" * 100_000  # more than a pipe holds, both ways at once
    res = ext.exec(h, ["cat"], stdin=data.encode())
    assert res.exit_code == 0 and data.startswith(res.stdout) and 4094 <= len(res.stdout.encode()) <= 4096
    assert res.truncated  # the 4096-byte cap of this config
    assert ext.exec(h, ["sh", "-c", "wc -c"], stdin=b"abc").stdout.strip() == "3"
    assert ext.exec(h, ["echo", "hi"]).stdout == "hi\n"
    assert ext.exec(h, ["no-such-command-x"]).exit_code != 0


def _running(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if token.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_timeout_is_exit_124_and_kills_every_process_it_started(ext):
    h = provision(ext)
    token = f"{os.getpid() % 1000}.{time.monotonic_ns() % 100000}"
    began = time.monotonic()
    res = ext.exec(h, ["sh", "-c", f"setsid sleep 1{token} & echo started; sleep 2{token}"], timeout=1.0)
    assert (res.exit_code, res.timed_out, res.stdout) == (124, True, "started\n")
    assert time.monotonic() - began < 5
    deadline = time.monotonic() + 5
    while _running(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(token) == []


def _visible_dir() -> Path:
    """A fresh host directory the sandbox does see, wherever the repository was cloned: not under
    /tmp, /var/tmp, /run or a home, which the stub hides (a clone may live under any of them)."""
    base = Path("/var/lib") if os.access("/var/lib", os.W_OK) else Path(__file__).parent
    return Path(tempfile.mkdtemp(prefix=".sbx-stub-test-", dir=base))


def test_files_outside_the_sandbox_dir_are_not_writable(ext):
    # A host directory the sandbox does see (a private /tmp would hide one made under /tmp).
    seen = _visible_dir()
    os.chmod(seen, 0o755)  # readable by anyone (the sandbox's own uid, when root)
    try:
        outside = seen / "outside.txt"
        outside.write_text("host\n")
        os.chmod(outside, 0o666)  # only the read-only mount refuses a write
        h = provision(ext)
        res = ext.exec(h, ["sh", "-c", f"cat {outside}; echo x >> {outside}; echo y > /etc/sbx-stub-test; "
                                       "echo z > kept.txt"])
        assert res.stdout == "host\n"  # visible, read-only
        assert outside.read_text() == "host\n" and not Path("/etc/sbx-stub-test").exists()
        assert res.stderr.count("Read-only file system") == 2, res.stderr
        assert (Path(ext.sandbox_dir(h)) / "kept.txt").read_text() == "z\n"
    finally:
        shutil.rmtree(seen)


def test_another_sandboxs_dir_and_the_managers_home_are_not_visible(ext):
    a, b = provision(ext, "sb-a"), provision(ext, "sb-b")
    Path(ext.sandbox_dir(b), "secret.txt").write_text("b's\n")
    res = ext.exec(a, ["sh", "-c", f"ls {ext.sandbox_dir(b)}; cat {ext.sandbox_dir(b)}/secret.txt; ls {ext.home}"])
    assert "b's" not in res.stdout and "secret.txt" not in res.stdout
    assert ext.table_path.name not in res.stdout  # the stub's table (its "provider side") is hidden too


def test_teardown_removes_the_dir_and_snapshot_restore_brings_it_back(ext):
    h = provision(ext)
    assert ext.exec(h, ["sh", "-c", "mkdir d && echo kept > d/f"]).exit_code == 0
    snap = ext.snapshot(h)
    meta = SnapshotMeta(id="snap-1", sandbox_id="sb-1", extension=ext.id, profile="stub", consumer="t",
                        created_at="2026-12-01T00:00:00Z", data=snap.data, size_bytes=snap.size_bytes)
    ext.teardown(h)
    assert not Path(ext.sandbox_dir(h)).exists()
    r = ext.restore_from_snapshot(ProvisionRequest(profile=Profile(slug="stub", extension=ext.id),
                                                   sandbox_id="sb-2"), meta)
    assert ext.exec(r, ["cat", "d/f"]).stdout == "kept\n"
    assert ext.exec(r, ["sh", "-c", "echo more >> d/f && touch d/g"]).exit_code == 0  # its own (its uid's, as root)
    ext.delete_snapshot(meta)
    assert not Path(snap.data["path"]).exists()
    ext.teardown(r)
    assert not Path(ext.sandbox_dir(r)).exists()


def test_without_bwrap_exec_refuses_rather_than_run_unconfined(ext, monkeypatch):
    h = provision(ext)
    real = shutil.which
    monkeypatch.setattr(saas_stub.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real(name))
    with pytest.raises(CapabilityError, match="needs bubblewrap .bwrap. to confine exec.*install"):
        ext.exec(h, ["true"])


def test_a_bwrap_that_cannot_start_the_command_is_an_exec_error_not_an_exit_code(ext, monkeypatch):
    h = provision(ext)
    real = shutil.which
    monkeypatch.setattr(saas_stub.shutil, "which", lambda name, *a, **k: real("false") if name == "bwrap" else real(name))
    with pytest.raises(ExecError, match="bubblewrap could not start the command in sandbox sb-1: exit code 1"):
        ext.exec(h, ["true"])


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the manager runs as root only in this test")


@as_root
def test_as_root_a_command_runs_unprivileged_and_cannot_read_root_only_host_files(ext):
    # A root-only file in a host directory the sandbox does see (not hidden, not under the private /tmp).
    seen = _visible_dir()
    os.chmod(seen, 0o755)  # the directory lets anyone in: only the file's own mode refuses
    try:
        secret = seen / "root-only.txt"
        secret.write_text("root's secret\n")
        os.chmod(secret, 0o600)
        os.chown(secret, 0, 0)
        h = provision(ext)
        res = ext.exec(h, ["sh", "-c", f"cat {secret}; cat /etc/shadow; id -u; echo mine > own.txt; "
                                       "mkdir -p d && echo deep > d/f && cat d/f; echo t > /tmp/t && cat /tmp/t"])
        assert "root's secret" not in res.stdout and "root:" not in res.stdout
        assert res.stderr.count("Permission denied") == 2, res.stderr
        uid = int(res.stdout.split()[0])
        assert uid != 0 and os.stat(ext.sandbox_dir(h)).st_uid == uid  # the dir is the command's own
        assert res.stdout.split()[1:] == ["deep", "t"]  # its own files and its private /tmp stay writable
        assert (Path(ext.sandbox_dir(h)) / "own.txt").read_text() == "mine\n"
        # Its directory is reachable by its absolute path (a shell's `cd d` goes by it): the
        # directories above it, made by bwrap inside the covering tmpfs, let its uid through.
        res = ext.exec(h, ["sh", "-c", "mkdir -p sub && cd sub && pwd -P"])
        assert (res.exit_code, res.stdout) == (0, os.path.realpath(ext.sandbox_dir(h)) + "/sub\n"), res
    finally:
        shutil.rmtree(seen)


@as_root
def test_as_root_two_sandboxes_get_distinct_uids_freed_at_teardown(ext):
    a, b = provision(ext, "sb-a"), provision(ext, "sb-b")
    ids = [int(ext.exec(h, ["id", "-u"]).stdout) for h in (a, b)]
    assert ids[0] != ids[1] and 0 not in ids
    assert [os.stat(ext.sandbox_dir(h)).st_uid for h in (a, b)] == ids
    assert ext.exec(a, ["sh", "-c", "echo x > f; mkdir -p d/e && chmod 000 d"]).exit_code == 0
    for h, uid in zip((a, b), ids):
        ext.teardown(h)
        assert not Path(ext.sandbox_dir(h)).exists()  # its 000 directory too
        assert not (UID_REGISTRY / str(uid)).exists()  # the uid is free for another sandbox
