"""ext.modal against the Modal stand-in: the unmodified SDK over real gRPC on 127.0.0.1.

No SDK class is mocked; faults are scripted on the server side as real gRPC
statuses with real status details, the way Modal's control plane sends them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest

# The SDK reads its config file path when first imported; keep any ~/.modal.toml out.
os.environ.setdefault("MODAL_CONFIG_PATH", "/nonexistent/sandboxer-tests/modal.toml")

pytest.importorskip("modal", reason="the modal extra is not installed (pip install 'sand-boxer[modal]')")

from grpclib import Status  # noqa: E402
from modal_proto import api_pb2  # noqa: E402

from sandboxer.contract import TeardownReport  # noqa: E402
from sandboxer.errors import (  # noqa: E402
    AuthError,
    CapacityUnavailable,
    InputError,
    ProvisionError,
    RateLimited,
    ReadinessTimeout,
    SnapshotError,
    TTLError,
)
from sandboxer.loader import load_catalog  # noqa: E402
from sandboxer.extensions.modal import ModalHandle  # noqa: E402
from sandboxer.models import SnapshotMeta  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.cloud.modal_standin import ModalStandIn  # noqa: E402

TOKEN_ID = "ak-sandboxertest0001"
SENTINEL = "as-SENTINEL-7f3c9e1d-do-not-leak"
ALICE_ID = "ak-alice0002"
ALICE_SECRET = "as-ALICE-SENTINEL-51b2-do-not-leak"
OWNER = {"sandboxer.owner": "test-owner-1"}


@pytest.fixture
def standin():
    server = ModalStandIn(TOKEN_ID, SENTINEL).start()
    server.tokens[ALICE_ID] = ALICE_SECRET
    try:
        yield server
    finally:
        server.stop()
    assert not server.unimplemented, f"the SDK called RPCs the stand-in does not implement: {server.unimplemented}"


def write_config(root: Path, server_url: str, extra: str = "") -> Path:
    (root / "extensions").mkdir(parents=True, exist_ok=True)
    (root / "profiles").mkdir(exist_ok=True)
    (root / "extensions" / "ext.test-modal.yaml").write_text(textwrap.dedent(f"""\
        id: ext.test-modal
        title: Modal (stand-in)
        version: 0.1.0
        handler: sandboxer.extensions.modal:ModalExtension
        capabilities:
          isolation_levels: [container]
          pricing_model: metered
          features: [exec, snapshots, metering, list_owned]
        pricing: {{per_vcpu_second: 0.00001971, per_gib_second: 0.00000672, source: test, as_of: "2026-11-21"}}
        config:
          server_url: {server_url}
          token_id: {{env: SBX_TEST_MODAL_TOKEN_ID}}
          token_secret: {{env: SBX_TEST_MODAL_TOKEN_SECRET}}
          consumer_tokens:
            alice:
              token_id: {{env: SBX_TEST_ALICE_TOKEN_ID}}
              token_secret: {{env: SBX_TEST_ALICE_TOKEN_SECRET}}
          app_name: sandboxer-test
          image: python:3.12-slim
          plan_max_ttl: 24h
        """) + textwrap.indent(textwrap.dedent(extra), "  "))
    (root / "profiles" / "profile.test-modal.yaml").write_text(textwrap.dedent("""\
        slug: test-modal
        extension: ext.test-modal
        ttl: {default: 10m, max: 48h}
        resources: {cpu: 2, memory_mb: 1536}
        options:
          idle_timeout: 5m
        """))
    return root


@pytest.fixture
def tokens(monkeypatch):
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_ID", TOKEN_ID)
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_SECRET", SENTINEL)
    monkeypatch.setenv("SBX_TEST_ALICE_TOKEN_ID", ALICE_ID)
    monkeypatch.setenv("SBX_TEST_ALICE_TOKEN_SECRET", ALICE_SECRET)


def load(cfg: Path):
    catalog = load_catalog([cfg])
    return catalog.extensions["ext.test-modal"].instance(), catalog.profiles["test-modal"]


@pytest.fixture
def backend(tmp_path, standin, tokens):
    return load(write_config(tmp_path / "cfg", standin.url))


def inputs(sandbox_id: str = "sbx-1", consumer: str = "me", **extra):
    """What the manager gives provision (reserved keys mixed in, for sandboxer.testing.request):
    the TTL is the test profile's default, 10m."""
    tags = {**OWNER, "sandboxer.sandbox_id": sandbox_id, "sandboxer.consumer": consumer,
            "sandboxer.profile": "test-modal"}
    return {"sandbox_id": sandbox_id, "owner_labels": dict(OWNER), "tags": tags, "ttl": 600.0, **extra}


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SENTINEL not in text and ALICE_SECRET not in text


