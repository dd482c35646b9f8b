"""ext.daytona's one error table: what a user sees when Daytona refuses, limits, is full or has lost a sandbox.

Each fault is the stand-in's real HTTP answer to the unmodified SDK; the key (a sentinel) must
never appear in what is raised.
"""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("daytona", reason="the daytona extra is not installed: pip install 'sand-boxer[daytona]'")

from sandboxer.errors import (  # noqa: E402 - after the importorskip
    AuthError,
    CapacityUnavailable,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
)
from sandboxer.testing import request  # noqa: E402

from tests.cloud.conftest_daytona import KEY_ENV, config_dir, inputs, make_ext, sentinel, standin  # noqa: E402,F401
from tests.cloud.daytona_standin import DaytonaStandIn  # noqa: E402

CREATE = r"/api/sandbox"


def _provision(ext, profile, sid: str = "sb-err"):
    return ext.provision(request(profile, inputs(sid), None))


def _text(err: BaseException) -> str:
    return f"{err}\n{err!r}\n{err.__cause__!r}\n{err.__context__!r}"


def test_a_refused_key_is_an_auth_error_naming_the_reference_never_the_key(make_ext, standin: DaytonaStandIn,
                                                                          sentinel: str):
    ext, profile = make_ext()
    standin.fail("POST", CREATE, 401, "Invalid credentials", echo_key=True)
    with pytest.raises(AuthError) as err:
        _provision(ext, profile)
    assert err.value.credential == f"env {KEY_ENV}"
    assert (f"Daytona create: Daytona refused the API key from environment variable {KEY_ENV} (HTTP 401); "
            "check the key or rotate it") in str(err.value)
    assert sentinel not in _text(err.value)
    assert err.value.__cause__ is None and err.value.__context__ is None


def test_an_unset_key_is_an_auth_error_before_any_request(make_ext, standin: DaytonaStandIn,
                                                         monkeypatch: pytest.MonkeyPatch):
    ext, profile = make_ext()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(AuthError, match=rf"no credential found in environment variable {KEY_ENV}"):
        _provision(ext, profile)
    assert standin.calls == []


def test_a_rate_limit_carries_retry_after_from_the_header(make_ext, standin: DaytonaStandIn, sentinel: str):
    ext, profile = make_ext()
    standin.fail("POST", CREATE, 429, "ThrottlerException: Too Many Requests", headers={"Retry-After": "17"},
                 echo_key=True)
    with pytest.raises(RateLimited) as err:
        _provision(ext, profile)
    assert err.value.retry_after == 17.0
    assert "Daytona create: rate limited by Daytona (HTTP 429)" in str(err.value)
    assert sentinel not in _text(err.value)
    assert [c["method"] for c in standin.calls] == ["POST"]  # refused: nothing to clean up, no more requests


def test_a_rate_limit_without_the_header_waits_the_configured_time(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext(rate_limit_retry_after=9)
    standin.fail("POST", CREATE, 429, "Too Many Requests")
    with pytest.raises(RateLimited) as err:
        _provision(ext, profile)
    assert err.value.retry_after == 9.0


def test_a_used_up_quota_is_quota_exceeded(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    standin.fail("POST", CREATE, 403, "Total CPU limit exceeded. Maximum allowed: 10")
    with pytest.raises(QuotaExceeded, match=r"Daytona create: refused by Daytona \(HTTP 403.*Total CPU limit exceeded"):
        _provision(ext, profile)


def test_no_capacity_is_capacity_unavailable(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    standin.fail("POST", CREATE, 503, "No available runners")
    with pytest.raises(CapacityUnavailable, match=r"Daytona has no capacity right now \(HTTP 503\).*No available"):
        _provision(ext, profile)


def test_a_sandbox_no_runner_took_is_capacity_unavailable(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    standin.no_runner = True
    with pytest.raises(CapacityUnavailable, match=r"no Daytona runner took the sandbox in time"):
        _provision(ext, profile)


def test_a_server_error_is_a_transient_provision_error_and_a_bad_request_is_not(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    standin.fail("POST", CREATE, 500, "Internal server error")
    with pytest.raises(ProvisionError) as err:
        _provision(ext, profile)
    assert err.value.transient and "Daytona create failed (HTTP 500)" in str(err.value)
    standin.fail("POST", CREATE, 400, "cpu must not be greater than 4")
    with pytest.raises(ProvisionError) as err:
        _provision(ext, profile, "sb-err-2")
    assert not err.value.transient and "cpu must not be greater than 4" in str(err.value)


def test_an_unreachable_api_is_a_transient_provision_error(make_ext):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    ext, profile = make_ext(api_url=f"http://127.0.0.1:{port}/api")
    with pytest.raises(ProvisionError) as err:
        _provision(ext, profile)
    assert err.value.transient and "cannot reach Daytona" in str(err.value)


def test_a_create_whose_response_was_lost_leaves_no_sandbox_behind(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    standin.lose_next_create_response()
    with pytest.raises(ProvisionError) as err:
        _provision(ext, profile)
    assert err.value.transient
    assert standin.live() == []  # made, then removed by name


def test_a_sandbox_that_does_not_start_in_time_is_removed(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext(profile={"ready_timeout": 1})
    standin.boot_delay = 3600
    with pytest.raises(ProvisionError) as err:
        _provision(ext, profile)
    assert err.value.transient
    assert standin.live() == []


def test_a_create_retried_with_the_same_sandbox_id_finds_the_first_ones_sandbox(make_ext, standin: DaytonaStandIn):
    ext, profile = make_ext()
    first = _provision(ext, profile, "sb-twice")
    again = _provision(ext, profile, "sb-twice")
    assert again.daytona_sandbox_id == first.daytona_sandbox_id
    assert len(standin.live()) == 1
