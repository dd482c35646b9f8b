"""Canonical JSON: the exact bytes a bundle signature covers.

RFC 8785-like for the types a manifest holds: object keys sorted by their UTF-16 code units, no
whitespace, UTF-8, strings escaped as ``json`` does without ``ensure_ascii``; integers as digits;
an integral float as an integer (``1.0`` -> ``1``), other floats in Python's shortest round-trip
form. Anything else (dates, NaN, objects) is refused, naming where it is, so two parties can never
disagree on what was signed.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _number(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError("not JSON: NaN and infinities have no canonical form")
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _encode(value: Any, where: str, out: list[str]) -> None:
    if value is None or isinstance(value, bool):
        out.append({None: "null", True: "true", False: "false"}[value])
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, f"{where}.{i}" if where else str(i), out)
        out.append("]")
    elif isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"field {where or '<root>'!r}: not JSON: a mapping key is not a string")
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be"))):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _encode(value[key], f"{where}.{key}" if where else key, out)
        out.append("}")
    else:
        raise ValueError(f"field {where or '<root>'!r}: not JSON: a {type(value).__name__} "
                         f"(quote it in the YAML to make it a string)")


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of ``value`` (see the module docstring).

    Raises:
        ValueError: ``value`` holds what JSON cannot carry; the message names the field.
    """
    out: list[str] = []
    _encode(value, "", out)
    return "".join(out).encode("utf-8")