# ---------------------------------------------------------------- lifecycle

def test_create_ready_exec_snapshot_restore_teardown(backend, standin):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    assert ModalHandle.model_validate(json.loads(handle.model_dump_json())) == handle
    assert_no_secret(handle.model_dump_json())

    names = [name for name, _ in standin.calls]
    # The SDK caches the environment per process, so EnvironmentGetOrCreate comes once per test run.
    assert set(names[:5]) - {"EnvironmentGetOrCreate"} == {"AppGetOrCreate", "ImageGetOrCreate", "AuthTokenGet",
                                                           "SandboxCreateV2"}
    assert [n for n in names if n != "EnvironmentGetOrCreate"][:4] == [
        "AppGetOrCreate", "ImageGetOrCreate", "AuthTokenGet", "SandboxCreateV2"]
    create = standin.called("SandboxCreateV2")[0]
    d = create.definition
    assert d.timeout_secs == 600 and d.idle_timeout_secs == 300
    assert d.resources.milli_cpu == 1000 and d.resources.memory_mb == 1536  # 2 vCPU = 1 Modal core
    assert {t.tag_name: t.tag_value for t in create.tags}["sandboxer.sandbox_id"] == "sbx-1"
    assert d.readiness_probe.exec_command.argv == ["true"]

    reach = ext.wait_ready(handle, timeout=10)
    assert reach.sandbox_id == handle.object_id

    seen: list[tuple[str, str]] = []
    res = ext.exec(handle, ["sh", "-c", 'echo "hi $WHO"; echo oops >&2; pwd; exit 3'],
                   env={"WHO": "there"}, cwd="/work", on_output=lambda s, t: seen.append((s, t)))
    assert res.exit_code == 3 and not res.timed_out
    assert res.stdout.splitlines()[0] == "hi there" and res.stdout.rstrip().endswith("/work")
    assert res.stderr == "oops\n"
    assert ("stderr", "oops\n") in seen and "".join(t for s, t in seen if s == "stdout") == res.stdout

    res = ext.exec(handle, ["sh", "-c", "cat > note.txt && wc -c < note.txt"], stdin=b"kept across restore")
    assert res.exit_code == 0 and res.stdout.strip() == "19"

    snap = ext.snapshot(handle)
    image_id = snap.data["image_id"]
    assert image_id.startswith("im-")
    meta = SnapshotMeta(id="snap-1", sandbox_id="sbx-1", extension=ext.id, profile=profile.slug,
                        created_at="2026-11-21T00:00:00Z", data=snap.data)
    restored = ext.restore_from_snapshot(request(profile, inputs("sbx-2"), None), meta)
    assert restored.object_id != handle.object_id
    assert standin.called("SandboxCreateV2")[-1].definition.image_id == image_id
    ext.wait_ready(restored, timeout=10)
    assert ext.exec(restored, ["cat", "note.txt"]).stdout == "kept across restore"

    for h in (handle, restored):
        assert ext.teardown(h) == TeardownReport(already_gone=False, removed=[h.object_id],
                                                 detail={"object_id": h.object_id})
        assert standin.sandboxes[h.object_id].status == api_pb2.GenericResult.GENERIC_STATUS_TERMINATED
    ext.delete_snapshot(meta)  # nothing to call; must not raise


def test_exec_timeout_is_reported(backend):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    res = ext.exec(handle, ["sleep", "30"], timeout=1)
    assert res.timed_out
    ext.teardown(handle)


def test_exec_output_split_inside_a_utf8_character(backend):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    chunks: list[str] = []
    res = ext.exec(handle, ["sh", "-c", r"printf '\303'; sleep 0.3; printf '\251\n'"],
                   on_output=lambda s, t: chunks.append(t))
    assert res.stdout == "\u00e9\n" and "".join(chunks) == "\u00e9\n"
    ext.teardown(handle)


