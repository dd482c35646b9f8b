"""The Sandbox object create() returns, Manager.extend_ttl, the files verbs' checks, and AsyncManager,
on the scriptable fake backend."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from sandboxer import AsyncManager, AsyncSandbox, Sandbox, SandboxStatus
from sandboxer.errors import CapabilityError, InputError, SandboxFileNotFound, SandboxNotFound, SandboxStateError, TTLError
from tests.conftest import FAKE_EXT, FAKE_PROFILE


@pytest.fixture
def mgr(cfg, make_manager):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.fake.yaml", FAKE_PROFILE)
    return make_manager()


def test_create_returns_a_sandbox_that_is_still_its_status(mgr):
    sb = mgr.create(profile="fake", consumer="me")
    assert isinstance(sb, Sandbox) and isinstance(sb, SandboxStatus)
    status = mgr.get(sb.id)
    assert sb == status and status == sb
    assert sb.model_dump(mode="json") == status.model_dump(mode="json")
    assert json.loads(sb.model_dump_json()) == json.loads(status.model_dump_json())
    assert "manager" not in repr(sb) and "_manager" not in sb.model_dump()
    assert sb.exec(["echo", "hi"]).stdout == "echo hi\n"
    assert sb.teardown() is sb and sb.state.value == "terminated"


def test_sandbox_context_manager_and_manager_sandbox_tear_down(mgr):
    with mgr.create(profile="fake", consumer="me") as sb:
        pass
    assert mgr.get(sb.id).state.value == "terminated"
    with pytest.raises(RuntimeError):
        with mgr.sandbox("fake", consumer="me") as sb2:
            assert isinstance(sb2, Sandbox)
            raise RuntimeError("boom")
    assert mgr.get(sb2.id).state.value == "terminated"


def test_from_id_reattaches(mgr):
    sb = mgr.create(profile="fake", consumer="me")
    again = Sandbox.from_id(mgr, sb.id)
    assert again == sb and again.exec(["true"]).exit_code == 0
    with pytest.raises(SandboxNotFound, match="sb-missing"):
        Sandbox.from_id(mgr, "sb-missing")
    sb.teardown()


def test_extend_ttl_moves_the_expiry_and_stops_at_the_profiles_maximum(mgr):
    sb = mgr.create(profile="fake", consumer="me")  # ttl default 10m, max 1h
    first = sb.expires_at
    sb.extend_ttl(600)
    assert (sb.expires_at - first).total_seconds() == pytest.approx(600, abs=1)
    assert mgr.get(sb.id).expires_at == sb.expires_at
    assert [e["kind"] for e in mgr.events(sb.id)][-1] == "ttl_extended"
    with pytest.raises(TTLError, match=rf"sandbox {sb.id}: extending its TTL by 1h .* over profile 'fake''s "
                                       r"maximum of 1h; it may live until"):
        sb.extend_ttl(3600)
    with pytest.raises(TTLError, match="positive"):
        sb.extend_ttl(0)
    sb.keepalive(60)  # it lives 20 minutes already: nothing to do
    assert mgr.get(sb.id).expires_at == sb.expires_at
    sb.keepalive(1800)
    assert sb.expires_at.timestamp() == pytest.approx(time.time() + 1800, abs=2)
    sb.teardown()
    with pytest.raises(SandboxStateError, match="not ready"):
        sb.extend_ttl(60)


def test_files_on_a_backend_without_the_feature_are_refused_before_any_work(mgr):
    sb = mgr.create(profile="fake", consumer="me")
    with pytest.raises(CapabilityError, match=rf"ext.fake does not support files \(sandbox {sb.id}\)"):
        sb.files.write("a.txt", b"x")
    with pytest.raises(InputError, match=rf"sandbox {sb.id}: path 'a\\x00' contains a NUL byte"):
        sb.files.read("a\0")
    with pytest.raises(InputError, match="mode"):
        sb.files.write("a.txt", b"x", mode=0o17777)
    with pytest.raises(SandboxNotFound):
        mgr.write_file("sb-missing", "a.txt", b"x")
    sb.teardown()


def test_async_manager_has_the_same_semantics(mgr):
    async def main() -> None:
        amgr = AsyncManager(manager=mgr)
        async with await amgr.create(profile="fake", consumer="me") as sb:
            assert isinstance(sb, AsyncSandbox) and sb.state.value == "ready"
            results = await asyncio.gather(*(sb.exec(["echo", str(i)]) for i in range(8)))
            assert [r.stdout for r in results] == [f"echo {i}\n" for i in range(8)]
            await sb.extend_ttl(60)
            with pytest.raises(CapabilityError):
                await sb.files.write("x", b"y")
            assert (await amgr.get(sb.id)).expires_at == sb.expires_at
        assert (await amgr.get(sb.id)).state.value == "terminated"
        async with amgr.sandbox("fake", consumer="me") as sb2:
            again = await AsyncSandbox.from_id(amgr, sb2.id)
            assert again.id == sb2.id
        assert (await amgr.get(sb2.id)).state.value == "terminated"
        many = await asyncio.gather(*(amgr.create(profile="fake", consumer="me") for _ in range(6)))
        assert len({s.id for s in many}) == 6
        await asyncio.gather(*(s.teardown() for s in many))
        assert all(s.state.value == "terminated" for s in many)
        await amgr.close()  # not its manager: left open
        assert mgr.list() == []

    asyncio.run(main())


FAKE_FILES = FAKE_EXT.replace("features: [exec, snapshots, list_owned]", "features: [exec, list_owned, files]")


def test_a_files_call_past_its_deadline_is_abandoned_and_cut_off_from_the_stream(cfg, make_manager):
    import io
    import threading

    from sandboxer.deadline import CallLimits
    from sandboxer.errors import ExtensionTimeout, SandboxStateError

    cfg.write("ext.fake.yaml", FAKE_FILES)
    cfg.write("profile.fake.yaml", FAKE_PROFILE)
    mgr = make_manager(call_limits=CallLimits(files=0.2, files_rate=1e12))
    sb = mgr.create(profile="fake", consumer="me")
    fake = mgr.extension("ext.fake")
    late: list[BaseException] = []
    resumed = threading.Event()

    def slow_write(handle, path, source):  # type: ignore[no-untyped-def]
        resumed.wait(5)
        try:
            source.read(10)
        except BaseException as exc:  # noqa: BLE001 - what the late thread met
            late.append(exc)
        return 0

    fake.script("write_file", slow_write)
    stream = io.BytesIO(b"the caller's data")
    with pytest.raises(ExtensionTimeout, match=rf"write_file of 'f.txt' in sandbox {sb.id} did not return within 0.2s"):
        sb.files.write("f.txt", stream)
    resumed.set()
    deadline = time.monotonic() + 5
    while not late and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(late[0], SandboxStateError) and stream.tell() == 0  # the caller's stream was not touched
    # without a fault the fake keeps files too
    assert sb.files.write("f.txt", b"abc") == 3 and sb.files.read("f.txt") == b"abc"
    assert [(i.name, i.size) for i in sb.files.list("f.txt")] == [("f.txt", 3)]
    sb.files.remove("f.txt")
    with pytest.raises(SandboxFileNotFound):
        sb.files.read("f.txt")
    sb.teardown()


def test_extend_ttl_is_refused_where_the_backend_fixed_the_end_at_create(mgr):
    sb = mgr.create(profile="fake", consumer="t", ttl=60)
    ext = mgr.extension("ext.fake")
    ext.own_ttl = "fixed"  # the seam: a backend that ends the sandbox at its create-time TTL
    try:
        with pytest.raises(TTLError, match=rf"sandbox {sb.id}: ext.fake ends it at the TTL it was created with"):
            sb.extend_ttl(30)
        assert mgr.get(sb.id).expires_at == sb.expires_at
    finally:
        del ext.own_ttl



@pytest.mark.parametrize("kwargs, message", [
    ({"ttl": "1x"}, r"^create request: field 'ttl' \(value '1x'\): '1x' is not a duration"),
    ({"labels": "team=red"}, r"^create request: field 'labels' \(value 'team=red'\): "),
    ({"colour": "red"}, r"^create request: field 'colour' \(value 'red'\): unknown field"),
])
def test_a_bad_create_request_is_an_input_error_of_the_one_tree(mgr, kwargs, message):
    # keyword arguments a careless caller types: one InputError (a SandboxerError), never pydantic's own
    # ValidationError, and nothing recorded
    args = {"profile": "fake", "consumer": "me", **kwargs}
    with pytest.raises(InputError, match=message):
        mgr.create(**args)
    with pytest.raises(InputError, match=message):
        with mgr.sandbox(**args):
            pass
    assert mgr.list(all=True) == []
