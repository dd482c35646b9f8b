"""ext.daytona keeps the profile's network policy and GPUs: what the unmodified SDK sends on create, per policy.

The stand-in records the create body as it arrived on the wire (``networkBlockAll``,
``networkAllowList``, ``domainAllowList``, ``gpu``, ``gpuType``); nothing in the SDK is mocked.
What Daytona cannot keep (a deny-list; GPUs without an image) is refused before any request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer import Manager, SandboxCreateRequest  # noqa: E402 - after the importorskip
from sandboxer.errors import CapabilityError, ProfileError  # noqa: E402
from sandboxer.loader import load_catalog  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.support.profiles import set_policy  # noqa: E402

from tests.cloud.conftest_daytona import EXT, PROFILE, config_dir, inputs, sentinel, standin  # noqa: E402,F401
from tests.cloud.daytona_standin import DaytonaStandIn  # noqa: E402

NETWORK = ("networkBlockAll", "networkAllowList", "domainAllowList")


@pytest.fixture
def create(config_dir, standin: DaytonaStandIn):
    """Create a sandbox under a profile with this ``network`` (and ``options``); the create body as Daytona got it."""

    def make(network: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
             profile: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        cfg = config_dir(profile, **(config or {}))
        set_policy(cfg / "profiles" / f"profile.{PROFILE}.yaml", network, **options)
        catalog = load_catalog([cfg], builtins=False)
        ext = catalog.extensions[EXT].instance()
        ext.provision(request(catalog.profiles[PROFILE], inputs("sb-net"), None))
        return standin.creates()[-1]

    return make


def _net(body: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(body.get(k) for k in NETWORK)


def test_the_default_policy_blocks_all_network(create):
    assert _net(create()) == (True, None, None)


def test_egress_internet_blocks_nothing(create):
    assert _net(create({"egress": "internet"})) == (False, None, None)


def test_an_option_that_narrows_internet_to_none_is_kept(create):
    assert _net(create({"egress": "internet"}, network_block_all=True)) == (True, None, None)


def test_a_cidr_allow_list_is_sent_as_the_network_allow_list(create):
    assert _net(create({"egress": ["10.1.0.0/16", "192.0.2.7"]})) == (False, "10.1.0.0/16,192.0.2.7/32", None)


def test_domains_are_sent_as_the_domain_allow_list_beside_the_cidrs(create):
    body = create({"egress": ["api.example.com", "*.pypi.org", "198.51.100.0/24"]})
    assert _net(body) == (False, "198.51.100.0/24", "*.pypi.org,api.example.com")


def test_an_option_that_narrows_an_allow_list_to_none_sends_no_list(create):
    assert _net(create({"egress": ["api.example.com"]}, network_block_all=True)) == (True, None, None)


def test_an_option_that_would_widen_none_is_refused_at_load(config_dir):
    cfg = config_dir()
    set_policy(cfg / "profiles" / f"profile.{PROFILE}.yaml", None, network_block_all=False)
    with pytest.raises(ProfileError, match=r"field 'options\.network_block_all' \(value False\) widens field "
                                           r"'network\.egress' \(value 'none'\)"):
        load_catalog([cfg], builtins=False)


def test_gpus_are_sent_as_resources_of_a_create_from_an_image(create):
    body = create(config={"image": "python:3.12-slim"}, profile={"resources": {"gpu": {"count": 2, "type": "h100"}}})
    assert (body["gpu"], body["gpuType"]) == (2, ["H100"])
    assert "gpu" not in create(config={"image": "python:3.12-slim"})  # no GPU asked, none sent


def _manager(cfg: Path, tmp_path: Path) -> Manager:
    return Manager(config_dirs=[cfg], home=tmp_path / "home")


def test_a_deny_list_is_never_placed_on_daytona(config_dir, standin: DaytonaStandIn, tmp_path: Path):
    cfg = config_dir({"network": {"egress": "internet", "deny": ["10.0.0.0/8"]}})
    with _manager(cfg, tmp_path) as mgr:
        with pytest.raises(CapabilityError, match=rf"{EXT} does not enforce network:cidr-denylist, which the policy "
                                                  rf"of profile '{PROFILE}' needs"):
            mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="bob"))
    assert standin.creates() == []


def test_gpus_without_an_image_are_refused_naming_what_to_set(config_dir, standin: DaytonaStandIn, tmp_path: Path):
    cfg = config_dir({"resources": {"gpu": {"count": 1}}})
    with _manager(cfg, tmp_path) as mgr:
        with pytest.raises(CapabilityError, match=rf"{EXT} cannot keep the policy of profile '{PROFILE}': Daytona "
                                                  r"gives GPUs \(resources\.gpu\) only to a sandbox created from an "
                                                  rf"image: set options\.image in profile '{PROFILE}', or config\.image"):
            mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="bob"))
    assert standin.creates() == []


def test_a_gpu_daytona_does_not_have_is_refused(config_dir, standin: DaytonaStandIn, tmp_path: Path):
    cfg = config_dir({"resources": {"gpu": {"type": "V100"}}}, image="python:3.12-slim")
    with _manager(cfg, tmp_path) as mgr:
        with pytest.raises(CapabilityError, match=r"field 'resources\.gpu\.type' \(value 'V100'\): Daytona has no "
                                                  r"such GPU; it accepts H100, H200"):
            mgr.create(SandboxCreateRequest(profile=PROFILE, consumer="bob"))
    assert standin.creates() == []


def test_exposed_ports_get_preview_urls_that_need_the_sandboxes_token(config_dir, standin: DaytonaStandIn):
    cfg = config_dir({"network": {"egress": "none", "expose": [8080, 3000]}})
    catalog = load_catalog([cfg], builtins=False)
    ext = catalog.extensions[EXT].instance()
    handle = ext.provision(request(catalog.profiles[PROFILE], inputs("sb-expose"), None))
    reach = ext.wait_ready(handle, timeout=10)
    sid = handle.daytona_sandbox_id
    assert reach.urls == {"3000": f"https://3000-{sid}.proxy.standin.test", "8080": f"https://8080-{sid}.proxy.standin.test"}
    body = standin.creates()[0]
    assert (body["public"], body["networkBlockAll"]) == (False, True)  # private previews; serving opens no egress
    assert "token" not in reach.model_dump_json()  # the preview token is the consumer's to fetch, never recorded
