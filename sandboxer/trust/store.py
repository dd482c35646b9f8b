"""``trust.yaml``: the publisher keys an operator trusts, and the keys revoked.

It is read from the operator's config dirs only (``--config`` / ``SANDBOXER_CONFIG``), never from
the built-in config, a package's config dir or a bundle: trust is the operator's word. Several dirs
merge (keys and revocations add up; one key id under two publishers is an error)::

    publishers:
      acme:
        keys:
          - id: 3f2a9c0d1b7e6a45          # first 16 hex of sha256 of the raw public key
            public_key: <base64 of the raw 32 bytes>
            not_after: 2027-12-31T00:00:00Z   # optional
    revoked: [0123456789abcdef]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from sandboxer.errors import ConfigError
from sandboxer.models import Strict
from sandboxer.trust.keys import decode_public_key, key_id

FILENAME = "trust.yaml"


def _utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=timezone.utc)
    return value


UtcTime = Annotated[datetime, BeforeValidator(_utc)]


class TrustedKey(Strict):
    id: str = Field(pattern=r"^[0-9a-f]{16}$")
    public_key: str
    not_after: UtcTime | None = None

    @field_validator("public_key")
    @classmethod
    def _raw32(cls, v: str) -> str:
        decode_public_key(v)
        return v

    @model_validator(mode="after")
    def _id_matches(self) -> "TrustedKey":
        actual = key_id(decode_public_key(self.public_key))
        if actual != self.id:
            raise ValueError(f"id {self.id!r} is not this public key's id ({actual})")
        return self

    def raw(self) -> bytes:
        return decode_public_key(self.public_key)


class TrustedPublisher(Strict):
    keys: list[TrustedKey] = Field(min_length=1)


class TrustFile(Strict):
    publishers: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")], TrustedPublisher] = \
        Field(default_factory=dict)
    revoked: list[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] = Field(default_factory=list)
    #: bundle registries beyond the built-in one: a directory (relative to this file) or an http(s) URL
    registries: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    #: extension id -> the grants it keeps of those its bundle declares (the operator narrowing them)
    narrow: dict[Annotated[str, Field(pattern=r"^ext\.[a-z0-9][a-z0-9-]*$")], list[str]] = Field(default_factory=dict)


@dataclass(frozen=True)
class KeyEntry:
    publisher: str
    key: TrustedKey
    source: Path


@dataclass
class TrustStore:
    """The merged trust.yaml of the operator's config dirs."""

    keys: dict[str, KeyEntry] = field(default_factory=dict)
    #: revoked key id -> the trust.yaml revoking it
    revoked: dict[str, Path] = field(default_factory=dict)
    #: the config dirs searched, and the trust.yaml files found
    dirs: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    #: (trust.yaml, its ``registries:``) per file that lists any (sandboxer.trust.registry)
    registries: list[tuple[Path, list[str]]] = field(default_factory=list)
    #: (trust.yaml, its ``narrow:``) per file that narrows any extension's grants, in config-dir order
    narrowing: list[tuple[Path, dict[str, list[str]]]] = field(default_factory=list)

    def grants_for(self, ext_id: str, declared: list[str]) -> "GrantSet":
        """The grants ``ext_id`` gets: ``declared``, narrowed by each trust.yaml in turn (each keeps less).

        Raises:
            ConfigError: a trust.yaml keeps a grant the extension does not declare (narrowing never widens).
        """
        from sandboxer.trust.grants import GrantSet

        out = GrantSet.of(declared)
        for path, narrow in self.narrowing:
            if ext_id in narrow:
                out = GrantSet.of(out.grants, narrow[ext_id], source=str(path), field=f"narrow.{ext_id}")
                out = GrantSet(out.grants, tuple(declared))
        return out

    def describe_sources(self) -> str:
        if not self.files:
            where = ", ".join(str(d) for d in self.dirs) or "none given"
            return f"no trust.yaml in the config dirs ({where})"
        return "trust.yaml of " + ", ".join(str(f.parent) for f in self.files)


