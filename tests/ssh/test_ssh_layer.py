"""sandboxer.ssh against real sshd servers: host keys, auth, deadlines, quoting, reuse, forwards."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from sandboxer.errors import AuthError, ExecError, HostKeyError, InputError, ProvisionError
from sandboxer.ssh import (
    STATS,
    LocalForward,
    SSHConnection,
    SSHHostConfig,
    build_command,
    env_script,
    local_ports_free,
)
from sandboxer.workspace import (
    GIT_CLONE_SCRIPT,
    check_ref,
    check_repo,
    check_root,
)
from tests.support.docker_fixtures import wait_gone
from tests.support.sshd import SSHD, user_key


def cfg_for(server: SSHD, known_hosts: Path | None, **extra: object) -> SSHHostConfig:
    return SSHHostConfig(**server.host_config(known_hosts, **extra))


def test_run_delivers_env_and_stdin_literally(sshd_pool, known_hosts, marker):
    hostile = {"A": f"$(touch {marker})", "B": "it's \"quoted\" `touch " + str(marker) + "`", "C": "line1\nline2\n"}
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        res = conn.run(["sh", "-c", 'printf "%s|%s|%s" "$A" "$B" "$C"; cat'], env=hostile, stdin=b"in;put $(x)")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{hostile['A']}|{hostile['B']}|{hostile['C']}in;put $(x)"


def test_argv_words_are_never_interpreted(sshd_pool, known_hosts, marker):
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        res = conn.run(["echo", f"a;touch {marker}", f"$(touch {marker})", "'\"", "\n"], cwd="/")
    assert res.stdout == f"a;touch {marker} $(touch {marker}) '\" \n\n"


def test_secret_env_values_are_not_on_the_command_line():
    cmd = build_command(["printenv", "TOKEN"], cwd="/tmp", env_bytes=40, timeout=5)
    assert "hunter2" not in cmd and cmd.startswith("cd /tmp && eval")


def test_one_connection_for_many_commands(sshd_pool, known_hosts):
    STATS.reset()
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        for _ in range(5):
            assert conn.run(["true"]).exit_code == 0
    assert STATS.snapshot() == {"connections": 1, "round_trips": 5}


def test_host_key_mismatch_is_refused_before_anything_runs(sshd_pool, tmp_path, marker):
    wrong = tmp_path / "known_hosts"
    # host 0's address and port, but host 1's key
    wrong.write_text(f"[127.0.0.1]:{sshd_pool[0].port} {sshd_pool[1].host_pub}\n")
    conn = SSHConnection(cfg_for(sshd_pool[0], wrong))
    with pytest.raises(HostKeyError, match="does not match the known key"):
        conn.open()
    assert not conn.alive


def test_unknown_host_key_is_refused_unless_pinned_or_insecure_opt_in(sshd_pool, tmp_path, caplog):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="not in .* no fingerprint is pinned"):
        SSHConnection(cfg_for(sshd_pool[0], empty)).open()
    with pytest.raises(HostKeyError, match="not the pinned"):
        SSHConnection(cfg_for(sshd_pool[0], empty, host_key_fingerprint=sshd_pool[1].fingerprint)).open()
    with SSHConnection(cfg_for(sshd_pool[0], empty, host_key_fingerprint=sshd_pool[0].fingerprint)) as conn:
        assert conn.run(["true"]).exit_code == 0
    with SSHConnection(cfg_for(sshd_pool[0], empty, insecure_accept_unknown_host_keys=True)) as conn:
        assert conn.run(["true"]).exit_code == 0
    assert "INSECURE" in caplog.text


def test_missing_known_hosts_file_is_a_host_key_error(sshd_pool, tmp_path):
    with pytest.raises(HostKeyError, match="does not exist"):
        SSHConnection(cfg_for(sshd_pool[0], tmp_path / "nope")).open()


def test_passwords_are_refused_in_config(sshd_pool, known_hosts):
    with pytest.raises(ValidationError, match="passwords are not accepted"):
        SSHHostConfig(**sshd_pool[0].host_config(known_hosts, password="hunter2"))


def test_a_key_the_server_does_not_know_is_an_auth_error(sshd_pool, known_hosts, tmp_path):
    stranger = user_key(tmp_path / "stranger")
    with pytest.raises(AuthError, match="refused") as info:
        SSHConnection(cfg_for(sshd_pool[0], known_hosts, key_file=str(stranger))).open()
    assert "PRIVATE KEY" not in str(info.value)


def test_an_encrypted_key_without_its_passphrase_says_to_set_it(sshd_pool, known_hosts, tmp_path, monkeypatch):
    import shutil
    import subprocess

    locked = tmp_path / "locked"
    shutil.copy(sshd_pool[0].user_key, locked)
    locked.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "sesame-42", "-f", str(locked)], check=True,
                   timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
    with pytest.raises(AuthError, match=f"key file {locked} is encrypted; set key_passphrase") as info:
        SSHConnection(cfg_for(sshd_pool[0], known_hosts, key_file=str(locked))).open()
    assert info.value.__cause__ is None and info.value.__context__ is None
    cfg = cfg_for(sshd_pool[0], known_hosts, key_file=str(locked), key_passphrase={"env": "SBX_TEST_KEY_PASS"})
    monkeypatch.setenv("SBX_TEST_KEY_PASS", "wrong-one")
    with pytest.raises(AuthError, match=r"cannot be loaded with key_passphrase \(SecretRef\(environment variable "
                                        r"SBX_TEST_KEY_PASS\)\): a wrong passphrase") as info:
        SSHConnection(cfg).open()
    assert "wrong-one" not in str(info.value)
    monkeypatch.setenv("SBX_TEST_KEY_PASS", "sesame-42")
    with SSHConnection(cfg) as conn:
        assert conn.run(["true"]).exit_code == 0


@pytest.mark.parametrize("case", ["refused-key", "unreachable"])
def test_no_paramiko_or_socket_exception_rides_on_our_error(sshd_pool, known_hosts, tmp_path, case):
    """Translated outside the except block (contract.translated): neither __cause__ nor __context__."""
    if case == "refused-key":
        cfg = cfg_for(sshd_pool[0], known_hosts, key_file=str(user_key(tmp_path / "stranger")))
        want: type[Exception] = AuthError
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = SSHHostConfig(address="127.0.0.1", port=port, user="u", connect_timeout=2,
                            insecure_accept_unknown_host_keys=True)
        want = ProvisionError
    with pytest.raises(want) as info:
        SSHConnection(cfg).open()
    assert info.value.__cause__ is None and info.value.__context__ is None, (
        info.value.__cause__, info.value.__context__)


def test_unreachable_host_fails_within_its_budget(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = SSHHostConfig(address="127.0.0.1", port=port, user="u", connect_timeout=2, known_hosts=str(tmp_path / "k"),
                        insecure_accept_unknown_host_keys=True)
    start = time.monotonic()
    with pytest.raises(ProvisionError) as info:
        SSHConnection(cfg).open()
    assert info.value.transient and time.monotonic() - start < 3


def test_silent_host_fails_at_the_banner_deadline():
    """A host that accepts TCP but never speaks SSH must not hang the caller."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    cfg = SSHHostConfig(address="127.0.0.1", port=srv.getsockname()[1], user="u", connect_timeout=1,
                        banner_timeout=1, auth_timeout=1, insecure_accept_unknown_host_keys=True)
    start = time.monotonic()
    try:
        with pytest.raises(ProvisionError) as info:
            SSHConnection(cfg).open()
        assert info.value.transient and time.monotonic() - start < 4
    finally:
        stop.set()
        t.join(2)
        srv.close()
        for c in held:
            c.close()


