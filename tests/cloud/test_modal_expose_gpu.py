"""ext.modal keeps ``network.expose`` and ``resources.gpu``: what the unmodified SDK sends, per policy.

The stand-in keeps each create's sandbox definition as it arrived over gRPC: the ports it opened
(``open_ports``), who may connect to them (``inbound_cidr_allowlist``), its outbound network and
its GPU (``resources.gpu_config``); it answers ``SandboxGetTunnels[V2]`` with a tunnel per
opened port. A GPU sandbox goes through Modal's V1 sandbox API, which it serves too.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

os.environ.setdefault("MODAL_CONFIG_PATH", "/nonexistent/sandboxer-tests/modal.toml")
pytest.importorskip("modal", reason="the modal extra is not installed (pip install 'sand-boxer[modal]')")

from sandboxer.errors import ProfileError  # noqa: E402
from sandboxer.extensions.modal import ModalExtension  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.support.profiles import set_policy  # noqa: E402
from tests.cloud.test_modal import inputs, load, standin, tokens, write_config  # noqa: E402,F401 - fixtures


@pytest.fixture
def ready(tmp_path, standin, tokens):
    """Create and wait for a sandbox under a profile with this policy: (sandbox as Modal got it, reachability).

    ``gpu`` is ``resources.gpu``; ``teardown`` ends it again (through the same API version it was made by).
    """

    def make(network: dict[str, Any] | None = None, gpu: dict[str, Any] | None = None, teardown: bool = True,
             **options: Any):
        cfg = write_config(tmp_path / "cfg", standin.url)
        path = cfg / "profiles" / "profile.test-modal.yaml"
        set_policy(path, network, **options)
        if gpu is not None:
            profile = yaml.safe_load(path.read_text())
            profile["resources"]["gpu"] = gpu
            path.write_text(yaml.safe_dump(profile))
        ext, prof = load(cfg)
        handle = ext.provision(request(prof, inputs("sbx-x"), None))
        reach = ext.wait_ready(handle, timeout=10)
        if teardown:
            assert not ext.teardown(handle).already_gone
        return standin.sandboxes[handle.object_id], reach

    return make


BLOCKED = {"type": "BLOCKED", "cidrs": [], "domains": [], "block_network": False}
NOTHING_ALLOWED = {"type": "ALLOWLIST", "cidrs": [], "domains": [], "block_network": False}


def test_exposed_ports_are_encrypted_ports_with_the_tunnels_urls(ready, standin):
    sb, reach = ready({"egress": "internet", "expose": [8080, 3000]})
    assert sb.ports == [(3000, "encrypted"), (8080, "encrypted")]
    assert reach.urls == {"3000": f"https://{sb.tunnel_host(3000)}", "8080": f"https://{sb.tunnel_host(8080)}"}
    assert len(standin.called("SandboxGetTunnelsV2")) == 1


def test_no_port_is_opened_and_no_tunnel_asked_for_when_none_is_exposed(ready, standin):
    sb, reach = ready({"egress": "internet"})
    assert (sb.ports, reach.urls) == ([], {})
    assert standin.called("SandboxGetTunnelsV2") == []


def test_expose_with_no_egress_sends_an_allow_list_of_nothing(ready):
    # Modal refuses open ports beside block_network ("Cannot specify open ports when `block_network`
    # is enabled"); an outbound allow-list blocks "all other outbound traffic", so one naming nothing
    # keeps network:none while the tunnels serve.
    sb, reach = ready({"expose": [8080]})
    assert sb.network == NOTHING_ALLOWED
    assert sb.ports == [(8080, "encrypted")]
    assert reach.urls == {"8080": f"https://{sb.tunnel_host(8080)}"}


def test_block_network_narrowing_internet_still_serves_the_exposed_ports_with_nothing_allowed(ready):
    sb, _ = ready({"egress": "internet", "expose": [8080]}, block_network=True)
    assert sb.network == NOTHING_ALLOWED and sb.ports == [(8080, "encrypted")]


def test_no_egress_and_nothing_exposed_still_blocks_the_network(ready):
    sb, _ = ready()
    assert sb.network == BLOCKED


def test_expose_beside_an_allow_list_keeps_the_allow_list(ready):
    sb, _ = ready({"egress": ["10.1.0.0/16", "api.example.com"], "expose": [8080]})
    assert sb.network == {"type": "ALLOWLIST", "cidrs": ["10.1.0.0/16"], "domains": ["api.example.com"],
                          "block_network": False}


def test_inbound_cidrs_option_limits_who_reaches_the_tunnels(ready):
    sb, _ = ready({"expose": [8080]}, inbound_cidr_allowlist=["203.0.113.0/24"])
    assert sb.inbound == ["203.0.113.0/24"]
    sb, _ = ready({"expose": [8080]})
    assert sb.inbound == []  # Modal: anyone with the URL


def test_a_bad_inbound_cidr_is_refused_at_load(ready):
    with pytest.raises(ProfileError, match=r"options\.inbound_cidr_allowlist"):
        ready({"expose": [8080]}, inbound_cidr_allowlist=["not a cidr"])


@pytest.mark.parametrize("gpu, sent", [
    ({"count": 2, "type": "A100"}, ("A100", 2)),
    ({"type": "t4"}, ("T4", 1)),
    ({"count": 4, "type": "A100-80GB"}, ("A100-80GB", 4)),
    ({"count": 1}, ("ANY", 1)),
])
def test_resources_gpu_is_modals_gpu(ready, standin, gpu, sent):
    sb, _ = ready(gpu=gpu)
    assert sb.gpu == sent
    # the SDK sends a GPU sandbox through Modal's V1 sandbox API
    assert len(standin.called("SandboxCreate")) == 1 and standin.called("SandboxCreateV2") == []
    assert standin.called("SandboxTerminate")


def test_no_gpu_asked_for_sends_none(ready):
    sb, _ = ready()
    assert sb.gpu is None


def test_a_gpu_type_modal_does_not_know_is_refused_at_load_listing_what_it_accepts(ready, standin):
    with pytest.raises(ProfileError) as err:
        ready(gpu={"count": 1, "type": "V100"})
    msg = str(err.value)
    assert "profile.test-modal.yaml: field 'resources.gpu.type' (value 'V100')" in msg
    assert "accepts A10, A100, A100-40GB, A100-80GB, A10G, ANY, B200, H100, H200, L4, L40S, RTX-PRO-6000, T4" in msg
    assert standin.called("SandboxCreate") == [] and standin.called("SandboxCreateV2") == []


def test_modal_declares_expose_and_gpu():
    assert {"expose", "gpu"} <= ModalExtension.enforces


def test_a_port_modal_gives_no_tunnel_is_a_transient_provision_error(tmp_path, standin, tokens):
    from sandboxer.errors import ProvisionError

    cfg = write_config(tmp_path / "cfg", standin.url)
    set_policy(cfg / "profiles" / "profile.test-modal.yaml", {"expose": [8080, 9090]})
    ext, prof = load(cfg)
    standin.no_tunnel = {9090}
    handle = ext.provision(request(prof, inputs("sbx-nt"), None))
    with pytest.raises(ProvisionError) as err:
        ext.wait_ready(handle, timeout=10)
    assert err.value.transient
    assert f"ext.test-modal: wait_ready {handle.object_id}: Modal opened no tunnel for port(s) 9090 of " \
           "network.expose" in str(err.value)
    ext.teardown(handle)


def _routed(tmp_path, standin, extra_profile: dict[str, Any], backends=("ext.docker", "ext.test-modal")):
    """A Manager over this config, with profile ``job`` listing ``backends`` (by default ext.docker, which has
    no GPUs on this machine, then ext.test-modal)."""
    from sandboxer import Manager

    cfg = write_config(tmp_path / "cfg", standin.url)
    job = {"slug": "job", "backends": [{"extension": b} for b in backends],
           "ttl": {"default": "10m", "max": "1h"}, **extra_profile}
    (cfg / "profiles" / "profile.job.yaml").write_text(yaml.safe_dump(job))
    return Manager(config_dirs=[cfg], home=tmp_path / "home")


def test_a_gpu_profile_skips_docker_here_and_runs_on_modal_with_docker_s_reason_recorded(tmp_path, standin, tokens):
    with _routed(tmp_path, standin, {"resources": {"gpu": {"count": 2, "type": "L4"}}}) as mgr:
        sb = mgr.create(profile="job", consumer="bob")
        assert sb.extension == "ext.test-modal"
        assert standin.sandboxes[sb.reachability["sandbox_id"]].gpu == ("L4", 2)
        intent = next(e for e in mgr.events(sb.id) if e["kind"] == "create_intent")
        (skipped,) = intent["detail"]["route"]["tried_before"]
        assert skipped["backend"] == "ext.docker" and skipped["error"] == (
            "CapabilityError: ext.docker does not enforce gpu (on this host: set config.gpus: true when the engine "
            "has NVIDIA GPUs and its runtime), which the policy of profile 'job' needs (no network)")
        mgr.teardown(sb.id)


def test_through_the_manager_the_tunnel_urls_are_the_sandboxs_reachability(tmp_path, standin, tokens):
    with _routed(tmp_path, standin, {"network": {"egress": "none", "expose": [8080]}},
                 backends=("ext.test-modal",)) as mgr:
        sb = mgr.create(profile="job", consumer="bob")
        modal_sb = standin.sandboxes[sb.reachability["sandbox_id"]]
        assert sb.extension == "ext.test-modal"
        assert sb.reachability["urls"] == {"8080": f"https://{modal_sb.tunnel_host(8080)}"}
        assert mgr.get(sb.id).reachability["urls"] == sb.reachability["urls"]
        assert modal_sb.network == NOTHING_ALLOWED
        mgr.teardown(sb.id)
