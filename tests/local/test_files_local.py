"""Files on ext.local, through the Manager and the Sandbox object: streamed, and never led out of the
sandbox's workspace by a symlink the sandbox planted."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from sandboxer import Sandbox
from sandboxer.errors import ExecError, InputError, SandboxFileNotFound, SandboxNotFound, SandboxStateError
from tests.local.test_local import mgr, sb  # noqa: F401 - fixtures


def _host_state(paths: list[str]) -> dict[str, tuple[bool, bytes | None, float | None]]:
    out = {}
    for p in paths:
        try:
            out[p] = (True, Path(p).read_bytes() if os.path.isfile(p) else None, os.lstat(p).st_mtime)
        except FileNotFoundError:
            out[p] = (False, None, None)
    return out


@pytest.fixture
def outside():
    """A host directory outside the sandbox (not under /tmp, which a sandbox sees as its own)."""
    d = Path(tempfile.mkdtemp(prefix="sbx-files-outside-", dir="/var/lib"))
    yield d
    shutil.rmtree(d)


def test_symlinks_the_sandbox_plants_never_lead_a_files_call_out_of_it(mgr, sb, outside):
    (outside / "keep.txt").write_text("host data")
    res = mgr.exec(sb.id, ["sh", "-c", f"ln -s /etc/passwd x && ln -s / up && ln -s {outside} out && "
                                       "ln -s ../.. dotdot && mkdir d && ln -s ../x d/x2"])
    assert res.exit_code == 0, res.stderr
    watched = ["/etc/passwd", "/pwned", "/etc/pwned", str(outside / "keep.txt"), str(outside / "new.txt"),
               "/tmp/pwned"]
    before = _host_state(watched)
    attempts = [
        lambda: mgr.write_file(sb.id, "x", b"pwned"), lambda: mgr.read_file(sb.id, "x"),
        lambda: mgr.write_file(sb.id, "up/pwned", b"pwned"), lambda: mgr.write_file(sb.id, "up/etc/pwned", b"p"),
        lambda: mgr.read_file(sb.id, "up/etc/passwd"), lambda: mgr.list_files(sb.id, "up"),
        lambda: mgr.list_files(sb.id, "up/etc"), lambda: mgr.remove_file(sb.id, "up/etc/passwd"),
        lambda: mgr.remove_file(sb.id, "out/keep.txt"), lambda: mgr.write_file(sb.id, "out/new.txt", b"p"),
        lambda: mgr.read_file(sb.id, "out/keep.txt"), lambda: mgr.remove_file(sb.id, "out", recursive=False) and None,
        lambda: mgr.write_file(sb.id, "dotdot/pwned", b"p"), lambda: mgr.read_file(sb.id, "d/x2"),
        lambda: mgr.write_file(sb.id, "../../../pwned", b"p"), lambda: mgr.read_file(sb.id, "/etc/passwd"),
        lambda: mgr.write_file(sb.id, "/tmp/../../pwned", b"p"),
    ]
    refused = 0
    for attempt in attempts:
        try:
            got = attempt()
        except (ExecError, InputError) as exc:
            assert sb.id in str(exc)
            refused += 1
        else:
            assert got is None  # only removing the link "out" itself succeeds: it is the sandbox's
    assert refused == len(attempts) - 1
    assert _host_state(watched) == before
    assert (outside / "keep.txt").read_text() == "host data"
    # the links themselves are the sandbox's: listed as links, removable (not their targets)
    kinds = {i.name: i.type for i in mgr.list_files(sb.id, ".")}
    assert kinds["x"] == kinds["up"] == "symlink" and "out" not in kinds
    mgr.remove_file(sb.id, "x")
    assert os.path.exists("/etc/passwd")


def test_links_inside_the_workspace_are_followed(mgr, sb):
    mgr.write_file(sb.id, "real/dir/f.txt", "inside")
    mgr.exec(sb.id, ["sh", "-c", f"ln -s real/dir rel && ln -s {sb.reachability['workspace']}/real abs && "
                                 "ln -s /tmp tmplink"])
    assert mgr.read_file(sb.id, "rel/f.txt") == b"inside"
    assert mgr.read_file(sb.id, "abs/dir/f.txt") == b"inside"
    mgr.write_file(sb.id, "tmplink/t.txt", b"in its /tmp")
    assert mgr.exec(sb.id, ["cat", "/tmp/t.txt"]).stdout == "in its /tmp"
    assert mgr.read_file(sb.id, "/tmp/t.txt") == b"in its /tmp"


def test_write_read_list_remove_streamed(mgr, sb, tmp_path):
    data = bytes(range(256)) * 4096 + b"\0\xff"
    assert mgr.write_file(sb.id, "sub/new/bin.dat", io.BytesIO(data), mode=0o640) == len(data)
    assert mgr.exec(sb.id, ["sha256sum", "sub/new/bin.dat"]).stdout.split()[0] == hashlib.sha256(data).hexdigest()
    sink = io.BytesIO()
    assert mgr.read_file(sb.id, "sub/new/bin.dat", into=sink) == len(data) and sink.getvalue() == data
    [info] = mgr.list_files(sb.id, "sub/new")
    assert (info.name, info.type, info.size, info.mode) == ("bin.dat", "file", len(data), 0o640)
    assert info.path == f"{sb.reachability['workspace']}/sub/new/bin.dat"
    # the sandbox's own uid owns what was written, so it can change it
    assert mgr.exec(sb.id, ["sh", "-c", "echo more >> sub/new/bin.dat && rm -r sub"]).exit_code == 0
    with pytest.raises(SandboxFileNotFound, match=rf"sandbox {sb.id}.*sub/new/bin.dat"):
        mgr.read_file(sb.id, "sub/new/bin.dat")
    mgr.exec(sb.id, ["mkfifo", "fifo"])
    with pytest.raises(ExecError, match="not a regular file"):
        mgr.read_file(sb.id, "fifo")  # refused at once, not hung on the FIFO


@pytest.mark.parametrize("path, why", [("", "the path is empty"), ("a\0b", "contains a NUL byte")])
def test_bad_paths_are_refused_naming_the_sandbox(mgr, sb, path, why):
    with pytest.raises(InputError, match=rf"sandbox {sb.id}: .*{why}"):
        mgr.write_file(sb.id, path, b"x")


def test_the_sandbox_object(mgr, tmp_path):
    with mgr.create(profile="local", consumer="tester") as sb:
        assert isinstance(sb, Sandbox)
        assert sb == mgr.get(sb.id) and sb.model_dump() == mgr.get(sb.id).model_dump()
        assert sb.exec(["echo", "hi"]).stdout == "hi\n"
        local = tmp_path / "tool.sh"
        local.write_text("#!/bin/sh\necho ran\n")
        local.chmod(0o755)
        sb.files.upload(local, "bin/tool.sh")
        assert sb.exec(["./bin/tool.sh"]).stdout == "ran\n"  # the mode came along
        sb.files.download("bin/tool.sh", tmp_path / "back.sh")
        assert (tmp_path / "back.sh").read_text() == local.read_text()
        with pytest.raises(SandboxFileNotFound):
            sb.files.download("nope", tmp_path / "nope")
        assert not (tmp_path / "nope").exists() and not list(tmp_path.glob(".nope.*"))
        again = Sandbox.from_id(mgr, sb.id)
        assert again.files.read("bin/tool.sh") == local.read_bytes()
        # ext.local's init ends the sandbox at its end file, which set_ttl moves: extending works
        before = sb.expires_at
        sb.extend_ttl(60)
        assert (sb.expires_at - before).total_seconds() == pytest.approx(60, abs=1)
        assert sb.exec(["echo", "still"]).stdout == "still\n"
    assert sb.state.value == "terminated"
    with pytest.raises(SandboxStateError, match="terminated, not ready"):
        sb.files.read("bin/tool.sh")
    with pytest.raises(SandboxNotFound):
        Sandbox.from_id(mgr, "sb-nosuchthing")


def test_concurrent_writes_make_one_parent_directory_between_them(mgr, sb):
    # Threads of one manager writing under a directory none of them finds: each makes it or finds it
    # made, never FileExistsError (a race the saas-stub's files had too).
    import threading

    for round_ in range(5):
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                mgr.write_file(sb.id, f"race{round_}/deep/{i}.bin", bytes([i]) * 1000)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert [f.name for f in mgr.list_files(sb.id, f"race{round_}/deep")] == [f"{i}.bin" for i in range(6)]
