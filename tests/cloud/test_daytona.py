"""ext.daytona against a stand-in Daytona API + toolbox, driven by the unmodified daytona SDK.

The stand-in (tests/cloud/daytona_standin.py) is a real HTTP server on 127.0.0.1; nothing in
the SDK is mocked. Every test fails if the SDK called a route the stand-in does not implement.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer.errors import ReadinessTimeout  # noqa: E402 - after the importorskip
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_daytona import (  # noqa: E402,F401 - fixtures
    ALICE_ENV,
    OWNER,
    PROFILE,
    config_dir,
    inputs,
    make_ext,
    sentinel,
    standin,
)
from tests.cloud.daytona_standin import DaytonaStandIn  # noqa: E402


def test_the_unmodified_sdk_creates_gets_and_deletes_against_the_standin(standin: DaytonaStandIn, sentinel: str):
    from daytona import CreateSandboxFromSnapshotParams, Daytona, DaytonaConfig, SandboxState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = Daytona(DaytonaConfig(api_key=sentinel, api_url=standin.api_url, target="us",
                                       use_deprecated_polling=True))
    sbx = client.create(CreateSandboxFromSnapshotParams(name="plain", labels={"k": "v"}), timeout=10)
    assert sbx.state == SandboxState.STARTED
    assert client.get("plain").id == sbx.id
    client.delete(sbx)
    assert client.get(sbx.id).state == SandboxState.DESTROYED
    assert standin.live() == []


# ---------------------------------------------------------------- lifecycle


def test_create_ready_probe_teardown(make_ext, standin: DaytonaStandIn, sentinel: str):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sb-1"), None))
    box = standin.boxes[handle.daytona_sandbox_id]
    assert box.labels == {**OWNER, "sandboxer.sandbox_id": "sb-1", "sandboxer.consumer": "bob",
                          "sandboxer.profile": PROFILE, "code-toolbox-language": "python"}
    body = standin.creates()[0]
    # the TTL (the profile's default, 10m) is Daytona's ttl_minutes; the sandbox stops at the
    # same mark when idle, and a stopped sandbox is deleted at once
    assert (body["ttlMinutes"], body["autoStopInterval"], body["autoDeleteInterval"]) == (10, 10, 0)
    assert box.name == handle.name and handle.name.startswith("sandboxer-")
    assert "buildInfo" not in body and "cpu" not in body  # Daytona's default snapshot, at its own size

    reach = ext.wait_ready(handle, timeout=10)
    assert reach.daytona_sandbox_id == handle.daytona_sandbox_id
    assert ext.probe(handle) is True

    stored = json.dumps(handle.model_dump(mode="json")) + repr(handle) + repr(ext) + reach.model_dump_json()
    assert sentinel not in stored

    first = ext.teardown(handle)
    assert (first.already_gone, first.removed) == (False, [handle.daytona_sandbox_id])
    assert ext.probe(handle) is False
    assert ext.teardown(handle).already_gone is True
    assert standin.live() == []


def test_a_sandbox_from_an_image_gets_the_profiles_resources(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext(image="python:3.12-slim")
    ext.provision(request(profile, inputs("sb-img"), None))
    body = standin.creates()[0]
    assert (body["cpu"], body["memory"], body["disk"]) == (2, 2, 5)  # 2 vCPU, 2048 MiB, 5120 MiB
    assert body["buildInfo"]["dockerfileContent"].startswith("FROM python:3.12-slim")
    assert "snapshot" not in body


def test_a_ttl_that_is_not_whole_minutes_is_rounded_up(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    ext.provision(request(profile, inputs("sb-ttl", ttl=90.0), None))
    body = standin.creates()[0]
    assert (body["ttlMinutes"], body["autoStopInterval"], body["autoDeleteInterval"]) == (2, 2, 0)


def test_a_sandbox_destroyed_behind_our_back_probes_gone_and_tears_down_as_already_gone(
        make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sb-gone"), None))
    standin.destroy(handle.daytona_sandbox_id)
    assert ext.probe(handle) is False
    report = ext.teardown(handle)
    assert (report.already_gone, report.removed) == (True, [])


def test_wait_ready_times_out_on_a_sandbox_that_never_starts(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sb-slow"), None))
    standin.boxes[handle.daytona_sandbox_id].ready_at += 3600
    with pytest.raises(ReadinessTimeout) as err:
        ext.wait_ready(handle, timeout=1)
    assert f"Daytona sandbox {handle.daytona_sandbox_id}" in str(err.value)
    assert "1s" in str(err.value)


def test_a_consumer_with_a_key_of_their_own_gets_sandboxes_in_their_organization(
        make_ext, standin: DaytonaStandIn, monkeypatch: pytest.MonkeyPatch):
    alice_key = "dtn_alice_" + "a" * 16
    standin.keys.add(alice_key)
    monkeypatch.setenv(ALICE_ENV, alice_key)
    ext, profile = make_ext(consumer_keys={"alice": {"env": ALICE_ENV}})
    handle = ext.provision(request(profile, inputs("sb-alice", consumer="alice"), None))
    assert standin.boxes[handle.daytona_sandbox_id].org == alice_key
    assert handle.consumer == "alice"
    assert ext.probe(handle) is True  # later calls use alice's key too
    assert ext.teardown(handle).already_gone is False


def test_list_owned_finds_ours_by_labels_across_pages(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    ours = [ext.provision(request(profile, inputs(f"sb-own-{i}"), None)) for i in range(3)]
    other = {"sandboxer.owner": "someone-else"}
    ext.provision(request(profile, {**inputs("sb-foreign"), "owner_labels": other,
                                    "tags": {**other, "sandboxer.sandbox_id": "sb-foreign"}}, None))
    ext.teardown(ours[2])
    standin.page_limit = 1
    found = ext.list_owned(OWNER)
    assert sorted(o.sandbox_id for o in found) == ["sb-own-0", "sb-own-1"]
    assert {o.handle.daytona_sandbox_id for o in found} == {h.daytona_sandbox_id for h in ours[:2]}
    assert [c["query"].get("labels") for c in standin.calls if c["path"] == "/api/sandbox" and
            c["method"] == "GET"][0] == [json.dumps(OWNER)]


def test_wait_ready_on_a_destroyed_sandbox_says_so_at_once(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    handle = ext.provision(request(profile, inputs("sb-dead"), None))
    standin.destroy(handle.daytona_sandbox_id)
    with pytest.raises(ReadinessTimeout, match=rf"Daytona sandbox {handle.daytona_sandbox_id} will not get ready: "
                                               r"it is destroyed"):
        ext.wait_ready(handle, timeout=30)


def test_module_imports_without_the_sdk_and_using_it_names_the_extra():
    """Built-in manifests load on a core-only install: the handler module must not import the SDK."""
    code = (
        "import sys\n"
        "sys.modules['daytona'] = None  # as if the extra were not installed\n"
        "from sandboxer.loader import load_catalog\n"
        "from sandboxer.errors import MissingExtra\n"
        "c = load_catalog([])\n"
        "assert 'ext.daytona' in c.extensions\n"
        "try:\n"
        "    c.extensions['ext.daytona'].instance()\n"
        "except MissingExtra as exc:\n"
        "    assert \"pip install 'sand-boxer[daytona]'\" in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no MissingExtra')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=60)


@pytest.mark.parametrize("config", [{"api_key": "dtn_LITERAL0123456789"},
                                    {"consumer_keys": {"alice": "dtn_LITERAL0123456789"}}])
def test_a_literal_key_in_the_manifest_is_refused_without_echoing_it(config_dir, config):
    from sandboxer.errors import ManifestError
    from sandboxer.loader import load_catalog

    with pytest.raises(ManifestError, match=r"ext\.test-daytona\.yaml: field 'config'.*must be a reference") as info:
        load_catalog([config_dir(None, **config)], builtins=False)
    assert "dtn_LITERAL" not in str(info.value)


def test_cost_estimates_come_from_the_manifests_pricing(make_ext):
    ext, profile = make_ext()
    p = ext.manifest.pricing
    q = ext.estimate_cost(profile, 3600)  # 2 vCPU, 2 GiB
    assert q.amount == pytest.approx(3600 * (2 * p.per_vcpu_second + 2 * p.per_gib_second), rel=1e-3)
    assert q.pricing_model == "metered" and "daytona.io" in q.source


def test_calls_from_the_main_thread_leave_its_alarm_alone(make_ext, standin: DaytonaStandIn):
    """The SDK times its waits with SIGALRM on the main thread; an application's own alarm must survive."""
    import signal
    import threading

    assert threading.current_thread() is threading.main_thread()
    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.alarm(300)
        ext, profile = make_ext()
        handle = ext.provision(request(profile, inputs("sb-alarm"), None))
        ext.teardown(handle)
        assert signal.getsignal(signal.SIGALRM) is not old and signal.alarm(0) > 250  # ours, still armed
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_list_owned_asks_with_every_key_and_skips_one_that_is_refused(make_ext, standin: DaytonaStandIn,
                                                                      monkeypatch: pytest.MonkeyPatch, caplog):
    alice_key = "dtn_alice_" + "b" * 16
    standin.keys.add(alice_key)
    monkeypatch.setenv(ALICE_ENV, alice_key)
    monkeypatch.setenv("SBX_TEST_DAYTONA_REVOKED", "dtn_revoked_" + "c" * 16)  # Daytona does not know it
    ext, profile = make_ext(consumer_keys={"alice": {"env": ALICE_ENV}, "zed": {"env": "SBX_TEST_DAYTONA_REVOKED"}})
    mine = ext.provision(request(profile, inputs("sb-op"), None))
    hers = ext.provision(request(profile, inputs("sb-alice", consumer="alice"), None))
    found = {o.sandbox_id: o.handle for o in ext.list_owned(OWNER)}
    assert {k: v.daytona_sandbox_id for k, v in found.items()} == {"sb-op": mine.daytona_sandbox_id,
                                                                   "sb-alice": hers.daytona_sandbox_id}
    assert found["sb-alice"].consumer == "alice"  # so gc tears it down with alice's key
    assert "list_owned: skipping the key in env SBX_TEST_DAYTONA_REVOKED (consumer zed)" in caplog.text
    assert ext.teardown(found["sb-alice"]).already_gone is False
