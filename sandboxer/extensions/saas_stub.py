"""ext.saas-stub: a metered stand-in backend for tests, demos and capacity drills.

It behaves like a small SaaS: configurable latency, a capacity beyond which
it raises CapacityUnavailable, a price per second (the manifest's pricing),
and fault injection per stage. It keeps its own table of live sandboxes in a
small SQLite file (one locked transaction per call, so threads and processes
agree), which outlives the manager process: a leak shows up there. The table also records the peak
number of live sandboxes, so a drill can check that nothing over-admitted.

Standing in for the provider's machine, each sandbox is a directory of its own under the
extension's home (made at provision, removed at teardown; a snapshot copies it, a restore
brings it back; its files, feature ``files``, are the files there: saas_stub_files), and ``exec`` really
runs the command there, confined by bubblewrap: no
namespace shared with the host (no network), the root filesystem read-only, the sandbox
directory its only writable place and its working directory, a private /tmp, /run, /proc
and /dev, the manager's home (hence every other sandbox's directory and the stub's table)
and the user's home covered by an empty tmpfs, no capability, and an environment of PATH,
HOME and LANG and the sandbox's secrets only. The secrets' values are kept where a provider keeps
them, on its side: in the stub's table (mode 0600), never in the handle or a snapshot. Without bwrap, exec refuses (CapabilityError): it never runs unconfined.

When the manager runs as root, each sandbox has an unprivileged uid of its own (taken from
ext.local's uid registry, so no two sandboxes of either extension share one) which owns its
directory and runs its commands: a root-only host file that shows through the read-only root
it still cannot read, nor another sandbox's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import re
import selectors
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandboxer.errors import (
    AuthError,
    BackendError,
    CapabilityError,
    CapacityUnavailable,
    ExecError,
    InputError,
    ProvisionError,
    QuotaExceeded,
    RateLimited,
    ReadinessTimeout,
    SnapshotError,
    TeardownError,
)
from sandboxer.execution import OUTPUT_CAP, OutputCollector, check_argv
from sandboxer.contract import Handle, OwnedSandbox, ProvisionRequest, Reachability, SnapshotResult, TeardownReport
from sandboxer.extensions.base import OutputCallback, SandboxExtension
from sandboxer.extensions.local import UID_REGISTRY, alloc_uid, chown_tree, free_uid
from sandboxer.extensions.local_cgroup import kill_tree
from sandboxer.extensions.saas_stub_files import StubFiles
from sandboxer.models import ExecResult, SnapshotMeta
from sandboxer.secrets import SecretRef

#: The whole PATH a command gets.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Directories never covered by a tmpfs even when a home is one of them (the command needs them).
_NEVER_HIDE = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/opt",
                         "/proc", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib"})
#: Host directories replaced by an empty private tmpfs: nothing of the host's (a unix socket
#: such as /run/docker.sock is reachable through a read-only mount too) shows through.
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run")
_STUB_ID = re.compile(r"stub-[0-9a-f]{12}")
_SNAP_ID = re.compile(r"ss-[0-9a-f]{10}")


class Fault(BaseModel):
    """Inject an error at a stage, at a rate or when a named input is set."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["provision", "ready", "teardown", "snapshot", "files"]
    error: Literal["capacity", "quota", "rate_limited", "auth", "transient", "fatal", "timeout"] = "transient"
    rate: float = Field(default=0.0, ge=0, le=1)
    when_input: str | None = None
    retry_after: float | None = Field(default=None, ge=0)
    late_success: bool = Field(default=False, description="provision raises, yet the sandbox appears anyway")
    late_after_s: float = Field(default=0.0, ge=0, description="how long after the error the late sandbox appears")


class StubHandle(Handle):
    """A stub sandbox: its row in the stub's table."""

    model_config = ConfigDict(extra="ignore")

    stub_id: str
    sandbox_id: str | None = None
    restored_from: str | None = None


class StubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(default=0.0, ge=0)
    capacity: int = Field(default=100, ge=0)
    table: str | None = Field(default=None, description="live-sandbox table file; default <home>/saas-stub/<id>.json")
    faults: list[Fault] = Field(default_factory=list)
    seed: int | None = None
    api_key: SecretRef | None = Field(default=None, description="a key every create must present (drills)")
    consumer_keys: dict[str, SecretRef] = Field(default_factory=dict, description="a consumer's own key")
    refuse_keys_with_prefix: str | None = Field(default=None, description="keys the stub 'provider' refuses")
    duplicate_creates: bool = Field(default=False, description="ignore idempotency: each create makes two")
    output_cap: int = Field(default=OUTPUT_CAP, gt=0, description="bytes kept (and streamed) per stream of one exec")


class SaasStubExtension(StubFiles, SandboxExtension):
    Config = StubConfig
    features = frozenset({"exec", "snapshots", "metering", "list_owned", "files"})
    own_ttl = "none"  # nothing here ends a sandbox on its own: the manager's gc does
    # its "machine" has no network (a stand-in: nothing it runs reaches out); the secrets are its
    # commands' environment, kept on the "provider side" (the table) like E2B's envs
    enforces = frozenset({"network:none", "secrets"})
    Handle = StubHandle

    def __init__(self, manifest, config):  # type: ignore[no-untyped-def]
        super().__init__(manifest, config)
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._rng = random.Random(config.seed)
        self._running: dict[str, set[subprocess.Popen]] = {}  # stub_id -> its execs running now

    @property
    def table_path(self) -> Path:
        return Path(self.config.table) if self.config.table else self.home / "saas-stub" / f"{self.id}.db"

    @property
    def sandboxes_root(self) -> Path:
        """Where the sandboxes' directories are (one per live sandbox, named by its stub id)."""
        return self.home / "saas-stub" / f"{self.id}.sandboxes"

    @property
    def snapshots_root(self) -> Path:
        """Where snapshots (copies of a sandbox directory) are kept."""
        return self.home / "saas-stub" / f"{self.id}.snapshots"

    def sandbox_dir(self, handle: StubHandle) -> str:
        """The sandbox's directory on this machine: its commands' home and working directory.

        Raises:
            BackendError: the handle's stub id is not one this stub makes (a damaged record).
        """
        if not _STUB_ID.fullmatch(handle.stub_id):
            raise BackendError(f"{self.id}: the handle names {handle.stub_id!r}, which is not a stub id "
                               "(stub- and 12 hex digits); the record is damaged", backend=self.id)
        return str(self.sandboxes_root / handle.stub_id)

    @contextlib.contextmanager
    def _db(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """The stub's own table (its "provider side"), in one locked transaction.

        A small SQLite file of its own, not the manager's state store: it stands for
        the remote service, so it must outlive and stay independent of the manager.
        Threads queue on a lock (SQLite's busy handler would make a burst convoy);
        other processes meet SQLite's own locking.
        """
        with self._db_lock:
            if self._conn is None:
                path = self.table_path
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
                os.chmod(path, 0o600)  # it holds the sandboxes' secrets (its WAL files take this mode)
                conn.execute("PRAGMA secure_delete=ON")  # a torn-down sandbox's secrets do not linger in free pages
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("CREATE TABLE IF NOT EXISTS live (stub_id TEXT PRIMARY KEY, sandbox_id TEXT, record TEXT)")
                conn.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)")
                self._conn = conn
            db = self._conn
            if not write:  # one SELECT: autocommit is consistent enough
                yield db
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _counter(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    @staticmethod
    def _set_counter(db: sqlite3.Connection, name: str, value: int) -> None:
        db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = ?",
                   (name, value, value))

    def _record(self, stub_id: str) -> dict[str, Any] | None:
        with self._db(write=False) as db:
            row = db.execute("SELECT record FROM live WHERE stub_id = ?", (stub_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def reset_peak(self) -> None:
        """Start a new drill: the peak becomes the number live now."""
        with self._db() as db:
            self._set_counter(db, "peak", db.execute("SELECT count(*) FROM live").fetchone()[0])

    def live(self) -> dict[str, Any]:
        """The stub's own view: ``{"live": {stub_id: record}, "peak": n, "created": n}``."""
        with self._db() as db:
            rows = db.execute("SELECT stub_id, record FROM live").fetchall()
            return {"live": {k: json.loads(v) for k, v in rows}, "peak": self._counter(db, "peak"),
                    "created": self._counter(db, "created")}

    def _fault(self, stage: str, inputs: dict[str, Any] | None = None) -> Fault | None:
        for f in self.config.faults:
            if f.stage != stage:
                continue
            if f.when_input is not None:
                if inputs and inputs.get(f.when_input):
                    return f
                continue
            with self._lock:
                if f.rate and self._rng.random() < f.rate:
                    return f
        return None

    def _raise(self, f: Fault, what: str) -> None:
        msg = f"{self.id}: injected {f.error} at {what}"
        kw: dict[str, Any] = {"backend": self.id}
        if f.error == "capacity":
            raise CapacityUnavailable(msg, **kw)
        if f.error == "quota":
            raise QuotaExceeded(msg, **kw)
        if f.error == "rate_limited":
            raise RateLimited(msg, retry_after=f.retry_after, **kw)
        if f.error == "auth":
            raise AuthError(msg, **kw)
        if what.startswith("files"):
            raise ExecError(msg, **kw)
        if f.error == "timeout":
            raise ReadinessTimeout(msg, **kw)
        if what == "teardown":
            raise TeardownError(msg, **kw)
        if what == "snapshot":
            raise SnapshotError(msg, **kw)
        raise ProvisionError(msg, transient=f.error == "transient", **kw)

    def _add(self, request: ProvisionRequest, extra: dict[str, Any] | None = None) -> StubHandle:
        stub_id = "stub-" + uuid.uuid4().hex[:12]
        uid = alloc_uid(UID_REGISTRY, self.id) if _real_root() else None
        record = {"sandbox_id": request.sandbox_id, "owner_labels": request.owner_labels, "uid": uid,
                  "tags": request.tags, "created": time.time(), "profile": request.profile.slug,
                  "env": request.secret_env(), **(extra or {})}
        try:
            with self._db() as db:
                n = db.execute("SELECT count(*) FROM live").fetchone()[0]
                if n >= self.config.capacity:
                    raise CapacityUnavailable(
                        f"{self.id}: at capacity ({self.config.capacity} live sandboxes)", backend=self.id)
                db.execute("INSERT INTO live (stub_id, sandbox_id, record) VALUES (?, ?, ?)",
                           (stub_id, record["sandbox_id"], json.dumps(record)))
                self._set_counter(db, "created", self._counter(db, "created") + 1)
                self._set_counter(db, "peak", max(self._counter(db, "peak"), n + 1))
        except BaseException:
            free_uid(UID_REGISTRY, uid)
            raise
        # The uid is kept in the stub's table only (the "provider side"), not in the handle.
        handle = StubHandle(stub_id=stub_id, sandbox_id=request.sandbox_id, host="stub")
        try:
            os.makedirs(self.sandbox_dir(handle), mode=0o700)
            if uid is not None:  # the command (as that uid) writes its own files there
                os.chown(self.sandbox_dir(handle), uid, uid)
        except OSError as exc:
            self.kill(stub_id)
            raise ProvisionError(f"{self.id}: cannot make sandbox {request.sandbox_id}'s directory "
                                 f"{self.sandbox_dir(handle)}: {exc.strerror}", backend=self.id) from None
        return handle

    def _key_ref(self, consumer: str | None) -> SecretRef | None:
        return self.config.consumer_keys.get(consumer or "", self.config.api_key)

    def _check_key(self, consumer: str | None) -> None:
        ref = self._key_ref(consumer)
        if ref is None:
            return
        value = ref.resolve(backend=self.id)
        prefix = self.config.refuse_keys_with_prefix
        if prefix and value.startswith(prefix):
            raise AuthError(f"{self.id}: the key from {ref.describe()} was refused; fix or rotate it",
                            backend=self.id, credential=ref.reference())

    def credential_key(self, consumer: str | None) -> str | None:
        ref = self._key_ref(consumer)
        return ref.fingerprint() if ref is not None else None

    def kill(self, stub_id: str) -> None:
        """Drill: the "provider" ends a sandbox behind the manager's back (its machine goes too)."""
        with self._db() as db:
            rec = self._take(db, stub_id)
        self._end_machine(StubHandle(stub_id=stub_id), rec)

    @staticmethod
    def _take(db: sqlite3.Connection, stub_id: str) -> dict[str, Any] | None:
        """Delete the sandbox's row; its record, or None if it had none."""
        row = db.execute("SELECT record FROM live WHERE stub_id = ?", (stub_id,)).fetchone()
        db.execute("DELETE FROM live WHERE stub_id = ?", (stub_id,))
        return json.loads(row[0]) if row else None

    def _end_machine(self, handle: StubHandle, record: dict[str, Any] | None) -> bool:
        """Kill the sandbox's running commands, remove its directory and give back its uid
        (its record's); True if the directory existed."""
        with self._lock:
            running = list(self._running.pop(handle.stub_id, ()))
        for proc in running:
            _kill(proc)
        box = self.sandbox_dir(handle)
        existed = os.path.isdir(box)
        try:
            shutil.rmtree(box)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TeardownError(f"{self.id}: cannot remove sandbox {handle.sandbox_id or handle.stub_id}'s "
                                f"directory {box}: {exc.strerror}", backend=self.id) from None
        free_uid(UID_REGISTRY, (record or {}).get("uid"))  # only once nothing of it is left
        if (record or {}).get("env"):
            # the write-ahead log still holds the pages of its create: truncate it, so its
            # secrets do not outlive it there (secure_delete clears the table's own pages)
            with self._db(write=False) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return existed

    # ------------------------------------------------------------ contract

    def provision(self, request: ProvisionRequest) -> StubHandle:
        if self.config.latency_s:
            time.sleep(self.config.latency_s)
        self._check_key(request.tags.get("sandboxer.consumer"))
        if self.config.duplicate_creates:
            self._add(request, {"duplicate": True})  # a retried create the provider did not dedupe
        fault = self._fault("provision", request.inputs)
        if fault is not None:
            if fault.late_success:
                if fault.late_after_s:
                    timer = threading.Timer(fault.late_after_s, self._add, (request, {"late": True}))
                    timer.daemon = True
                    timer.start()
                else:
                    self._add(request, {"late": True})
            self._raise(fault, "provision")
        return self._add(request)

    def wait_ready(self, handle: StubHandle, timeout: float = 60.0) -> Reachability:
        fault = self._fault("ready")
        if fault is not None:
            self._raise(fault, "ready")
        if self._record(handle.stub_id) is None:
            raise ReadinessTimeout(f"{self.id}: {handle.stub_id} vanished", backend=self.id)
        return Reachability(host="stub", url=f"stub://{handle.stub_id}")

    def teardown(self, handle: StubHandle) -> TeardownReport:
        fault = self._fault("teardown")
        if fault is not None:
            self._raise(fault, "teardown")
        with self._db() as db:
            rec = self._take(db, handle.stub_id)
        gone = rec is None
        had_dir = self._end_machine(handle, rec)
        return TeardownReport(already_gone=gone, removed=([] if gone else [handle.stub_id])
                              + ([self.sandbox_dir(handle)] if had_dir else []))

    def exec(self, handle: StubHandle, argv: list[str], *, env: dict[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, stdin: bytes | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        """Run ``argv`` in the sandbox's directory, confined by bubblewrap (see the module's docstring).

        Raises:
            InputError: argv is not a command line, or ``cwd`` is outside the sandbox's directory.
            ExecError: the sandbox is not running, or bubblewrap could not start the command.
            CapabilityError: bubblewrap is not installed (the command is never run unconfined).
        """
        argv = check_argv(argv, backend=self.id)
        who = handle.sandbox_id or handle.stub_id
        rec = self._record(handle.stub_id)
        if rec is None:
            raise ExecError(f"{self.id}: {handle.stub_id} is not running", backend=self.id)
        box = self.sandbox_dir(handle)
        if not os.path.isdir(box):
            raise ExecError(f"{self.id}: sandbox {who}'s directory {box} is gone", backend=self.id)
        wd = self._workdir(who, box, cwd)
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise CapabilityError(f"{self.id}: exec needs bubblewrap (bwrap) to confine exec's command, and it is "
                                  "not installed; install it (package bubblewrap): the stub never runs a command "
                                  "unconfined")
        status_r, status_w = os.pipe()  # bwrap's --json-status-fd: did the command start at all?
        cmd = [*self._confinement(bwrap, box, wd, status_w, rec.get("uid")), *argv]
        run_env = {"PATH": PATH, "HOME": box, "LANG": "C.UTF-8", **rec.get("env", {}), **(env or {})}
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env, cwd="/",
                                    start_new_session=True, close_fds=True, pass_fds=(status_w,))
        except OSError as exc:
            os.close(status_r)
            raise ExecError(f"{self.id}: cannot start bwrap for sandbox {who}: {exc.strerror}",
                            backend=self.id) from None
        finally:
            os.close(status_w)
        with self._lock:
            self._running.setdefault(handle.stub_id, set()).add(proc)
        out = OutputCollector(on_output, self.config.output_cap)
        try:
            timed_out = _pump(proc, stdin, timeout, out)
            try:
                code = proc.wait(timeout=30)  # its output ended: it is exiting
            except subprocess.TimeoutExpired:
                _kill(proc)
                code = proc.wait(timeout=30)
            started = b"child-pid" in _read_all(status_r)
        finally:
            os.close(status_r)
            with self._lock:
                self._running.get(handle.stub_id, set()).discard(proc)
        if not started and not timed_out:
            why = out.text("stderr").strip()[-500:] or f"exit code {code}"
            raise ExecError(f"{self.id}: bubblewrap could not start the command in sandbox {who}: {why}",
                            backend=self.id)
        return out.result(code, timed_out=timed_out)

    def _workdir(self, who: str, box: str, cwd: str | None) -> str:
        """``cwd`` (relative to the sandbox directory, or absolute inside it) as a real directory there."""
        if not cwd:
            return box
        real_box = os.path.realpath(box)
        wd = os.path.realpath(os.path.join(box, cwd))
        if wd != real_box and not wd.startswith(real_box + os.sep):
            raise InputError(f"{self.id}: cwd {cwd!r} is outside sandbox {who}'s directory {box}; give a "
                             "directory inside it (relative paths start there)")
        if not os.path.isdir(wd):
            raise InputError(f"{self.id}: cwd {cwd!r} is not a directory in sandbox {who}")
        return wd

    def _hidden_dirs(self) -> list[str]:
        """Directories covered by an empty tmpfs: the manager's home (every sandbox directory, the
        stub's table, the state store), the table's directory, and the user's home; never a
        system directory, nor one inside a private or already covered one."""
        dirs = {os.path.realpath(self.home), os.path.realpath(self.table_path.parent)}
        with contextlib.suppress(KeyError):
            dirs.add(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
        out: list[str] = []
        for d in sorted(dirs, key=len):
            if d in _NEVER_HIDE or not os.path.isdir(d) or any(d == o or d.startswith(o + "/")
                                                               for o in (*_PRIVATE_DIRS, *out)):
                continue
            out.append(d)
        return out

    def _confinement(self, bwrap: str, box: str, wd: str, status_fd: int, uid: int | None) -> list[str]:
        """The argv that runs a command in ``box``: the command's own argv follows it.

        Like ext.local's init and the extension host's worker (host/client.py ``confine``), but
        for one command: it dies with its bwrap (--die-with-parent), so killing that ends it all.

        With ``uid`` (the manager is root): bwrap runs as root without a user namespace (a user
        namespace made by root maps the command to real root, which reads every root-only file
        the read-only root shows), sets up the mounts, and the command starts through setpriv
        as ``uid``: a real unprivileged uid on the host, no capability, no group, no new
        privileges (a setuid binary gains nothing). It owns only its sandbox directory.

        Without (the manager is not root): bwrap's user namespace maps the command's uid to the
        manager's own uid, so outside it is the manager's user: it can read (not write: the root
        is read-only) any visible file that user can, and every sandbox of this manager has that
        same uid. What keeps it from the manager's secrets and from other sandboxes is the mount
        namespace alone: the manager's home (the table, every other sandbox's directory) and the
        user's home are covered by empty tmpfs, /tmp and /run are private.
        """
        if uid is None:
            argv = [bwrap, "--unshare-all", "--cap-drop", "ALL"]
        else:
            argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        # In a user namespace of someone else's making (a namespaced extension worker), the
        # kernel refuses a new proc mount (the outer bwrap's read-only covers under /proc make it
        # "too revealing"); binding the outer /proc would show the worker's processes and their
        # environments, so the command gets an empty /proc instead.
        proc = ["--proc", "/proc"] if not _nested_userns() else ["--perms", "0555", "--tmpfs", "/proc"]
        argv += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", *proc]
        for d in _PRIVATE_DIRS:
            if os.path.isdir(d) and not os.path.islink(d):
                argv += ["--perms", "1777" if d.endswith("/tmp") else "0755", "--tmpfs", d]
        covers = [d for d in _PRIVATE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
        for d in self._hidden_dirs():
            argv += ["--perms", "0555", "--size", "65536", "--tmpfs", d]
            covers.append(d)
        # The directories between a covering tmpfs and the box are made by bwrap with the host
        # directories' modes (0700 for a mkdtemp): the box's uid could not pass them by path.
        # Made here first, they let anyone through (0711) and list nothing.
        parts = Path(box).parts
        for i in range(2, len(parts)):
            above = str(Path(*parts[:i]))
            if any(above.startswith(c + "/") for c in covers):
                argv += ["--perms", "0711", "--dir", above]
        argv += ["--bind", box, box, "--chdir", wd, "--json-status-fd", str(status_fd), "--"]
        if uid is not None:
            argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--bounding-set=-all",
                     "--inh-caps=-all", "--no-new-privs", "--"]
        return argv

    def probe(self, handle: StubHandle) -> bool | None:
        return self._record(handle.stub_id) is not None

    def handle_id(self, handle: StubHandle) -> str | None:
        return handle.stub_id

    def list_owned(self, owner_labels: dict[str, str]) -> list[OwnedSandbox]:
        return [
            OwnedSandbox(sandbox_id=rec["sandbox_id"],
                         handle=StubHandle(stub_id=sid, sandbox_id=rec["sandbox_id"], host="stub"))
            for sid, rec in self.live()["live"].items()
            if all(rec.get("owner_labels", {}).get(k) == v for k, v in owner_labels.items())
        ]

    def snapshot(self, handle: StubHandle) -> SnapshotResult:
        """Copy the sandbox's directory into the stub's snapshot store."""
        fault = self._fault("snapshot")
        if fault is not None:
            self._raise(fault, "snapshot")
        box = self.sandbox_dir(handle)
        snap_id = "ss-" + uuid.uuid4().hex[:10]
        dest = self.snapshots_root / snap_id
        try:
            self.snapshots_root.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copytree(box, dest, symlinks=True)
        except OSError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise SnapshotError(f"{self.id}: cannot copy sandbox {handle.sandbox_id or handle.stub_id}'s "
                                f"directory {box}: {exc}", backend=self.id) from None
        size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(dest) for f in files)
        return SnapshotResult(data={"stub_snapshot": snap_id, "source": handle.stub_id, "path": str(dest)},
                              size_bytes=size)

    def _snapshot_dir(self, snapshot: SnapshotMeta) -> Path | None:
        """The snapshot's copy, or None for a snapshot made before the stub kept files."""
        snap_id = snapshot.data.get("stub_snapshot")
        if "path" not in snapshot.data:
            return None
        if not isinstance(snap_id, str) or not _SNAP_ID.fullmatch(snap_id):
            raise SnapshotError(f"{self.id}: snapshot {snapshot.id} names {snap_id!r}, not a stub snapshot",
                                backend=self.id)
        return self.snapshots_root / snap_id  # never the recorded path itself: it could point anywhere

    def restore_from_snapshot(self, request: ProvisionRequest, snapshot: SnapshotMeta) -> StubHandle:
        """A new sandbox whose directory is a copy of the snapshot's."""
        src = self._snapshot_dir(snapshot)
        if src is not None and not src.is_dir():
            raise SnapshotError(f"{self.id}: snapshot {snapshot.id}'s copy {src} is missing", backend=self.id)
        handle = self.provision(request)
        if src is not None:
            try:
                shutil.copytree(src, self.sandbox_dir(handle), symlinks=True, dirs_exist_ok=True)
                uid = (self._record(handle.stub_id) or {}).get("uid")
                if uid is not None:  # the copy is root's: the new sandbox's uid must own it
                    chown_tree(self.sandbox_dir(handle), uid)
            except OSError as exc:
                self.teardown(handle)
                raise SnapshotError(f"{self.id}: cannot restore snapshot {snapshot.id}: {exc}",
                                    backend=self.id) from None
        return handle.model_copy(update={"restored_from": snapshot.data.get("stub_snapshot")})

    def delete_snapshot(self, snapshot: SnapshotMeta) -> None:
        src = self._snapshot_dir(snapshot)
        if src is not None:
            shutil.rmtree(src, ignore_errors=True)

    def meter_actual(self, handle: StubHandle) -> dict[str, Any] | None:
        rec = self._record(handle.stub_id)
        return {"seconds": time.time() - rec["created"]} if rec else None


def _nested_userns() -> bool:
    """Whether this process is inside a user namespace (not the host's own)."""
    try:
        with open("/proc/self/uid_map") as fh:
            return fh.read().split()[1:] != ["0", "4294967295"]
    except (OSError, IndexError):
        return False


def _real_root() -> bool:
    """Whether this process is root of the host's own user namespace, so it can hand out uids.

    Root inside a user namespace (a ``worker.sandbox: namespace`` extension worker) has no other
    uid mapped to switch to, nor the uid registry to write: its sandboxes get no uid of their own,
    and their commands are, outside, whatever that namespace maps its root to (real root for a
    worker bwrap started as root), as before.
    """
    return os.geteuid() == 0 and not _nested_userns()


def _kill(proc: subprocess.Popen) -> None:
    """End a command and all it started: bwrap and its tree, then (by --die-with-parent) the
    sandbox's pid namespace as a whole, so a process that left the tree (setsid, a double
    fork) dies too."""
    kill_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


def _pump(proc: subprocess.Popen, stdin: bytes | None, timeout: float | None, out: OutputCollector) -> bool:
    """Feed stdin and collect stdout/stderr together (neither can fill and block the other);
    at ``timeout`` kill the whole tree. True if it timed out."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")  # type: ignore[arg-type]
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")  # type: ignore[arg-type]
    pending = memoryview(stdin or b"")
    if proc.stdin is not None:
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
        else:
            proc.stdin.close()
    deadline = None if timeout is None else time.monotonic() + timeout
    open_streams, timed_out = 2, False
    try:
        while open_streams:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = sel.select(wait)
            if not events and deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                _kill(proc)
                break
            for key, _ in events:
                if key.data == "stdin":
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the command does not read it all: not an error
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(key.fileobj)
                        proc.stdin.close()  # type: ignore[union-attr]
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                out.feed(key.data, chunk)
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed:
                with contextlib.suppress(OSError):
                    f.close()
    return timed_out


def _read_all(fd: int) -> bytes:
    """What bwrap wrote to its status pipe (it has exited: the pipe holds all of it)."""
    os.set_blocking(fd, False)
    parts = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
    return b"".join(parts)
