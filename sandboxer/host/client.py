"""The manager's side of the extension host: a SandboxExtension proxy over a worker process.

:class:`ProcessExtension` is what the loader hands the manager for a ``runtime: process``
extension. Every contract call becomes one protocol request to a worker process
(``python -m sandboxer.host``) that it starts on first use, with a minimal environment (PATH,
a private HOME, LANG, the import path, and the secrets the extension's config references,
resolved here), a private working directory and no inherited descriptors.

The rule it keeps: whatever the worker does, the manager goes on. A worker that dies, or
writes a line that is not the protocol, fails the calls in flight with
:class:`~sandboxer.errors.ExtensionCrashed`; one that does not answer a call in time is killed
and the call fails with :class:`~sandboxer.errors.ExtensionTimeout`. Either way the next call
starts a fresh worker. The worker's stderr is kept: the last :data:`STDERR_RING` bytes in memory
(quoted in errors) and a size-bounded file under the manager's home (named in errors).
"""

from __future__ import annotations

import base64
import collections
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

from pydantic import BaseModel

from sandboxer.contract import FileInfo, Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult, TeardownReport
from sandboxer.deadline import CallLimits
from sandboxer.errors import CapabilityError, ExtensionCrashed, ExtensionTimeout, SandboxerError
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.host import protocol
from sandboxer.models import ExecResult, ExtensionManifest, Profile, SnapshotMeta
from sandboxer.secrets import SecretRef

#: Bytes of a worker's most recent stderr kept in memory (quoted in errors).
STDERR_RING = 64 * 1024
#: Size at which the stderr log file is rotated (one older file, ``.1``, is kept).
STDERR_LOG_MAX = 1024 * 1024
#: Seconds a new worker has to answer the handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds past the manager's own deadline before the client kills a worker that has not
#: answered: the manager gives up first (ExtensionTimeout), then the worker is replaced.
KILL_GRACE = 1.0
#: Deadline of the small calls the manager makes without one (resource_names, deadline, ...).
QUICK_CALL = 30.0


def secret_env(names: Iterable[str]) -> dict[str, str]:
    """The environment variables among ``names`` (a config's ``{env: NAME}`` secret references) that are set.

    Only these cross to the worker; a reference that is unset stays unset there, so the
    handler's own ``resolve()`` raises the AuthError naming it.
    """
    return {n: os.environ[n] for n in names if os.environ.get(n)}


def worker_env(private: Path, secrets: dict[str, str]) -> dict[str, str]:
    """A worker's whole environment: nothing of the manager's but PATH and the import path."""
    return {
        "PATH": os.environ.get("PATH") or os.defpath,
        "HOME": str(private),
        "LANG": "C.UTF-8",
        # the worker imports the same sand-boxer and the extension's package as the manager
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        **secrets,
    }


def confine(manifest: ExtensionManifest, hidden: Path, private: Path, argv: list[str]) -> list[str]:
    """A worker's command line, under bubblewrap when the manifest's ``worker.sandbox`` says so.

    Namespaced, the worker sees the filesystem read-only, ``hidden`` (the manager's home) not at
    all (an empty tmpfs) except its own ``private`` directory (writable), a /dev and /proc of its
    own, and no network unless ``worker.network`` is set.

    Raises:
        CapabilityError: ``worker.sandbox: namespace`` and bubblewrap is not installed.
    """
    policy = manifest.worker
    if policy.sandbox == "none":
        return argv
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise CapabilityError(
            f"{manifest.id}: the manifest asks for worker.sandbox 'namespace', but bubblewrap (bwrap) is not "
            f"installed; install it, or set worker.sandbox: none to run the worker unconfined")
    # No --die-with-parent: its death signal follows the *thread* that started bwrap (a restart
    # thread ends at once); the worker exits anyway when its stdin closes with the manager.
    return [bwrap, "--unshare-all", *(["--share-net"] if policy.network else []),
            "--ro-bind", "/", "/", "--tmpfs", str(hidden), "--bind", str(private), str(private),
            "--dev", "/dev", "--proc", "/proc", "--chdir", str(private), "--", *argv]


