"""Webhook sinks with secret headers: the token is read at delivery, by reference, and stored nowhere.

A real HTTP server on 127.0.0.1 checks the header; the state store's files are read back
byte by byte for the token.
"""

from __future__ import annotations

import http.server
import json
import secrets
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest

from sandboxer.errors import ConfigError
from sandboxer.loader import load_settings
from sandboxer.models import SinkConfig

TOKEN_ENV = "SBX_TEST_SINK_TOKEN"


class Hook(http.server.BaseHTTPRequestHandler):
    """Takes a POST only with the expected Authorization header; 401 otherwise, like a real hub."""

    expected = ""
    seen: list[str | None] = []
    bodies: list[bytes] = []
    redirect_to: str | None = None

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        auth = self.headers.get("Authorization")
        type(self).seen.append(auth)
        if type(self).redirect_to:
            self.send_response(307)
            self.send_header("Location", type(self).redirect_to)
        elif auth == type(self).expected:
            type(self).bodies.append(body)
            self.send_response(200)
        else:
            self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def hook() -> Iterator[http.server.ThreadingHTTPServer]:
    Hook.seen, Hook.bodies, Hook.redirect_to = [], [], None
    server = serve(Hook)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "tok_SENTINEL" + secrets.token_hex(12)
    monkeypatch.setenv(TOKEN_ENV, value)
    Hook.expected = "Bearer " + value
    return value


def stub(cfg) -> None:  # type: ignore[no-untyped-def]
    cfg.write("ext.a.yaml", """
        id: ext.a
        title: a
        version: 1.0.0
        handler: sandboxer.extensions.saas_stub:SaasStubExtension
        capabilities: {isolation_levels: [microvm], pricing_model: metered, features: [exec, snapshots, list_owned]}
        pricing: {per_vcpu_second: 0.01}
        config: {latency_s: 0.0}
    """)
    cfg.write("profile.p.yaml", "slug: p\nbackends: [{extension: ext.a}]\n")


def state_bytes(home: Path) -> bytes:
    """Every file of the state store (the database, its WAL and journal)."""
    return b"".join(p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file())


def test_webhook_header_from_env_is_sent_and_never_stored(cfg, make_manager, home, hook, token, monkeypatch):
    stub(cfg)
    (cfg.root / "settings.yaml").write_text(textwrap.dedent(f"""
        sinks:
          hub:
            kind: webhook
            url: "http://127.0.0.1:{hook.server_port}/usage"
            headers: {{Authorization: {{env: {TOKEN_ENV}, prefix: "Bearer "}}, X-Team: platform}}
            retries: 0
    """))
    mgr = make_manager()
    sink = mgr.catalog.settings.sinks["hub"]
    assert token not in repr(sink) and token not in json.dumps(sink.model_dump(mode="json"))
    assert TOKEN_ENV in repr(sink)
    for _ in range(2):
        mgr.teardown(mgr.create(profile="p").id)

    monkeypatch.setenv(TOKEN_ENV, "tok_ROTATED_WRONG")  # read at delivery: a wrong value is refused
    assert mgr.metering.export(sink="hub") == {"queued": 2, "delivered": 0, "pending": 2}
    assert Hook.seen == ["Bearer tok_ROTATED_WRONG"]
    monkeypatch.delenv(TOKEN_ENV)  # unset: not sent at all, and the reference is named
    assert mgr.metering.export(sink="hub")["pending"] == 2
    assert len(Hook.seen) == 1
    monkeypatch.setenv(TOKEN_ENV, token)
    assert mgr.metering.export(sink="hub") == {"queued": 0, "delivered": 2, "pending": 0}
    assert Hook.seen[-1] == "Bearer " + token
    assert len(Hook.bodies) == 1 and len(Hook.bodies[0].splitlines()) == 2
    mgr.close()
    stored = state_bytes(home)
    assert stored and token.encode() not in stored
    assert b"tok_ROTATED_WRONG" not in stored


def test_a_failed_delivery_names_the_reference_not_the_value(cfg, make_manager, hook, token, monkeypatch, caplog):
    stub(cfg)
    (cfg.root / "settings.yaml").write_text(textwrap.dedent(f"""
        sinks:
          hub:
            kind: webhook
            url: "http://127.0.0.1:{hook.server_port}/usage"
            headers: {{Authorization: {{env: {TOKEN_ENV}, prefix: "Bearer "}}}}
            retries: 0
    """))
    mgr = make_manager()
    mgr.teardown(mgr.create(profile="p").id)
    monkeypatch.delenv(TOKEN_ENV)
    mgr.metering.export(sink="hub")
    assert f"environment variable {TOKEN_ENV}" in caplog.text
    monkeypatch.setenv(TOKEN_ENV, "tok_WRONG" + secrets.token_hex(6))
    mgr.metering.export(sink="hub")
    assert "HTTP 401" in caplog.text and "tok_WRONG" not in caplog.text


def test_webhook_header_from_file(tmp_path: Path, hook, token):
    from sandboxer.metering import push

    keyfile = tmp_path / "hub.token"
    keyfile.write_text(token + "\n")
    sink = SinkConfig.model_validate({
        "kind": "webhook", "url": f"http://127.0.0.1:{hook.server_port}/usage", "retries": 0,
        "headers": {"Authorization": {"file": str(keyfile), "prefix": "Bearer "}},
    })
    push(sink, [{"id": "r1"}])
    assert Hook.seen == ["Bearer " + token]


def test_a_redirect_does_not_carry_the_token_elsewhere(hook, token):
    from sandboxer.metering import push

    class Elsewhere(Hook):
        seen: list[str | None] = []

    other = serve(Elsewhere)
    try:
        Hook.redirect_to = f"http://127.0.0.1:{other.server_port}/steal"
        sink = SinkConfig.model_validate({
            "kind": "webhook", "url": f"http://127.0.0.1:{hook.server_port}/usage", "retries": 0,
            "headers": {"Authorization": {"env": TOKEN_ENV, "prefix": "Bearer "}},
        })
        with pytest.raises(OSError, match="HTTP 307"):
            push(sink, [{"id": "r1"}])
        assert Elsewhere.seen == []
    finally:
        other.shutdown()
        other.server_close()


def test_a_literal_authorization_header_is_refused_without_echoing_it(tmp_path: Path):
    (tmp_path / "settings.yaml").write_text(textwrap.dedent("""
        sinks:
          hub: {kind: webhook, url: "https://hub.example/usage", headers: {Authorization: "Bearer tok_LITERAL123"}}
    """))
    with pytest.raises(ConfigError, match=r"settings\.yaml.*'Authorization'.*\{env: NAME") as info:
        load_settings([tmp_path])
    assert "tok_LITERAL123" not in str(info.value)
