"""ext.e2b against a stand-in E2B API + envd, driven by the unmodified e2b SDK.

The stand-in (tests/cloud/e2b_standin.py) is a real HTTP server on 127.0.0.1;
nothing in the SDK is mocked. Every test fails if the SDK called a route the
stand-in does not implement.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer.errors import (  # noqa: E402 - after the importorskip
    AuthError,
    CapacityUnavailable,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    TTLError,
)
from sandboxer.contract import TeardownReport  # noqa: E402
from sandboxer.models import SnapshotMeta  # noqa: E402
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_e2b import (  # noqa: E402,F401 - fixtures
    ALICE_ENV,
    KEY_ENV,
    OWNER,
    config_dir,
    inputs,
    make_ext,
    sentinel,
    standin,
)
from tests.cloud.e2b_standin import E2BStandIn  # noqa: E402

# ---------------------------------------------------------------- lifecycle


def test_create_ready_exec_snapshot_restore_teardown(make_ext, standin: E2BStandIn, sentinel: str):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-1"), None))
    box = standin.boxes[handle.e2b_sandbox_id]
    assert box.metadata == {**OWNER, "sandboxer.sandbox_id": "sbx-1", "sandboxer.consumer": "bob",
                            "sandboxer.profile": "test-e2b"}
    assert box.template == "base"
    assert box.end_at - box.started_at == pytest.approx(600, abs=2)  # the profile's default TTL is E2B's timeout

    reach = ext.wait_ready(handle, timeout=10)
    assert reach.e2b_sandbox_id == handle.e2b_sandbox_id

    res = ext.exec(handle, ["sh", "-c", "echo made > state.txt && echo hi && echo oops >&2"])
    assert (res.exit_code, res.stdout, res.stderr) == (0, "hi\n", "oops\n")

    snap = ext.snapshot(handle)
    meta = SnapshotMeta(id="snap-1", sandbox_id="sbx-1", extension=ext.id, profile="test-e2b",
                        created_at="2026-11-21T00:00:00Z", data=snap.data)
    restored = ext.restore_from_snapshot(request(profile, inputs("sbx-2"), None), meta)
    assert restored.e2b_sandbox_id != handle.e2b_sandbox_id
    ext.wait_ready(restored, timeout=10)
    assert ext.exec(restored, ["cat", "state.txt"]).stdout == "made\n"
    assert standin.boxes[restored.e2b_sandbox_id].metadata["sandboxer.sandbox_id"] == "sbx-2"

    assert ext.teardown(handle).removed == [handle.e2b_sandbox_id]
    assert ext.teardown(restored).removed == [restored.e2b_sandbox_id]
    assert standin.live() == []
    ext.delete_snapshot(meta)
    ext.delete_snapshot(meta)  # idempotent
    assert standin.snapshots == {}

    routes = standin.routes()
    for expected in ("POST /v2/sandboxes", "POST /v2/sandboxes/{id}/connect", "GET /health",
                     "POST /process.Process/Start", "POST /sandboxes/{id}/snapshots", "DELETE /sandboxes/{id}",
                     "DELETE /templates/{id}"):
        assert expected in routes
    api = [c for c in standin.calls if c["plane"] == "api"]
    assert all(c["headers"].get("x-api-key") == sentinel for c in api)
    starts = [c for c in standin.calls if c["path"] == "/process.Process/Start"]
    assert all(c["headers"]["e2b-sandbox-id"] and c["headers"]["x-access-token"] for c in starts)
    # Connect RPC, JSON codec, streaming request body sent chunked
    assert all(c["headers"]["content-type"] == "application/connect+json" for c in starts)
    assert all(c["headers"].get("transfer-encoding") == "chunked" for c in starts)
    # the handle is stored in the state DB: it must hold neither the key nor envd's access token
    for h in (handle, restored):
        assert sentinel not in repr(h)
        assert all(b.token not in repr(h) for b in standin.boxes.values())


def test_exec_exit_code_env_cwd_stdin_streaming_and_timeout(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-x"), None))
    ext.wait_ready(handle, timeout=10)

    res = ext.exec(handle, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.exit_code, res.stdout, res.stderr, res.timed_out) == (3, "out\n", "err\n", False)

    # argv is quoted: a hostile argument stays one argument
    res = ext.exec(handle, ["printf", "%s|", "a b", "$(id)", "; rm -rf /"])
    assert res.stdout == "a b|$(id)|; rm -rf /|"

    standin.boxes[handle.e2b_sandbox_id].workdir.joinpath("sub").mkdir()
    res = ext.exec(handle, ["sh", "-c", 'echo "$GREETING"; basename "$PWD"'], env={"GREETING": "hello"}, cwd="sub")
    assert res.stdout == "hello\nsub\n"

    assert ext.exec(handle, ["tr", "a-z", "A-Z"], stdin=b"shout\n").stdout == "SHOUT\n"

    seen: list[tuple[str, str]] = []
    ext.exec(handle, ["sh", "-c", "echo one; echo two >&2"], on_output=lambda s, t: seen.append((s, t)))
    assert ("stdout", "one\n") in seen and ("stderr", "two\n") in seen

    t0 = time.monotonic()
    res = ext.exec(handle, ["sleep", "30"], timeout=1)
    assert res.timed_out and res.exit_code == 124
    assert time.monotonic() - t0 < 10
    ext.teardown(handle)


def test_a_character_split_across_events_arrives_whole_and_output_is_capped(make_ext, standin: E2BStandIn):
    from tests.unit.test_execution import check_split

    ext, profile = make_ext(max_output_bytes=1000)
    handle = ext.provision(request(profile, inputs("sbx-utf8"), None))
    ext.wait_ready(handle, timeout=10)
    check_split(lambda argv, on_output: ext.exec(handle, argv, on_output=on_output))
    # the stdin path (a background command) streams the same way
    res = ext.exec(handle, ["sh", "-c", "cat; printf '\\303'; sleep 0.2; printf '\\251'"], stdin=b"in:")
    assert (res.stdout, res.truncated) == ("in:é", False)
    # past the cap: cut on a character boundary, flagged, the exit code still the command's
    res = ext.exec(handle, ["sh", "-c", "i=0; while [ $i -lt 400 ]; do printf '\\342\\202\\254'; i=$((i+1)); done;"
                                        " exit 3"])
    assert (res.exit_code, res.stdout, res.truncated) == (3, "€" * 333, True)
    ext.teardown(handle)


def test_wait_ready_times_out_while_envd_is_not_up(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    standin.boot_delay = 30
    handle = ext.provision(request(profile, inputs("sbx-slow"), None))
    t0 = time.monotonic()
    with pytest.raises(ReadinessTimeout, match="health check within 1s"):
        ext.wait_ready(handle, timeout=1)
    assert time.monotonic() - t0 < 5
    ext.teardown(handle)


# ---------------------------------------------------------------- errors


def test_bad_key_is_auth_error_without_the_key(make_ext, standin: E2BStandIn, monkeypatch, sentinel):
    ext, profile = make_ext()
    wrong = "e2b_WRONG" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(AuthError) as info:
        ext.provision(request(profile, inputs("sbx-a"), None))
    text = str(info.value) + repr(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert wrong not in text and sentinel not in text
    assert KEY_ENV in str(info.value)  # names where the key comes from
    assert info.value.__cause__ is None and info.value.__context__ is None  # the SDK's error is not reachable
    assert standin.calls[-1]["headers"]["x-api-key"] == wrong  # the stand-in echoed it in its 401 body


def test_missing_key_is_auth_error_before_any_request(make_ext, standin: E2BStandIn, monkeypatch):
    ext, profile = make_ext()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(AuthError, match=f"environment variable {KEY_ENV}"):
        ext.provision(request(profile, inputs("sbx-m"), None))
    assert standin.calls == []


def test_429_is_rate_limited_with_retry_after(make_ext, standin: E2BStandIn):
    # the header and the configured fallback agree here; test_e2b_hardening.py tells them apart
    ext, profile = make_ext(rate_limit_retry_after=7)
    standin.fail("POST", "/v2/sandboxes", 429, "slow down", headers={"Retry-After": "7"})
    with pytest.raises(RateLimited) as info:
        ext.provision(request(profile, inputs("sbx-r"), None))
    assert info.value.retry_after == 7
    assert info.value.backend == "ext.test-e2b"
    assert standin.routes() == ["POST /v2/sandboxes"]  # the SDK's own retries are off: the router hears at once


def test_concurrent_sandbox_limit_is_reported_for_fallback(make_ext, standin: E2BStandIn):
    """E2B answers its concurrent-sandbox limit with 429, which the router falls back on."""
    ext, profile = make_ext()
    standin.max_concurrent = 1
    first = ext.provision(request(profile, inputs("sbx-c1"), None))
    with pytest.raises(RateLimited, match="429"):
        ext.provision(request(profile, inputs("sbx-c2"), None))
    ext.teardown(first)
    ext.teardown(ext.provision(request(profile, inputs("sbx-c3"), None)))


@pytest.mark.parametrize(("status", "error"), [(503, CapacityUnavailable), (403, QuotaExceeded)])
def test_capacity_and_quota(make_ext, standin: E2BStandIn, status: int, error: type):
    ext, profile = make_ext()
    standin.fail("POST", "/v2/sandboxes", status, "no room for you")
    with pytest.raises(error, match="no room for you"):
        ext.provision(request(profile, inputs("sbx-q"), None))
    assert standin.live() == []


def test_unknown_template_and_server_error(make_ext, standin: E2BStandIn):
    ext, profile = make_ext(template="nope")
    profile = profile.model_copy(update={"options": {}})
    with pytest.raises(ProvisionError, match="template 'nope' not found") as info:
        ext.provision(request(profile, inputs("sbx-t"), None))
    assert info.value.transient is False
    ext, profile = make_ext()
    standin.fail("POST", "/v2/sandboxes", 500, "boom")
    with pytest.raises(ProvisionError) as info:
        ext.provision(request(profile, inputs("sbx-t2"), None))
    assert info.value.transient is True


def test_unreachable_api_is_transient_provision_error(make_ext, standin: E2BStandIn):
    ext, profile = make_ext(api_url="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ProvisionError) as info:
        ext.provision(request(profile, inputs("sbx-u"), None))
    assert info.value.transient is True


def test_kill_already_gone_succeeds(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-g"), None))
    standin.expire(handle.e2b_sandbox_id)  # reached its E2B timeout on its own
    assert ext.teardown(handle) == TeardownReport(already_gone=True, removed=[],
                                                  detail={"e2b_sandbox_id": handle.e2b_sandbox_id, "killed": False})
    assert ext.teardown(handle).already_gone is True


def test_teardown_failure_is_teardown_error(make_ext, standin: E2BStandIn):
    from sandboxer.errors import TeardownError

    ext, profile = make_ext()
    from sandboxer.extensions.e2b import KILL_ATTEMPTS

    handle = ext.provision(request(profile, inputs("sbx-tf"), None))
    standin.fail("DELETE", "/sandboxes/.*", 500, "kill failed", times=KILL_ATTEMPTS)
    with pytest.raises(TeardownError, match="kill failed"):
        ext.teardown(handle)
    assert ext.teardown(handle).removed == [handle.e2b_sandbox_id]
    # a passing failure (a 5xx, a dropped keep-alive connection) is retried: kill is idempotent
    handle = ext.provision(request(profile, inputs("sbx-tf2"), None))
    standin.fail("DELETE", "/sandboxes/.*", 502, "bad gateway", times=KILL_ATTEMPTS - 1)
    assert ext.teardown(handle).removed == [handle.e2b_sandbox_id]


# ---------------------------------------------------------------- TTL


def test_ttl_over_plan_max_is_refused_before_any_request(make_ext, standin: E2BStandIn):
    ext, profile = make_ext(plan_max_ttl="5m")
    with pytest.raises(TTLError, match=r"TTL 10m is over the E2B plan maximum of 5m.*plan_max_ttl"):
        ext.provision(request(profile, inputs("sbx-ttl"), None))
    assert standin.calls == []


def test_ttl_over_plan_max_clamped_with_warning(make_ext, standin: E2BStandIn, caplog):
    ext, profile = make_ext(plan_max_ttl="5m", ttl_over_max="clamp")
    with caplog.at_level(logging.WARNING, logger="sandboxer"):
        handle = ext.provision(request(profile, inputs("sbx-ttl2"), None))
    assert handle.ttl_clamped is True and handle.timeout_s == 300
    import json

    assert json.loads(standin.calls[-1]["body"])["timeout"] == 300
    assert "sbx-ttl2" in caplog.text and "clamped to 5m" in caplog.text
    ext.teardown(handle)


# ---------------------------------------------------------------- BYOK


def test_per_consumer_key_and_rotation(make_ext, standin: E2BStandIn, monkeypatch, sentinel):
    alice_key = "e2b_ALICE" + secrets.token_hex(8)
    standin.keys.add(alice_key)
    monkeypatch.setenv(ALICE_ENV, alice_key)
    ext, profile = make_ext(consumer_keys={"alice": {"env": ALICE_ENV}})
    h_alice = ext.provision(request(profile, inputs("sbx-al", consumer="alice"), None))
    h_bob = ext.provision(request(profile, inputs("sbx-bo", consumer="bob"), None))
    assert standin.boxes[h_alice.e2b_sandbox_id].team == alice_key  # billed to alice's own account
    assert standin.boxes[h_bob.e2b_sandbox_id].team == sentinel
    assert alice_key not in repr(h_alice) and alice_key not in repr(ext.config)

    # list_owned asks with every key, so gc sees both accounts
    owned = {o.sandbox_id for o in ext.list_owned(OWNER)}
    assert owned == {"sbx-al", "sbx-bo"}

    # rotation: the reference is read at each call, so a new value takes effect at once
    rotated = "e2b_ROTATED" + secrets.token_hex(8)
    standin.keys.add(rotated)
    standin.boxes[h_alice.e2b_sandbox_id].team = rotated  # same account, new key
    monkeypatch.setenv(ALICE_ENV, rotated)
    assert ext.exec(h_alice, ["echo", "ok"]).stdout == "ok\n"
    assert standin.calls[-2]["headers"]["x-api-key"] == rotated
    standin.keys.discard(alice_key)  # the old key is revoked
    ext.teardown(h_alice)
    ext.teardown(h_bob)


def test_key_from_file(make_ext, standin: E2BStandIn, tmp_path: Path, sentinel: str, monkeypatch):
    keyfile = tmp_path / "e2b.key"
    keyfile.write_text(sentinel + "\n")
    keyfile.chmod(0o600)
    monkeypatch.delenv(KEY_ENV)
    ext, profile = make_ext(api_key={"file": str(keyfile)})
    ext.teardown(ext.provision(request(profile, inputs("sbx-f"), None)))
    assert standin.calls[0]["headers"]["x-api-key"] == sentinel


# ---------------------------------------------------------------- gc / metering


def test_list_owned_filters_by_metadata_and_pages(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    handles = [ext.provision(request(profile, inputs(f"sbx-{i}"), None)) for i in range(5)]
    other = ext.provision(request(profile, {**inputs("sbx-other"), "tags": {"sandboxer.owner": "someone-else",
                                                                              "sandboxer.sandbox_id": "sbx-other"},
                                            "owner_labels": {"sandboxer.owner": "someone-else"}}, None))
    standin.page_limit = 2
    owned = ext.list_owned(OWNER)
    assert sorted(o.sandbox_id for o in owned) == [f"sbx-{i}" for i in range(5)]
    lists = [c for c in standin.calls if c["path"] == "/v2/sandboxes" and c["method"] == "GET"]
    assert len(lists) == 3  # 2 + 2 + 1, following x-next-token
    assert all("sandboxer.owner" in c["query"]["metadata"][0] for c in lists)
    assert [c["query"].get("nextToken") for c in lists] == [None, ["2"], ["4"]]
    by_id = {o.sandbox_id: o for o in owned}
    ext.teardown(by_id["sbx-3"].handle)  # a listed handle is enough to tear down
    assert len(standin.live()) == 5
    for h in handles + [other]:
        ext.teardown(h)


def test_meter_actual_reports_size_and_rate(make_ext, standin: E2BStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-m"), None))
    m = ext.meter_actual(handle)
    assert m is not None
    assert (m["vcpus"], m["memory_gib"]) == (2.0, 0.5)
    p = ext.manifest.pricing
    assert m["rate_per_second"] == pytest.approx(2 * p.per_vcpu_second + 0.5 * p.per_gib_second)
    ext.teardown(handle)
    assert ext.meter_actual(handle) is None
    q = ext.estimate_cost(profile, 3600)
    assert q.amount == pytest.approx(3600 * (2 * p.per_vcpu_second + 1 * p.per_gib_second), rel=1e-3)
    assert q.pricing_model == "metered" and q.source and "e2b.dev" in q.source


def test_module_imports_without_the_sdk():
    """Built-in manifests load on a core-only install: the handler module must not import the SDK."""
    code = (
        "import sys\n"
        "from sandboxer.loader import load_catalog\n"
        "c = load_catalog([])\n"
        "assert 'ext.e2b' in c.extensions\n"
        "assert 'e2b' not in sys.modules, 'the e2b SDK was imported at load time'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=60)


@pytest.mark.parametrize("config", [{"api_key": "e2b_LITERAL0123456789"},
                                    {"consumer_keys": {"alice": "e2b_LITERAL0123456789"}}])
def test_literal_key_in_manifest_is_refused_without_echoing_it(config_dir, config):
    from sandboxer.errors import ManifestError
    from sandboxer.loader import load_catalog

    with pytest.raises(ManifestError, match=r"ext\.test-e2b\.yaml: field 'config'.*must be a reference") as info:
        load_catalog([config_dir(**config)], builtins=False)
    assert "e2b_LITERAL" not in str(info.value)


def test_exec_on_a_sandbox_gone_at_e2b_is_exec_error(make_ext, standin: E2BStandIn):
    from sandboxer.errors import ExecError

    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-gone"), None))
    standin.expire(handle.e2b_sandbox_id)
    with pytest.raises(ExecError, match=f"sandbox {handle.e2b_sandbox_id}: the sandbox is gone at E2B"):
        ext.exec(handle, ["true"])
    with pytest.raises(ReadinessTimeout, match="gone"):
        ext.wait_ready(handle, timeout=2)



def test_exec_cwd_round_trips_the_directory_pwd_reports(make_ext, standin: E2BStandIn):
    """The conformance kit's exec_cwd step: a directory the sandbox's own pwd named is where cwd runs."""
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sbx-cwd"), None))
    ext.wait_ready(handle, timeout=10)
    res = ext.exec(handle, ["sh", "-c", "mkdir -p sbx-conformance-dir && cd sbx-conformance-dir && pwd -P"])
    target = res.stdout.strip()
    assert res.exit_code == 0 and target
    assert ext.exec(handle, ["pwd", "-P"], cwd=target).stdout.strip() == target
    start = [c for c in standin.calls if c["path"] == "/process.Process/Start"][-1]
    assert target.encode() in start["body"]  # the cwd went on the wire as given (in a Connect envelope)
    ext.teardown(handle)
