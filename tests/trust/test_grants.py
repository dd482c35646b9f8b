"""The grant vocabulary of registry/capabilities.yaml: closed, with patterns only where the issue shows them."""

from __future__ import annotations

import pytest

from sandboxer.errors import UnknownCapability
from sandboxer.trust import load_grants

GOOD = ["secrets:read:env:FOO", "secrets:read:file:/etc/keys/api", "network:egress:*.example.com",
        "network:egress:api.example.com", "network:egress:10.0.0.7", "ssh:connect:build-1.example.com",
        "ssh:connect:192.0.2.4", "fs:write:cache", "fs:write:data/out", "docker:engine", "state:own-tables"]
BAD = {
    "network:egress:*": "'*' is not a host name, an IP address or *.domain",
    "ssh:connect:*.example.com": "'*.example.com' is not a host name or an IP address",
    "fs:write:../etc": "'../etc' is not a relative path under the extension's home",
    "fs:write:/etc": "'/etc' is not a relative path under the extension's home",
    "secrets:read:FOO": "'FOO' is not env:NAME or file:/absolute/path",
    "docker:engine:x": "unknown capability",
    "root": "unknown capability",
}


@pytest.mark.parametrize("grant", GOOD)
def test_known_grants_pass(grant):
    load_grants().check([grant], "m.yaml")


@pytest.mark.parametrize("grant", sorted(BAD))
def test_unknown_or_malformed_grants_are_refused(grant):
    with pytest.raises(UnknownCapability) as ei:
        load_grants().check(["docker:engine", grant], "m.yaml")
    msg = str(ei.value)
    assert msg.startswith(f"m.yaml: field 'capabilities.grants.1' (value {grant!r}): {BAD[grant]}")
    assert msg.endswith("allowed: secrets:read:<ref>, network:egress:<host-pattern>, ssh:connect:<host>, "
                        "fs:write:<path-under-home>, docker:engine, state:own-tables")