def test_every_utf8_length_split_across_chunks_arrives_whole_and_output_is_capped(tmp_path, standin, tokens):
    from tests.unit.test_execution import check_split

    ext, profile = load(write_config(tmp_path / "cfg", standin.url, "max_output_bytes: 1000\n"))
    handle = ext.provision(request(profile, inputs(), None))
    check_split(lambda argv, on_output: ext.exec(handle, argv, on_output=on_output))
    res = ext.exec(handle, ["sh", "-c", "i=0; while [ $i -lt 400 ]; do printf '\\342\\202\\254'; i=$((i+1)); done;"
                                        " exit 3"])
    assert (res.exit_code, res.stdout, res.truncated, res.timed_out) == (3, "€" * 333, True, False)
    res = ext.exec(handle, ["sleep", "30"], timeout=1)
    assert (res.exit_code, res.timed_out, res.truncated) == (124, True, False)
    ext.teardown(handle)


def test_sandbox_that_ended_before_ready_fails_provisioning(backend, standin):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    standin.finish(handle.object_id)
    with pytest.raises(ProvisionError) as info:
        ext.wait_ready(handle, timeout=5)
    assert not isinstance(info.value, ReadinessTimeout) and not info.value.transient
    assert handle.object_id in str(info.value)


def test_from_id_reattaches_after_restart(tmp_path, standin, tokens):
    cfg = write_config(tmp_path / "cfg", standin.url)
    ext, profile = load(cfg)
    # as the manager keeps it: JSON in the state store, rebuilt as the backend's model
    handle = ModalHandle.model_validate(json.loads(ext.provision(request(profile, inputs(), None)).model_dump_json()))
    fresh, _ = load(cfg)  # a new manager process: nothing cached
    assert fresh is not ext
    assert fresh.exec(handle, ["echo", "again"]).stdout == "again\n"
    assert standin.called("SandboxWaitV2")[-1].sandbox_id == handle.object_id
    assert fresh.teardown(handle).already_gone is False


def test_teardown_of_a_gone_sandbox_succeeds(backend, standin):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    standin.forget(handle.object_id)
    assert ext.teardown(handle) == TeardownReport(already_gone=True, removed=[], detail={"object_id": handle.object_id})
    assert ext.teardown(handle).already_gone is True  # idempotent

    finished = ext.provision(request(profile, inputs("sbx-2"), None))
    standin.finish(finished.object_id)  # its TTL ran out on Modal's side
    assert ext.teardown(finished).detail["object_id"] == finished.object_id


# ---------------------------------------------------------------- errors

def test_bad_token_raises_auth_error_without_the_secret(tmp_path, standin, tokens, monkeypatch):
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_ID", "ak-wrong")
    ext, profile = load(write_config(tmp_path / "cfg", standin.url))
    with pytest.raises(AuthError) as info:
        ext.provision(request(profile, inputs(), None))
    # The stand-in echoed the secret back in its UNAUTHENTICATED message.
    assert "Invalid token" not in str(info.value)
    assert_no_secret(str(info.value), repr(info.value), "".join(traceback.format_exception(info.value)))
    assert "ak-wrong" not in str(info.value)
    assert not standin.called("SandboxCreateV2")


def test_missing_token_names_the_reference(tmp_path, standin, tokens, monkeypatch):
    monkeypatch.delenv("SBX_TEST_MODAL_TOKEN_SECRET")
    ext, profile = load(write_config(tmp_path / "cfg", standin.url))
    with pytest.raises(AuthError, match="SBX_TEST_MODAL_TOKEN_SECRET"):
        ext.provision(request(profile, inputs(), None))
    assert not standin.calls


def test_rate_limit_raises_rate_limited_with_retry_after(backend, standin):
    ext, profile = backend
    standin.fail_next("SandboxCreateV2", Status.RESOURCE_EXHAUSTED, f"slow down {SENTINEL}",
                      [api_pb2.RPCRetryPolicy(retry_after_secs=30)])
    with pytest.raises(RateLimited) as info:
        ext.provision(request(profile, inputs(), None))
    assert info.value.retry_after == 30
    assert_no_secret(str(info.value))

    standin.fail_next("SandboxCreateV2", Status.RESOURCE_EXHAUSTED, "too many creates",
                      [api_pb2.RateLimit(limit=5, interval=api_pb2.RATE_LIMIT_INTERVAL_MINUTE)])
    with pytest.raises(RateLimited) as info:
        ext.provision(request(profile, inputs(), None))
    assert info.value.retry_after == 60


def test_quota_limit_raises_capacity_unavailable(backend, standin):
    ext, profile = backend
    standin.fail_next("SandboxCreateV2", Status.RESOURCE_EXHAUSTED, "concurrent sandbox limit reached")
    with pytest.raises(CapacityUnavailable, match="quota/concurrency limit"):
        ext.provision(request(profile, inputs(), None))
    assert len(standin.called("SandboxCreateV2")) == 1  # not retried by the SDK, so the router can fall back


