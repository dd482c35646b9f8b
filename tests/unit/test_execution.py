"""The one exec convention (sandboxer/execution.py): argv checks, whole UTF-8 characters across
chunks, the output cap and its flag, exit 124 at the deadline; and the CLI's ``exec`` through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: Multi-byte characters of every UTF-8 length: 2 (é), 3 (€, 漢), 4 (emoji).
MIXED = "é€漢😀"

#: A POSIX sh script (dash, busybox) that writes é, € and 😀 each split across writes with pauses
#: between, so the reader gets them in separate chunks whatever the transport; and € on stderr.
SPLIT_SCRIPT = ("printf '\\303'; sleep 0.2; printf '\\251\\342\\202'; sleep 0.2; printf '\\254\\360\\237';"
                " sleep 0.2; printf '\\230\\200\\n'; printf '\\342' >&2; sleep 0.2; printf '\\202\\254' >&2")
SPLIT_STDOUT, SPLIT_STDERR = "é€😀\n", "€"


def check_split(run) -> None:
    """Run :data:`SPLIT_SCRIPT` with ``run(argv, on_output)`` and check every character arrived whole."""
    seen: list[tuple[str, str]] = []
    res = run(["sh", "-c", SPLIT_SCRIPT], lambda stream, text: seen.append((stream, text)))
    assert (res.exit_code, res.stdout, res.stderr) == (0, SPLIT_STDOUT, SPLIT_STDERR), res
    assert "".join(t for s, t in seen if s == "stdout") == SPLIT_STDOUT
    assert "".join(t for s, t in seen if s == "stderr") == SPLIT_STDERR
    assert not any("\ufffd" in t for _, t in seen), seen


@pytest.fixture
def sbx(home, cfg):
    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}

    def run(*args, check=None):
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, env=env, timeout=120)
        if check is not None:
            assert p.returncode == check, (p.returncode, p.stdout[-300:], p.stderr[-300:])
        return p

    return run


def test_cli_exec_streams_multibyte_characters_whole(sbx):
    sb = json.loads(sbx("create", "local", "--json", check=0).stdout)
    try:
        script = ("import sys; sys.stdout.write('é' * 200000); sys.stdout.flush(); "
                  f"sys.stderr.write({MIXED!r} * 50000)")
        p = sbx("exec", sb["id"], "--", "python3", "-c", script, check=0)
        out, err = p.stdout.decode("utf-8"), p.stderr.decode("utf-8")
        assert "\ufffd" not in out and "\ufffd" not in err
        assert out == "é" * 200000
        assert err == MIXED * 50000
    finally:
        sbx("teardown", sb["id"], check=0)


def test_cli_exec_says_on_stderr_that_output_was_cut(sbx, cfg):
    cfg.write("ext.local.yaml", "id: ext.local\noverride: config\nconfig: {max_output_bytes: 1000}\n")
    sb = json.loads(sbx("create", "local", "--json", check=0).stdout)
    try:
        # 3-byte characters: the cap (1000) falls inside one; the cut is on a character boundary.
        p = sbx("exec", sb["id"], "--", "python3", "-c", "print('€' * 5000, end=''); print('done', flush=True)",
                check=0)
        assert p.stdout.decode("utf-8") == "€" * 333
        assert p.stderr.decode("utf-8") == (
            "warning: output was cut at the backend's output cap (the rest was not kept or shown);"
            " write large output to a file in the sandbox instead\n")
    finally:
        sbx("teardown", sb["id"], check=0)


# ------------------------------------------------------------------ the collector itself

from sandboxer.errors import InputError  # noqa: E402
from sandboxer.execution import TIMEOUT_EXIT_CODE, OutputCollector, check_argv  # noqa: E402


def every_split(data: bytes):
    """``data`` cut into one-byte chunks: every character is split wherever it can be."""
    return [data[i:i + 1] for i in range(len(data))]


def test_a_character_split_across_chunks_arrives_whole_in_stream_and_result():
    seen: list[tuple[str, str]] = []
    col = OutputCollector(lambda s, t: seen.append((s, t)))
    for chunk in every_split(MIXED.encode() * 3):
        col.feed("stdout", chunk)
    for chunk in every_split("😀é".encode()):
        col.feed("stderr", chunk)
    res = col.result(0)
    assert res.stdout == MIXED * 3 and res.stderr == "😀é"
    assert "".join(t for s, t in seen if s == "stdout") == MIXED * 3
    assert all(t and "\ufffd" not in t for _, t in seen)  # whole characters, never a piece
    assert (res.exit_code, res.timed_out, res.truncated) == (0, False, False)


def test_invalid_bytes_become_one_replacement_each():
    col = OutputCollector()
    for chunk in (b"a\xff", b"b\xe2\x82", b"c", b"\xf0\x9f"):  # a stray byte; a cut-off €; an unfinished emoji
        col.feed("stdout", chunk)
    assert col.result(1).stdout == "a\ufffdb\ufffdc\ufffd"


def test_the_cap_cuts_on_a_character_boundary_and_says_so():
    seen: list[str] = []
    col = OutputCollector(lambda s, t: seen.append(t), cap=10)
    for chunk in every_split(("€" * 5).encode()):  # 15 bytes; 10 holds three whole € (9 bytes)
        col.feed("stdout", chunk)
    col.feed("stdout", b"more")
    col.feed("stderr", b"ok")
    res = col.result(0)
    assert res.stdout == "€€€" and "".join(seen) == "€€€ok" and res.stderr == "ok"
    assert res.truncated and col.cut_bytes("stdout") == 6 + 4 and col.cut_bytes("stderr") == 0


def test_feed_text_is_capped_the_same_way():
    col = OutputCollector(cap=5)
    col.feed_text("stderr", "ab")
    col.feed_text("stderr", "é€")  # 2 + 3 bytes: é fits (4 bytes), € does not
    res = col.result(0)
    assert res.stderr == "abé" and res.truncated


def test_a_command_killed_at_its_deadline_is_exit_124():
    col = OutputCollector()
    col.feed("stdout", b"started\n\xc3")
    res = col.result(None, timed_out=True)
    assert (res.exit_code, res.timed_out, res.stdout) == (TIMEOUT_EXIT_CODE, True, "started\n\ufffd")
    assert TIMEOUT_EXIT_CODE == 124


@pytest.mark.parametrize("argv, message", [
    ([], "ext.x: exec needs a non-empty argv: the command to run, then its arguments"),
    ("ls -l", "ext.x: exec needs argv as a list of strings, got str 'ls -l'"),
    (["ls", 3], "ext.x: exec argv[1] must be a string, got int 3"),
    (["echo", "a\0b"], "ext.x: exec argv[1] 'a\\x00b' holds a NUL byte, which no command can receive"),
])
def test_argv_is_checked_before_anything_runs(argv, message):
    with pytest.raises(InputError) as exc:
        check_argv(argv, backend="ext.x")
    assert str(exc.value) == message


def test_argv_check_returns_a_copy():
    argv = ("echo", "hi")
    assert check_argv(argv) == ["echo", "hi"]
