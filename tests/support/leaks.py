"""Where a secret could leak from an exception: everything an operator's logging could render."""

from __future__ import annotations

import traceback
from typing import Any, Callable


def caught(call: Callable[[], Any]) -> BaseException:
    """The exception ``call`` raises, caught in a frame that holds no secret (its locals are rendered)."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever it is
        return exc
    raise AssertionError("no error was raised")


def reachable_text(err: BaseException) -> str:
    """Everything an operator's logging or error reporter could render from ``err``."""
    return "\n".join([
        str(err), repr(err), repr(err.__cause__), repr(err.__context__),
        "".join(traceback.TracebackException.from_exception(err, capture_locals=True).format()),
    ])