def test_hung_command_is_killed_at_its_deadline(sshd_pool, known_hosts, tmp_path):
    pidfile = tmp_path / "pid"
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        start = time.monotonic()
        res = conn.run(["sh", "-c", 'echo $$ > "$1"; sleep 300 & wait', "sh", str(pidfile)], timeout=1)
        took = time.monotonic() - start
        assert res.timed_out and res.exit_code == 124 and took < 5
        with pytest.raises(ExecError, match="timed out"):
            conn.run(["sleep", "300"], timeout=0.5, check=True)
        assert conn.run(["true"]).exit_code == 0  # the connection survives
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 3
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the remote process outlived its deadline"


@pytest.mark.parametrize("script", ['trap "" TERM; sleep 60', "setsid sleep 60 & sleep 60",
                                    "(setsid sleep 60 &); sleep 60"],
                         ids=["ignores-TERM", "setsid-child", "setsid-orphan"])
def test_deadline_kills_every_process_of_the_command(sshd_pool, known_hosts, script):
    """A command that ignores SIGTERM, or leaves its session, is still gone at its deadline: exit 124, timed out."""
    mark = uuid.uuid4().hex
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        start = time.monotonic()
        res = conn.run(["sh", "-c", script], env={"SBX_TEST_MARK": mark}, timeout=1)
        took = time.monotonic() - start
    assert (res.exit_code, res.timed_out) == (124, True), res
    assert took < 6
    assert wait_gone("SBX_TEST_MARK", mark) == [], "a process of the command outlived its deadline"


def test_a_command_exiting_124_by_itself_is_not_a_timeout(sshd_pool, known_hosts):
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        res = conn.run(["sh", "-c", "exit 124"], timeout=5)
    assert (res.exit_code, res.timed_out) == (124, False)


def test_a_background_process_outlives_a_command_that_ends_in_time(sshd_pool, known_hosts, tmp_path):
    """Only a command killed at its deadline is swept; a daemon it started and left running stays."""
    mark = uuid.uuid4().hex
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        res = conn.run(["sh", "-c", "setsid sleep 30 >/dev/null 2>&1 < /dev/null & echo ok"],
                       env={"SBX_TEST_MARK": mark}, timeout=5)
    assert res.stdout == "ok\n" and not res.timed_out
    try:
        time.sleep(0.5)
        from tests.support.docker_fixtures import pids_with_env

        assert pids_with_env("SBX_TEST_MARK", mark), "the background process was killed"
    finally:
        for pid in pids_with_env("SBX_TEST_MARK", mark):
            os.kill(pid, 9)


