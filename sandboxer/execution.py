"""The one exec convention every backend's ``exec`` follows.

What a caller of :meth:`SandboxExtension.exec` can rely on, whatever the backend:

* ``argv`` is a non-empty list of strings without NUL bytes (:func:`check_argv`); anything
  else is an :class:`~sandboxer.errors.InputError` naming the problem, before anything runs.
* Output is UTF-8 text made of whole characters. Each stream is decoded incrementally, so a
  character split between two chunks (of a pipe, a socket, a frame) arrives whole; bytes that
  are not UTF-8 become U+FFFD, once each (:class:`OutputCollector`).
* ``on_output(stream, text)`` gets the same text as the result, as it arrives.
* Each stream is kept up to a cap (:data:`OUTPUT_CAP` unless the backend's config says
  otherwise), cut on a character boundary; past it output is neither kept nor streamed and
  ``ExecResult.truncated`` says so. The command itself runs on: the cap bounds memory, not work.
* A command killed at its deadline is exit code :data:`TIMEOUT_EXIT_CODE` (124, as coreutils'
  ``timeout``) with ``timed_out=True``, and nothing it started is left running. How the process
  tree is killed is each backend's own business; the marker-variable sweep the cloud backends
  share is here (:func:`kill_marked_argv`).
"""

from __future__ import annotations

import codecs
from typing import Any

from sandboxer.errors import InputError
from sandboxer.models import ExecResult

__all__ = [
    "EXEC_MARKER", "KILL_MARKED_SCRIPT", "KILL_MARKED_TIMEOUT", "OUTPUT_CAP", "STREAMS", "TIMEOUT_EXIT_CODE",
    "OutputCollector", "check_argv", "kill_marked_argv",
]

#: The exit code reported for a command stopped at its deadline (as coreutils' ``timeout``).
TIMEOUT_EXIT_CODE = 124
#: Bytes kept per stream of one exec when the backend's config sets no cap of its own.
OUTPUT_CAP = 16 * 1024 * 1024
#: The names of the streams, as ``on_output`` receives them.
STREAMS = ("stdout", "stderr")

#: The environment variable that marks every process of one exec (see :func:`kill_marked_argv`).
EXEC_MARKER = "SANDBOXER_EXEC_ID"
#: Seconds the kill of a timed-out command's leftovers may take.
KILL_MARKED_TIMEOUT = 30.0
#: Kills, a bounded five rounds (a process may fork while the first round scans), every
#: process whose environment holds the entry "$1"; zombies have an empty environ.
KILL_MARKED_SCRIPT = """\
for round in 1 2 3 4 5; do
  n=0
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    if tr '\\000' '\\n' < "$d/environ" 2>/dev/null | grep -qxF -- "$1"; then
      kill -9 "$p" 2>/dev/null && n=$((n + 1))
    fi
  done
  [ "$n" -eq 0 ] && exit 0
done
"""


def check_argv(argv: Any, *, backend: str | None = None) -> list[str]:
    """Check a command line before anything runs, and return it as a new list.

    Args:
        argv: the command: a non-empty list (or tuple) of strings, none holding a NUL byte
            (no OS can pass one: it would end the argument there).
        backend: the extension id, named in the error.

    Raises:
        InputError: naming what is wrong (empty, not a list, which item, which position).
    """
    who = f"{backend}: " if backend else ""
    if not isinstance(argv, (list, tuple)):
        raise InputError(f"{who}exec needs argv as a list of strings, got {type(argv).__name__} {argv!r}")
    if not argv:
        raise InputError(f"{who}exec needs a non-empty argv: the command to run, then its arguments")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise InputError(f"{who}exec argv[{i}] must be a string, got {type(arg).__name__} {arg!r}")
        if "\0" in arg:
            raise InputError(f"{who}exec argv[{i}] {arg!r} holds a NUL byte, which no command can receive")
    return list(argv)


