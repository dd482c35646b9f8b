"""ext.modal keeps the profile's network policy: what the unmodified SDK sends on create, per policy.

The stand-in keeps each create's sandbox definition as it arrived over gRPC; its
``network`` is the definition's ``network_access`` (modal 1.6 sends ``block_network``
and the outbound allow-lists there).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("MODAL_CONFIG_PATH", "/nonexistent/sandboxer-tests/modal.toml")
pytest.importorskip("modal", reason="the modal extra is not installed (pip install 'sand-boxer[modal]')")

from sandboxer.errors import ProfileError  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.support.profiles import set_policy  # noqa: E402
from tests.cloud.test_modal import inputs, load, standin, tokens, write_config  # noqa: E402,F401 - fixtures


@pytest.fixture
def create(tmp_path, standin, tokens):
    """Create a sandbox under a profile with this ``network`` (and ``options``); its network as Modal got it."""

    def make(network: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        cfg = write_config(tmp_path / "cfg", standin.url)
        set_policy(cfg / "profiles" / "profile.test-modal.yaml", network, **options)
        ext, prof = load(cfg)
        handle = ext.provision(request(prof, inputs("sbx-net"), None))
        return standin.sandboxes[handle.object_id].network

    return make


BLOCKED = {"type": "BLOCKED", "cidrs": [], "domains": [], "block_network": False}
OPEN = {"type": "OPEN", "cidrs": [], "domains": [], "block_network": False}


def test_the_default_policy_blocks_the_network(create):
    assert create() == BLOCKED


def test_egress_internet_leaves_the_network_open(create):
    assert create({"egress": "internet"}) == OPEN


def test_an_option_that_narrows_internet_to_none_blocks_the_network(create):
    assert create({"egress": "internet"}, block_network=True) == BLOCKED


def test_a_cidr_allow_list_is_sent_as_the_outbound_cidr_allowlist(create):
    assert create({"egress": ["10.1.0.0/16", "192.0.2.7"]}) == {
        "type": "ALLOWLIST", "cidrs": ["10.1.0.0/16", "192.0.2.7/32"], "domains": [], "block_network": False}


def test_a_domain_allow_list_is_sent_as_the_outbound_domain_allowlist(create):
    assert create({"egress": ["api.example.com", "*.pypi.org", "198.51.100.0/24"]}) == {
        "type": "ALLOWLIST", "cidrs": ["198.51.100.0/24"], "domains": ["*.pypi.org", "api.example.com"],
        "block_network": False}


def test_an_option_that_narrows_an_allow_list_to_none_blocks_the_network(create):
    assert create({"egress": ["api.example.com"]}, block_network=True) == BLOCKED


def test_block_network_false_with_an_allow_list_keeps_the_allow_list(create):
    # not a widening: the allow-list still applies
    assert create({"egress": ["10.1.0.0/16"]}, block_network=False)["cidrs"] == ["10.1.0.0/16"]


def test_block_network_false_with_no_network_is_refused_at_load(create):
    with pytest.raises(ProfileError, match=r"field 'options\.block_network' \(value False\) widens field "
                                           r"'network\.egress' \(value 'none'\)"):
        create(None, block_network=False)
