"""The one polling helper: wait for a condition with a deadline.

Transient errors retry until the deadline; any other error propagates at
once. On timeout the last thing seen is attached to the exception as a note.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll(
    check: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    *,
    transient: tuple[type[BaseException], ...] = (),
    on_timeout: Callable[[], BaseException] | None = None,
    max_interval: float = 1.0,
) -> T:
    """Call ``check`` until it returns something truthy, and return that.

    Args:
        check: returns a truthy value when done, or a falsy one to keep waiting.
        timeout: seconds before giving up.
        interval: first pause between calls; doubles up to ``max_interval``.
        transient: exception types that mean "not yet" rather than failure.
        on_timeout: builds the exception raised on timeout (default TimeoutError).

    Raises:
        Whatever ``on_timeout`` builds, with a note of the last result or error.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except transient as exc:  # noqa: PERF203 - the loop is bounded by the deadline
            last = exc
        now = time.monotonic()
        if now >= deadline:
            exc_out = on_timeout() if on_timeout else TimeoutError(f"condition not met within {timeout:g}s")
            exc_out.add_note(f"last seen: {last!r}")
            raise exc_out
        time.sleep(min(interval, deadline - now))
        interval = min(interval * 2, max_interval)
