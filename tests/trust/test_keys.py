"""Private keys: PEM, mode 0600, encrypted by a passphrase named by env var, never shown."""

from __future__ import annotations

import base64
import stat

import pytest

from sandboxer.errors import SigningKeyError
from sandboxer.trust import SigningKey, canonical_json, key_id, load_signing_key


def _secret_forms(key: SigningKey) -> list[str]:
    raw = key._raw_private()  # test-only peek at the private bytes, to look for them in outputs
    return [raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")]


def test_key_file_is_0600_pem_and_round_trips(tmp_path, acme):
    path = acme.save(tmp_path / "acme.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----")
    again = load_signing_key(path)
    assert again.key_id == acme.key_id and again.public_key_b64() == acme.public_key_b64()


def test_key_id_is_the_first_16_hex_of_sha256_of_the_raw_public_key(acme):
    import hashlib

    raw = base64.b64decode(acme.public_key_b64())
    assert len(raw) == 32
    assert acme.key_id == key_id(raw) == hashlib.sha256(raw).hexdigest()[:16]


def test_repr_shows_only_the_id(acme):
    for shown in (repr(acme), str(acme)):
        assert shown == f"SigningKey(id={acme.key_id})"
        assert not any(s in shown for s in _secret_forms(acme))


def test_an_existing_key_file_is_never_overwritten(tmp_path, acme):
    path = acme.save(tmp_path / "acme.key")
    before = path.read_bytes()
    with pytest.raises(SigningKeyError, match=f"{path}: already exists; a key file is never overwritten"):
        SigningKey.generate().save(path)
    assert path.read_bytes() == before


def test_encrypted_with_a_passphrase_from_an_env_var(tmp_path, acme, monkeypatch):
    monkeypatch.setenv("ACME_PASS", "correct horse battery staple")
    path = acme.save(tmp_path / "acme.key", passphrase_env="ACME_PASS")
    assert path.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_signing_key(path, passphrase_env="ACME_PASS").key_id == acme.key_id
    with pytest.raises(SigningKeyError) as ei:
        load_signing_key(path)
    assert str(ei.value) == f"{path}: the key is encrypted; pass the environment variable holding its " \
                            f"passphrase (--passphrase-env NAME)"
    monkeypatch.setenv("ACME_PASS", "wrong")
    with pytest.raises(SigningKeyError) as ei:
        load_signing_key(path, passphrase_env="ACME_PASS")
    assert str(ei.value) == f"{path}: cannot decrypt the key with the passphrase in environment variable ACME_PASS"
    assert "wrong" not in str(ei.value)
    monkeypatch.delenv("ACME_PASS")
    with pytest.raises(SigningKeyError, match="environment variable ACME_PASS is not set"):
        load_signing_key(path, passphrase_env="ACME_PASS")


def test_a_key_file_others_can_read_is_refused(tmp_path, acme):
    path = acme.save(tmp_path / "acme.key")
    path.chmod(0o644)
    with pytest.raises(SigningKeyError) as ei:
        load_signing_key(path)
    assert str(ei.value) == f"{path}: mode 0644 lets others read the private key; chmod 600 {path}"


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": [1, True, None], "a": {"é": "ü", "A": 1.0}}) == \
        '{"a":{"A":1,"é":"ü"},"b":[1,true,null]}'.encode()
    # RFC 8785 sorts keys by UTF-16 code units: U+1F600 (surrogates D83D DE00) before U+E000,
    # where Python's code-point order (json.dumps sort_keys) puts U+E000 first
    assert canonical_json({"\ue000": 2, "\U0001F600": 1}) == '{"\U0001F600":1,"\ue000":2}'.encode()
    with pytest.raises(ValueError, match="field 'a.0': not JSON"):
        canonical_json({"a": [object()]})
