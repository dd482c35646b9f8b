"""A sandbox's secrets cross the extension-host ABI intact, to the worker alone, and reach the sandbox."""

from __future__ import annotations

import hashlib
import secrets as _random

import pytest

from sandboxer.contract import ProvisionRequest
from sandboxer.host import protocol
from sandboxer.host.client import ProcessExtension
from sandboxer.models import Profile
from tests.host.conftest import STUB_PROCESS, STUB_PROFILE

SECRET_PROFILE = STUB_PROFILE + """    secrets:
      TOKEN: {env: SBX_HOST_TOKEN}
"""


@pytest.fixture
def mgr(cfg, host_manager, monkeypatch):  # type: ignore[no-untyped-def]
    cfg.write("ext.stubproc.yaml", STUB_PROCESS)
    cfg.write("profile.stubproc.yaml", SECRET_PROFILE)
    return host_manager()


def test_the_request_carries_the_values_on_the_wire_and_the_worker_gets_them_back(mgr):
    ext = mgr.extension("ext.stubproc")
    assert isinstance(ext, ProcessExtension)
    req = ProvisionRequest(profile=mgr.profile("stubproc"), sandbox_id="sb-1", secrets={"TOKEN": "sbx_WIRE_value"})
    line = protocol.request(7, "provision", {"request": ext._request(req)})
    data = dict(protocol.decode(line)["params"]["request"])  # what the worker reads, as it reads it
    back = ProvisionRequest(profile=Profile.model_validate(data.pop("profile")), **data)
    assert back.secret_env() == {"TOKEN": "sbx_WIRE_value"} and "sbx_WIRE_value" not in repr(back)
    assert "secrets" not in ext._request(req.model_copy(update={"secrets": {}}))  # an old worker is not troubled


def test_an_out_of_process_sandbox_sees_its_secret_and_the_worker_keeps_it_off_its_environment(mgr, monkeypatch):
    value = "sbx_HOST_" + _random.token_hex(10)
    monkeypatch.setenv("SBX_HOST_TOKEN", value)
    sb = mgr.create(profile="stubproc")
    ext = mgr.extension("ext.stubproc")
    res = mgr.exec(sb.id, ["sh", "-c", 'printf %s "$TOKEN" | sha256sum'])
    assert res.exit_code == 0 and res.stdout.split()[0] == hashlib.sha256(value.encode()).hexdigest()
    with open(f"/proc/{ext.pid()}/environ", "rb") as f:
        assert value.encode() not in f.read()  # resolved by the manager, not given to the worker's environment
    assert value not in ext.stderr.tail()
    mgr.teardown(sb.id)


def test_the_stubs_provider_side_table_forgets_the_values_at_teardown(mgr, monkeypatch, home):
    value = "sbx_FORGOTTEN_" + _random.token_hex(10)
    monkeypatch.setenv("SBX_HOST_TOKEN", value)
    sb = mgr.create(profile="stubproc")
    mgr.teardown(sb.id)
    tables = [p for p in home.rglob("*") if p.is_file() and "saas-stub" in str(p)]
    assert any(p.name.endswith(".db") for p in tables)
    assert all(value.encode() not in p.read_bytes() for p in tables)  # the table, its WAL and shared memory
    assert all(p.stat().st_mode & 0o077 == 0 for p in tables if p.name.endswith(".db"))
