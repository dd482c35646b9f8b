"""ext.e2b's feature ``files`` against the stand-in's envd (``/files`` and the filesystem RPC),
driven by the unmodified e2b SDK's ``Sandbox.files``."""

from __future__ import annotations

import pytest

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer.errors import AuthError, ExecError, RateLimited, SandboxFileNotFound  # noqa: E402
from sandboxer.extensions.base import check_features  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.support import files_cases as cases  # noqa: E402
from tests.cloud.conftest_e2b import config_dir, inputs, make_ext, sentinel, standin  # noqa: E402,F401
from tests.cloud.e2b_standin import E2BStandIn  # noqa: E402


@pytest.fixture
def box(make_ext):
    ext, profile = make_ext()
    with cases.ready(ext, request(profile, inputs("sbx-files"), None)) as made:
        yield made


def test_declared_and_implemented(box):
    ext, _ = box
    assert "files" in ext.features and "files" in ext.manifest.capabilities.features
    assert check_features(type(ext), ["files"]) is None


def test_bytes_listing_modes_relative_and_bad_paths(box, standin: E2BStandIn):
    ext, handle = box
    cases.everyday(ext, handle)
    # the bytes are really in the box's filesystem, where its commands see them
    assert (standin.boxes[handle.e2b_sandbox_id].workdir / "bin" / "data.bin").read_bytes() == b"short"
    routes = {c["path"] for c in standin.calls if c["plane"] == "envd"}
    assert {"/files", "/filesystem.Filesystem/Stat", "/filesystem.Filesystem/ListDir"} <= routes
    uploads = [c for c in standin.calls if c["path"] == "/files" and c["method"] == "POST"]
    assert all(c["headers"]["content-type"] == "application/octet-stream" for c in uploads)


def test_twenty_mib_round_trip_is_streamed(box, standin: E2BStandIn):
    ext, handle = box
    cases.large_round_trip(ext, handle)
    upload = [c for c in standin.calls if c["path"] == "/files" and c["method"] == "POST"][-1]
    assert upload["headers"].get("transfer-encoding") == "chunked"  # streamed, not sized up front in memory


def test_remove_and_missing_paths(box, standin: E2BStandIn):
    ext, handle = box
    cases.removal(ext, handle, handle.e2b_sandbox_id)
    assert not (standin.boxes[handle.e2b_sandbox_id].workdir / "rm" / "tree").exists()


def test_concurrent_transfers(box):
    ext, handle = box
    cases.concurrent(ext, handle)


def test_relative_path_is_taken_from_the_profile_cwd(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    profile = profile.model_copy(update={"options": {**profile.options, "cwd": "/work/dir"}})
    handle = ext.provision(request(profile, inputs("sbx-cwd"), None))
    ext.wait_ready(handle, timeout=10)
    try:
        cases.write(ext, handle, "in-cwd.txt", b"here")
        root = standin.boxes[handle.e2b_sandbox_id].workdir
        assert (root / "work" / "dir" / "in-cwd.txt").read_bytes() == b"here"
        assert ext.exec(handle, ["cat", "in-cwd.txt"]).stdout == "here"
        [entry] = ext.list_files(handle, "in-cwd.txt")
        assert entry.path == "/work/dir/in-cwd.txt"
    finally:
        ext.teardown(handle)


def test_a_directory_is_not_read_and_a_gone_sandbox_is_no_missing_file(box, standin: E2BStandIn):
    ext, handle = box
    cases.write(ext, handle, "d/f", b"1")
    with pytest.raises(ExecError, match="is a directory"):
        cases.read(ext, handle, "d")
    standin.boxes[handle.e2b_sandbox_id].state = "killed"
    with pytest.raises(ExecError) as err:
        cases.read(ext, handle, "d/f")
    assert not isinstance(err.value, SandboxFileNotFound)


def test_rate_limit_and_refused_key_map_as_the_other_verbs_do(box, standin: E2BStandIn, sentinel: str):
    ext, handle = box
    standin.fail("GET", r"/files", 429, "slow down")
    with pytest.raises(RateLimited):
        cases.read(ext, handle, "anything")
    standin.fail("POST", r"/v2/sandboxes/[^/]+/connect", 401, "bad key", echo_key=True)
    with pytest.raises(AuthError) as err:
        cases.write(ext, handle, "x", b"1")
    assert sentinel not in str(err.value) and err.value.__cause__ is None and err.value.__context__ is None


def test_a_symlink_out_of_the_box_is_not_followed_by_the_stand_in(box, standin: E2BStandIn, tmp_path):
    ext, handle = box
    cases.symlink_out_of_the_box(ext, handle, standin.boxes[handle.e2b_sandbox_id].workdir, tmp_path / "host")
