"""Credentials by reference: the one place a secret value is read.

A config never holds a secret, only where to find it: ``{env: NAME}`` or
``{file: /path}``. The value is resolved at call time and handed straight to
the SDK; it never enters state, events, logs, exception text or ``repr``.
:func:`redact` scrubs provider messages that echo a key back.

A sandbox's own secrets (a profile's ``secrets``) are resolved here too, by
:func:`sandbox_secrets`, once per create, before anything is recorded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from sandboxer.errors import AuthError


#: Set in an installed bundle's worker (sandboxer.host.brokered): secrets are read through the broker.
BROKER_READ: "Callable[[SecretRef], str] | None" = None


class SecretRef(BaseModel):
    """Where a secret lives: an environment variable or a file (first line used)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretRef":
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret reference needs exactly one of 'env' or 'file'")
        return self

    def describe(self) -> str:
        """Where the secret lives, for a message: ``environment variable NAME`` or ``file PATH``."""
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def reference(self) -> str:
        """The short name of this reference, ``env NAME`` or ``file PATH`` (``AuthError.credential``)."""
        return f"env {self.env}" if self.env else f"file {self.file}"

    def __repr__(self) -> str:
        return f"SecretRef({self.describe()})"

    __str__ = __repr__

    def fingerprint(self) -> str:
        """:meth:`reference` plus a short digest of the current value (``unset`` if none): tells a
        rotated key from the refused one without keeping the key. Never raises."""
        import hashlib

        try:
            value = self.resolve()
        except AuthError:
            return f"{self.reference()}#unset"
        return f"{self.reference()}#{hashlib.sha256(value.encode()).hexdigest()[:16]}"

    def read(self) -> str:
        """The value now, ``""`` if unset or empty (the file's first line, stripped).

        Raises:
            OSError: the file cannot be read.
            GrantDenied: in an installed bundle's worker, no grant names this reference.
        """
        if BROKER_READ is not None:  # an installed bundle's worker: only the broker holds secrets
            return BROKER_READ(self)
        if self.env:
            return os.environ.get(self.env, "")
        assert self.file is not None
        text = self.file.read_text(encoding="utf-8").strip()
        return text.splitlines()[0] if text else ""

    def resolve(self, *, backend: str | None = None) -> str:
        """Read the secret now.

        Raises:
            AuthError: the variable is unset/empty or the file is unreadable.
                The message names the reference, never a value.
        """
        try:
            value = self.read()
        except OSError as exc:
            raise AuthError(f"cannot read credential from {self.describe()}: {exc.strerror}", backend=backend,
                            credential=self.reference()) from None
        if not value:
            raise AuthError(f"no credential found in {self.describe()}; set it and try again", backend=backend,
                            credential=self.reference())
        return value


class HeaderSecret(SecretRef):
    """An HTTP header value held by reference: ``{env: NAME, prefix: "Bearer "}`` or ``{file: PATH}``.

    The value sent is ``prefix`` followed by the secret, read when the request is made.
    """

    prefix: str = Field(default="", max_length=64, pattern=r"[!-~ ]*", description='e.g. "Bearer "')

    def __repr__(self) -> str:
        return f"HeaderSecret({self.describe()}" + (f", prefix {self.prefix!r})" if self.prefix else ")")

    __str__ = __repr__

    def value(self, *, backend: str | None = None) -> str:
        """The header value now: the prefix and the secret (AuthError names the reference if unset)."""
        return self.prefix + self.resolve(backend=backend)


