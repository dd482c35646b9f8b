"""``sandboxer cp``: into and out of an ext.local sandbox, through stdin/stdout too, and one ``error:`` line
for every mistake."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def sbx(home, cfg):
    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}

    def run(*args, check=None, stdin=None):
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, input=stdin, env=env,
                           timeout=120, stdin=None if stdin is not None else subprocess.DEVNULL)
        if check is not None:
            assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
        return p

    return run


@pytest.fixture
def sandbox_id(sbx):
    sb = json.loads(sbx("create", "local", "--consumer", "ci", "--json", check=0).stdout)
    yield sb["id"]
    sbx("teardown", sb["id"], check=0)


def test_cp_both_ways_and_through_pipes(sbx, sandbox_id, tmp_path):
    data = hashlib.sha256(b"x").digest() * 40000  # 1.2 MB, binary
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    assert sbx("cp", str(src), f"{sandbox_id}:deep/dir/in.bin", check=0).stdout == b""
    assert sbx("exec", sandbox_id, "--", "sha256sum", "deep/dir/in.bin", check=0).stdout.split()[0].decode() \
        == hashlib.sha256(data).hexdigest()
    sbx("cp", f"{sandbox_id}:deep/dir/in.bin", str(tmp_path), check=0)  # into a directory: its name
    assert (tmp_path / "in.bin").read_bytes() == data
    sbx("cp", f"{sandbox_id}:deep/dir/in.bin", str(tmp_path / "out.bin"), check=0)
    assert (tmp_path / "out.bin").read_bytes() == data
    sbx("cp", "-", f"{sandbox_id}:piped.txt", stdin=b"from stdin\n", check=0)
    assert sbx("cp", f"{sandbox_id}:piped.txt", "-", check=0).stdout == b"from stdin\n"
    sbx("cp", str(src), f"{sandbox_id}:deep/", check=0)
    assert sbx("exec", sandbox_id, "--", "ls", "deep", check=0).stdout == b"dir\nin.bin\n"


@pytest.mark.parametrize("args, message", [
    (["a.txt", "b.txt"], "error: cp needs one side in a sandbox, written ID:PATH (e.g. sb-0123abcd:/work/out.txt); "
                         "neither 'a.txt' nor 'b.txt' has a colon"),
    ([":x", "b.txt"], "error: ':x': no sandbox id before the colon; write ID:PATH, e.g. sb-0123abcd:/work/out.txt"),
    (["sb-1:", "b.txt"], "error: 'sb-1:': no path after the colon; write ID:PATH, e.g. sb-1:/work/out.txt"),
    (["sb-1:a", "sb-2:b"], "error: cp copies between this machine and one sandbox; to copy between two "
                           "sandboxes, copy to a local file first"),
    (["sb-nosuch:a", "b.txt"], "error: no sandbox with id or name 'sb-nosuch'"),
])
def test_cp_mistakes_are_one_error_line(sbx, tmp_path, args, message):
    p = sbx("cp", *args, check=66 if "no sandbox with id" in message else 64)  # not found / usage (docs/cli.md)
    assert p.stderr.decode().strip().startswith(message) and p.stdout == b""
    assert len(p.stderr.decode().strip().splitlines()) == 1


def test_cp_a_missing_file_either_side(sbx, sandbox_id, tmp_path):
    p = sbx("cp", str(tmp_path / "nope"), f"{sandbox_id}:x", check=65)
    assert p.stderr.decode().strip() == f"error: cannot read the local file '{tmp_path / 'nope'}': No such file or directory"
    p = sbx("cp", f"{sandbox_id}:nope.txt", str(tmp_path / "got"), check=66)
    assert p.stderr.decode().startswith("error: ") and "nope.txt" in p.stderr.decode() and sandbox_id in p.stderr.decode()
    assert len(p.stderr.decode().strip().splitlines()) == 1 and not (tmp_path / "got").exists()
    p = sbx("cp", str(tmp_path), f"{sandbox_id}:x", "--mode", "9x", check=64)
    assert p.stderr.decode().strip().startswith("error: ") and "--mode" in p.stderr.decode() \
        and "'9x': give octal permission bits, e.g. 644 or 0755" in p.stderr.decode()
