"""The trust commands as a user runs them: keygen, sign, trust add-key/revoke, verify (exit codes, --json)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxer.trust import load_signing_key

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sbx(tmp_path):
    """``run(*args, check=None, env=None)``; every output is kept in ``run.outputs`` for the leak check."""
    outputs: list[str] = []
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
            "SANDBOXER_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}

    def run(*args, check=None, env=None):
        p = subprocess.run([sys.executable, "-m", "sandboxer", *map(str, args)], capture_output=True, text=True,
                           env={**base, **(env or {})}, cwd=tmp_path, timeout=120)
        outputs.extend([p.stdout, p.stderr])
        if check is not None:
            assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
        return p

    run.outputs = outputs
    return run


def _secret_forms(key_path: Path, env=None) -> list[str]:
    raw = load_signing_key(key_path, passphrase_env=env)._raw_private()
    pem_body = [line for line in key_path.read_text().splitlines() if not line.startswith("-----")]
    return [raw.hex(), base64.b64encode(raw).decode(), *pem_body]


def test_keygen_sign_trust_verify_revoke_round_trip(sbx, bundle, tmp_path):
    manifest, artifact = bundle()
    p = sbx("extensions", "keygen", "--publisher", "acme", "--out", "keys", check=0)
    key, pub = tmp_path / "keys" / "acme.key", tmp_path / "keys" / "acme.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
    kid = load_signing_key(key).key_id
    assert f"key id: {kid}\n" in p.stdout and "private key: keys/acme.key (mode 0600; keep it secret)\n" in p.stdout

    p = sbx("extensions", "sign", manifest, "--key", key, "--artifact", artifact, "--expires", "30d", check=0)
    assert p.stdout.startswith(f"signed {manifest} with key {kid} (expires 20")
    assert Path(f"{manifest}.sig").is_file()

    operator = tmp_path / "operator"
    operator.mkdir()
    p = sbx("--config", operator, "extensions", "verify", manifest, check=77)
    assert p.stderr.startswith(f"error: {manifest}.sig: field 'key_id' (value {kid!r}): unknown key: not in "
                               f"no trust.yaml in the config dirs ({operator})")

    p = sbx("--config", operator, "extensions", "trust", "add-key", "--publisher", "acme",
            "--public-key-file", pub, check=0)
    assert p.stdout == f"trusted key {kid} of publisher acme in {operator / 'trust.yaml'}\n"
    p = sbx("--config", operator, "extensions", "verify", manifest, check=0)
    assert p.stdout.startswith(f"verified: ext.workspace 0.1.0 from acme, key {kid}, artifact {artifact.name} sha256 ")
    got = json.loads(sbx("--config", operator, "extensions", "verify", manifest, "--json", check=0).stdout)
    assert got["verified"] is True and got["key_id"] == kid and got["publisher"] == "acme"
    assert got["grants"] == ["fs:write:workspaces", "secrets:read:env:WORKSPACE_TOKEN", "network:egress:*.example.com"]

    listed = json.loads(sbx("--config", operator, "extensions", "trust", "list", "--json", check=0).stdout)
    assert listed == [{"id": kid, "publisher": "acme", "not_after": None, "revoked": False,
                       "source": str(operator / "trust.yaml")}]

    flipped = bytearray(artifact.read_bytes())
    flipped[100] ^= 0xFF
    artifact.write_bytes(bytes(flipped))
    p = sbx("--config", operator, "extensions", "verify", manifest, "--json", check=77)
    got = json.loads(p.stdout)
    assert got["verified"] is False and got["reason"] == "artifact-changed" and got["file"] == str(artifact)
    assert got["error"].startswith(f"{artifact}: sha256 ")
    flipped[100] ^= 0xFF
    artifact.write_bytes(bytes(flipped))

    p = sbx("--config", operator, "extensions", "trust", "revoke", kid, check=0)
    assert p.stdout == f"revoked key {kid} in {operator / 'trust.yaml'}\n"
    p = sbx("--config", operator, "extensions", "verify", manifest, check=77)
    assert p.stderr == (f"error: {manifest}.sig: field 'key_id' (value {kid!r}): key of publisher 'acme' is revoked "
                        f"in {operator / 'trust.yaml'}; ask the publisher for a bundle signed with a new key\n")

    leaked = [s for s in _secret_forms(key) for out in sbx.outputs if s in out]
    assert not leaked, "private key material in CLI output"


def test_an_encrypted_key_needs_its_passphrase_env_and_never_shows_it(sbx, bundle, tmp_path, monkeypatch):
    manifest, artifact = bundle()
    env = {"ACME_PASS": "s3cret-passphrase"}
    sbx("extensions", "keygen", "--publisher", "acme", "--out", "keys", "--passphrase-env", "ACME_PASS", env=env,
        check=0)
    key = tmp_path / "keys" / "acme.key"
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    p = sbx("extensions", "sign", manifest, "--key", key, "--artifact", artifact, check=77)
    assert p.stderr == (f"error: {key}: the key is encrypted; pass the environment variable holding its "
                        f"passphrase (--passphrase-env NAME)\n")
    sbx("extensions", "sign", manifest, "--key", key, "--artifact", artifact, "--passphrase-env", "ACME_PASS",
        env=env, check=0)
    monkeypatch.setenv("ACME_PASS", env["ACME_PASS"])
    forms = _secret_forms(key, env="ACME_PASS")
    assert not [s for s in [*forms, env["ACME_PASS"]] for out in sbx.outputs if s in out]


def test_errors_name_the_file_field_and_value(sbx, bundle, tmp_path):
    manifest, artifact = bundle()
    missing = tmp_path / "nope.key"
    p = sbx("extensions", "sign", manifest, "--key", missing, "--artifact", artifact, check=77)
    assert p.stderr == f"error: {missing}: cannot read the key: No such file or directory\n"
    sbx("extensions", "keygen", "--publisher", "acme", "--out", "keys", check=0)
    p = sbx("extensions", "sign", manifest, "--key", "keys/acme.key", "--artifact", artifact, "--expires", "soon",
            check=64)
    assert "--expires" in p.stderr and "'soon'" in p.stderr
    p = sbx("extensions", "keygen", "--publisher", "Acme Corp", "--out", "keys2", check=64)
    assert "--publisher" in p.stderr and "'Acme Corp'" in p.stderr
    p = sbx("extensions", "keygen", "--publisher", "acme", "--out", "keys", check=77)
    assert p.stderr == "error: keys/acme.key: already exists; a key file is never overwritten " \
                       "(choose another --out, or remove it first)\n"
    bad = manifest.read_text().replace("abi: 2", "abi: two")
    manifest.write_text(bad)
    p = sbx("extensions", "sign", manifest, "--key", "keys/acme.key", "--artifact", artifact, check=77)
    assert p.stderr.startswith(f"error: {manifest}: field 'abi' (value 'two'): ")
    p = sbx("extensions", "trust", "revoke", "abc", check=78)
    assert "key id 'abc': expected 16 lowercase hex digits" in p.stderr
