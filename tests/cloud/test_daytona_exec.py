"""ext.daytona's exec: a toolbox session per command, its logs followed as they come.

Against the stand-in's toolbox, whose commands are real local processes; nothing in the SDK
is mocked.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer.errors import ExecError, InputError  # noqa: E402 - after the importorskip
from sandboxer.execution import EXEC_MARKER  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_daytona import config_dir, inputs, make_ext, sentinel, standin  # noqa: E402,F401
from tests.cloud.daytona_standin import DaytonaStandIn  # noqa: E402
from tests.cloud.procs import marked  # noqa: E402


@pytest.fixture
def ready(make_ext, standin: DaytonaStandIn):
    """A ready sandbox: (extension, handle, the stand-in's box)."""
    def make(**config):
        ext, profile = make_ext(**config)
        handle = ext.provision(request(profile, inputs("sb-exec"), None))
        ext.wait_ready(handle, timeout=10)
        return ext, handle, standin.boxes[handle.daytona_sandbox_id]

    return make


def test_exit_codes_and_the_two_streams_apart(ready, standin: DaytonaStandIn):
    ext, handle, box = ready()
    res = ext.exec(handle, ["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    assert (res.exit_code, res.stdout, res.stderr, res.timed_out, res.truncated) == (3, "hi\n", "oops\n", False, False)
    assert box.sessions == {}  # each exec's session is deleted after it


def test_env_cwd_and_stdin_arrive_verbatim(ready):
    ext, handle, box = ready()
    tricky = "it's \"quoted\" $(whoami) `id` and  spaces"
    assert ext.exec(handle, ["sh", "-c", 'printf %s "$V"'], env={"V": tricky}).stdout == tricky
    sub = box.workdir / "sub dir"
    sub.mkdir()
    assert ext.exec(handle, ["pwd"], cwd=str(sub)).stdout == f"{sub}\n"
    data = b"line one\nline two\n\x01\x02\x03 binary-ish\n"
    res = ext.exec(handle, ["cat"], stdin=data)
    assert (res.exit_code, res.stdout.encode()) == (0, data)
    assert [p.name for p in box.workdir.iterdir()] == ["sub dir"]  # the uploaded stdin is removed
    assert ext.exec(handle, ["cat"]).stdout == ""  # no stdin: cat sees end of file at once


def test_output_streams_while_the_command_runs(ready):
    ext, handle, _ = ready()
    seen: list[tuple[float, str, str]] = []
    started = time.monotonic()
    res = ext.exec(handle, ["sh", "-c", "echo first; echo err1 >&2; sleep 1.5; echo last"],
                   on_output=lambda stream, text: seen.append((time.monotonic() - started, stream, text)))
    assert res.stdout == "first\nlast\n" and res.stderr == "err1\n"
    assert "".join(t for _, s, t in seen if s == "stdout") == res.stdout
    assert "".join(t for _, s, t in seen if s == "stderr") == res.stderr
    first = next(at for at, _, text in seen if "first" in text)
    assert first < 1.2, f"the first line arrived only after {first:.2f}s: not streamed"


def test_a_command_past_its_timeout_is_124_and_leaves_nothing_running(ready):
    ext, handle, _ = ready()
    started = time.monotonic()
    res = ext.exec(handle, ["sh", "-c", "setsid sleep 300 & echo started; sleep 300"], timeout=1.5)
    assert (res.exit_code, res.timed_out, res.stdout) == (124, True, "started\n")
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 10
    while marked("DAYTONA_STANDIN_BOX", handle.daytona_sandbox_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked("DAYTONA_STANDIN_BOX", handle.daytona_sandbox_id) == []


def test_the_exec_marker_reaches_the_command(ready):
    ext, handle, _ = ready()
    out = ext.exec(handle, ["sh", "-c", f'printf %s "${EXEC_MARKER}"']).stdout
    assert len(out) == 24


def test_output_past_the_cap_is_cut_on_a_character_and_flagged(ready):
    ext, handle, _ = ready(max_output_bytes=1001)
    got: list[str] = []
    res = ext.exec(handle, ["sh", "-c", "i=0; while [ $i -lt 1000 ]; do printf 'é'; i=$((i+1)); done"],
                   on_output=lambda s, t: got.append(t))
    assert (res.exit_code, res.truncated) == (0, True)
    assert res.stdout == "é" * 500 and "".join(got) == res.stdout


def test_utf8_split_between_chunks_arrives_whole(ready):
    ext, handle, _ = ready()
    res = ext.exec(handle, ["sh", "-c", "i=0; while [ $i -lt 3000 ]; do printf 'ééééééééééééééééééééééééééé'; "
                                        "i=$((i+1)); done"])
    assert res.stdout == "é" * 27 * 3000


def test_a_bad_argv_is_refused_before_anything_runs(ready, standin: DaytonaStandIn):
    ext, handle, _ = ready()
    before = len(standin.calls)
    with pytest.raises(InputError, match=r"exec needs a non-empty argv"):
        ext.exec(handle, [])
    assert len(standin.calls) == before


def test_exec_in_a_torn_down_sandbox_is_an_exec_error(ready):
    ext, handle, _ = ready()
    ext.teardown(handle)
    with pytest.raises(ExecError, match=rf"Daytona exec of sandbox {handle.daytona_sandbox_id}"):
        ext.exec(handle, ["true"])


def test_a_log_stream_that_stays_open_after_its_command_ended_does_not_hold_the_exec(ready, standin: DaytonaStandIn):
    ext, handle, _ = ready()
    standin.logs_stay_open = True
    started = time.monotonic()
    res = ext.exec(handle, ["sh", "-c", "echo done; exit 5"], timeout=20)
    assert (res.exit_code, res.stdout, res.timed_out) == (5, "done\n", False)
    assert time.monotonic() - started < 8
