"""Deadlines on extension calls: a call past its deadline is abandoned, never waited for.

Every call the manager makes into a backend runs on a worker thread of a small pool
while the caller waits at most the call's deadline. A call that does not return in time
raises :class:`~sandboxer.errors.ExtensionTimeout` in the caller, which goes on (the
create counts as failed, the teardown as ``teardown_failed``); the worker is left to
finish on its own, and what it returns late can be handed to a clean-up callback (a
handle from a late provision is torn down). Worker threads are daemons, so a call that
never returns does not keep the process alive, and the pool grows only while every
worker is busy, up to :data:`MAX_WORKERS` calls stuck at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from sandboxer.errors import ExtensionTimeout

log = logging.getLogger("sandboxer.deadline")

T = TypeVar("T")

#: Most calls in flight at once (hung ones included); past it a call is refused at once.
MAX_WORKERS = 256


@dataclass(frozen=True)
class CallLimits:
    """Deadlines, in seconds, of the extension calls whose length a profile does not set.

    ``provision`` and ``wait_ready`` follow the profile (its backend's
    :meth:`~sandboxer.extensions.base.SandboxExtension.deadline` and ``ready_timeout``);
    an ``exec`` with a timeout gets that timeout plus ``exec_grace`` (the backend must
    stop the command and answer), one without gets ``exec``.
    """

    teardown: float = 300.0
    snapshot: float = 1800.0
    list_owned: float = 120.0
    probe: float = 30.0
    meter: float = 30.0
    exec: float = 3600.0
    exec_grace: float = 30.0
    ready_grace: float = 5.0
    #: files calls (feature ``files``): ``files`` seconds plus one second per ``files_rate`` bytes
    #: of a transfer whose size is known; ``files_stream`` for one whose size is not (a read, a pipe)
    files: float = 120.0
    files_rate: float = float(1 << 20)
    files_stream: float = 3600.0

    def files_deadline(self, size: int | None) -> float:
        """The deadline of a files call moving ``size`` bytes (None: not known beforehand)."""
        if size is None:
            return self.files_stream
        return self.files + size / self.files_rate


class _Call:
    __slots__ = ("fn", "args", "kwargs", "signal", "finished", "result", "error", "late", "lock", "abandoned")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 late: Callable[[Any], None] | None):
        self.fn, self.args, self.kwargs, self.late = fn, args, kwargs, late
        # Held until the call ends; the caller waits by acquiring it (cheaper than an Event).
        self.signal = threading.Lock()
        self.signal.acquire()
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()  # orders "finished" against "abandoned"
        self.abandoned = False


class Caller:
    """Runs calls on daemon worker threads under a deadline. Thread-safe; one per manager."""

    def __init__(self, max_workers: int = MAX_WORKERS):
        self._q: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._workers = 0
        self._max = max_workers

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None, what: str, backend: str | None,
             late: Callable[[Any], None] | None = None, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, waiting at most ``timeout`` seconds (None: no deadline, run here).

        Args:
            what: the call, for the error ("teardown of sandbox sb-1").
            backend: the extension id, for the error.
            late: called with the result if the call returns after its deadline (on the worker).

        Raises:
            ExtensionTimeout: the call did not return in time (it was abandoned), or too many
                calls are stuck already.
            Whatever ``fn`` raised, in time.
        """
        if timeout is None:
            return fn(*args, **kwargs)
        c = self.start(fn, *args, what=what, backend=backend, late=late, **kwargs)
        return self.wait(c, time.monotonic() + timeout, timeout=timeout, what=what, backend=backend)

    def start(self, fn: Callable[..., T], *args: Any, what: str, backend: str | None,
              late: Callable[[Any], None] | None = None, **kwargs: Any) -> _Call:
        """Start ``fn`` on a worker; :meth:`wait` for it. Lets a caller run several calls at once."""
        c = _Call(fn, args, kwargs, late)
        self._submit(c, what, backend)
        return c

    @staticmethod
    def wait(c: _Call, until: float, *, timeout: float, what: str, backend: str | None) -> Any:
        """The result of a started call, waiting until ``until`` (``time.monotonic()``) at most.

        Raises:
            ExtensionTimeout: not returned by then (abandoned); whatever the call raised otherwise.
        """
        try:
            done = c.signal.acquire(timeout=max(0.0, until - time.monotonic()))
        except BaseException:  # interrupted (Ctrl-C): abandoned too, so a late result is still cleaned up
            with c.lock:
                c.abandoned = not c.finished
            raise
        if not done:
            with c.lock:
                c.abandoned = not c.finished
            if c.abandoned:
                raise ExtensionTimeout(
                    f"{backend or 'extension'}: {what} did not return within {timeout:g}s; it was abandoned "
                    f"and the manager went on", backend=backend, timeout=timeout)
        if c.error is not None:
            raise c.error
        return c.result

    def _submit(self, c: _Call, what: str, backend: str | None) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif self._workers < self._max:
                self._workers += 1
                threading.Thread(target=self._work, name="sandboxer-call", daemon=True).start()
            else:
                raise ExtensionTimeout(
                    f"{backend or 'extension'}: {what} was not started: {self._max} extension calls are "
                    f"already in flight (hung calls included)", backend=backend, timeout=0.0)
        self._q.put(c)

    def _work(self) -> None:
        while True:
            c = self._q.get()
            try:
                c.result = c.fn(*c.args, **c.kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                c.error = exc
            with c.lock:
                c.finished = True
                late = c.abandoned
            c.signal.release()
            if late:
                self._late(c)
            c.fn = c.args = c.kwargs = None  # type: ignore[assignment] - drop references
            with self._lock:
                self._idle += 1

    @staticmethod
    def _late(c: _Call) -> None:
        if c.error is not None or c.late is None:
            if c.error is not None:
                log.warning("an abandoned extension call ended late with %s: %s", type(c.error).__name__, c.error)
            return
        try:
            c.late(c.result)
        except Exception as exc:  # noqa: BLE001 - gc reconciles whatever this could not undo
            log.warning("cleaning up after an abandoned extension call failed: %s", exc)