def refuse_literal_keys(data: Any, key: str = "api_key", per_consumer: str = "consumer_keys") -> Any:
    """A config's ``key`` and each of ``per_consumer``'s values must be references, not literal keys.

    For a ``mode="before"`` model validator: it runs before field validation, so the error cannot
    quote the value (it may be a real key).

    Raises:
        ValueError: naming the field (``api_key``, ``consumer_keys.alice``), never the value.
    """
    if isinstance(data, dict):
        refs = {key: data.get(key)}
        consumer_keys = data.get(per_consumer)
        if isinstance(consumer_keys, dict):
            refs.update({f"{per_consumer}.{k}": v for k, v in consumer_keys.items()})
        for name, value in refs.items():
            if value is not None and not isinstance(value, (dict, SecretRef)):
                raise ValueError(f"'{name}' must be a reference, {{env: NAME}} or {{file: PATH}}, not a literal "
                                 "value (see docs/byok.md)")
    return data


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each secret (and of its long prefixes) with ``***``."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def secret_env_names(config: Any) -> list[str]:
    """The environment variables named by the ``{env: NAME}`` secret references in ``config``.

    Walks a validated config model (nested models, dicts, lists), in order, without duplicates.
    """
    found: dict[str, None] = {}

    def walk(value: Any) -> None:
        if isinstance(value, SecretRef):
            if value.env:
                found[value.env] = None
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                walk(v)

    walk(config)
    return list(found)


# ------------------------------------------------------------ a sandbox's secrets

def sandbox_secrets(profile: str, declared: dict[str, SecretRef], given: dict[str, Any] | None = None
                    ) -> dict[str, SecretStr]:
    """Resolve a sandbox's secrets now, once per create: values for the sandbox's environment.

    The profile declares which secrets its sandboxes get, with the operator's references; a
    consumer may give its own reference for a declared name (it replaces the operator's), never
    a name the profile does not declare: what a sandbox holds is the profile's policy, and the
    router chose a backend that keeps exactly that.

    Args:
        profile: the profile's slug (for messages).
        declared: the profile's ``secrets``: name -> the operator's reference.
        given: the consumer's references: name -> :class:`SecretRef` or ``{env: NAME}`` /
            ``{file: PATH}``.

    Returns:
        name -> the value, masked (:class:`pydantic.SecretStr`).

    Raises:
        InputError: a name the profile does not declare, something that is not a reference, or a
            reference with no value; the message names the secret and its reference, never a value.
    """
    from sandboxer.errors import InputError

    refs: dict[str, tuple[SecretRef, str]] = {name: (ref, "the profile's") for name, ref in declared.items()}
    for name, ref in (given or {}).items():
        if name not in declared:
            have = ", ".join(sorted(declared)) or "none"
            raise InputError(f"secret {name!r} is not declared by profile {profile!r} (it declares: {have}); a "
                             f"consumer may give references only for the secrets its profile declares. "
                             f"Nothing was created.")
        if not isinstance(ref, SecretRef):
            try:
                ref = SecretRef.model_validate(ref)
            except ValueError:  # the value itself, maybe: never echo it
                raise InputError(f"secret {name!r}: a reference is {{env: NAME}} or {{file: PATH}} (a "
                                 f"SecretRef), not a {type(ref).__name__}; give where the value is, never the "
                                 f"value. Nothing was created.") from None
        refs[name] = (ref, "the consumer's")
    out: dict[str, SecretStr] = {}
    for name, (ref, whose) in refs.items():
        try:
            value = ref.read()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise InputError(f"secret {name!r} of profile {profile!r} ({whose} reference): cannot read "
                             f"{ref.describe()}: {why}. Nothing was created.") from None
        if not value:
            raise InputError(f"secret {name!r} of profile {profile!r} ({whose} reference): no value in "
                             f"{ref.describe()}; set it and try again. Nothing was created.")
        if "\0" in value:
            raise InputError(f"secret {name!r} of profile {profile!r} ({whose} reference): the value in "
                             f"{ref.describe()} holds a NUL byte, which no environment variable can. "
                             f"Nothing was created.")
        out[name] = SecretStr(value)
    return out


def scrub(exc: BaseException, values: Iterable[str]) -> BaseException:
    """Redact ``values`` from an exception's message and notes, in place (class and fields kept).

    A backend's error may echo what it was given (a provider repeating the env it refused); this
    runs before such an error is recorded or raised, so no secret value reaches state or a caller.
    """
    values = [v for v in values if v]
    if not values:
        return exc
    exc.args = tuple(redact(a, values) if isinstance(a, str) else a for a in exc.args)
    notes = getattr(exc, "__notes__", None)
    if notes:
        exc.__notes__ = [redact(n, values) if isinstance(n, str) else n for n in notes]
    return exc