def test_deadline_wrapper_works_with_busybox(busybox_image):
    """Hosts with busybox instead of GNU tools (its grep stops at a NUL, its kill has no -SIG --)."""
    import subprocess

    from sandboxer.ssh import DEADLINE_WRAPPER

    cid = subprocess.run(["docker", "run", "-d", "--rm", "--init", busybox_image, "sleep", "120"], check=True,
                         capture_output=True, text=True, timeout=60).stdout.strip()
    try:
        start = time.monotonic()
        res = subprocess.run(["docker", "exec", cid, "sh", "-c", DEADLINE_WRAPPER, "sh", "tok1", "1", "2",
                              "sh", "-c", "trap '' TERM; (setsid sleep 61 &); setsid sleep 62 & sleep 63"],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 124 and time.monotonic() - start < 6, res.stderr
        ps = subprocess.run(["docker", "exec", cid, "ps"], capture_output=True, text=True, timeout=30).stdout
        assert "sleep 6" not in ps, ps
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)


def test_output_is_capped(sshd_pool, known_hosts):
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts, output_cap_bytes=1000)) as conn:
        res = conn.run(["head", "-c", "500000", "/dev/zero"])
    assert res.exit_code == 0 and res.stdout == "\0" * 1000 and res.truncated


def test_a_character_split_across_packets_arrives_whole(sshd_pool, known_hosts):
    from tests.unit.test_execution import check_split

    with SSHConnection(cfg_for(sshd_pool[0], known_hosts, output_cap_bytes=1000)) as conn:
        check_split(lambda argv, on_output: conn.run(argv, on_output=on_output))
        # the cap falls inside a 3-byte character: the cut is before it, and flagged
        res = conn.run(["sh", "-c", "i=0; while [ $i -lt 400 ]; do printf '\\342\\202\\254'; i=$((i+1)); done"])
        assert (res.exit_code, res.stdout, res.truncated) == (0, "€" * 333, True)
        assert not conn.run(["echo", "é"]).truncated
        with pytest.raises(InputError, match=r"argv\[1\] 'a\\x00b' holds a NUL byte"):
            conn.run(["echo", "a\0b"])


def test_remote_git_refuses_ext_transport_even_if_validation_were_bypassed(sshd_pool, known_hosts, tmp_path, marker):
    with SSHConnection(cfg_for(sshd_pool[0], known_hosts)) as conn:
        for repo in (f"ext::sh -c touch% {marker}", f"--upload-pack=touch {marker}"):
            res = conn.run(["sh", "-c", GIT_CLONE_SCRIPT + 'git_clone "$1" "$2" ""', "sh", repo,
                            str(tmp_path / "clone")])
            assert res.exit_code != 0


@pytest.mark.parametrize("repo", ["--upload-pack=touch /tmp/x", "ext::sh -c touch% /tmp/x", "fd::3",
                                  "file:///etc", "http://example.com/x.git", "relative/path", "/a/../../etc",
                                  "https://h/x\n--upload-pack=x", "", "https://h/x.git\n", "/srv/git/r\n",
                                  "git@h:o/r.git\n"])
def test_check_repo_refuses(repo):
    with pytest.raises(InputError, match="repo"):
        check_repo(repo)


@pytest.mark.parametrize("ref", ["main\n", "-x", "a..b", ""])
def test_check_ref_refuses(ref):
    with pytest.raises(InputError, match="ref"):
        check_ref(ref)


def test_check_root_refuses_a_trailing_newline():
    with pytest.raises(ValueError, match="workspace_root"):
        check_root("/srv/ws\n")


@pytest.mark.parametrize("name", ["A\n", "1A", "A-B", "É"])
def test_bad_env_names_are_input_errors(name):
    with pytest.raises(InputError, match="environment variable name"):
        env_script({name: "x"})


@pytest.mark.parametrize("repo", ["https://github.com/o/r.git", "ssh://git@h:2222/o/r", "git@github.com:o/r.git",
                                  "/srv/git/r"])
def test_check_repo_accepts(repo):
    assert check_repo(repo) == repo


def test_local_forward_lives_until_closed(sshd_pool, known_hosts):
    echo = socket.create_server(("127.0.0.1", 0))
    echo.settimeout(5)

    def serve() -> None:
        with echo.accept()[0] as c:
            c.sendall(c.recv(100).upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    fwd = LocalForward(SSHConnection(cfg_for(sshd_pool[0], known_hosts)).open(), echo.getsockname()[1])
    try:
        with socket.create_connection(("127.0.0.1", fwd.local_port), timeout=5) as c:
            c.sendall(b"ping")
            assert c.recv(100) == b"PING"
    finally:
        fwd.close()
        echo.close()
    assert local_ports_free(fwd.local_port) and not fwd.open