def describe_process(loaded: Any, *, confine_with: Callable[..., list[str]] | None = None,
                     extra_env: dict[str, str] | None = None, brokered: bool = False) -> None:
    """Check a ``runtime: process`` extension's handler in a short-lived worker, never importing it here.

    The worker (``python -m sandboxer.host --describe``, started like any worker: minimal
    environment, no secrets, confined as its manifest says) loads the handler, checks its
    features and signatures, validates the merged config and every profile's options for it,
    and returns its metadata, which is set on ``loaded`` (``info``, ``config``, ``missing_extra``).

    Raises:
        ConfigError (the subclass the worker named): the handler or its config is refused.
        ExtensionLoadError: the worker crashed, hung, or answered garbage.
    """
    import json
    import tempfile

    from sandboxer import errors
    from sandboxer.loader import HandlerInfo

    manifest = loaded.manifest
    source = str(loaded.source)
    payload = {"manifest": manifest.model_dump(mode="json"), "source": source,
               "config_source": str(loaded.config_overrides[-1]) if loaded.config_overrides else source,
               "options": loaded.pending_options, "brokered": brokered}
    with tempfile.TemporaryDirectory(prefix="sandboxer-describe-") as tmp:
        private = Path(tmp)
        argv = (confine_with or confine)(manifest, Path(os.environ.get("SANDBOXER_HOME") or private), private,
                                         [sys.executable, "-m", "sandboxer.host", "--describe", "--extension",
                                          manifest.id])
        try:
            done = subprocess.run(argv, input=json.dumps(payload).encode(), capture_output=True,
                                  env={**worker_env(private, {}), **(extra_env or {})}, cwd=private,
                                  timeout=HANDSHAKE_TIMEOUT, close_fds=True, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise errors.ExtensionLoadError(
                f"{source}: field 'handler' (value {manifest.handler!r}): loading the handler in a worker did not "
                f"finish within {HANDSHAKE_TIMEOUT:g}s; last stderr: {_tail(exc.stderr)!r}") from None
    try:
        answer = json.loads(done.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = f"exited with status {done.returncode}" if done.returncode >= 0 else \
            f"died of signal {signal.Signals(-done.returncode).name}"
        raise errors.ExtensionLoadError(
            f"{source}: field 'handler' (value {manifest.handler!r}): the worker loading the handler {why} without "
            f"an answer; last stderr: {_tail(done.stderr)!r}") from None
    if "error" in answer:
        cls = getattr(errors, str(answer["error"].get("type")), None)
        if not (isinstance(cls, type) and issubclass(cls, errors.ConfigError)):
            cls = errors.ExtensionLoadError
        raise cls(str(answer["error"].get("message")))
    ok = answer["ok"]
    loaded.info = HandlerInfo.from_json(ok)
    loaded.missing_extra = ok.get("missing_extra")
    loaded.refusals = {(str(slug), int(index)): [str(r) for r in reasons]
                       for slug, index, reasons in ok.get("refusals") or ()}
    loaded.pending_options = []


def _tail(data: bytes | None, limit: int = 800) -> str:
    return (data or b"").decode("utf-8", "replace")[-limit:]


class _Pending:
    __slots__ = ("done", "result", "error", "on_output", "method", "on_data", "data_error")

    def __init__(self, method: str, on_output: OutputCallback | None, on_data: Callable[[bytes], None] | None = None):
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.on_output = on_output
        self.method = method
        self.on_data = on_data
        self.data_error: BaseException | None = None  # the sink refused: the rest is dropped, the call fails


class StderrLog:
    """A worker's stderr: a ring of the last :data:`STDERR_RING` bytes and a rotated file."""

    def __init__(self, path: Path):
        self.path = path
        self._ring: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self._lock:
            self._ring.append(data)
            self._size += len(data)
            while self._size > STDERR_RING and len(self._ring) > 1:
                self._size -= len(self._ring.popleft())
            try:
                if self.path.exists() and self.path.stat().st_size + len(data) > STDERR_LOG_MAX:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                with open(self.path, "ab") as f:
                    f.write(data[-STDERR_LOG_MAX:])
            except OSError:
                pass  # the ring still holds it; a full disk must not fail the call

    def tail(self, limit: int = 2000) -> str:
        """The last ``limit`` bytes of stderr, as text."""
        with self._lock:
            data = b"".join(self._ring)[-limit:]
        return data.decode("utf-8", "replace").strip()


class WorkerProcess:
    """One running worker: its process, its reader threads and the calls it has in flight."""

    def __init__(self, ext: "ProcessExtension", generation: int):
        self.ext = ext
        self.generation = generation
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.dead: str | None = None  # why it is no longer usable
        self.ready = False  # handshake answered
        self.answered = 0  # responses received, the handshake's included
        self.closing = False
        private = ext.private_dir
        private.mkdir(parents=True, exist_ok=True)
        env = worker_env(private, ext.secrets())
        self.proc = subprocess.Popen(
            ext.confine([sys.executable, "-m", "sandboxer.host", "--extension", ext.id]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=private, close_fds=True, start_new_session=True,
        )
        self.stdin = self.proc.stdin
        threading.Thread(target=self._read_stdout, name=f"{ext.id}-out", daemon=True).start()
        threading.Thread(target=self._read_stderr, name=f"{ext.id}-err", daemon=True).start()

    # ---------------------------------------------------------- readers

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            chunk = self.proc.stderr.read1(65536) if hasattr(self.proc.stderr, "read1") else self.proc.stderr.read(65536)
            if not chunk:
                return
            self.ext.stderr.add(chunk)

    def _read_stdout(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            line = out.readline(protocol.MAX_LINE + 1)
            if not line:
                self._died(None)
                return
            try:
                msg = protocol.decode(line)
            except protocol.ProtocolError as exc:
                self._died(f"wrote a line that is not the extension-host protocol ({exc})")
                return
            with self._lock:
                pend = self._pending.get(msg["id"])
            if pend is None:
                continue  # the answer to a call already given up on
            if "event" in msg:
                if msg.get("event") == "data" and pend.on_data is not None and pend.data_error is None:
                    try:
                        pend.on_data(base64.b64decode(str(msg.get("data", ""))))
                    except Exception as exc:  # noqa: BLE001 - the call fails with it; the reader goes on
                        pend.data_error = exc
                elif msg.get("event") == "output" and pend.on_output is not None:
                    try:
                        pend.on_output(str(msg.get("stream")), str(msg.get("text", "")))
                    except Exception:  # noqa: BLE001 - a consumer's callback must not kill the reader
                        pass
                continue
            with self._lock:
                self._pending.pop(msg["id"], None)
                self.answered += 1
            if "error" in msg:
                pend.error = protocol.error_from_wire(msg["error"], worker=self.ext.id)
            elif pend.data_error is not None:
                pend.error = pend.data_error
            else:
                pend.result = msg.get("result")
            pend.done.set()

    def _died(self, why: str | None) -> None:
        """The worker is unusable: kill it, and fail every call in flight with ExtensionCrashed."""
        if why is not None:
            self.kill()
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait(timeout=5)
        if why is None:
            if code > 128 and self.ext.manifest.worker.sandbox == "namespace":
                code = 128 - code  # bubblewrap reports its child's death by signal N as 128 + N
            if code < 0:
                try:
                    why = f"died of signal {signal.Signals(-code).name}"
                except ValueError:
                    why = f"died of signal {-code}"
            else:
                why = f"exited with status {code}"
        self.fail_all(why)

    def fail_all(self, why: str) -> None:
        with self._lock:
            first = self.dead is None
            if first:
                self.dead = why
            pending, self._pending = self._pending, {}
        # Replaced at once only if it served a call: one that dies idle right after its start
        # would otherwise be restarted in a loop; the next call starts it again instead.
        if first and self.ready and self.answered > 1:
            self.ext.restart_soon(self)
        for pend in pending.values():
            pend.error = self.ext.crashed(f"during {pend.method}", self.dead, self.proc.pid)
            pend.done.set()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: children go too
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except OSError:
            pass

    # ---------------------------------------------------------- calls

    def call(self, method: str, params: dict[str, Any], timeout: float,
             on_output: OutputCallback | None = None, on_data: Callable[[bytes], None] | None = None) -> Any:
        pend = _Pending(method, on_output, on_data)
        with self._lock:
            if self.dead is not None:
                raise self.ext.crashed(f"before {method}", self.dead, self.proc.pid)
            msg_id = next(self._ids)
            self._pending[msg_id] = pend
        try:
            line = protocol.request(msg_id, method, params)
        except (TypeError, ValueError) as exc:
            with self._lock:
                self._pending.pop(msg_id, None)
            raise ExtensionCrashed(f"{self.ext.id}: the arguments of {method} are not JSON: {exc}",
                                   backend=self.ext.id) from None
        try:
            with self._write_lock:
                self.stdin.write(line)  # type: ignore[union-attr]
                self.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError, ValueError):
            pass  # the stdout reader sees the exit and fails the call
        if not pend.done.wait(timeout):
            with self._lock:
                self._pending.pop(msg_id, None)
            self.kill()
            self.fail_all(f"was killed: {method} did not answer within {timeout:g}s")
            raise ExtensionTimeout(
                f"{self.ext.id}: {method} did not answer within {timeout:g}s; the worker (pid {self.proc.pid}) "
                f"was killed and will be restarted on the next call; {self.ext.where_log()}",
                backend=self.ext.id, timeout=timeout)
        if pend.error is not None:
            raise pend.error
        return pend.result

    def handshake(self) -> dict[str, Any]:
        params = {"abi_version": self.ext.abi_version, "manifest": self.ext.manifest.model_dump(mode="json"),
                  "home": str(self.ext.private_dir), **self.ext.handshake_extra()}
        out = self.call("handshake", params, HANDSHAKE_TIMEOUT)
        self.ready = True
        return out

    def close(self) -> None:
        self.closing = True
        try:
            self.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()


class ProcessExtension(SandboxExtension):
    """A SandboxExtension whose handler runs in a worker process (``runtime: process``).

    The handler's module is never imported into the manager: what the manager needs of the class
    (its features, exclusive inputs, whether it names resources, its secret references) comes
    from :class:`~sandboxer.loader.HandlerInfo`, read at load by a describe worker. ``supports()``
    and pricing are answered here; every other call goes to the worker.

    Args:
        manifest: the extension's manifest (its ``config`` goes to the worker on the handshake).
        info: what the describe worker said of the handler class.
        home: the manager's home; the worker's private dir and stderr log live under
            ``<home>/extension-host/<id>/``.
        limits: the manager's call deadlines; a worker that has not answered a call
            :data:`KILL_GRACE` seconds past the manager's deadline is killed.
    """

    #: The protocol version this client speaks (a test may change it to see a refusal).
    abi_version = protocol.ABI_VERSION

    def __init__(self, manifest: ExtensionManifest, info: Any, *, home: Path, limits: CallLimits | None = None):
        super().__init__(manifest, dict(manifest.config))
        self.info = info
        self.features = info.features  # type: ignore[misc]
        self.exclusive_inputs = info.exclusive_inputs  # type: ignore[misc]
        self.home = Path(home)
        self.limits = limits or CallLimits()
        base = self.home / "extension-host" / manifest.id
        self.private_dir = base / "home"
        base.mkdir(parents=True, exist_ok=True)
        self.stderr = StderrLog(base / "worker.log")
        self._lock = threading.Lock()
        self._worker: WorkerProcess | None = None
        self._generation = 0
        self._closed = False
        self.restarts = 0

    def __repr__(self) -> str:
        return f"<ProcessExtension {self.manifest.id} handler={self.info.name}>"

    # ---------------------------------------------------------- the worker

    def confine(self, argv: list[str]) -> list[str]:
        """The worker's command line (see :func:`confine`): the manager's home hidden but for its private dir."""
        return confine(self.manifest, self.home, self.private_dir, argv)

    def secrets(self) -> dict[str, str]:
        """What the worker's environment gets beyond the minimum: its config's secret references."""
        return secret_env(self.info.secret_envs)

    def handshake_extra(self) -> dict[str, Any]:
        """What the handshake tells the worker beyond its manifest and home (an installed bundle: its broker token)."""
        return {}

    def where_log(self) -> str:
        return f"its stderr is in {self.stderr.path}"

    def crashed(self, when: str, why: str, pid: int) -> ExtensionCrashed:
        tail = self.stderr.tail()
        quoted = f"; last stderr: {tail[-800:]!r}" if tail else ""
        return ExtensionCrashed(
            f"{self.id}: the extension worker (pid {pid}) {why} {when}; it will be restarted on the next call"
            f"{quoted}; {self.where_log()}", backend=self.id, log=str(self.stderr.path))

    def restart_soon(self, dead: WorkerProcess) -> None:
        """Start a replacement for ``dead`` in the background, so the next call does not wait for it.

        Only a worker that started and answered a call is replaced eagerly; one that fails its
        start, or dies before serving anything, is started again by the next call only, so a
        broken extension cannot spin.
        """
        if self._closed or dead.closing:
            return

        def restart() -> None:
            try:
                self.worker()
            except SandboxerError:
                pass  # the next call starts one again and reports why it cannot

        threading.Thread(target=restart, name=f"{self.id}-restart", daemon=True).start()

    def worker(self) -> WorkerProcess:
        """The running worker, started (and handshaken) if there is none or it died."""
        with self._lock:
            if self._closed:
                raise ExtensionCrashed(f"{self.id}: the extension host was closed", backend=self.id)
            w = self._worker
            if w is not None and w.dead is None and w.proc.poll() is None:
                return w
            if w is not None:
                w.kill()
                self.restarts += 1
            self._generation += 1
            w = WorkerProcess(self, self._generation)
            try:
                w.handshake()
            except SandboxerError:
                w.kill()
                raise
            self._worker = w
            return w

    def pid(self) -> int | None:
        """The running worker's pid, if any (for operators and tests)."""
        w = self._worker
        return w.proc.pid if w is not None and w.proc.poll() is None else None

    def close(self) -> None:
        """Stop the worker (it exits when its stdin closes)."""
        with self._lock:
            self._closed = True
            w, self._worker = self._worker, None
        if w is not None:
            w.close()

    def _call(self, method: str, limit: float, on_output: OutputCallback | None = None, /,
              on_data: Callable[[bytes], None] | None = None, **params: Any) -> Any:
        return self.worker().call(method, params, limit + KILL_GRACE, on_output, on_data)

    # ---------------------------------------------------------- contract

    @staticmethod
    def _profile(profile: Profile) -> dict[str, Any]:
        return profile.model_dump(mode="json", exclude_defaults=True)

    def _request(self, request: ProvisionRequest) -> dict[str, Any]:
        # A request's dump leaves its secrets out (so nothing else can leak them): they cross to
        # the worker deliberately, in clear on the protocol pipe only, as a field of their own (only
        # when there are some: a worker too old to know the field then refuses, never drops them).
        out = {"profile": self._profile(request.profile), **request.model_dump(mode="json", exclude={"profile"})}
        if request.secrets:
            out["secrets"] = request.secret_env()
        return out

    @staticmethod
    def _h(handle: Handle) -> dict[str, Any]:
        return handle.model_dump(mode="json")

    # Results come back as JSON; the manager's boundary (contract.checked) makes them models again,
    # with the base Handle (which keeps every field) standing in for the handler's own class.

    def provision(self, request: ProvisionRequest) -> Handle:
        return self._call("provision", self.deadline(request.profile), request=self._request(request))

    def wait_ready(self, handle: Handle, timeout: float = 60.0) -> Reachability:
        return self._call("wait_ready", timeout + self.limits.ready_grace, handle=self._h(handle), timeout=timeout)

    def teardown(self, handle: Handle) -> TeardownReport:
        return self._call("teardown", self.limits.teardown, handle=self._h(handle))

    def exec(self, handle: Handle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        limit = timeout + self.limits.exec_grace if timeout else self.limits.exec
        out = self._call("exec", limit, on_output, handle=self._h(handle), argv=list(argv), env=env, cwd=cwd,
                         timeout=timeout, stdin=protocol.pack_bytes(stdin), stream=on_output is not None)
        return ExecResult.model_validate(out)

    # Files: a write's content is staged in a file of the worker's private directory (which every
    # worker can read, a confined or brokered one too) and the worker streams it from there; a
    # read's content comes back as ``data`` events of at most protocol.DATA_CHUNK bytes. Neither
    # side holds a whole file in memory.

    def write_file(self, handle: Handle, path: str, source: BinaryIO, *, mode: int | None = None) -> int:
        staging = self.private_dir / ".files"
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix="write-", dir=staging)
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(source, f, protocol.DATA_CHUNK)
                size = f.tell()
            return self._call("write_file", self.limits.files_deadline(size), handle=self._h(handle), path=path,
                              staged=staged, mode=mode)
        finally:
            Path(staged).unlink(missing_ok=True)

    def read_file(self, handle: Handle, path: str, sink: BinaryIO) -> int:
        return self._call("read_file", self.limits.files_deadline(None), on_data=sink.write, handle=self._h(handle),
                          path=path)

    def list_files(self, handle: Handle, path: str) -> list[FileInfo]:
        return self._call("list_files", self.limits.files, handle=self._h(handle), path=path)

    def remove_file(self, handle: Handle, path: str, *, recursive: bool = False) -> None:
        self._call("remove_file", self.limits.files, handle=self._h(handle), path=path, recursive=recursive)

    def set_ttl(self, handle: Handle, ttl: float) -> None:
        self._call("set_ttl", self.limits.probe, handle=self._h(handle), ttl=ttl)

    def snapshot(self, handle: Handle) -> SnapshotResult:
        return self._call("snapshot", self.limits.snapshot, handle=self._h(handle))

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> Handle:
        return self._call("restore_from_snapshot", self.deadline(request.profile), request=self._request(request),
                          snapshot=snapshot.model_dump(mode="json"))

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        self._call("delete_snapshot", self.limits.snapshot, snapshot=snapshot.model_dump(mode="json"))

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        return self._call("list_owned", self.limits.list_owned, owner_labels=owner_labels)

    def meter_actual(self, handle: Handle) -> dict[str, Any] | None:
        return self._call("meter_actual", self.limits.meter, handle=self._h(handle))

    def probe(self, handle: Handle) -> bool | None:
        return self._call("probe", self.limits.probe, handle=self._h(handle))

    def handle_id(self, handle: Handle) -> str | None:
        return self._call("handle_id", QUICK_CALL, handle=self._h(handle))

    def resource_names(self, request: ProvisionRequest) -> list[str]:
        return self._call("resource_names", QUICK_CALL, request=self._request(request))

    def names_resources(self) -> bool:
        return self.info.names_resources

    def deadline(self, profile: Profile) -> float:
        return float(self._call("deadline", QUICK_CALL, profile=self._profile(profile)))

    def credential_key(self, consumer: str | None) -> str | None:
        return self._call("credential_key", QUICK_CALL, consumer=consumer)

    def hosts(self) -> dict[str, int | None]:
        return self._call("hosts", QUICK_CALL)

    def ping(self) -> str:
        """A round trip that runs no handler code (the benchmark's baseline)."""
        return self._call("ping", QUICK_CALL)


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether process ``pid`` is gone within ``timeout`` seconds (bounded poll; for tests and operators)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False
