"""Credentials by reference: the one place a secret value is read.

A config never holds a secret, only where to find it: ``{env: NAME}`` or
``{file: /path}``. The value is resolved at call time and handed straight to
the SDK; it never enters state, events, logs, exception text or ``repr``.
:func:`redact` scrubs provider messages that echo a key back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sandboxer.errors import AuthError


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

    def resolve(self, *, backend: str | None = None) -> str:
        """Read the secret now.

        Raises:
            AuthError: the variable is unset/empty or the file is unreadable.
                The message names the reference, never a value.
        """
        if self.env:
            value = os.environ.get(self.env, "")
        else:
            try:
                assert self.file is not None
                value = self.file.read_text(encoding="utf-8").strip().splitlines()[0] if self.file.stat().st_size else ""
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