def test_deadlines_map_to_provision_error_and_readiness_timeout(backend, standin):
    ext, profile = backend
    standin.fail_next("SandboxCreateV2", Status.DEADLINE_EXCEEDED, "deadline", times=10)
    with pytest.raises(ProvisionError) as info:
        ext.provision(request(profile, inputs(), None))
    assert info.value.transient
    standin._faults.clear()

    handle = ext.provision(request(profile, inputs(), None))
    standin.fail_next("SandboxWaitUntilReady", Status.DEADLINE_EXCEEDED, "probe never passed")
    with pytest.raises(ReadinessTimeout):
        ext.wait_ready(handle, timeout=2)
    ext.teardown(handle)


def test_ttl_above_plan_max_is_refused_or_clamped(tmp_path, backend, standin, tokens, caplog):
    ext, profile = backend
    with pytest.raises(TTLError, match="over the Modal plan's maximum sandbox timeout 1d"):
        ext.provision(request(profile, inputs(ttl=2 * 86400), None))
    assert not standin.called("SandboxCreateV2")

    clamping, profile = load(write_config(tmp_path / "clamp", standin.url, "ttl_over_max: clamp\n"))
    with caplog.at_level(logging.WARNING, logger="sandboxer"):
        handle = clamping.provision(request(profile, inputs(ttl=2 * 86400), None))
    assert standin.called("SandboxCreateV2")[-1].definition.timeout_secs == 86400
    assert "clamped" in caplog.text
    clamping.teardown(handle)


def test_bad_inputs_are_refused_before_any_call(backend, standin):
    ext, profile = backend
    with pytest.raises(InputError, match=r"unknown input\(s\) \['colour'\]"):
        ext.provision(request(profile, inputs(colour="red"), None))
    with pytest.raises(InputError, match="'env'"):
        ext.provision(request(profile, inputs(env={"A": 1}), None))
    assert not standin.calls
    handle = ext.provision(request(profile, inputs(), None))
    with pytest.raises(InputError, match="absolute"):
        ext.exec(handle, ["ls"], cwd="relative/dir")
    ext.teardown(handle)


# ---------------------------------------------------------------- BYOK, gc, metering

def test_consumer_override_uses_that_consumers_token(backend, standin):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(consumer="alice"), None))
    assert handle.credentials == "alice"
    assert {tid for name, tid in standin.callers if name == "SandboxCreateV2"} == {ALICE_ID}
    ext.teardown(handle)
    assert standin.callers[-1] == ("SandboxTerminateV2", ALICE_ID)

    other = ext.provision(request(profile, inputs("sbx-2", consumer="bob"), None))
    assert other.credentials is None
    assert standin.callers[-1] == ("SandboxCreateV2", TOKEN_ID)
    ext.teardown(other)


def test_list_owned_finds_orphans_by_tags_across_pages(backend, standin):
    ext, profile = backend
    mine = [ext.provision(request(profile, inputs(f"sbx-{i}"), None)) for i in range(3)]
    alice = ext.provision(request(profile, inputs("sbx-a", consumer="alice"), None))
    stranger = dict(inputs("sbx-x"))
    stranger["tags"] = {**stranger["tags"], "sandboxer.owner": "someone-else"}
    theirs = ext.provision(request(profile, stranger, None))
    ext.teardown(mine[2])  # terminated ones are not live

    owned = ext.list_owned(OWNER)
    assert sorted(o.sandbox_id for o in owned) == ["sbx-0", "sbx-1", "sbx-a"]
    assert len(standin.called("SandboxListV2")) >= 3  # page size 2: the SDK paged
    by_id = {o.sandbox_id: o.handle for o in owned}
    assert by_id["sbx-0"].object_id == mine[0].object_id
    for h in [*by_id.values(), theirs]:
        ext.teardown(h)
    assert ext.list_owned(OWNER) == []
    del alice


