"""exec: options before ``--``, the command after it, stdin forwarded, Ctrl-C stops the command in the sandbox."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest


@pytest.fixture
def local_sb(sbx):
    sb = json.loads(sbx("create", "local", "--name", "box", "--quiet", "--json", check=0).stdout)
    yield sb
    sbx("teardown", sb["id"], check=0)


def test_stdin_is_forwarded_when_it_is_not_a_terminal(sbx, local_sb):
    assert sbx("exec", local_sb["id"], "--", "cat", input="x\ny\n", check=0).stdout == "x\ny\n"
    assert sbx("exec", local_sb["id"], "--", "wc", "-c", input="hello", check=0).stdout.strip() == "5"
    # --no-stdin: the command reads EOF
    assert sbx("exec", "--no-stdin", local_sb["id"], "--", "cat", input="unread", check=0).stdout == ""


def test_options_go_before_the_double_dash(sbx, local_sb):
    sid = local_sb["id"]
    assert sbx("exec", "--timeout", "30s", sid, "--", "echo", "a", check=0).stdout == "a\n"
    assert sbx("exec", sid, "--timeout", "1h30m", "--", "echo", "b", check=0).stdout == "b\n"
    # everything after -- is the command's, flags that look like ours included
    assert sbx("exec", sid, "--", "echo", "--no-stdin", "--json", check=0).stdout == "--no-stdin --json\n"
    # without --, the command starts at its first word
    assert sbx("exec", sid, "sh", "-c", "echo $0 $1", "x", "--timeout", check=0).stdout == "x --timeout\n"


def test_a_trailing_timeout_after_the_double_dash_is_refused(sbx, local_sb):
    """The README's old `exec ID -- CMD --timeout 30s`: the only thing after -- refused, with the fix."""
    p = sbx("exec", local_sb["id"], "--", "sleep", "1", "--timeout", "30s", check=64)
    assert p.stderr == ("error: --timeout 30s after '--' would go to the command: sand-boxer's options go before "
                        "'--' (sandboxer exec --timeout 30s ID -- CMD); if the command itself takes it, write "
                        "--timeout=30s (see `sandboxer exec --help`)\n")
    # the joined form, or a value that is no duration, is the command's
    assert sbx("exec", local_sb["id"], "--", "echo", "--timeout=30s", check=0).stdout == "--timeout=30s\n"
    assert sbx("exec", local_sb["id"], "--", "echo", "--timeout", "never", check=0).stdout == "--timeout never\n"
    assert "no command to run" in sbx("exec", local_sb["id"], "--", check=64).stderr


def test_exec_status_and_teardown_take_a_name(sbx):
    sb = json.loads(sbx("create", "local", "--name", "named-one", "--quiet", "--json", check=0).stdout)
    assert sbx("exec", "named-one", "--", "echo", "hi", check=0).stdout == "hi\n"
    assert json.loads(sbx("status", "named-one", "--json", check=0).stdout)["id"] == sb["id"]
    assert sbx("status", "named-one", check=0).stdout.splitlines()[:2] == [f"id:           {sb['id']}",
                                                                          "name:         named-one"]
    assert json.loads(sbx("teardown", "named-one", "--json", check=0).stdout)["state"] == "terminated"
    # a name still finds its sandbox once it is gone
    assert json.loads(sbx("status", "named-one", "--json", check=0).stdout)["state"] == "terminated"


def _pids(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def interrupt_exec(sbx, sid: str, tag: str) -> subprocess.Popen:
    """Start an exec whose command leaves a child and a setsid grandchild, Ctrl-C it once they run."""
    script = f"sleep 3{tag} & setsid sleep 4{tag} & echo started; wait"
    p = sbx.spawn("exec", sid, "--", "sh", "-c", script)
    assert p.stdout.readline() == "started\n"
    deadline = time.monotonic() + 20
    while len(_pids(f"^sleep [34]{tag}$")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_pids(f"^sleep [34]{tag}$")) == 2
    p.send_signal(signal.SIGINT)
    return p


def test_ctrl_c_during_exec_stops_the_command_in_the_sandbox_and_exits_130(sbx, local_sb):
    tag = str(time.monotonic_ns())[-9:]
    p = interrupt_exec(sbx, local_sb["id"], tag)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "error: interrupted\n", (p.returncode, out, err)
    assert _pids(f"^sleep [34]{tag}$") == []  # the command, its child and the setsid one: all gone
    assert sbx("exec", local_sb["id"], "--", "echo", "still ready", check=0).stdout == "still ready\n"