def _read(path: Path) -> TrustFile:
    from sandboxer.loader import describe_validation, read_yaml

    data = read_yaml(path, ConfigError, empty_ok=True)
    try:
        return TrustFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation(str(path), exc)) from None


def load_trust(config_dirs: list[Path] | None = None) -> TrustStore:
    """Merge ``trust.yaml`` of each of the operator's config dirs (default: ``SANDBOXER_CONFIG``).

    Raises:
        ConfigError: a trust.yaml is malformed (naming file, field and value), or one key id is
            trusted for two publishers.
    """
    from sandboxer.loader import config_dirs_from_env

    dirs = list(config_dirs) if config_dirs is not None else config_dirs_from_env()
    store = TrustStore(dirs=[Path(d) for d in dirs])
    for d in store.dirs:
        path = d / FILENAME
        if not path.is_file():
            continue
        store.files.append(path)
        tf = _read(path)
        for name, pub in tf.publishers.items():
            for i, key in enumerate(pub.keys):
                prior = store.keys.get(key.id)
                if prior is not None and prior.publisher != name:
                    raise ConfigError(f"{path}: field 'publishers.{name}.keys.{i}.id' (value {key.id!r}): already "
                                      f"trusted for publisher {prior.publisher!r} in {prior.source}; a key belongs "
                                      f"to one publisher")
                store.keys[key.id] = KeyEntry(name, key, path)
        for kid in tf.revoked:
            store.revoked.setdefault(kid, path)
        if tf.registries:
            store.registries.append((path, list(tf.registries)))
        if tf.narrow:
            store.narrowing.append((path, {k: list(v) for k, v in tf.narrow.items()}))
    return store


def _write(path: Path, tf: TrustFile) -> None:
    data = tf.model_dump(mode="json", exclude_none=True)
    for key in ("registries", "narrow"):
        if not data.get(key):
            data.pop(key, None)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("# Publisher keys this operator trusts (docs/extensions-trust.md).\n"
                   + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def add_trusted_key(config_dir: Path, publisher: str, public_key: str, *,
                    not_after: datetime | None = None) -> TrustedKey:
    """Trust ``public_key`` (base64 raw) for ``publisher`` in ``config_dir``'s trust.yaml.

    Raises:
        ConfigError: the key is malformed, or already trusted there for another publisher.
    """
    path = Path(config_dir) / FILENAME
    tf = _read(path) if path.is_file() else TrustFile()
    try:
        raw = decode_public_key(public_key)
        key = TrustedKey(id=key_id(raw), public_key=public_key.strip(), not_after=not_after)
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"public key {public_key.strip()!r}: {exc}") from None
    for name, pub in tf.publishers.items():
        if name != publisher and any(k.id == key.id for k in pub.keys):
            raise ConfigError(f"{path}: key {key.id} is already trusted for publisher {name!r}")
    pub = tf.publishers.get(publisher)
    keys = [k for k in (pub.keys if pub else []) if k.id != key.id] + [key]
    tf.publishers[publisher] = TrustedPublisher(keys=keys)
    try:
        tf = TrustFile.model_validate(tf.model_dump())
    except ValidationError as exc:
        from sandboxer.loader import describe_validation

        raise ConfigError(describe_validation(str(path), exc)) from None
    _write(path, tf)
    return key


def revoke_key(config_dir: Path, kid: str) -> Path:
    """Add ``kid`` to the revoked keys of ``config_dir``'s trust.yaml; returns that file.

    Raises:
        ConfigError: ``kid`` is not a key id.
    """
    import re

    if not re.fullmatch(r"[0-9a-f]{16}", kid):
        raise ConfigError(f"key id {kid!r}: expected 16 lowercase hex digits (as `sandboxer extensions keygen` prints)")
    path = Path(config_dir) / FILENAME
    tf = _read(path) if path.is_file() else TrustFile()
    if kid not in tf.revoked:
        tf.revoked.append(kid)
    _write(path, tf)
    return path