def test_list_owned_skips_a_consumer_whose_token_is_unset(backend, monkeypatch, caplog):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    monkeypatch.delenv("SBX_TEST_ALICE_TOKEN_SECRET")
    with caplog.at_level(logging.WARNING, logger="sandboxer"):
        assert [o.sandbox_id for o in ext.list_owned(OWNER)] == ["sbx-1"]
    assert "skips consumer alice" in caplog.text and "SBX_TEST_ALICE_TOKEN_SECRET" in caplog.text
    monkeypatch.setenv("SBX_TEST_ALICE_TOKEN_SECRET", "as-revoked")  # set, but refused by Modal
    assert [o.sandbox_id for o in ext.list_owned(OWNER)] == ["sbx-1"]
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_SECRET", "as-revoked")
    with pytest.raises(AuthError):
        ext.list_owned(OWNER)  # the default token failing is not skipped
    monkeypatch.setenv("SBX_TEST_MODAL_TOKEN_SECRET", SENTINEL)
    ext.teardown(handle)


def test_meter_actual_reports_modal_usage(backend, standin):
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    ext.teardown(handle)
    usage = ext.meter_actual(handle)
    assert usage is not None and usage["source"] == "modal sandbox stats"
    assert usage["vcpu_seconds"] > 0 and usage["gib_seconds"] > 0
    assert usage["vcpu_seconds"] == pytest.approx(usage["gib_seconds"] * 2 / 1.5, rel=1e-6)
    standin.forget(handle.object_id)
    assert ext.meter_actual(handle) is None
    quote = ext.estimate_cost(profile, 3600)
    assert quote.breakdown == {"cpu": pytest.approx(0.141912), "memory": pytest.approx(0.036288)}


def test_secret_never_reaches_logs_handles_or_errors(backend, standin, caplog, monkeypatch):
    ext, profile = backend
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        handle = ext.provision(request(profile, inputs(), None))
        texts.append(handle.model_dump_json())
        texts.append(ext.exec(handle, ["sh", "-c", "echo $HOME"]).stdout)
        standin.fail_next("TaskSnapshotFilesystem", Status.FAILED_PRECONDITION, f"disk full for {SENTINEL}")
        with pytest.raises(SnapshotError) as info:
            ext.snapshot(handle)
        texts += [str(info.value), "".join(traceback.format_exception(info.value))]
        ext.teardown(handle)
        texts += [repr(ext), repr(ext.config), str(ext.config.model_dump())]
    texts.append(caplog.text)
    assert_no_secret(*texts)


def test_core_imports_without_the_modal_sdk(tmp_path):
    # A core-only install: importing the handler module and loading every built-in
    # manifest must work without the SDK; using ext.modal then names the extra.
    code = textwrap.dedent("""
        import sys
        for name in ("modal", "modal_proto", "grpclib"):
            sys.modules[name] = None
        import sandboxer.extensions.modal
        from sandboxer.loader import load_catalog
        catalog = load_catalog([])
        assert "ext.modal" in catalog.extensions
        assert "modal" not in sys.modules or sys.modules["modal"] is None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"



@pytest.mark.parametrize(("ended", "returncode"), [("finish", 124), ("kill", 137)])
def test_teardown_of_a_sandbox_modal_already_ended_says_already_gone(backend, standin, ended, returncode):
    """Its timeout passed (finish) or it was terminated elsewhere (kill): the report says already gone, so
    billing stops when the sandbox was last seen, not at this teardown."""
    from tests.cloud.modal_standin import SANDBOX_MARKER
    from tests.cloud.procs import marked

    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    ext.wait_ready(handle, timeout=10)
    assert ext.exec(handle, ["sh", "-c", "setsid sleep 300 > /dev/null 2>&1 & echo started"]).stdout == "started\n"
    getattr(standin, ended)(handle.object_id)
    assert marked(SANDBOX_MARKER, handle.object_id) == []  # its container is gone, and all it ran
    report = ext.teardown(handle)
    assert (report.already_gone, report.removed) == (True, [])
    assert report.detail == {"object_id": handle.object_id, "returncode": returncode}  # as Modal reported it
    assert ext.teardown(handle).already_gone is True  # and again



def test_exec_cwd_round_trips_the_directory_pwd_reports(backend, standin):
    """The conformance kit's exec_cwd step: a directory the sandbox's own pwd named is where cwd runs."""
    ext, profile = backend
    handle = ext.provision(request(profile, inputs(), None))
    ext.wait_ready(handle, timeout=10)
    res = ext.exec(handle, ["sh", "-c", "mkdir -p sbx-conformance-dir && cd sbx-conformance-dir && pwd -P"])
    target = res.stdout.strip()
    assert res.exit_code == 0 and target
    assert ext.exec(handle, ["pwd", "-P"], cwd=target).stdout.strip() == target
    assert standin.called("TaskExecStart")[-1].workdir == target  # the workdir went on the wire as given
    ext.teardown(handle)
