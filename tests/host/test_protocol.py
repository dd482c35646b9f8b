"""The wire protocol, spoken raw to a real worker, and its error mapping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sandboxer import errors
from sandboxer.host import protocol
from sandboxer.host.client import wait_gone

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST = {"id": "ext.stub", "title": "stub", "version": "0.1.0",
            "handler": "sandboxer.extensions.saas_stub:SaasStubExtension",
            "capabilities": {"isolation_levels": ["microvm"], "pricing_model": "metered", "features": ["exec"]},
            "config": {}}


def _worker(tmp_path):  # type: ignore[no-untyped-def]
    return subprocess.Popen([sys.executable, "-m", "sandboxer.host", "--extension", "ext.stub"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": os.defpath, "PYTHONPATH": REPO, "HOME": str(tmp_path)}, cwd=tmp_path)


def _say(proc, msg):  # type: ignore[no-untyped-def]
    proc.stdin.write(json.dumps(msg).encode() + b"\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_a_handshake_of_another_abi_is_refused_and_the_worker_exits(tmp_path) -> None:
    proc = _worker(tmp_path)
    answer = _say(proc, {"id": 1, "method": "handshake", "params": {"abi_version": 1, "manifest": MANIFEST,
                                                                     "home": str(tmp_path)}})
    assert answer == {"id": 1, "error": {"type": "ExtensionLoadError", "message": (
        "ext.stub: the manager speaks extension-host ABI 1, this worker speaks 2; install the same "
        "sand-boxer version for both")}}
    assert proc.wait(10) == 2


def test_requests_events_and_responses_on_the_wire(tmp_path) -> None:
    proc = _worker(tmp_path)
    try:
        hello = _say(proc, {"id": 1, "method": "handshake", "params": {"abi_version": 2, "manifest": MANIFEST,
                                                                        "home": str(tmp_path)}})
        assert hello["result"]["abi_version"] == 2 and hello["result"]["pid"] == proc.pid
        assert _say(proc, {"id": 2, "method": "ping", "params": {}}) == {"id": 2, "result": "pong"}
        profile = {"slug": "p", "extension": "ext.stub"}
        handle = _say(proc, {"id": 3, "method": "provision", "params": {"request": {
            "profile": profile, "inputs": {}, "sandbox_id": "sb-1", "owner_labels": {}, "tags": {}, "ttl": 60,
            "host": None}}})["result"]
        assert handle == {"host": "stub", "stub_id": handle["stub_id"], "sandbox_id": "sb-1", "restored_from": None}
        event = _say(proc, {"id": 4, "method": "exec", "params": {"handle": handle, "argv": ["echo", "hé"],
                                                                  "stream": True}})
        assert event == {"id": 4, "event": "output", "stream": "stdout", "text": "hé\n"}
        done = json.loads(proc.stdout.readline())
        assert done["id"] == 4 and done["result"]["stdout"] == "hé\n" and done["result"]["exit_code"] == 0
        assert _say(proc, {"id": 5, "method": "nope", "params": {}})["error"] == {
            "type": "BackendError", "message": "ext.stub: the worker has no method 'nope' (extension-host ABI 2)",
            "backend": "ext.stub", "transient": False}
        assert _say(proc, {"id": 6, "method": "shutdown"}) == {"id": 6, "result": None}
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("exc", [
    errors.RateLimited("slow down", retry_after=2.5, backend="ext.x"),
    errors.AuthError("refused", credential="env K", backend="ext.x"),
    errors.ExtensionTimeout("late", timeout=3.0, backend="ext.x"),
    errors.InputError("bad input"),
    errors.ExtensionCrashed("died", log="/x/worker.log", backend="ext.x"),
])
def test_errors_of_the_tree_cross_as_themselves(exc) -> None:
    wire = json.loads(protocol.error_response(1, exc, worker="ext.x"))["error"]
    back = protocol.error_from_wire(wire, worker="ext.x")
    assert type(back) is type(exc) and str(back) == str(exc)
    for field in ("backend", "retry_after", "credential", "timeout", "log"):
        assert getattr(back, field, None) == getattr(exc, field, None)


def test_an_unknown_error_type_is_a_backend_error_naming_the_worker() -> None:
    back = protocol.error_from_wire({"type": "SystemExit", "message": "x"}, worker="ext.x")
    assert type(back) is errors.BackendError and str(back) == "ext.x: SystemExit: x"


def test_the_worker_exits_when_the_manager_process_dies(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from pathlib import Path
        from sandboxer.extensions.base import NoConfig
        from sandboxer.extensions.saas_stub import SaasStubExtension, StubConfig
        from sandboxer.host.client import ProcessExtension
        from sandboxer.loader import HandlerInfo
        from sandboxer.models import ExtensionManifest
        m = ExtensionManifest.model_validate({MANIFEST!r})
        ext = ProcessExtension(m, HandlerInfo.of(SaasStubExtension, StubConfig()), home=Path({str(tmp_path)!r}))
        ext.ping()
        print(ext.pid(), flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert wait_gone(int(out.stdout.strip()), 10)
