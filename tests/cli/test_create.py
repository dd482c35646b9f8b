"""create: one progress line per stage without a terminal, a visible fallback, name conflicts, Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import time

from sandboxer import Manager
from tests.cli.conftest import profile, stub


def stages(stderr: str) -> list[str]:
    return [re.sub(r" \(\d+\.\d+s\)$", "", line) for line in stderr.splitlines()]


def test_one_line_per_stage_on_stderr(sbx):
    p = sbx("create", "saas-stub", check=0)
    sid = p.stdout.splitlines()[0]
    assert stages(p.stderr) == [
        "create: routing: profile saas-stub",
        f"create: provisioning {sid} on ext.saas-stub",
        f"create: waiting until {sid} is ready on ext.saas-stub host stub",
        f"create: ready: {sid} on ext.saas-stub host stub",
    ]
    assert all(re.search(r" \(\d+\.\d+s\)$", line) for line in p.stderr.splitlines())  # with the time elapsed
    assert sbx("create", "saas-stub", "--quiet", check=0).stderr == ""


def test_a_fallback_is_visible(sbx, cfg):
    stub(cfg, "first", faults="[{stage: provision, error: rate_limited, rate: 1.0}]")
    stub(cfg, "second")
    profile(cfg, "burst", "ext.first", "ext.second")
    p = sbx("create", "burst", "--json", check=0)
    sb = json.loads(p.stdout)
    assert sb["extension"] == "ext.second"
    lines = stages(p.stderr)
    assert "create: ext.first: injected rate_limited at provision, trying ext.second" in lines
    assert lines[-1] == f"create: ready: {sb['id']} on ext.second host stub"
    # --quiet keeps only the fallback
    assert stages(sbx("create", "burst", "--quiet", check=0).stderr) == [
        "create: ext.first: injected rate_limited at provision, trying ext.second"]


def test_create_name_with_other_parameters_is_a_conflict(sbx):
    sb = json.loads(sbx("create", "saas-stub", "--name", "job-1", "--label", "a=1", "--quiet", "--json",
                        check=0).stdout)
    again = json.loads(sbx("create", "saas-stub", "--name", "job-1", "--label", "a=1", "--quiet", "--json",
                           check=0).stdout)
    assert again["id"] == sb["id"]  # the same request: the same sandbox
    for args, differs in ((["--label", "a=2"], "labels {'a': '1'} -> {'a': '2'}"),
                          (["--label", "a=1", "--ttl", "5m"], "ttl 30m -> 5m"),
                          (["--label", "a=1", "--input", "k=v"], "inputs {} -> {'k': 'v'}"),
                          (["--label", "a=1", "--consumer", "bob"], "consumer 'cli' -> 'bob'")):
        p = sbx("create", "saas-stub", "--name", "job-1", *args, check=67)
        assert p.stderr == (f"error: sandbox name 'job-1' is taken by live sandbox {sb['id']}, created with other "
                            f"parameters ({differs}); use another name, or tear {sb['id']} down first\n")
    p = sbx("create", "local", "--name", "job-1", "--label", "a=1", check=67)
    assert "profile 'saas-stub' -> 'local'" in p.stderr
    assert [s["id"] for s in json.loads(sbx("list", "--json", check=0).stdout)] == [sb["id"]]


def test_ctrl_c_during_create_cleans_up_and_exits_130(sbx, cfg, home):
    stub(cfg, "slow", latency=3.0)
    profile(cfg, "slow", "ext.slow")
    p = sbx.spawn("create", "slow")
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        seen.append(line)
        if " provisioning " in line or not line:
            break
    sid = seen[-1].split()[2]
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (seen, out, err)
    assert out == "" and err.startswith("interrupted: cleaning up") and err.endswith("error: interrupted\n")
    listed = json.loads(sbx("list", "--all", "--json", check=0).stdout)
    assert [(s["id"], s["state"]) for s in listed] == [(sid, "terminated")]
    with Manager(config_dirs=[cfg.root], home=home) as mgr:
        assert mgr.extension("ext.slow").live()["live"] == {}  # nothing left at the backend either


def test_on_progress_from_python(cfg, home):
    """The API under the CLI's progress: the stages in order; a callback that raises never breaks the create."""
    stub(cfg, "first", faults="[{stage: provision, error: capacity, rate: 1.0}]")
    stub(cfg, "second")
    profile(cfg, "burst", "ext.first", "ext.second")
    seen = []
    with Manager(config_dirs=[cfg.root], home=home) as mgr:
        sb = mgr.create(profile="burst", on_progress=lambda stage, detail: seen.append((stage, detail)))
        assert [s for s, _ in seen] == ["routing", "provisioning", "fallback", "provisioning", "waiting-ready", "ready"]
        fallback = seen[2][1]
        assert (fallback["backend"], fallback["next"]) == ("ext.first", "ext.second")
        assert "injected capacity at provision" in fallback["reason"]
        assert seen[-1][1] == {"sandbox_id": sb.id, "backend": "ext.second", "host": "stub"}

        def broken(stage, detail):
            raise RuntimeError("display failed")

        again = mgr.create(profile="saas-stub", on_progress=broken)
        assert again.state.value == "ready"
        for s in (sb, again):
            mgr.teardown(s.id)
