"""ext.modal's feature ``files`` against the Modal stand-in, driven by the unmodified SDK's
``Sandbox.filesystem`` (Modal's file tool exec'd over the task command router: the stand-in's
tool is tests/cloud/modal_fs_tools.py, over the sandbox's directory)."""

from __future__ import annotations

import json

import pytest

from tests.cloud.test_modal import (  # noqa: F401 - fixtures
    SENTINEL,
    backend,
    inputs,
    load,
    standin,
    tokens,
    write_config,
)

from grpclib import Status  # noqa: E402
from modal_proto import api_pb2  # noqa: E402

from sandboxer.errors import AuthError, ExecError, SandboxFileNotFound  # noqa: E402
from sandboxer.extensions.base import check_features  # noqa: E402
from sandboxer.loader import load_catalog  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.support import files_cases as cases  # noqa: E402
from tests.cloud.modal_standin import FS_TOOLS  # noqa: E402
from tests.support.leaks import caught, reachable_text  # noqa: E402


@pytest.fixture
def box(backend):
    ext, profile = backend
    with cases.ready(ext, request(profile, inputs("sbx-files"), None)) as made:
        yield made


def tool_calls(standin) -> list[str]:
    return [next(iter(json.loads(r.command_args[1]))) for r in standin.called("TaskExecStart")
            if list(r.command_args[:1]) == [FS_TOOLS]]


def test_declared_and_implemented(box):
    ext, _ = box
    assert "files" in ext.features
    assert check_features(type(ext), ["files"]) is None
    builtin = load_catalog([]).extensions["ext.modal"]
    assert "files" in builtin.manifest.capabilities.features


def test_bytes_listing_modes_relative_and_bad_paths(box, standin):
    ext, handle = box
    cases.everyday(ext, handle)
    sb = standin.sandboxes[handle.object_id]
    assert (sb.root / "bin" / "data.bin").read_bytes() == b"short"
    assert {"WriteFile", "ReadFile", "Stat", "ListFiles"} <= set(tool_calls(standin))
    assert standin.called("TaskExecStdinWriteStream")  # the upload went through the SDK's stdin stream


def test_twenty_mib_round_trip_is_streamed(box, standin):
    ext, handle = box
    cases.large_round_trip(ext, handle)


def test_remove_and_missing_paths(box, standin):
    ext, handle = box
    cases.removal(ext, handle, handle.object_id)
    assert not (standin.sandboxes[handle.object_id].root / "rm" / "tree").exists()
    assert "Remove" in tool_calls(standin)


def test_concurrent_transfers(box):
    ext, handle = box
    cases.concurrent(ext, handle)


def test_relative_path_is_taken_from_the_profile_workdir(tmp_path, standin, tokens):
    cfg = write_config(tmp_path / "cfg", standin.url)
    prof = cfg / "profiles" / "profile.test-modal.yaml"
    prof.write_text(prof.read_text() + "  workdir: /work/dir\n")
    ext, profile = load(cfg)
    handle = ext.provision(request(profile, inputs("sbx-wd"), None))
    ext.wait_ready(handle, timeout=10)
    try:
        assert handle.workdir == "/work/dir"
        cases.write(ext, handle, "in-wd.txt", b"here")
        assert (standin.sandboxes[handle.object_id].root / "work" / "dir" / "in-wd.txt").read_bytes() == b"here"
        assert ext.exec(handle, ["cat", "in-wd.txt"], cwd="/work/dir").stdout == "here"
        [entry] = ext.list_files(handle, "in-wd.txt")
        assert entry.path == "/work/dir/in-wd.txt"
        assert "pwd" not in [list(r.command_args)[0] for r in standin.called("TaskExecStart")]
    finally:
        ext.teardown(handle)


def test_a_directory_is_not_read_and_a_gone_sandbox_is_no_missing_file(box, standin):
    ext, handle = box
    cases.write(ext, handle, "d/f", b"1")
    with pytest.raises(ExecError) as err:
        cases.read(ext, handle, "/d")
    assert not isinstance(err.value, SandboxFileNotFound)
    standin.kill(handle.object_id)
    with pytest.raises(ExecError) as err:
        cases.read(ext, handle, "/d/f")
    assert not isinstance(err.value, SandboxFileNotFound)
    assert SENTINEL not in str(err.value)


def test_a_symlink_out_of_the_sandbox_is_not_followed_by_the_stand_in(box, standin, tmp_path):
    ext, handle = box
    cases.symlink_out_of_the_box(ext, handle, standin.sandboxes[handle.object_id].root, tmp_path / "host", "/")


def test_a_refused_token_is_auth_error_and_a_throttled_tool_exec_is_exec_error(box, standin, tmp_path, monkeypatch):
    """The token is checked on the control plane before the tool runs: AuthError naming the pair. A
    RESOURCE_EXHAUSTED on the tool's own exec, though, the SDK's Sandbox.filesystem replaces with a
    bare SandboxFilesystemError ("an unexpected error occurred"), so it can only be ExecError here."""
    ext, handle = box
    cases.write(ext, handle, "/a", b"1")
    standin.fail_next("TaskExecStart", Status.RESOURCE_EXHAUSTED, f"slow down {SENTINEL}",
                      details=[api_pb2.RPCRetryPolicy(retry_after_secs=30)])
    err = caught(lambda: cases.read(ext, handle, "/a"))
    assert isinstance(err, ExecError) and SENTINEL not in reachable_text(err)
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_SECRET", "as-revoked")
    refused, _ = load(write_config(tmp_path / "cfg2", standin.url))
    err = caught(lambda: cases.read(refused, handle, "/a"))
    assert isinstance(err, AuthError) and "SBX_TEST_MODAL_TOKEN_SECRET" in str(err)
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_SECRET", SENTINEL)  # the fixture's teardown uses it
