"""``ext.vm-packer``'s build mode: run ``packer build`` for a profile, record the artifact, reuse it.

A profile's ``options.packer`` names a Packer template (HCL2 ``.pkr.hcl``, JSON ``.json``, or a
directory of ``.pkr.hcl`` files) and its variables (:class:`PackerBuild`). Before vm-packer attaches,
:meth:`PackerBuilder.ensure` finds an artifact recorded for the template digest (the template and
the files its provisioners name: :mod:`sandboxer.extensions.vm_packer_digest`) and the variables'
sha256, or builds one:

* the build is recorded ``building`` in the state store first (the row is also the lock: one build
  per template digest at a time, across processes on one store), and ``ready`` once Packer named
  its artifact; a failed, timed-out or interrupted build deletes its row. One whose process died
  (SIGKILL) leaves a ``building`` row that is never reused: the next build or gc in the same home
  removes it at once (its ``flock`` is free: :meth:`PackerBuilder.reap_dead`), any other past its
  deadline;
* ``packer build -machine-readable`` runs under a watchdog (:mod:`sandboxer.extensions.packer_watchdog`:
  Packer dies with this process) in its own process group with a minimal environment (PATH, a
  private HOME, PACKER_CACHE_DIR, PACKER_CONFIG_DIR and TMPDIR, CHECKPOINT_DISABLE=1; the variables
  go in a var-file, never the environment or argv), is killed (the whole group) at its deadline,
  and its progress is streamed line by line;
* its private directory (``<home>/packer/<record id>``) is removed whatever the outcome.

Only the ``null`` builder is accepted: it provisions the VM vm-packer then attaches to, over SSH
(``sandboxer_ssh_*`` variables carry that VM's address, port, user and key file). Builders that
make an image (docker, qemu, the clouds') leave nothing vm-packer could attach to without starting
a machine, which it never does (docs/backends/vm-packer.md#build-mode).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandboxer.errors import ProfileError, ProvisionError
from sandboxer.extensions.vm_packer_digest import DigestError, template_digest
from sandboxer.models import Duration

if TYPE_CHECKING:
    from sandboxer.ssh import SSHHostConfig
    from sandboxer.state import StateStore

log = logging.getLogger("sandboxer.vm_packer")

#: The builders whose artifact vm-packer can attach to (see the module docstring).
ATTACHABLE_BUILDERS = frozenset({"null"})
RESERVED_PREFIX = "sandboxer_"
#: seconds between SIGTERM to a build's process group (Packer cleans up) and SIGKILL
KILL_GRACE_S = 5.0
#: how long past its deadline a ``building`` row is kept before it counts as left by a crash
STALE_GRACE_S = 60.0
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")
_HCL_VAR = re.compile(r"var\.([A-Za-z_][A-Za-z0-9_-]*): .*")
_HCL_SOURCE = re.compile(r"\s+([A-Za-z0-9_-]+)\.[A-Za-z0-9_.-]+")
ProgressCallback = Callable[[str], None]
#: the parent of every packer build: Packer dies with this process (see that module)
WATCHDOG = Path(__file__).with_name("packer_watchdog.py")

# Builds running in this process: record id -> (the packer process, its clean-up). A create runs on
# a daemon worker thread (sandboxer/deadline.py), so a Ctrl-C ends the process without unwinding
# it; at exit each build's process group (its own session: no signal of ours reaches it) is killed
# and its record and private directory removed here instead.
_RUNNING: dict[str, tuple[subprocess.Popen, Callable[[], None]]] = {}
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _end_running_builds() -> None:
    with _RUNNING_LOCK:
        running = list(_RUNNING.values())
        _RUNNING.clear()
    for proc, cleanup in running:
        _kill_group(proc)
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - best effort at exit; gc reaps what is left
            log.warning("could not clean up an interrupted packer build", exc_info=True)


class PackerBuild(BaseModel):
    """``options.packer`` of a vm-packer profile: the template to build before attaching."""

    model_config = ConfigDict(extra="forbid")

    template: Path = Field(description="an absolute path (or ~/...) to a .pkr.hcl or .json template file, or to a "
                                       "directory of .pkr.hcl files")
    variables: dict[str, Any] = Field(default_factory=dict,
                                      description="the template's variables: strings, numbers or booleans")
    timeout: Duration = Field(default=1800.0, gt=0, description="deadline of one packer build")

    @field_validator("template", mode="before")
    @classmethod
    def _template(cls, v: Any) -> Any:
        text = str(v)
        if not (text.startswith("/") or text.startswith("~/")):
            raise ValueError("must be an absolute path (or start with ~/)")
        path = Path(text).expanduser()
        if path.is_dir():
            if not any(p.name.endswith((".pkr.hcl", ".pkr.json")) for p in path.iterdir()):
                raise ValueError("a directory template must hold .pkr.hcl (or .pkr.json) files; this one has none")
            return path
        if not (path.name.endswith(".pkr.hcl") or path.name.endswith(".json")):
            raise ValueError("must end in .pkr.hcl (HCL2) or .json (JSON), or be a directory of .pkr.hcl files")
        if not path.is_file():
            raise ValueError("no such file")
        return path

    @field_validator("variables", mode="before")
    @classmethod
    def _variables(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of variable names to values")
        for name, value in v.items():
            if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
                raise ValueError(f"variable {name!r}: a name must match {_VARIABLE.pattern}")
            if name.startswith(RESERVED_PREFIX):
                raise ValueError(f"variable {name!r}: names starting {RESERVED_PREFIX} are set by sandboxer from "
                                 "the VM's inventory entry")
            if not isinstance(value, (str, int, float, bool)):
                raise ValueError(f"variable {name!r} (value {value!r}): must be a string, number or boolean")
        return v


def ssh_variables(cfg: "SSHHostConfig") -> dict[str, Any]:
    """The ``sandboxer_ssh_*`` variables for the VM a sandbox will be attached to.

    They are part of the variables digest whether the template declares them or not, so an
    artifact (a provisioned VM) is reused only for the VM it was built on.
    """
    found = {"sandboxer_ssh_host": cfg.address, "sandboxer_ssh_port": cfg.port, "sandboxer_ssh_username": cfg.user}
    if cfg.key_file is not None:
        found["sandboxer_ssh_private_key_file"] = str(cfg.key_file)
    return found


def digest_variables(variables: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(variables, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class TemplateInfo:
    """What ``packer inspect`` says of a template."""

    builders: list[str]
    variables: set[str]


@dataclass
class BuildOutput:
    """What one ``packer build -machine-readable`` printed, parsed."""

    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)  # "<target>/<index>" -> key -> value
    errors: list[str] = field(default_factory=list)
    tail: deque = field(default_factory=lambda: deque(maxlen=30))

    def feed(self, line: str, on_progress: ProgressCallback | None) -> None:
        """One machine-readable line: ``timestamp,target,type,data...`` (commas in data escaped)."""
        parts = line.rstrip("\r\n").split(",")
        if len(parts) < 3:
            return
        target, kind = parts[1], parts[2]
        data = [p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "") for p in parts[3:]]
        if kind == "ui" and len(data) >= 2:
            for text in data[1].splitlines():
                if text.strip():
                    self.tail.append(text)
                    if data[0] == "error":
                        self.errors.append(text.strip())
                    log.info("packer: %s", text)
                    if on_progress is not None:
                        on_progress(text)
        elif kind == "artifact" and len(data) >= 2:
            self.artifacts.setdefault(f"{target}/{data[0]}", {})[data[1]] = ",".join(data[2:])
        elif kind == "error" and data:
            self.errors.append(",".join(data).strip())


def _machine_lines(text: str) -> list[list[str]]:
    return [[p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n") for p in line.split(",")]
            for line in text.splitlines() if line.count(",") >= 2]


def parse_inspect(text: str) -> TemplateInfo:
    """The builder types and variable names in ``packer inspect -machine-readable``'s output."""
    builders: list[str] = []
    variables: set[str] = set()
    for parts in _machine_lines(text):
        kind, data = parts[2], parts[3:]
        if kind == "template-variable" and data:  # JSON mode
            variables.add(data[0])
        elif kind == "template-builder" and len(data) >= 2:
            builders.append(data[1])
        elif kind == "ui" and len(data) >= 2 and data[0] == "say":  # HCL2 mode
            body = ",".join(data[1:])
            section = None
            for line in body.splitlines():
                if line.startswith("> "):
                    section = line.strip("> :")
                elif line.strip() in ("sources:", "provisioners:", "post-processors:"):
                    section = line.strip().rstrip(":")
                elif section == "input-variables" and (m := _HCL_VAR.fullmatch(line.strip())):
                    variables.add(m.group(1))
                elif section == "sources" and (m := _HCL_SOURCE.fullmatch(line)):
                    builders.append(m.group(1))
    return TemplateInfo(builders=builders, variables=variables)