def kill_marked_argv(marker: str) -> list[str]:
    """The argv that SIGKILLs, inside a sandbox, every process whose environment has ``EXEC_MARKER=marker``.

    A command's descendants inherit the marker whatever process group or session
    they move to (``setsid``), so this reaches what a kill of the command's process,
    or of its group, leaves running. POSIX sh, ``tr`` and ``grep`` only (busybox will do).
    """
    return ["sh", "-c", KILL_MARKED_SCRIPT, "sh", f"{EXEC_MARKER}={marker}"]


class _Stream:
    """One stream: its incremental decoder, the text kept, and how much was cut."""

    def __init__(self, cap: int):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.room = cap  # UTF-8 bytes still to keep
        self.parts: list[str] = []
        self.cut = 0  # bytes (as UTF-8) not kept

    def keep(self, text: str) -> str:
        """Keep what fits of ``text`` (whole characters); return the part kept."""
        if not text:
            return ""
        if self.room <= 0:
            self.cut += len(text.encode("utf-8", "surrogatepass"))
            return ""
        data = text.encode("utf-8", "surrogatepass")
        if len(data) <= self.room:
            self.room -= len(data)
            self.parts.append(text)
            return text
        # Cut on a character boundary: the decoder holds back a partial last character.
        head = codecs.getincrementaldecoder("utf-8")("replace").decode(data[: self.room])
        self.cut += len(data) - len(head.encode("utf-8", "surrogatepass"))
        self.room = 0
        self.parts.append(head)
        return head


class OutputCollector:
    """Collects one exec's output, streams it, and builds its :class:`ExecResult`.

    Feed it raw chunks as they arrive (:meth:`feed`), or text from an SDK that already
    decodes incrementally (:meth:`feed_text`); call :meth:`result` once the command ended.
    Not thread-safe per stream: feed one stream from one thread (two threads, one per
    stream, are fine).

    Args:
        on_output: called with ``(stream, text)``, text of whole characters, as it arrives.
        cap: most bytes kept (and streamed) per stream; the rest is counted and ``truncated`` set.
    """

    def __init__(self, on_output: Any = None, cap: int = OUTPUT_CAP):
        if cap <= 0:
            raise ValueError(f"output cap must be positive, got {cap}")
        self.on_output = on_output
        self.cap = cap
        self.streams = {name: _Stream(cap) for name in STREAMS}
        self._closed = False

    def feed(self, stream: str, data: bytes) -> None:
        """Take a raw chunk of ``stream`` ("stdout" or "stderr"); any split character waits for its rest."""
        s = self.streams[stream]
        self._emit(stream, s.keep(s.decoder.decode(data)))

    def feed_text(self, stream: str, text: str) -> None:
        """Take already decoded text of ``stream`` (an SDK that decodes incrementally itself)."""
        self._emit(stream, self.streams[stream].keep(text))

    def close(self) -> None:
        """End of output: a character left incomplete at the end becomes one U+FFFD. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for name, s in self.streams.items():
            self._emit(name, s.keep(s.decoder.decode(b"", final=True)))

    def _emit(self, stream: str, text: str) -> None:
        if text and self.on_output is not None:
            self.on_output(stream, text)

    def text(self, stream: str) -> str:
        """What was kept of ``stream`` so far."""
        return "".join(self.streams[stream].parts)

    @property
    def truncated(self) -> bool:
        """True when some output of either stream was past the cap and was not kept."""
        return any(s.cut for s in self.streams.values())

    def cut_bytes(self, stream: str) -> int:
        """Bytes of ``stream`` not kept (past the cap)."""
        return self.streams[stream].cut

    def result(self, exit_code: int | None, *, timed_out: bool = False) -> ExecResult:
        """The command's result. ``timed_out`` (killed at its deadline) reports exit code 124.

        Args:
            exit_code: the command's exit code; ignored (and may be None) when ``timed_out``.
            timed_out: the command was killed at its deadline.
        """
        self.close()
        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
        if exit_code is None:
            raise ValueError("a command that did not time out needs an exit code")
        return ExecResult(exit_code=exit_code, stdout=self.text("stdout"), stderr=self.text("stderr"),
                          timed_out=timed_out, truncated=self.truncated)
