"""ext.saas-stub's feature ``files``: the files of its sandbox directory, where its confined commands
see them, streamed, never through a symlink the sandbox planted.

Against the real stub (its own table) and, for what commands see, the real bwrap.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sandboxer.contract import ProvisionRequest
from sandboxer.errors import ExecError, InputError, RateLimited, SandboxFileNotFound
from sandboxer.extensions.base import check_features
from sandboxer.extensions.saas_stub import Fault, SaasStubExtension, StubConfig
from sandboxer.models import ExtensionManifest, Profile

from tests.support import files_cases as cases

MANIFEST = Path(__file__).resolve().parents[2] / "extensions" / "ext.saas-stub.yaml"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


def make(tmp_path: Path, **config) -> SaasStubExtension:
    manifest = ExtensionManifest.model_validate(yaml.safe_load(MANIFEST.read_text()))
    e = SaasStubExtension(manifest, StubConfig(latency_s=0, **config))
    e.home = tmp_path / "home"
    return e


@pytest.fixture
def ext(tmp_path: Path):
    e = make(tmp_path)
    yield e
    for stub_id in e.live()["live"]:
        e.kill(stub_id)


@pytest.fixture
def handle(ext):
    return ext.provision(ProvisionRequest(profile=Profile(slug="stub", extension=ext.id), sandbox_id="sb-files"))


def test_declared_and_implemented(ext):
    assert "files" in ext.features and "files" in ext.manifest.capabilities.features
    assert check_features(type(ext), ["files"]) is None


def test_bytes_listing_modes_and_bad_paths(ext, handle):
    cases.everyday(ext, handle, relative=False)  # relative paths: below, with bwrap
    box = Path(ext.sandbox_dir(handle))
    assert (box / "bin" / "data.bin").read_bytes() == b"short"
    assert not [p for p in box.rglob(".sandboxer-write-*")]  # no upload left half-made
    [entry] = ext.list_files(handle, "bin/data.bin")
    assert entry.path == str(box / "bin" / "data.bin")  # the path its commands see


def test_twenty_mib_round_trip_is_streamed(ext, handle):
    cases.large_round_trip(ext, handle)


def test_remove_and_missing_paths(ext, handle):
    cases.removal(ext, handle, "sb-files")
    with pytest.raises(InputError, match="own directory"):
        ext.remove_file(handle, ".", recursive=True)


@needs_bwrap
def test_relative_paths_are_where_its_commands_start(ext, handle):
    cases.relative_to_workdir(ext, handle)


def test_concurrent_transfers(ext, handle):
    cases.concurrent(ext, handle)


def test_a_path_outside_the_sandbox_directory_is_refused(ext, handle, tmp_path):
    for outside in ("/etc/passwd", "../other", str(tmp_path / "x"), "a/../../b"):
        with pytest.raises(InputError, match="sb-files"):
            cases.read(ext, handle, outside)
        with pytest.raises(InputError):
            cases.write(ext, handle, outside, b"x")
    assert not (tmp_path / "x").exists()


def test_a_symlink_the_sandbox_planted_is_never_followed(ext, handle, tmp_path):
    box = Path(ext.sandbox_dir(handle))
    target = tmp_path / "host"
    target.mkdir()
    (target / "secret").write_text("host secret")
    (box / "out").symlink_to(target)
    (box / "f").symlink_to(target / "secret")
    for path in ("out/secret", "f"):
        with pytest.raises(ExecError, match="symlink"):
            cases.read(ext, handle, path)
    with pytest.raises(ExecError, match="symlink"):
        cases.write(ext, handle, "out/planted", b"x")
    assert sorted(os.listdir(target)) == ["secret"]
    cases.write(ext, handle, "f", b"replaced")  # the link itself is replaced, not what it points at
    assert (target / "secret").read_text() == "host secret" and (box / "f").read_bytes() == b"replaced"
    (box / "d").mkdir()
    (box / "d" / "link").symlink_to(target)
    ext.remove_file(handle, "d", recursive=True)
    assert (target / "secret").read_text() == "host secret"
    [entry] = [e for e in ext.list_files(handle, ".") if e.name == "out"]
    assert entry.type == "symlink"


def test_a_gone_sandbox_and_a_directory_read_as_a_file(ext, handle):
    cases.write(ext, handle, "d/f", b"1")
    with pytest.raises(ExecError, match="not a regular file"):
        cases.read(ext, handle, "d")
    with pytest.raises(ExecError, match="is a directory"):
        cases.write(ext, handle, "d", b"x")
    ext.kill(handle.stub_id)
    with pytest.raises(ExecError, match="not running"):
        cases.read(ext, handle, "d/f")


def test_a_failed_upload_leaves_the_old_file_and_nothing_else(ext, handle):
    cases.write(ext, handle, "keep.txt", b"old")

    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError("the source broke")

    with pytest.raises(OSError, match="the source broke"):
        ext.write_file(handle, "keep.txt", Broken())
    box = Path(ext.sandbox_dir(handle))
    assert (box / "keep.txt").read_bytes() == b"old" and sorted(os.listdir(box)) == ["keep.txt"]


def test_a_files_fault_raises_as_configured(tmp_path):
    e = make(tmp_path, faults=[Fault(stage="files", error="rate_limited", rate=1.0, retry_after=3)])
    try:
        h = e.provision(ProvisionRequest(profile=Profile(slug="stub", extension=e.id), sandbox_id="sb-f"))
        with pytest.raises(RateLimited) as err:
            cases.read(e, h, "x")
        assert err.value.retry_after == 3
    finally:
        for stub_id in e.live()["live"]:
            e.kill(stub_id)


@pytest.mark.skipif(os.geteuid() != 0, reason="the per-sandbox uid exists only when the manager is root")
@needs_bwrap
def test_as_root_what_it_writes_is_the_sandboxs_own(ext, handle):
    cases.write(ext, handle, "made/by/manager.txt", b"x")
    uid = int(ext.exec(handle, ["id", "-u"]).stdout)
    box = Path(ext.sandbox_dir(handle))
    assert {os.stat(box / p).st_uid for p in ("made", "made/by", "made/by/manager.txt")} == {uid}
    res = ext.exec(handle, ["sh", "-c", "echo more >> made/by/manager.txt && rm -r made"])
    assert res.exit_code == 0, res.stderr
    with pytest.raises(SandboxFileNotFound):
        ext.list_files(handle, "made")
