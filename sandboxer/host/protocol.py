"""The extension-host wire protocol: versioned NDJSON over a worker's stdin/stdout.

One JSON object per line, UTF-8, ``\\n``-terminated (docs/extension-host.md is the reference).

* request (manager -> worker): ``{"id": 7, "method": "teardown", "params": {...}}``
* event (worker -> manager, before the response): ``{"id": 7, "event": "output", "stream": "stdout", "text": "..."}``,
  or for ``read_file`` ``{"id": 7, "event": "data", "data": "<base64, at most DATA_CHUNK bytes>"}``
* response (worker -> manager): ``{"id": 7, "result": ...}`` or
  ``{"id": 7, "error": {"type": "TeardownError", "message": "...", ...}}``

The first request is always ``handshake`` with ``params.abi_version``; a worker of another ABI
answers it with an error and exits. Errors cross as the same classes of :mod:`sandboxer.errors`
(by name, from that tree only); anything else arrives as a :class:`~sandboxer.errors.BackendError`.
This module owns the encoding and nothing else: no processes, no threads.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from sandboxer import errors as _errors
from sandboxer.errors import BackendError, SandboxerError

#: The protocol's version. A change a peer of the old version would misread bumps it.
ABI_VERSION = 2

#: Longest line either side accepts (a line past it is a protocol violation, not a result).
MAX_LINE = 64 * 1024 * 1024

#: The SandboxExtension methods a worker serves (besides ``handshake`` and ``shutdown``).
METHODS = frozenset({
    "provision", "wait_ready", "teardown", "exec", "snapshot", "restore_from_snapshot", "delete_snapshot",
    "list_owned", "meter_actual", "probe", "handle_id", "resource_names", "deadline", "credential_key",
    "hosts", "ping", "write_file", "read_file", "list_files", "remove_file", "set_ttl",
})

#: Most bytes of file content one ``data`` event carries (``read_file``); a ``write_file``'s
#: content is staged in a file of the worker's private directory instead (docs/extension-host.md).
DATA_CHUNK = 1 << 20

#: Attributes of an error that cross with it (keyword arguments of its constructor).
_ERROR_FIELDS = ("backend", "host", "transient", "retry_after", "credential", "timeout", "log")


class ProtocolError(ValueError):
    """A line is not a valid message of this protocol."""


def encode(msg: dict[str, Any]) -> bytes:
    """One message as one line (compact JSON, no raw newlines inside)."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line into a message.

    Raises:
        ProtocolError: not JSON, not an object, or without an integer ``id``.
    """
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes is over the protocol's limit of {MAX_LINE}")
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON ({exc}): {line[:120]!r}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("id"), int) or isinstance(msg.get("id"), bool):
        raise ProtocolError(f"not a message with an integer 'id': {line[:120]!r}")
    return msg


def request(msg_id: int, method: str, params: dict[str, Any]) -> bytes:
    return encode({"id": msg_id, "method": method, "params": params})


def response(msg_id: int, result: Any) -> bytes:
    return encode({"id": msg_id, "result": result})


def output_event(msg_id: int, stream: str, text: str) -> bytes:
    return encode({"id": msg_id, "event": "output", "stream": stream, "text": text})


def data_event(msg_id: int, data: bytes) -> bytes:
    return encode({"id": msg_id, "event": "data", "data": base64.b64encode(data).decode("ascii")})


def error_response(msg_id: int, exc: BaseException, *, worker: str) -> bytes:
    return encode({"id": msg_id, "error": error_to_wire(exc, worker=worker)})


def error_to_wire(exc: BaseException, *, worker: str) -> dict[str, Any]:
    """An exception as ``{type, message, ...fields}``; a foreign one becomes a BackendError naming it."""
    if isinstance(exc, SandboxerError) and getattr(_errors, type(exc).__name__, None) is type(exc):
        out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
        for name in _ERROR_FIELDS:
            value = getattr(exc, name, None)
            if isinstance(value, (str, int, float, bool)):
                out[name] = value
        if isinstance(exc, _errors.RoutingError):
            out["attempts"] = exc.attempts
        return out
    return {"type": "BackendError",
            "message": f"{worker}: the handler raised {type(exc).__name__} (not an error of sandboxer.errors): {exc}"}


def error_from_wire(err: Any, *, worker: str) -> SandboxerError:
    """The exception a wire error stands for: its class from the tree, else a BackendError."""
    if not isinstance(err, dict):
        return BackendError(f"{worker}: malformed error from the extension worker: {err!r:.200}")
    name, message = err.get("type"), str(err.get("message", ""))
    cls = getattr(_errors, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SandboxerError)):
        return BackendError(f"{worker}: {name}: {message}", backend=err.get("backend"))
    kwargs = {k: err[k] for k in _ERROR_FIELDS if k in err}
    try:
        if cls is _errors.RoutingError:
            exc = cls.__new__(cls)
            SandboxerError.__init__(exc, message)
            exc.attempts = err.get("attempts", [])
            return exc
        return cls(message, **kwargs) if issubclass(cls, BackendError) else cls(message)
    except TypeError:  # a field this class does not take: keep the class, drop the field
        exc = cls.__new__(cls)
        SandboxerError.__init__(exc, message)
        for k, v in kwargs.items():
            setattr(exc, k, v)
        return exc


def pack_bytes(data: bytes | None) -> str | None:
    """Bytes (exec stdin) as base64 text, since JSON has no bytes."""
    return None if data is None else base64.b64encode(data).decode("ascii")


def unpack_bytes(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)
