"""Durations as people write them: ``90s``, ``10m``, ``1h30m``, ``2d``, ``500ms``.

The one parser of duration text. YAML and the Python API also take a bare number of seconds
(:func:`seconds`); the command line does not (:func:`parse_flag`): ``--timeout 30`` could mean
seconds or minutes, so it is refused with a message that names the flag and the fix
(``--timeout: '30' has no unit; write 30s``).
"""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_ORDER = ["d", "h", "m", "s", "ms"]
_BARE = re.compile(r"\d+(?:\.\d+)?")
EXAMPLES = "e.g. 90s, 10m, 1h30m, 2d"


def _compound(text: str) -> float | None:
    """Seconds of ``1h30m``-style text (units largest first, each at most once), or None."""
    pos, total, last = 0, 0.0, -1
    for m in _PART.finditer(text):
        rank = _ORDER.index(m.group(2))
        if m.start() != pos or rank <= last:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos, last = m.end(), rank
    return total if last >= 0 and pos == len(text) else None


def seconds(value: Any, *, bare_ok: bool = True) -> float:
    """Seconds of a duration: a number (seconds, when ``bare_ok``) or text with units.

    Raises:
        ValueError: not a duration, negative, or a bare number where units are required
            (the message quotes the value and says what to write).
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration ({EXAMPLES})")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration ({EXAMPLES})")
    text = value.strip().lower()
    if text.startswith("-"):
        raise ValueError(f"duration must not be negative: {value!r}")
    if _BARE.fullmatch(text):
        if bare_ok:
            return float(text)
        raise ValueError(f"{value!r} has no unit; write {text}s")
    total = _compound(text.replace(" ", ""))
    if total is None:
        raise ValueError(f"{value!r} is not a duration ({EXAMPLES})")
    return total


def parse_flag(value: str, flag: str) -> float:
    """Seconds of a command-line duration; units are required.

    Raises:
        ValueError: ``"<flag>: <what is wrong>"``.
    """
    try:
        return seconds(value, bare_ok=False)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
