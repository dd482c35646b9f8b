"""ext.e2b keeps the profile's network policy: what the unmodified SDK sends on create, per policy.

The stand-in records the create body's ``allow_internet_access`` and ``network`` as they
arrived on the wire; nothing in the SDK is mocked. Every create also says
``allowPublicTraffic: false`` (no port of the sandbox is public: tests/cloud/test_e2b_expose.py).
"""

from __future__ import annotations

from typing import Any

import re
import pytest

pytest.importorskip("e2b", reason="the e2b extra is not installed: pip install 'sand-boxer[e2b]'")

from sandboxer.errors import ProvisionError  # noqa: E402
from sandboxer.loader import load_catalog  # noqa: E402
from sandboxer.testing import request  # noqa: E402
from tests.support.profiles import set_policy  # noqa: E402

from tests.cloud.conftest_e2b import config_dir, inputs, sentinel, standin  # noqa: E402,F401 - fixtures
from tests.cloud.e2b_standin import E2BStandIn  # noqa: E402


#: what every create's network says besides its egress: no URL of the sandbox answers without its token
PRIVATE = {"allowPublicTraffic": False}


@pytest.fixture
def create(config_dir, standin: E2BStandIn):
    """Create a sandbox under a profile with this ``network`` (and ``options``); the box as E2B got it."""

    def make(network: dict[str, Any] | None = None, **options: Any):
        cfg = config_dir()
        set_policy(cfg / "profiles" / "profile.test-e2b.yaml", network, **options)
        catalog = load_catalog([cfg], builtins=False)
        ext = catalog.extensions["ext.test-e2b"].instance()
        handle = ext.provision(request(catalog.profiles["test-e2b"], inputs("sbx-net"), None))
        return standin.boxes[handle.e2b_sandbox_id]

    return make


def test_the_default_policy_sends_no_internet_access(create):
    box = create()
    assert (box.allow_internet_access, box.network) == (False, PRIVATE)


def test_egress_internet_sends_internet_access(create):
    box = create({"egress": "internet"})
    assert (box.allow_internet_access, box.network) == (True, PRIVATE)


def test_an_option_that_narrows_internet_to_none_is_kept(create):
    box = create({"egress": "internet"}, allow_internet_access=False)
    assert (box.allow_internet_access, box.network) == (False, PRIVATE)


def test_a_cidr_allow_list_allows_only_it_and_denies_all_other_traffic(create):
    box = create({"egress": ["10.1.0.0/16", "192.0.2.7"]})
    assert box.allow_internet_access is None
    assert box.network == {"allowOut": ["10.1.0.0/16", "192.0.2.7/32"], "denyOut": ["0.0.0.0/0"], **PRIVATE}


def test_a_domain_allow_list_is_sent_as_domains(create):
    box = create({"egress": ["api.example.com", "*.pypi.org", "198.51.100.0/24"]})
    assert box.allow_internet_access is None
    assert box.network == {"allowOut": ["*.pypi.org", "198.51.100.0/24", "api.example.com"],
                           "denyOut": ["0.0.0.0/0"], **PRIVATE}


def test_an_option_that_narrows_an_allow_list_to_none_sends_no_network(create):
    box = create({"egress": ["api.example.com"]}, allow_internet_access=False)
    assert (box.allow_internet_access, box.network) == (False, PRIVATE)


def test_a_deny_list_with_internet_is_sent_as_deny_out(create):
    box = create({"egress": "internet", "deny": ["10.0.0.0/8", "169.254.169.254"]})
    assert box.allow_internet_access is True
    assert box.network == {"denyOut": ["10.0.0.0/8", "169.254.169.254/32"], **PRIVATE}


def test_a_deny_list_inside_a_cidr_allow_list_is_cut_out_of_it(create):
    # E2B: "Allowed entries always take precedence over denied entries", so the denied part
    # is taken out of what is allowed rather than sent as a deny_out E2B would not apply.
    box = create({"egress": ["10.0.0.0/8", "192.0.2.0/24"], "deny": ["10.128.0.0/9", "192.0.2.0/24"]})
    assert box.network == {"allowOut": ["10.0.0.0/9"], "denyOut": ["0.0.0.0/0"], **PRIVATE}


def test_a_deny_list_that_denies_all_that_is_allowed_sends_no_network(create):
    box = create({"egress": ["10.1.0.0/16"], "deny": ["10.0.0.0/8"]})
    assert (box.allow_internet_access, box.network) == (False, PRIVATE)


def test_a_deny_list_with_domains_allowed_is_refused_before_any_request(create, standin: E2BStandIn):
    with pytest.raises(ProvisionError) as err:
        create({"egress": ["api.example.com"], "deny": ["10.0.0.0/8"]})
    assert not err.value.transient
    assert ("network.deny cannot be kept with domain names in network.egress (api.example.com): E2B lets an allowed "
            "domain through whatever deny_out says") in str(err.value)
    assert [c for c in standin.calls if c["path"] == "/v2/sandboxes"] == []


def test_the_router_never_places_a_policy_of_domains_and_a_deny_list_on_e2b(config_dir, standin: E2BStandIn, tmp_path):
    """E2B keeps domain allow-lists and deny-lists, not the two together: the catalog says so at
    load, `validate` warns, and the router refuses before anything is recorded or sent."""
    from sandboxer import Manager
    from sandboxer.errors import CapabilityError

    cfg = config_dir()
    set_policy(cfg / "profiles" / "profile.test-e2b.yaml", {"egress": ["api.example.com"], "deny": ["10.0.0.0/8"]})
    catalog = load_catalog([cfg], builtins=False)
    reason = ("network.deny cannot be kept with domain names in network.egress (api.example.com): E2B lets an "
              "allowed domain through whatever deny_out says")
    assert reason in catalog.extensions["ext.test-e2b"].refusals[("test-e2b", 0)][0]
    assert any(reason in w for w in catalog.warnings)
    mgr = Manager(catalog=catalog, home=tmp_path / "home")
    with pytest.raises(CapabilityError, match=r"ext\.test-e2b cannot keep the policy of profile 'test-e2b': "
                                              + re.escape(reason)):
        mgr.create(profile="test-e2b", consumer="t")
    assert mgr.list() == [] and [c for c in standin.calls if c["path"] == "/v2/sandboxes"] == []