def _errors_of(text: str) -> str:
    errs = [",".join(p[4:]).strip() for p in _machine_lines(text) if p[2] == "ui" and len(p) > 4 and p[3] == "error"]
    return " ".join(" ".join(errs).split())[:1500] or text.strip()[-1500:]


class PackerBuilder:
    """Builds (or reuses) a profile's Packer artifact for one VM; see the module docstring.

    Args:
        state: the state store the artifacts are recorded in.
        home: the manager's home; builds run in private directories under ``<home>/packer``.
        packer: the ``packer`` executable (a name on PATH or a path).
        backend: the extension id, for messages and events.
    """

    def __init__(self, state: "StateStore", home: Path, packer: str, backend: str):
        self.state = state
        self.root = Path(home) / "packer"
        self.packer = packer
        self.backend = backend

    # ------------------------------------------------------------ the entry point

    def ensure(self, *, profile: str, build: PackerBuild, ssh: dict[str, Any], sandbox_id: str | None = None,
               on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """The ``ready`` image record for ``build`` on the VM ``ssh`` names: reused, or built now.

        Returns:
            The record (``images`` row) with ``reused`` saying which.

        Raises:
            ProfileError: the template cannot be read, packer inspect refuses it, it uses a builder
                vm-packer cannot attach to, or a variable it does not declare (nothing recorded).
            ProvisionError: packer is missing, the build failed (Packer's error quoted) or passed its
                deadline (killed), or another build of the template did not finish in time.
        """
        where = f"profile {profile!r}: field 'options.packer.template' (value '{build.template}')"
        try:
            template_sha = template_digest(build.template)
        except DigestError as exc:
            raise ProfileError(f"{where}: {exc}") from None
        variables = {**build.variables, **ssh}
        record_id = uuid.uuid4().hex[:16]
        self.reap_dead()
        with _BuildLock(self.root, record_id):
            return self._claim_and_build(where, profile, build, variables, template_sha, record_id, sandbox_id,
                                         on_progress)

    def _claim_and_build(self, where: str, profile: str, build: PackerBuild, variables: dict[str, Any],
                         template_sha: str, record_id: str, sandbox_id: str | None,
                         on_progress: ProgressCallback | None) -> dict[str, Any]:
        row = {"id": record_id, "profile": profile, "extension": self.backend, "builder": "pending",
               "template": str(build.template), "template_sha256": template_sha,
               "variables_sha256": digest_variables(variables), "owner": f"{socket.gethostname()}:{os.getpid()}",
               "deadline_at": time.time() + build.timeout + KILL_GRACE_S + STALE_GRACE_S}
        wait_until = time.monotonic() + build.timeout + KILL_GRACE_S + STALE_GRACE_S
        while True:  # bounded by wait_until
            state, found = self.state.claim_image_build(row)
            if state == "ready":
                self._event(sandbox_id, "image_reused", found)
                return {**found, "reused": True}
            if state == "claimed":
                break
            if time.monotonic() > wait_until:
                raise ProvisionError(
                    f"{self.backend}: another build of {build.template} (record {found['id']}, by {found['owner']}) "
                    f"did not finish in time; try again later, or run `sandboxer images gc` if that process is gone",
                    backend=self.backend)
            self.reap_dead()  # a build of this home whose process died is given up at once
            time.sleep(0.25)
        self._event(sandbox_id, "image_build_started", row)
        try:
            done = self._build(where, profile, build, variables, row, on_progress)
        except BaseException as exc:
            self.state.drop_image_build(record_id)
            self._event(sandbox_id, "image_build_failed", row, error=str(exc)[:500] or type(exc).__name__)
            raise
        self._event(sandbox_id, "image_built", done)
        return {**done, "reused": False}

    # ------------------------------------------------------------ one build

    def _build(self, where: str, profile: str, build: PackerBuild, variables: dict[str, Any], row: dict[str, Any],
               on_progress: ProgressCallback | None) -> dict[str, Any]:
        packer = shutil.which(self.packer)
        if packer is None:
            raise ProvisionError(f"{self.backend}: {self.packer!r} is not installed or not on PATH (Debian package "
                                 "packer); vm-packer's build mode needs it", backend=self.backend)
        private = self.root / row["id"]
        try:
            env = self._private_env(private, packer, row["id"])
            info = self._inspect(where, packer, build.template, env)
            wrong = sorted(set(info.builders) - ATTACHABLE_BUILDERS)
            if wrong or not info.builders:
                what = f"builder {wrong[0]!r}" if wrong else "no builder"
                raise ProfileError(
                    f"{where}: {what} makes an artifact vm-packer cannot attach to over SSH (it never starts "
                    "machines); vm-packer builds with the null builder, which provisions the VM it then attaches "
                    "to (docs/backends/vm-packer.md#build-mode)")
            for name in build.variables:
                if name not in info.variables:
                    raise ProfileError(
                        f"profile {profile!r}: field 'options.packer.variables.{name}': template {build.template} "
                        f"declares no variable {name!r} (it declares: {', '.join(sorted(info.variables)) or 'none'})")
            passed = {k: v for k, v in variables.items() if k in info.variables}
            if build.template.is_file() and build.template.name.endswith(".json") and \
                    not build.template.name.endswith(".pkr.json"):
                # a legacy JSON template's user variables are strings (its var-file refuses a number)
                passed = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in passed.items()}
            var_file = private / "variables.pkrvars.json"
            fd = os.open(var_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(passed, fh)
            argv = [packer, "build", "-machine-readable", "-color=false", f"-var-file={var_file}", str(build.template)]
            def forget() -> None:
                self.state.drop_image_build(row["id"])
                _remove_private(private)
                _BuildLock(self.root, row["id"]).path.unlink(missing_ok=True)

            cwd = build.template if build.template.is_dir() else build.template.parent
            out = self._run(argv, env, cwd, build.timeout, on_progress, build.template, forget)
            artifact = next(iter(out.artifacts.values()), None)
            if artifact is None or "id" not in artifact:
                raise ProvisionError(f"{self.backend}: packer build of {build.template} named no artifact; its last "
                                     f"output: {' | '.join(out.tail)[-1000:]}", backend=self.backend)
            detail = {"builder_id": artifact.get("builder-id"), "artifact": artifact.get("string"),
                      "builders": info.builders, "vm": f"{variables.get('sandboxer_ssh_username')}@"
                                                        f"{variables.get('sandboxer_ssh_host')}:"
                                                        f"{variables.get('sandboxer_ssh_port')}"}
            done = self.state.finish_image_build(row["id"], artifact["id"], builder=info.builders[0], detail=detail)
            if done is None:
                raise ProvisionError(f"{self.backend}: build record {row['id']} of {build.template} was reaped as "
                                     "stale while it ran; raise options.packer.timeout", backend=self.backend)
            return done
        finally:
            _remove_private(private)

    def _private_env(self, private: Path, packer: str, record_id: str) -> dict[str, str]:
        """A new private directory for the build and the only environment Packer gets.

        TMPDIR is a short private directory in the system's temp dir instead (Packer's plugins
        listen on unix sockets there, whose paths may not exceed 107 bytes); the private
        directory names it, so gc can remove it after a crash.
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        private.mkdir(mode=0o700)
        dirs = {}
        for name in ("home", "cache", "config"):
            (private / name).mkdir(mode=0o700)
            dirs[name] = str(private / name)
        tmp = Path(tempfile.gettempdir()) / f"sandboxer-packer-{record_id}"
        tmp.mkdir(mode=0o700)
        (private / "tmpdir").write_text(str(tmp))
        path = os.pathsep.join(dict.fromkeys([os.path.dirname(packer), "/usr/local/bin", "/usr/bin", "/bin"]))
        return {"PATH": path, "HOME": dirs["home"], "PACKER_CACHE_DIR": dirs["cache"],
                "PACKER_CONFIG_DIR": dirs["config"], "TMPDIR": str(tmp), "CHECKPOINT_DISABLE": "1",
                "LANG": "C.UTF-8", "SANDBOXER_PACKER_BUILD": record_id}

    def _inspect(self, where: str, packer: str, template: Path, env: dict[str, str]) -> TemplateInfo:
        try:
            res = subprocess.run([packer, "inspect", "-machine-readable", str(template)], env=env,
                                 cwd=template.parent, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=60, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise ProvisionError(f"{self.backend}: packer inspect of {template} did not finish within 60s",
                                 backend=self.backend) from None
        if res.returncode != 0:
            raise ProfileError(f"{where}: packer inspect refused it: {_errors_of(res.stdout + res.stderr)}")
        return parse_inspect(res.stdout)

    def _run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float,
             on_progress: ProgressCallback | None, template: Path, cleanup: Callable[[], None]) -> BuildOutput:
        """Run the build, streaming its lines; kill its whole process group at the deadline or on any error
        (or at exit: ``cleanup`` then forgets the build)."""
        out = BuildOutput()
        record_id = env["SANDBOXER_PACKER_BUILD"]
        # the watchdog's pipe: its write end only this process holds (not inheritable), so it reads EOF
        # when this process is gone, however it ended, and then ends the build's process group
        alive_r, alive_w = os.pipe()
        try:
            with _RUNNING_LOCK:
                proc = subprocess.Popen([sys.executable, "-I", str(WATCHDOG), str(alive_r), str(KILL_GRACE_S), *argv],
                                        env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace",
                                        start_new_session=True, pass_fds=(alive_r,))
                _RUNNING[record_id] = (proc, cleanup)
        except BaseException:
            os.close(alive_w)
            raise
        finally:
            os.close(alive_r)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, name="packer-output", daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                try:
                    line = lines.get(timeout=min(left, 0.5))
                except queue.Empty:
                    continue
                if line is None:
                    break
                out.feed(line, on_progress)
            if not timed_out:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(record_id, None)
            _kill_group(proc)
            os.close(alive_w)
            reader.join(5)
            if proc.stdout is not None:
                proc.stdout.close()
        if timed_out:
            raise ProvisionError(f"{self.backend}: packer build of {template} did not finish within {timeout:g}s; "
                                 f"killed (its last output: {' | '.join(list(out.tail)[-3:])[-500:]})",
                                 backend=self.backend)
        if proc.returncode != 0:
            said = " ".join(" ".join(out.errors).split())[:1500] or " | ".join(out.tail)[-1500:]
            raise ProvisionError(f"{self.backend}: packer build of {template} failed (exit {proc.returncode}): {said}",
                                 backend=self.backend)
        return out

    def _event(self, sandbox_id: str | None, kind: str, row: dict[str, Any], **extra: Any) -> None:
        self.state.record_event(sandbox_id, kind, extension=self.backend, detail={
            "image": row["id"], "profile": row["profile"], "template": row["template"],
            "template_sha256": row["template_sha256"], "variables_sha256": row["variables_sha256"],
            **({"artifact_id": row["artifact_id"]} if row.get("artifact_id") else {}), **extra})

    # ------------------------------------------------------------ gc

    def reap(self) -> list[dict[str, Any]]:
        """Remove stale ``building`` rows (crashed builds) and private directories no build holds.

        Returns:
            The ``building`` rows removed: those of this home's builds whose process is gone
            (:meth:`reap_dead`), and any past its deadline (a build on another host, or one
            recorded before build locks).
        """
        dead = self.reap_dead()
        stale = self.state.reap_stale_images()
        building = {r["id"] for r in self.state.list_images(states=("building",))}
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and d.name not in building and not _BuildLock.held(self.root, d.name):
                    _remove_private(d)
        return dead + stale

    def reap_dead(self) -> list[dict[str, Any]]:
        """Forget the builds of this home whose process is gone (SIGKILLed, or its machine rebooted).

        Each build holds an exclusive ``flock`` on ``<home>/packer/<record id>.lock`` from before its
        record is claimed until it is forgotten, and the kernel releases it however the process
        ends; a lock this process can take is a dead build's: its ``building`` row, private
        directories and lock file are removed at once, not at its deadline. (Its packer was ended
        by the watchdog when that process died: :mod:`sandboxer.extensions.packer_watchdog`.)

        Returns:
            The ``building`` rows removed.
        """
        removed: list[dict[str, Any]] = []
        for record_id in _BuildLock.dead(self.root):
            row = self.state.image_build(record_id)
            if row is not None and row["state"] == "building" and self.state.drop_image_build(record_id):
                removed.append(row)
                log.info("forgot build %s of %s: the process that ran it (%s) is gone", record_id,
                         row["template"], row["owner"])
        return removed


class _BuildLock:
    """``<root>/<record id>.lock``, held (``flock``) by the process running that build; see
    :meth:`PackerBuilder.reap_dead`. It is locked under a temporary name and then renamed, so a
    ``.lock`` file that can be locked is never one whose owner has not locked it yet."""

    SUFFIX = ".lock"

    def __init__(self, root: Path, record_id: str):
        self.root, self.record_id = root, record_id
        self.path = root / f"{record_id}{self.SUFFIX}"
        self.fd: int | None = None

    def __enter__(self) -> "_BuildLock":
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = self.root / f".{self.record_id}{self.SUFFIX}.new"
        self.fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.rename(fresh, self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    @classmethod
    def held(cls, root: Path, record_id: str) -> bool:
        """Whether a live process holds that build's lock."""
        try:
            fd = os.open(root / f"{record_id}{cls.SUFFIX}", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @classmethod
    def dead(cls, root: Path) -> list[str]:
        """Take the lock of every build under ``root`` whose process is gone: remove its private
        directories and lock file, and return the record ids."""
        if not root.is_dir():
            return []
        found = []
        for path in sorted(root.glob(f"*{cls.SUFFIX}")):
            record_id = path.name[:-len(cls.SUFFIX)]
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # its build just ended
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # running
                _remove_private(root / record_id)
                path.unlink(missing_ok=True)
                found.append(record_id)
            finally:
                os.close(fd)
        for fresh in root.glob(f".*{cls.SUFFIX}.new"):  # a crash between creating and renaming a lock
            try:
                if time.time() - fresh.stat().st_mtime > STALE_GRACE_S:
                    fresh.unlink()
            except FileNotFoundError:
                pass
        return found


def _remove_private(private: Path) -> None:
    """Remove a build's private directory and the temp directory it names."""
    try:
        tmp = Path((private / "tmpdir").read_text().strip())
    except OSError:
        tmp = None
    if tmp is not None and tmp.name.startswith("sandboxer-packer-") and tmp.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(private, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the build's process group: SIGTERM (Packer cleans up what it made), then SIGKILL after a
    grace; returns once the leader is reaped and no process of the group is left (bounded)."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group's id

    def group_alive() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    if proc.poll() is None or group_alive():
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < end and (proc.poll() is None or group_alive()):
            time.sleep(0.05)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
        pass
    end = time.monotonic() + 5
    while group_alive() and time.monotonic() < end:
        time.sleep(0.05)


def check_packer_command(value: str) -> str:
    """``config.packer``: a command name or an absolute path (resolved when a build runs).

    Raises:
        ValueError: anything else (a relative path would depend on the working directory).
    """
    if not (value.startswith("/") or re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", value)):
        raise ValueError("must be a command name or an absolute path")
    return value
