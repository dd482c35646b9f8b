"""A misbehaving extension (raise, hang, abort, exit, garbage, stray print, huge output) run out of
process: the manager survives each, cleans up what can be cleaned, and says clearly what happened."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from sandboxer.contract import Handle

from sandboxer import Manager
from sandboxer.deadline import CallLimits
from sandboxer.errors import BackendError, ExtensionCrashed, ExtensionTimeout, TeardownError
from sandboxer.host import protocol
from sandboxer.host.client import KILL_GRACE, wait_gone
from tests.host.conftest import STUB_PROCESS, STUB_PROFILE

MISBEHAVING = """
    id: ext.misbehaving
    title: Misbehaving (tests)
    version: 0.1.0
    handler: misbehaving
    capabilities:
      isolation_levels: [none]
      pricing_model: free
      features: [exec, list_owned]
"""

PROFILE = """
    slug: bad
    extension: ext.misbehaving
    ready_timeout: 5s
"""

LIMITS = CallLimits(teardown=1.5, exec=1.5, exec_grace=0.5, list_owned=5, probe=5)


@pytest.fixture
def mgr(installed_examples, cfg, host_manager) -> Manager:  # type: ignore[no-untyped-def]
    cfg.write("ext.misbehaving.yaml", MISBEHAVING)
    cfg.write("profile.bad.yaml", PROFILE)
    cfg.write("ext.stubproc.yaml", STUB_PROCESS)
    cfg.write("profile.stubproc.yaml", STUB_PROFILE)
    return host_manager(LIMITS)


def _worker(mgr: Manager):  # type: ignore[no-untyped-def]
    return mgr.extension("ext.misbehaving")


def test_the_default_runtime_of_an_entry_point_handler_is_process(mgr) -> None:
    assert mgr.catalog.extensions["ext.misbehaving"].runtime == "process"
    assert mgr.catalog.extensions["ext.local"].runtime == "in-process"


def test_a_foreign_exception_is_a_backend_error_and_the_worker_lives_on(mgr) -> None:
    sb = mgr.create(profile="bad")
    pid = _worker(mgr).pid()
    with pytest.raises(BackendError) as err:
        mgr.exec(sb.id, ["raise"])
    assert type(err.value) is BackendError
    assert str(err.value) == ("ext.misbehaving: the handler raised RuntimeError (not an error of "
                              "sandboxer.errors): the handler's own bug")
    assert mgr.exec(sb.id, ["echo", "ok"]).stdout == "echo ok\n"
    assert _worker(mgr).pid() == pid


def test_abort_is_a_crash_named_with_its_signal_and_stderr_and_the_worker_restarts(mgr) -> None:
    sb = mgr.create(profile="bad")
    ext = _worker(mgr)
    pid = ext.pid()
    with pytest.raises(ExtensionCrashed) as err:
        mgr.exec(sb.id, ["abort"])
    msg = str(err.value)
    assert msg.startswith(f"ext.misbehaving: the extension worker (pid {pid}) died of signal SIGABRT during exec; "
                          f"it will be restarted on the next call; last stderr: ")
    assert "misbehaving: about to abort" in msg
    assert msg.endswith(f"its stderr is in {ext.stderr.path}")
    assert err.value.backend == "ext.misbehaving" and err.value.log == str(ext.stderr.path)
    assert "misbehaving: about to abort" in ext.stderr.path.read_text()
    assert wait_gone(pid)
    # the next call gets a fresh worker, which finds the sandbox (its state is on disk) and tears it down
    assert mgr.exec(sb.id, ["echo", "again"], timeout=10).stdout == "echo again\n"
    assert ext.pid() not in (None, pid) and ext.restarts == 1
    assert mgr.teardown(sb.id).state.value == "terminated"
    assert not list((ext.private_dir / "boxes").glob("*.json"))


def test_exit_is_a_crash_named_with_its_status(mgr) -> None:
    sb = mgr.create(profile="bad")
    with pytest.raises(ExtensionCrashed, match=r"\) exited with status 3 during exec; it will be restarted"):
        mgr.exec(sb.id, ["exit"])


def test_a_hung_call_times_out_the_worker_is_killed_and_everything_else_goes_on(mgr) -> None:
    sb = mgr.create(profile="bad")
    other = mgr.create(profile="stubproc")
    ext = _worker(mgr)
    pid = ext.pid()
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            mgr.exec(sb.id, ["hang"])
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    t = threading.Thread(target=hang)
    start = time.monotonic()
    t.start()
    time.sleep(0.3)
    # while one call hangs, the same worker answers others (a thread per request) ...
    assert mgr.exec(sb.id, ["echo", "meanwhile"], timeout=5).stdout == "echo meanwhile\n"
    # ... and other extensions are untouched
    assert mgr.exec(other.id, ["echo", "hi"], timeout=5).stdout == "hi\n"
    t.join(LIMITS.exec + 5)
    assert not t.is_alive()
    took = time.monotonic() - start
    assert len(errors) == 1 and isinstance(errors[0], ExtensionTimeout)
    assert str(errors[0]) == (f"ext.misbehaving: exec in sandbox {sb.id} did not return within 1.5s; it was "
                              "abandoned and the manager went on")
    assert took < LIMITS.exec + 1.5
    # shortly after the manager gave up, the worker is killed
    assert wait_gone(pid, LIMITS.exec + KILL_GRACE + 5)
    assert mgr.exec(sb.id, ["echo", "after"], timeout=10).stdout == "echo after\n"
    assert ext.pid() != pid


def test_a_direct_client_call_that_hangs_raises_extension_timeout_naming_the_worker(mgr) -> None:
    sb = mgr.create(profile="bad")
    ext = _worker(mgr)
    pid = ext.pid()
    handle = Handle(sandbox_id=sb.id, hang_teardown=False)
    with pytest.raises(ExtensionTimeout) as err:
        ext.exec(handle, ["hang"])
    assert str(err.value) == (
        f"ext.misbehaving: exec did not answer within {LIMITS.exec + KILL_GRACE:g}s; the worker (pid {pid}) was "
        f"killed and will be restarted on the next call; its stderr is in {ext.stderr.path}")
    assert wait_gone(pid)


def test_a_hung_teardown_fails_that_teardown_only(mgr) -> None:
    hung = mgr.create(profile="bad", inputs={"hang_teardown": True})
    fine = mgr.create(profile="bad")
    pid = _worker(mgr).pid()
    with pytest.raises(TeardownError, match=rf"^teardown of sandbox {hung.id} on ext\.misbehaving failed: "
                                            rf"ext\.misbehaving: teardown of sandbox {hung.id} did not return "
                                            r"within 1\.5s; it was abandoned and the manager went on$"):
        mgr.teardown(hung.id)
    assert mgr.get(hung.id).state.value == "teardown_failed"
    assert mgr.teardown(fine.id).state.value == "terminated"
    assert wait_gone(pid, KILL_GRACE + 5)


def test_garbage_on_the_protocol_stream_is_a_crash_and_the_worker_is_killed(mgr) -> None:
    sb = mgr.create(profile="bad")
    ext = _worker(mgr)
    pid = ext.pid()
    with pytest.raises(ExtensionCrashed) as err:
        mgr.exec(sb.id, ["garbage"], timeout=10)  # a long deadline: the crash, not a timeout, must end it
    assert re.search(r"the extension worker \(pid \d+\) wrote a line that is not the extension-host protocol "
                     r"\(not JSON \(.*\): b'this is not json\\n'\) during exec", str(err.value)), str(err.value)
    assert wait_gone(pid)
    assert mgr.exec(sb.id, ["echo", "x"], timeout=10).exit_code == 0


def test_a_stray_print_goes_to_the_stderr_log_not_the_protocol(mgr) -> None:
    sb = mgr.create(profile="bad")
    ext = _worker(mgr)
    pid = ext.pid()
    assert mgr.exec(sb.id, ["print"]).stdout == "printed\n"
    assert ext.pid() == pid
    deadline = time.monotonic() + 5
    while "stray output from the handler" not in ext.stderr.tail() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "stray output from the handler" in ext.stderr.path.read_text()


def test_huge_output_streams_whole_and_an_over_limit_result_is_refused(mgr, monkeypatch) -> None:
    sb = mgr.create(profile="bad")
    got: list[int] = []
    res = mgr.exec(sb.id, ["huge", "8"], timeout=30, on_output=lambda s, t: got.append(len(t)))
    assert res.stdout == "é" * (8 * 512 * 1024) and sum(got) == 8 * 512 * 1024
    pid = _worker(mgr).pid()
    # a result over the protocol's line limit is refused by the worker, which stays up
    with pytest.raises(BackendError, match=r"^ext\.misbehaving: the result of exec is \d+ bytes as JSON, over the "
                                           r"extension-host protocol's limit of 67108864; the result was dropped$"):
        mgr.exec(sb.id, ["huge", "65", "ascii"], timeout=60)
    assert _worker(mgr).pid() == pid


def test_the_stderr_ring_is_bounded(mgr) -> None:
    ext = _worker(mgr)
    for _ in range(200):
        ext.stderr.add(b"x" * 1000)
    assert sum(map(len, ext.stderr._ring)) <= 64 * 1024 + 1000
    assert protocol.ABI_VERSION == 2


def test_the_stderr_log_file_is_rotated_at_its_bound(tmp_path, monkeypatch) -> None:
    from sandboxer.host import client

    monkeypatch.setattr(client, "STDERR_LOG_MAX", 10_000)
    log = client.StderrLog(tmp_path / "worker.log")
    for i in range(30):
        log.add(f"line {i:04d} ".encode() * 100)  # 1 KB each
    assert log.path.stat().st_size <= 10_000
    assert (tmp_path / "worker.log.1").stat().st_size <= 10_000
    assert log.path.read_text().endswith("line 0029 ")
    assert not list(tmp_path.glob("worker.log.2"))
