"""ext.e2b keeps ``network.expose`` and refuses ``resources.gpu``: what the unmodified SDK sends, per policy.

The stand-in records the create body's ``network`` as it arrived; it hands out a traffic access
token (as E2B does, on create and connect only) to a sandbox created with
``allowPublicTraffic: false``. Nothing in the SDK is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402
from sandboxer.errors import RoutingError  # noqa: E402
from sandboxer.loader import load_catalog  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.support.profiles import set_policy  # noqa: E402

from tests.cloud.conftest_e2b import KEY_ENV, config_dir, inputs, sentinel, standin  # noqa: E402,F401 - fixtures
from tests.cloud.e2b_standin import E2BStandIn  # noqa: E402


@pytest.fixture
def ready(config_dir, standin: E2BStandIn):
    """Create and wait for a sandbox under a profile with this ``network``: (box as E2B got it, reachability)."""

    def make(network: dict[str, Any] | None = None, sandbox_id: str = "sbx-expose", **options: Any):
        cfg = config_dir()
        set_policy(cfg / "profiles" / "profile.test-e2b.yaml", network, **options)
        catalog = load_catalog([cfg], builtins=False)
        ext = catalog.extensions["ext.test-e2b"].instance()
        handle = ext.provision(request(catalog.profiles["test-e2b"], inputs(sandbox_id), None))
        reach = ext.wait_ready(handle, timeout=10)
        return standin.boxes[handle.e2b_sandbox_id], reach, handle

    return make


def test_exposed_ports_get_their_e2b_host_urls_and_need_the_traffic_token(ready):
    box, reach, _ = ready({"expose": [8080, 3000]})
    # E2B: "all requests to the sandbox's public URLs must include the e2b-traffic-access-token header"
    assert box.network == {"allowPublicTraffic": False}
    assert box.allow_internet_access is False  # expose serves; it does not open egress
    assert reach.urls == {"3000": f"https://3000-{box.id}.e2b-standin.test",
                          "8080": f"https://8080-{box.id}.e2b-standin.test"}


def test_no_port_is_public_even_when_none_is_exposed(ready):
    box, reach, _ = ready()
    assert box.network == {"allowPublicTraffic": False}
    assert reach.urls == {}


def test_expose_beside_an_allow_list_and_a_deny_list_is_sent_with_them(ready):
    box, reach, _ = ready({"egress": "internet", "deny": ["10.0.0.0/8"], "expose": [8000]})
    assert box.allow_internet_access is True
    assert box.network == {"denyOut": ["10.0.0.0/8"], "allowPublicTraffic": False}
    box, reach, _ = ready({"egress": ["192.0.2.0/24"], "expose": [8000]}, sandbox_id="sbx-expose-2")
    assert box.network == {"allowOut": ["192.0.2.0/24"], "denyOut": ["0.0.0.0/0"], "allowPublicTraffic": False}
    assert reach.urls == {"8000": f"https://8000-{box.id}.e2b-standin.test"}


def test_the_traffic_token_is_nowhere_in_the_handle_or_reachability_and_the_consumer_connects_for_it(
        ready, standin: E2BStandIn, sentinel: str):
    import e2b

    box, reach, handle = ready({"expose": [8080]})
    assert box.traffic_token
    assert box.traffic_token not in handle.model_dump_json() + reach.model_dump_json()
    # the documented way for the consumer (holding the key) to get it: connect with the SDK
    sbx = e2b.Sandbox.connect(reach.e2b_sandbox_id, api_key=sentinel, api_url=standin.url,
                              sandbox_url=standin.url)
    assert sbx.traffic_access_token == box.traffic_token
    assert sbx.get_host(8080) == reach.urls["8080"].removeprefix("https://")


def test_e2b_declares_expose_but_not_gpu():
    from sandboxer.extensions.e2b import E2BExtension

    assert "expose" in E2BExtension.enforces
    assert "gpu" not in E2BExtension.enforces


def _home_dump(home: Path) -> str:
    """Everything the manager wrote under its home (the state store among it), as text."""
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(home.rglob("*")) if p.is_file())


def test_through_the_manager_the_urls_are_recorded_and_the_token_is_not(config_dir, standin: E2BStandIn,
                                                                         tmp_path: Path):
    cfg = config_dir()
    set_policy(cfg / "profiles" / "profile.test-e2b.yaml", {"expose": [8080]})
    home = tmp_path / "home"
    mgr = Manager(config_dirs=[cfg], home=home)
    try:
        sb = mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice"))
        box = standin.boxes[sb.reachability["e2b_sandbox_id"]]
        assert sb.reachability["urls"] == {"8080": f"https://8080-{box.id}.e2b-standin.test"}
        status = mgr.get(sb.id, refresh=True)
        assert box.traffic_token not in json.dumps(status.model_dump(mode="json")) + json.dumps(mgr.events(sb.id))
        mgr.teardown(sb.id)
    finally:
        mgr.close()
    assert box.traffic_token not in _home_dump(home)


def test_a_gpu_profile_skips_e2b_with_the_reason_in_the_attempts(config_dir, standin: E2BStandIn, tmp_path: Path):
    import yaml

    cfg = config_dir()
    manifest = yaml.safe_load((cfg / "extensions" / "ext.test-e2b.yaml").read_text())
    (cfg / "extensions" / "ext.test-e2b2.yaml").write_text(yaml.safe_dump({**manifest, "id": "ext.test-e2b2"}))
    path = cfg / "profiles" / "profile.test-e2b.yaml"
    profile = yaml.safe_load(path.read_text())
    del profile["extension"]
    profile["backends"] = [{"extension": "ext.test-e2b"}, {"extension": "ext.test-e2b2"}]
    profile["resources"]["gpu"] = {"count": 1, "type": "A100"}
    path.write_text(yaml.safe_dump(profile))
    mgr = Manager(config_dirs=[cfg], home=tmp_path / "home")
    try:
        with pytest.raises(RoutingError) as err:
            mgr.create(SandboxCreateRequest(profile="test-e2b", consumer="alice"))
    finally:
        mgr.close()
    reasons = [str(a) for a in err.value.attempts]
    assert len(reasons) == 2, reasons
    for ext_id, reason in zip(("ext.test-e2b", "ext.test-e2b2"), reasons):
        assert (f"{ext_id} does not enforce gpu, which the policy of profile 'test-e2b' needs") in reason, reason
    assert standin.boxes == {}
