"""trust.yaml is the operator's: read from their config dirs only, checked, merged."""

from __future__ import annotations

import pickle

import pytest
import yaml

from sandboxer.errors import ConfigError, UnknownKey
from sandboxer.trust import SigningKey, add_trusted_key, load_trust, sign_bundle, verify


def test_the_default_is_the_operators_config_dirs(monkeypatch, operator_dir, acme):
    add_trusted_key(operator_dir, "acme", acme.public_key_b64())
    monkeypatch.setenv("SANDBOXER_CONFIG", str(operator_dir))
    assert list(load_trust().keys) == [acme.key_id]


def test_a_package_config_dir_or_the_bundle_cannot_add_trust(monkeypatch, bundle, acme, tmp_path):
    """A trust.yaml shipped by a package, or beside the bundle, trusts nothing."""
    manifest, artifact = bundle()
    sign_bundle(manifest, acme, artifact)
    add_trusted_key(manifest.parent, "acme", acme.public_key_b64())  # beside the bundle
    pkg = tmp_path / "pkgconfig"
    pkg.mkdir()
    add_trusted_key(pkg, "acme", acme.public_key_b64())
    import sandboxer.loader

    monkeypatch.setattr(sandboxer.loader, "package_config_dirs", lambda: [pkg])  # as if a package shipped it
    operator = tmp_path / "operator"
    operator.mkdir()
    monkeypatch.setenv("SANDBOXER_CONFIG", str(operator))
    with pytest.raises(UnknownKey):
        verify(manifest, artifact, load_trust(), {})


def test_an_id_that_is_not_the_keys_is_an_error(operator_dir, acme):
    other = SigningKey.generate()
    (operator_dir / "trust.yaml").write_text(yaml.safe_dump(
        {"publishers": {"acme": {"keys": [{"id": other.key_id, "public_key": acme.public_key_b64()}]}}}))
    with pytest.raises(ConfigError) as ei:
        load_trust([operator_dir])
    assert str(ei.value).startswith(f"{operator_dir / 'trust.yaml'}: field 'publishers.acme.keys.0'")
    assert f"id {other.key_id!r} is not this public key's id ({acme.key_id})" in str(ei.value)


def test_one_key_for_two_publishers_is_an_error(tmp_path, acme):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    add_trusted_key(a, "acme", acme.public_key_b64())
    add_trusted_key(b, "evil", acme.public_key_b64())
    with pytest.raises(ConfigError, match=f"already trusted for publisher 'acme' in {a / 'trust.yaml'}"):
        load_trust([a, b])


def test_dirs_merge_keys_and_revocations(tmp_path, acme):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    second = SigningKey.generate()
    add_trusted_key(a, "acme", acme.public_key_b64())
    add_trusted_key(b, "acme", second.public_key_b64())
    from sandboxer.trust import revoke_key

    revoke_key(b, acme.key_id)
    store = load_trust([a, b])
    assert set(store.keys) == {acme.key_id, second.key_id} and set(store.revoked) == {acme.key_id}


def test_a_signing_key_is_never_pickled(acme):
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(acme)


def test_a_bad_public_key_is_shown_in_the_error_it_is_no_secret(tmp_path):
    """describe_validation hides values of fields named like secrets; a public key is not one."""
    from pydantic import BaseModel, ValidationError

    from sandboxer.loader import describe_validation

    class Key(BaseModel):
        public_key: int
        api_key: int

    try:
        Key.model_validate({"public_key": "not-base64!", "api_key": "s3cr3t"})
    except ValidationError as exc:
        text = describe_validation("trust.yaml", exc)
    assert "(value 'not-base64!')" in text and "s3cr3t" not in text and "(value redacted)" in text
