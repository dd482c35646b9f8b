"""The worker side of the extension host: one process serving one extension over NDJSON.

Started by the manager as ``python -m sandboxer.host --extension ext.<name>``. It reads requests
from stdin and answers on the protocol stream, each request on a thread of its own (threads
are reused), so a call that hangs never blocks the others. The protocol stream is a private
copy of the original stdout: file descriptor 1 (and ``sys.stdout``) are pointed at stderr
before any handler code runs, so a stray ``print`` from an extension, or a child process it
starts, lands in the operator's log instead of corrupting the protocol. The worker keeps no state of the manager's; it is
given its extension's manifest, config and a private home on the handshake.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

from pydantic import BaseModel

from sandboxer.contract import ProvisionRequest, checked, load_handle
from sandboxer.errors import BackendError, ConfigError
from sandboxer.host import protocol
from sandboxer.models import ExtensionManifest, Profile, SnapshotMeta


def _jsonable(value: Any) -> Any:
    """A contract result as JSON: models dumped (lists of them too)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


#: The worker this process runs (None until :func:`main` starts one).
CURRENT: "Worker | None" = None


class Worker:
    """Serves one handler instance; :meth:`serve` returns when stdin closes."""

    def __init__(self, inp: BinaryIO, out_fd: int, name: str):
        self._in = inp
        self._out_fd = out_fd
        self._write_lock = threading.Lock()
        self.name = name
        self.ext: Any = None
        # Profiles arrive as JSON on every call: validate each distinct one once.
        self._profiles: dict[str, Profile] = {}
        self._profiles_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle = 0
        self._finished = threading.Event()
        self._code = 0

    def send(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            while view:
                n = os.write(self._out_fd, view)
                view = view[n:]

    # ------------------------------------------------------------ loop

    def serve(self) -> int:
        first = self._in.readline()
        if not first:
            return 0
        try:
            msg = protocol.decode(first)
        except protocol.ProtocolError as exc:
            sys.stderr.write(f"{self.name}: the first line is not a handshake: {exc}\n")
            return 2
        if not self._handshake(msg):
            return 2
        self._spawn()
        self._finished.wait()
        return self._code

    # Requests are served leader/follower style: the thread that reads a line serves it, after
    # making sure another thread is waiting to read the next one (spawning one only when none
    # is idle). A call that hangs holds its own thread only; in the steady state no thread is
    # created per request and no hand-off sits between reading a request and serving it.

    def _spawn(self) -> None:
        threading.Thread(target=self._loop, name="sandboxer-host-req", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._pool_lock:
                self._idle += 1
            with self._read_lock:
                with self._pool_lock:
                    self._idle -= 1
                    alone = self._idle == 0
                if self._finished.is_set():
                    return
                line = self._in.readline()
                if not line:
                    self._finish(0)
                    return
                if alone:
                    self._spawn()
            try:
                msg = protocol.decode(line)
            except protocol.ProtocolError as exc:
                sys.stderr.write(f"{self.name}: ignored a line from the manager: {exc}\n")
                continue
            if msg.get("method") == "shutdown":
                self.send(protocol.response(msg["id"], None))
                self._finish(0)
                return
            self._serve_one(msg)

    def _finish(self, code: int) -> None:
        self._code = code
        self._finished.set()

    def _handshake(self, msg: dict[str, Any]) -> bool:
        params = msg.get("params") or {}
        if msg.get("method") != "handshake":
            self.send(protocol.encode({"id": msg["id"], "error": {
                "type": "ExtensionLoadError", "message": f"{self.name}: expected a handshake first, got "
                f"{msg.get('method')!r}"}}))
            return False
        theirs = params.get("abi_version")
        if theirs != protocol.ABI_VERSION:
            self.send(protocol.encode({"id": msg["id"], "error": {
                "type": "ExtensionLoadError", "message": (
                    f"{self.name}: the manager speaks extension-host ABI {theirs!r}, this worker speaks "
                    f"{protocol.ABI_VERSION}; install the same sand-boxer version for both")}}))
            return False
        try:
            from sandboxer.extensions.registry import resolve_handler

            if params.get("broker_token"):  # an installed bundle: before any of its code runs
                from sandboxer.host import brokered

                brokered.configure(str(params["broker_token"]))
            manifest = ExtensionManifest.model_validate(params["manifest"])
            self.name = manifest.id
            cls = resolve_handler(manifest.handler, where=f"{manifest.id}: field 'handler'")
            ext = cls(manifest, cls.Config.model_validate(manifest.config))
            ext.home = Path(params["home"])
            self.ext = ext
        except Exception as exc:  # noqa: BLE001 - reported to the manager, which refuses the extension
            if not isinstance(exc, ConfigError):
                exc = ConfigError(f"{self.name}: the worker could not load the handler: {type(exc).__name__}: {exc}")
            self.send(protocol.error_response(msg["id"], exc, worker=self.name))
            return False
        self.send(protocol.response(msg["id"], {"abi_version": protocol.ABI_VERSION, "pid": os.getpid(),
                                                "handler": f"{cls.__module__}:{cls.__qualname__}"}))
        return True

    def _serve_one(self, msg: dict[str, Any]) -> None:
        msg_id = msg["id"]
        try:
            method = msg.get("method")
            fn = self._method(method)
            result = fn(msg_id, msg.get("params") or {})
            # the handler's answer is checked here, where its class is known: a lie is reported by name
            result = _jsonable(checked(method, result, backend=self.name, handle_cls=self.ext.Handle))
            try:
                line = protocol.response(msg_id, result)
            except (TypeError, ValueError) as exc:
                raise BackendError(f"{self.name}: {msg.get('method')} returned a value that is not JSON: {exc}",
                                   backend=self.name) from None
            if len(line) > protocol.MAX_LINE:
                raise BackendError(f"{self.name}: the result of {msg.get('method')} is {len(line)} bytes as JSON, over the "
                                 f"extension-host protocol's limit of {protocol.MAX_LINE}; the result was dropped", backend=self.name)
        except BaseException as exc:  # noqa: BLE001 - every failure is an answer, never a dead thread
            line = protocol.error_response(msg_id, exc, worker=self.name)
        self.send(line)

    # ------------------------------------------------------------ methods

    def _method(self, name: Any) -> Callable[[int, dict[str, Any]], Any]:
        if name not in protocol.METHODS:
            raise BackendError(f"{self.name}: the worker has no method {name!r} (extension-host ABI "
                               f"{protocol.ABI_VERSION})", backend=self.name)
        return getattr(self, f"_m_{name}")

    def _profile(self, data: dict[str, Any]) -> Profile:
        import json

        key = json.dumps(data, sort_keys=True)
        with self._profiles_lock:
            prof = self._profiles.get(key)
            if prof is None:
                prof = self._profiles[key] = Profile.model_validate(data)
                if len(self._profiles) > 256:
                    self._profiles.pop(next(iter(self._profiles)))
            return prof

    def _m_ping(self, _id: int, p: dict[str, Any]) -> Any:
        return "pong"

    def _request(self, p: dict[str, Any]) -> ProvisionRequest:
        data = dict(p["request"])
        return ProvisionRequest(profile=self._profile(data.pop("profile")), **data)

    def _handle(self, p: dict[str, Any]) -> Any:
        return load_handle(self.ext.Handle, p["handle"], what=self.name, backend=self.name)

    def _m_provision(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.provision(self._request(p))

    def _m_wait_ready(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.wait_ready(self._handle(p), p.get("timeout", 60.0))

    def _m_teardown(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.teardown(self._handle(p))

    def _m_exec(self, msg_id: int, p: dict[str, Any]) -> Any:
        on_output = None
        if p.get("stream"):
            def on_output(stream: str, text: str) -> None:
                self.send(protocol.output_event(msg_id, stream, text))
        return self.ext.exec(self._handle(p), list(p["argv"]), env=p.get("env"), cwd=p.get("cwd"),
                             timeout=p.get("timeout"), stdin=protocol.unpack_bytes(p.get("stdin")),
                             on_output=on_output)

    def _m_write_file(self, _id: int, p: dict[str, Any]) -> Any:
        from sandboxer.files import Gate

        staged = Path(str(p["staged"]))
        if staged.parent != Path(self.ext.home) / ".files":
            raise BackendError(f"{self.name}: write_file's staged content must be in the worker's own directory, "
                               f"not {staged}", backend=self.name)
        with open(staged, "rb") as f:
            gate = Gate(f, f"write_file of {p['path']!r}", os.fstat(f.fileno()).st_size)
            try:
                return self.ext.write_file(self._handle(p), str(p["path"]), gate, mode=p.get("mode"))
            finally:
                gate.close()

    def _m_read_file(self, msg_id: int, p: dict[str, Any]) -> Any:
        from sandboxer.files import Gate

        worker = self

        class Sink:
            def write(self, data: bytes) -> int:
                view = memoryview(data)
                for at in range(0, len(view), protocol.DATA_CHUNK):
                    worker.send(protocol.data_event(msg_id, bytes(view[at:at + protocol.DATA_CHUNK])))
                return len(view)

        gate = Gate(Sink(), f"read_file of {p['path']!r}")
        try:
            return self.ext.read_file(self._handle(p), str(p["path"]), gate)
        finally:
            gate.close()

    def _m_list_files(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.list_files(self._handle(p), str(p["path"]))

    def _m_remove_file(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.remove_file(self._handle(p), str(p["path"]), recursive=bool(p.get("recursive")))

    def _m_set_ttl(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.set_ttl(self._handle(p), float(p["ttl"]))

    def _m_snapshot(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.snapshot(self._handle(p))

    def _m_restore_from_snapshot(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.restore_from_snapshot(self._request(p), SnapshotMeta.model_validate(p["snapshot"]))

    def _m_delete_snapshot(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.delete_snapshot(SnapshotMeta.model_validate(p["snapshot"]))

    def _m_list_owned(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.list_owned(p["owner_labels"])

    def _m_meter_actual(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.meter_actual(self._handle(p))

    def _m_probe(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.probe(self._handle(p))

    def _m_handle_id(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.handle_id(self._handle(p))

    def _m_resource_names(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.resource_names(self._request(p))

    def _m_deadline(self, _id: int, p: dict[str, Any]) -> Any:
        return float(self.ext.deadline(self._profile(p["profile"])))

    def _m_credential_key(self, _id: int, p: dict[str, Any]) -> Any:
        return self.ext.credential_key(p.get("consumer"))

    def _m_hosts(self, _id: int, p: dict[str, Any]) -> Any:
        return dict(self.ext.hosts())


def describe(payload: dict[str, Any]) -> dict[str, Any]:
    """Load a handler the way the manager's loader would, and say what the manager needs to know.

    The manager never imports a ``runtime: process`` handler: this runs in a short-lived worker
    (``python -m sandboxer.host --describe``), with the worker's minimal environment. It checks the
    declared features and every contract method's signature, validates the (merged) config and the
    profiles' options with the handler's own models, and answers ``{"ok": {...}}`` (the metadata)
    or ``{"error": {"type", "message"}}`` naming the file and field, as the in-process loader does.
    """
    from sandboxer.loader import HandlerInfo, check_handler, check_options

    try:
        from sandboxer.extensions.registry import resolve_handler

        if payload.get("brokered"):  # an installed bundle's describe worker: confined, no broker to ask
            from sandboxer.host import brokered

            brokered.configure(None)
        manifest = ExtensionManifest.model_validate(payload["manifest"])
        source = payload["source"]
        cls = resolve_handler(manifest.handler, where=f"{source}: field 'handler'")
        config, missing = check_handler(source, manifest, cls, payload.get("config_source") or source)
        refusals = []
        for item in payload.get("options") or ():
            prof = Profile.model_validate(item["profile"]) if item.get("profile") else None
            refused = check_options(cls, item["where"], item["field"], item["options"], prof, config)
            if refused and prof is not None:
                refusals.append([prof.slug, int(item.get("index") or 0), refused])
        info = HandlerInfo.of(cls, config, manifest)
    except ConfigError as exc:
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}
    except Exception as exc:  # noqa: BLE001 - the handler's import or class is broken: say so, by name
        return {"error": {"type": "ExtensionLoadError", "message": (
            f"{payload.get('source')}: field 'handler': the handler could not be loaded: {type(exc).__name__}: {exc}")}}
    return {"ok": {**info.to_json(), "missing_extra": missing, "refusals": refusals}}


def main(argv: list[str] | None = None) -> int:
    """``python -m sandboxer.host --extension ext.<name>``: serve one extension on stdin/stdout."""
    parser = argparse.ArgumentParser(prog="python -m sandboxer.host",
                                     description="Serve one sand-boxer extension over the extension-host protocol.")
    parser.add_argument("--extension", default="extension", help="the extension's id (for messages)")
    parser.add_argument("--describe", action="store_true",
                        help="read one JSON request on stdin, describe the handler on stdout, and exit")
    args = parser.parse_args(argv)
    # The protocol keeps the original stdout; everything else that writes to fd 1 goes to stderr.
    sys.stdout.flush()
    out_fd = os.dup(1)
    os.set_inheritable(out_fd, False)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if args.describe:
        import json

        answer = describe(json.loads(sys.stdin.buffer.read() or b"{}"))
        os.write(out_fd, json.dumps(answer).encode("utf-8") + b"\n")
        sys.stderr.flush()
        os._exit(0)
    global CURRENT
    worker = CURRENT = Worker(sys.stdin.buffer, out_fd, args.extension)
    code = worker.serve()
    sys.stderr.flush()
    os._exit(code)  # threads still running a hung call must not keep the worker alive
