"""ext.daytona gives a sandbox its secrets as the unmodified SDK's create ``env_vars``: the stand-in
records the create body's ``env`` as it arrived on the wire, and runs every command with it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer.models import SnapshotMeta  # noqa: E402 - after the importorskip
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_daytona import PROFILE, config_dir, inputs, make_ext, sentinel, standin  # noqa: E402,F401
from tests.cloud.daytona_standin import DaytonaStandIn  # noqa: E402


def test_secrets_go_as_env_vars_and_every_command_sees_them(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    value = "sbx_DAYTONA_secret_value with spaces"
    handle = ext.provision(request(profile, inputs("sb-sec"), None, secrets={"TOKEN": value}))
    try:
        body = standin.creates()[0]
        assert body["env"] == {"TOKEN": value}  # env_vars, as the SDK sent them
        assert value not in json.dumps(body["labels"])
        reach = ext.wait_ready(handle, timeout=10)
        digest = hashlib.sha256(value.encode()).hexdigest()
        res = ext.exec(handle, ["sh", "-c", f'[ "$(printf %s "$TOKEN" | sha256sum | cut -d" " -f1)" = {digest} ]'])
        assert res.exit_code == 0, res.stderr
        assert value not in handle.model_dump_json() and value not in reach.model_dump_json()
        snap = ext.snapshot(handle)
        assert value not in json.dumps(snap.data)
        meta = SnapshotMeta(id="snap-1", sandbox_id="sb-sec", extension=ext.id, profile=PROFILE,
                            created_at="2026-11-21T00:00:00Z", data=snap.data)
        restored = ext.restore_from_snapshot(request(profile, inputs("sb-sec2"), None,
                                                     secrets={"TOKEN": "sbx_DAYTONA_restored"}), meta)
        assert standin.creates()[-1]["env"] == {"TOKEN": "sbx_DAYTONA_restored"}  # the new request's
        ext.teardown(restored)
    finally:
        ext.teardown(handle)


def test_a_secret_wins_over_an_option_env_of_the_same_name_and_none_send_none(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext(profile={"options": {"env": {"TOKEN": "from-options", "MODE": "ci"}}})
    ext.teardown(ext.provision(request(profile, inputs("sb-sec3"), None, secrets={"TOKEN": "secret"})))
    assert standin.creates()[-1]["env"] == {"TOKEN": "secret", "MODE": "ci"}
    ext, profile = make_ext()
    ext.teardown(ext.provision(request(profile, inputs("sb-nosec"), None)))
    assert standin.creates()[-1]["env"] == {}


def test_a_profiles_secret_reaches_the_sandbox_through_the_manager_and_nothing_else(
        config_dir, standin: DaytonaStandIn, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog):
    import logging

    from sandboxer import Manager, SandboxCreateRequest

    caplog.set_level(logging.DEBUG)
    value = "sbx_DAYTONA_profile_secret_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    monkeypatch.setenv("SBX_TEST_DAYTONA_SECRET", value)
    cfg = config_dir({"secrets": {"TOKEN": {"env": "SBX_TEST_DAYTONA_SECRET"}}})
    with Manager(config_dirs=[cfg], home=tmp_path / "home") as mgr:
        sb = mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="bob"))
        assert sb.policy["secrets"] == ["TOKEN"]
        digest = hashlib.sha256(value.encode()).hexdigest()
        check = f'[ "$(printf %s "$TOKEN" | sha256sum | cut -d" " -f1)" = {digest} ]'
        assert mgr.exec(sb.id, ["sh", "-c", check]).exit_code == 0
        assert standin.creates()[0]["env"] == {"TOKEN": value}
        mgr.teardown(sb.id)
        texts = [caplog.text, repr(mgr.events()), repr(mgr.list(all=True))]
    for text in texts:
        assert value not in text
    for p in (tmp_path / "home").rglob("*"):
        if p.is_file():
            assert value.encode() not in p.read_bytes(), f"secret found in {p}"


def test_no_error_carries_the_key_or_a_secret_in_a_traceback_rendered_with_locals(make_ext, standin: DaytonaStandIn,
                                                                                  sentinel: str):
    import threading
    import traceback

    from sandboxer.errors import SandboxerError

    ext, profile = make_ext()
    value = "sbx_DAYTONA_secret_in_locals"
    handle = ext.provision(request(profile, inputs("sb-locals"), None, secrets={"TOKEN": value}))
    standin.destroy(handle.daytona_sandbox_id)
    standin.fail("POST", "/api/sandbox", 500, "internal error", echo_key=True)
    calls = [lambda: ext.exec(handle, ["true"]), lambda: ext.wait_ready(handle, timeout=5),
             lambda: ext.provision(request(profile, inputs("sb-locals-2"), None, secrets={"TOKEN": value}))]
    errors: list[BaseException] = []
    for call in calls:
        for where in ("main", "worker"):
            def run() -> None:
                try:
                    call()
                except SandboxerError as exc:
                    errors.append(exc)
            if where == "main":
                run()
            else:
                t = threading.Thread(target=run)
                t.start()
                t.join(60)
            if call is calls[2]:
                break  # one scripted create failure
    assert len(errors) == 5
    tests = str(Path(__file__).parent)
    for exc in errors:
        tbe = traceback.TracebackException.from_exception(exc, capture_locals=True)
        assert tbe.__cause__ is None and tbe.__context__ is None
        # every frame but this test's own (whose locals hold the values, of course)
        frames = [f for f in tbe.stack if not f.filename.startswith(tests)]
        assert frames, "expected frames of sand-boxer's own in the traceback"
        rendered = str(exc) + "".join(f"{f.filename}:{f.lineno} {f.locals}" for f in frames)
        assert sentinel not in rendered and value not in rendered, rendered
