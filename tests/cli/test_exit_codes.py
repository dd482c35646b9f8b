"""Exit codes a script can tell apart, one ``error:`` line each, never a traceback (but with --debug)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.cli.conftest import profile, stub


def one_error_line(p, start):
    assert p.stderr.startswith(start), p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("args, code, start", [
    (["create", "local", "--ttl", "1x"], 64, "error: --ttl: '1x' is not a duration (e.g. 90s, 10m, 1h30m, 2d)"),
    (["create", "local", "--ttl", "30"], 64, "error: --ttl: '30' has no unit; write 30s"),
    (["create", "local", "--frobnicate"], 64, "error: No such option '--frobnicate'. (see `sandboxer create --help`)"),
    (["create"], 64, "error: Missing argument 'PROFILE'. (see `sandboxer create --help`)"),
    (["cost", "estimate", "local", "--duration", "2"], 64, "error: --duration: '2' has no unit; write 2s"),
    (["list", "--interval", "soon", "--watch"], 64, "error: --interval: 'soon' is not a duration"),
    (["create", "nope"], 66, "error: unknown profile 'nope'"),
    (["status", "nope"], 66, "error: no sandbox with id or name 'nope'"),
    (["snapshots", "delete", "snap-nope"], 66, "error: no snapshot with id 'snap-nope'"),
    (["restore", "snap-nope"], 66, "error: no usable snapshot with id 'snap-nope'"),
    (["create", "local", "--ttl", "48h"], 65, "error: TTL 2d is over profile 'local''s maximum of 1d"),
])
def test_each_failure_has_its_code(sbx, args, code, start):
    p = sbx(*args, check=code)
    if code:
        one_error_line(p, start)


def test_json_never_changes_the_exit_code(sbx):
    for args, code in ((["status", "sb-nope"], 66), (["create", "local", "--ttl", "48h"], 65),
                       (["create", "local", "--ttl", "9"], 64)):
        plain, as_json = sbx(*args, check=code), sbx(*args, "--json", check=code)
        assert plain.stderr == as_json.stderr and as_json.stdout == ""


def test_backend_failure_is_69_and_state_conflict_67(sbx, cfg):
    stub(cfg, "broken", faults="[{stage: provision, error: fatal, rate: 1.0}]")
    profile(cfg, "broken", "ext.broken")
    one_error_line(sbx("create", "broken", "--quiet", check=69), "error: ext.broken: injected fatal at provision")
    sb = json.loads(sbx("create", "saas-stub", "--json", check=0).stdout)
    sbx("teardown", sb["id"], check=0)
    one_error_line(sbx("exec", sb["id"], "--", "true", check=67), f"error: cannot exec in sandbox {sb['id']}: it is terminated")


def test_a_corrupt_yaml_config_is_78_and_one_line(sbx, cfg):
    path = cfg.write("profile.bad.yaml", "slug: [unclosed\n")
    for args in (["create", "local"], ["profiles", "list", "--json"], ["cost", "estimate", "local"]):
        one_error_line(sbx(*args, check=78), f"error: {path}: invalid YAML (line 2, column 1)")


def test_debug_adds_the_traceback(sbx, cfg):
    cfg.write("profile.bad.yaml", "slug: [unclosed\n")
    p = sbx("--debug", "profiles", "list", check=78)
    assert "Traceback (most recent call last)" in p.stderr and p.stderr.splitlines()[-1].startswith("error: ")
    assert "Traceback" in sbx("profiles", "list", check=78, env={"SANDBOXER_DEBUG": "1"}).stderr


def test_an_extensions_unexpected_exception_is_70_and_one_line(home, cfg, monkeypatch):
    """A bug in a backend (an exception outside the error tree) still ends as one error line."""
    from sandboxer.cli import cli
    from sandboxer.extensions.saas_stub import SaasStubExtension

    def provision(self, request):
        raise ZeroDivisionError("division by zero in the handler")

    monkeypatch.setattr(SaasStubExtension, "provision", provision)  # the fault, injected at the seam
    runner = CliRunner()
    env = {"SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}
    r = runner.invoke(cli, ["create", "saas-stub", "--quiet"], env=env)
    assert r.exit_code == 70, r.output
    assert r.stderr == ("error: unexpected ZeroDivisionError: division by zero in the handler "
                        "(a bug, or an extension's; run with --debug for the traceback)\n")
    r = runner.invoke(cli, ["--debug", "create", "saas-stub", "--quiet"], env=env)
    assert r.exit_code == 70 and "Traceback" in r.stderr and 'raise ZeroDivisionError' in r.stderr
    listed = json.loads(runner.invoke(cli, ["list", "--all", "--json"], env=env).stdout)
    assert [s["state"] for s in listed] == ["failed", "failed"]  # nothing half-created left live


def test_exec_exits_with_the_commands_own_code(sbx):
    sb = json.loads(sbx("create", "local", "--json", check=0).stdout)
    try:
        for code in (0, 1, 3, 66):
            sbx("exec", sb["id"], "--", "sh", "-c", f"exit {code}", check=code)
        assert sbx("exec", "--timeout", "1s", sb["id"], "--", "sleep", "30", check=124).stderr == \
            "error: command timed out after 1s\n"
    finally:
        sbx("teardown", sb["id"], check=0)


def test_help_lists_the_exit_codes(sbx):
    out = sbx("--help", check=0).stdout
    for code in ("64", "65", "66", "67", "69", "70", "77", "78", "130"):
        assert f"  {code}  " in out
