"""The conformance suite: one contract, checked the same way against any backend.

:class:`Conformance` drives a loaded extension directly, with the
:class:`~sandboxer.contract.ProvisionRequest` the manager would build, checks that every
result is the contract's model (and survives the state store's JSON), and goes through a :class:`~sandboxer.manager.Manager` for the lifecycle checks that are
the manager's (create, teardown twice, gc of an orphan). Every check is a named step
(:data:`STEPS`) whose failure says which backend, which step, what was expected and what
came back. Every extension call runs under a deadline, so a hung backend fails a step
instead of hanging the suite, and whatever the suite made is torn down at the end.

The rule kept here: plain Python, no pytest, so ``sandboxer conformance`` runs it too.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from sandboxer.contract import Handle, ProvisionRequest, Reachability, SnapshotResult, TeardownReport, checked
from sandboxer.deadline import Caller
from sandboxer.errors import BackendError, ConfigError, ProfileNotFound, SandboxerError
from sandboxer.models import ExecResult, Profile, SandboxCreateRequest, SnapshotMeta
from sandboxer.testing.files_steps import FILES_STEPS, FilesSteps

#: Every step, in the order it runs, with what it checks.
STEPS: dict[str, str] = {
    "provision": "provision returns the backend's Handle model, the same once read back from JSON",
    "wait_ready": "wait_ready returns JSON-serialisable reachability",
    "probe_alive": "probe does not say a ready sandbox is gone",
    "exec_exit_codes": "exit codes 0 and 3 come back, with stdout",
    "exec_stderr": "stdout and stderr are kept apart",
    "exec_stdin": "stdin reaches the command byte for byte",
    "exec_env": "env values reach the command verbatim (quotes, $, spaces)",
    "exec_cwd": "cwd sets the working directory",
    "exec_streaming": "on_output gets output while the command runs, and all of it",
    "exec_timeout": "a command past its timeout ends with exit 124 and timed_out=True",
    "exec_utf8_chunks": "UTF-8 split across chunks is never corrupted (result and stream)",
    "exec_output_cap": "output past the cap is cut on a character boundary and flagged truncated; the rest is kept",
    **FILES_STEPS,
    "snapshot": "snapshot returns a SnapshotResult (a data reference)",
    "restore": "a restored sandbox is ready and holds the snapshot's files",
    "teardown": "teardown returns a report",
    "teardown_again": "a second teardown of the same handle succeeds (idempotent)",
    "teardown_already_gone": "the first teardown report says already_gone false, the second true (billing stops right)",
    "probe_gone": "probe does not say a torn-down sandbox still exists",
    "list_owned": "list_owned finds an orphan with our owner labels, not a foreign resource nor a torn-down one",
    "manager_cycle": "through a Manager: create, exec, teardown twice ends terminated",
    "gc_orphan": "through a Manager: gc reaps an orphan and leaves a foreign resource alone",
    "errors_from_tree": "every error raised is a SandboxerError (exec after teardown included)",
    "nothing_left": "nothing the suite made is left at the backend",
}

PASS, FAIL, SKIP = "pass", "fail", "skip"

#: Seconds any ordinary command of the suite may take.
EXEC_LIMIT = 60.0
#: The exec_timeout step's command timeout, and how long past it the answer may take.
TIMEOUT_S, TIMEOUT_SLACK_S = 2.0, 20.0
#: The UTF-8 step: lines of nine 'é' (two bytes each); 180,000 characters in all.
UTF8_LINES, UTF8_WORD = 20000, "é" * 9


class StepFailed(Exception):
    """A check did not hold; the message says what was expected and what came back."""


class StepSkipped(Exception):
    """A step does not apply (a feature the backend does not declare, or a step it needs failed)."""


@dataclass
class StepResult:
    """One step's outcome. ``detail`` is the reason of a fail or skip."""

    extension: str
    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def message(self) -> str:
        what = STEPS.get(self.name, self.name)
        where = f"{self.extension} / {self.name}"
        return f"{where} ({what}): {self.detail}" if self.detail else where


@dataclass
class Report:
    """Every step's result for one backend and profile."""

    extension: str
    profile: str
    steps: list[StepResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status != FAIL for s in self.steps)

    @property
    def failures(self) -> list[StepResult]:
        return [s for s in self.steps if s.status == FAIL]

    def __getitem__(self, name: str) -> StepResult:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


def default_profile(manager: Any, extension: str) -> Profile:
    """The first profile (by slug) that uses ``extension``.

    Raises:
        ConfigError: the extension is not configured, or no profile uses it.
    """
    manager.extension(extension)  # a ConfigError naming the config dirs if it is not defined
    for slug in sorted(manager.catalog.profiles):
        prof = manager.catalog.profiles[slug]
        if any(c.extension == extension for c in prof.candidates):
            return prof
    raise ConfigError(f"no profile uses extension {extension!r}; write one (profiles/profile.<slug>.yaml) "
                      "or pass --profile")


def _show(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _json_ok(what: str, value: Any, model: type[BaseModel] | None = None) -> None:
    """The value survives the state store: dumped to JSON and read back into ``model``, it is the same."""
    try:
        text = json.dumps(value.model_dump(mode="json"))
    except (TypeError, ValueError) as exc:
        raise StepFailed(f"expected the {what} to be JSON-serialisable (it is stored), "
                         f"got {_show(value)}: {exc}") from None
    if model is not None:
        try:
            back = model.model_validate(json.loads(text))
        except ValidationError as exc:
            raise StepFailed(f"the {what} read back from JSON does not fit {model.__name__}: {exc}") from None
        if back.model_dump(mode="json") != json.loads(text):
            raise StepFailed(f"the {what} read back from JSON is not the same: {_show(back)} != {_show(value)}")


def _expect(got: Any, want: Any, what: str) -> None:
    if got != want:
        raise StepFailed(f"expected {what} {_show(want)}, got {_show(got)}")


class Conformance(FilesSteps):
    """The contract suite for one extension and profile of a Manager's catalog.

    Args:
        manager: a Manager over the configuration that defines the extension. Use a
            throwaway state store: the gc step reaps whatever orphans that store's owner has.
        extension: the extension id (``ext.<name>``).
        profile: a profile slug that uses it (default: the first one, by slug).
        inputs: inputs given as a consumer would give them (``--input``).
        output_cap: the per-stream output cap, in bytes, that the backend's config sets; the
            exec_output_cap step is skipped without it.

    Raises:
        ConfigError: the extension is not configured or no profile uses it.
        ProfileNotFound / InputError: the profile is unknown, does not use the extension, or
            lacks a required input.
    """

    def __init__(self, manager: Any, extension: str, profile: str | None = None,
                 inputs: dict[str, Any] | None = None, output_cap: int | None = None):
        self.manager = manager
        self.output_cap = output_cap
        self.ext = manager.extension(extension)
        self.profile = manager.profile(profile) if profile else default_profile(manager, extension)
        index = next((i for i, c in enumerate(self.profile.candidates) if c.extension == extension), None)
        if index is None:
            used = ", ".join(c.extension for c in self.profile.candidates)
            raise ProfileNotFound(f"profile {self.profile.slug!r} does not use {extension} (it uses {used})")
        self.index = index
        self.eff = manager.effective_profile(self.profile, index)
        self.inputs = manager._check_inputs(self.profile, inputs or {})
        hosts = manager._hosts(self.profile, index)
        self.host = hosts[0]
        self.run_id = uuid.uuid4().hex[:8]
        self.foreign_labels = {"sandboxer.owner": f"conformance-foreign-{self.run_id}"}
        self.report = Report(extension, self.profile.slug)
        self._caller = Caller()
        self._made: dict[str, Handle] = {}  # sandbox id -> handle, until torn down
        self._foreign: list[str] = []  # calls that raised something not from the tree
        self.sid = f"sbx-conf-{self.run_id}"
        self.created: Handle | None = None  # the main sandbox's handle, once provisioned
        self.handle: Handle | None = None  # the same, while it is ready
        self.gone_handle: Handle | None = None  # the same, once torn down
        self.reports: list[TeardownReport] = []  # its teardown reports
        self.snap: SnapshotMeta | None = None

    # ------------------------------------------------------------ helpers

    def _request(self, sandbox_id: str, owner: dict[str, str] | None = None) -> ProvisionRequest:
        """What provision gets from the manager, for ``sandbox_id`` (under ``owner`` labels, if given)."""
        req = self.manager._request(self.profile, self.index, sandbox_id, self.inputs, self.profile.ttl.default,
                                    "conformance", {"sandboxer.conformance": self.run_id}, self.host)
        if owner is not None:
            req = req.model_copy(update={"owner_labels": dict(owner), "tags": {**req.tags, **owner}})
        return req

    def call(self, method: str, *args: Any, deadline: float, late: Callable[[Any], None] | None = None,
             **kwargs: Any) -> Any:
        """``ext.<method>(...)`` under a deadline; a foreign exception is noted for errors_from_tree.

        ``late`` gets the result of a call that returns after its deadline (a handle to undo).
        """
        what = f"{method} on {self.ext.id}"
        try:
            # a closure: the method's own keywords (exec's ``timeout``) are not the deadline's
            fn = getattr(self.ext, method)
            out = self._caller.call(lambda: fn(*args, **kwargs), timeout=deadline, what=what, backend=self.ext.id,
                                    late=late)
        except SandboxerError:
            raise
        except Exception as exc:
            self._foreign.append(f"{method} raised {type(exc).__module__}.{type(exc).__name__}: {exc}")
            raise
        try:  # typed out: what the manager's boundary would accept, as the contract's model
            return checked(method, out, backend=self.ext.id, handle_cls=self.ext.Handle)
        except BackendError as exc:
            raise StepFailed(str(exc)) from None

    def exec(self, argv: list[str], **kwargs: Any) -> ExecResult:
        if self.handle is None:
            raise StepSkipped("no ready sandbox (provision or wait_ready failed)")
        kwargs.setdefault("timeout", EXEC_LIMIT)
        res = self.call("exec", self.handle, argv, deadline=kwargs["timeout"] + TIMEOUT_SLACK_S, **kwargs)
        if not isinstance(res, ExecResult):
            raise StepFailed(f"expected exec to return an ExecResult, got {_show(res)}")
        return res

    def provision(self, sandbox_id: str, owner: dict[str, str] | None = None) -> Handle:
        handle = self.call("provision", self._request(sandbox_id, owner), deadline=self.ext.deadline(self.eff),
                           late=self._undo_late)
        self._made[sandbox_id] = handle  # torn down at the end whatever the checks say
        _json_ok("handle", handle, self.ext.Handle)
        return handle

    def _undo_late(self, handle: Any) -> None:
        """A provision abandoned at its deadline returned after all: tear down what it made."""
        try:
            self.ext.teardown(handle)
        except Exception:  # noqa: BLE001 - nothing_left reports what list_owned still finds
            pass

    def teardown(self, sandbox_id: str) -> TeardownReport:
        report = self.call("teardown", self._made[sandbox_id], deadline=self.manager.limits.teardown)
        self._made.pop(sandbox_id, None)
        return report

    def _need(self, feature: str) -> None:
        if not self.ext.supports(feature):
            raise StepSkipped(f"{self.ext.id} does not declare the {feature!r} feature")

    def _need_exec(self) -> None:
        self._need("exec")
        if self.handle is None:
            raise StepSkipped("no ready sandbox (provision or wait_ready failed)")

    # -------------------------------------------------------------- steps

    def step_provision(self) -> None:
        self.created = self.provision(self.sid)
        self.handle = self.created

    def step_wait_ready(self) -> None:
        if self.handle is None:
            raise StepSkipped("provision failed")
        handle, self.handle = self.handle, None  # exec steps run only on a ready sandbox
        reach = self.call("wait_ready", handle, self.eff.ready_timeout,
                          deadline=self.eff.ready_timeout + self.manager.limits.ready_grace)
        _json_ok("reachability", reach, Reachability)
        self.handle = handle

    def step_probe_alive(self) -> None:
        if self.handle is None:
            raise StepSkipped("no ready sandbox")
        alive = self.call("probe", self.handle, deadline=self.manager.limits.probe)
        if alive not in (True, None):
            raise StepFailed(f"expected probe of a ready sandbox to be True (or None: cannot tell), got {_show(alive)}")

    def step_exec_exit_codes(self) -> None:
        self._need_exec()
        res = self.exec(["sh", "-c", "echo hi"])
        _expect((res.exit_code, res.stdout), (0, "hi\n"), "exit code and stdout of `echo hi`")
        res = self.exec(["sh", "-c", "exit 3"])
        _expect(res.exit_code, 3, "the exit code of `exit 3`")
        _expect(res.timed_out, False, "timed_out of a command that exited")
        _expect(res.truncated, False, "truncated of a command with little output")

    def step_exec_stderr(self) -> None:
        self._need_exec()
        res = self.exec(["sh", "-c", "echo out; echo err >&2"])
        _expect((res.stdout, res.stderr), ("out\n", "err\n"), "(stdout, stderr)")

    def step_exec_stdin(self) -> None:
        self._need_exec()
        data = "line one\nligne deux é\n"
        res = self.exec(["cat"], stdin=data.encode())
        _expect((res.exit_code, res.stdout), (0, data), "`cat`'s exit code and stdout (its stdin)")

    def step_exec_env(self) -> None:
        self._need_exec()
        value = "a'b \"c\" $(d) `e` ; f"
        res = self.exec(["sh", "-c", 'printf %s "$SBX_CONFORMANCE"'], env={"SBX_CONFORMANCE": value})
        _expect(res.stdout, value, "the variable's value")

    def step_exec_cwd(self) -> None:
        self._need_exec()
        res = self.exec(["sh", "-c", "mkdir -p sbx-conformance-dir && cd sbx-conformance-dir && pwd -P"])
        if res.exit_code != 0 or not res.stdout.strip():
            raise StepFailed(f"could not make a directory in the default working directory: {_show(res)}")
        target = res.stdout.strip()
        res = self.exec(["pwd", "-P"], cwd=target)
        _expect(res.stdout.strip(), target, "the working directory")

    def step_exec_streaming(self) -> None:
        self._need_exec()
        seen: list[tuple[float, str, str]] = []
        res = self.exec(["sh", "-c", "echo first; echo warn >&2; sleep 2; echo second"],
                        on_output=lambda stream, text: seen.append((time.monotonic(), stream, text)))
        ended = time.monotonic()
        _expect(res.stdout, "first\nsecond\n", "stdout")
        streamed = "".join(t for _, s, t in seen if s == "stdout")
        _expect(streamed, res.stdout, "the stdout streamed to on_output (all of it)")
        _expect("".join(t for _, s, t in seen if s == "stderr"), "warn\n", "the stderr streamed to on_output")
        first = next((at for at, s, t in seen if s == "stdout" and "first" in t), None)
        if first is None or ended - first < 1.0:
            raise StepFailed("expected 'first' to reach on_output while the command ran (it sleeps 2s after), "
                             f"got it {ended - first if first else 0:.2f}s before exec returned")

    def step_exec_timeout(self) -> None:
        self._need_exec()
        began = time.monotonic()
        res = self.exec(["sh", "-c", "echo started; sleep 60"], timeout=TIMEOUT_S)
        took = time.monotonic() - began
        _expect((res.exit_code, res.timed_out), (124, True), f"(exit_code, timed_out) after a {TIMEOUT_S:g}s timeout")
        if took > TIMEOUT_S + TIMEOUT_SLACK_S:
            raise StepFailed(f"expected exec to return soon after its {TIMEOUT_S:g}s timeout, took {took:.1f}s")

    def step_exec_utf8_chunks(self) -> None:
        self._need_exec()
        line = UTF8_WORD + "\n"
        lines = min(UTF8_LINES, (self.output_cap or 1 << 62) // len(line.encode()))  # all of it under the cap
        want = line * lines
        streamed: dict[str, list[str]] = {"stdout": [], "stderr": []}
        res = self.exec(["sh", "-c", f"yes '{UTF8_WORD}' | head -n {lines}; yes '{UTF8_WORD}' | head -n 100 >&2"],
                        on_output=lambda stream, text: streamed[stream].append(text))
        for what, got, expected in (("stdout", res.stdout, want), ("stderr", res.stderr, want[: 100 * 10]),
                                    ("streamed stdout", "".join(streamed["stdout"]), want)):
            if got != expected:
                bad = got.count("\ufffd")
                raise StepFailed(f"expected {what} to be {len(expected)} characters of 'é' lines, got {len(got)} "
                                 f"characters with {bad} U+FFFD (a character split between chunks was corrupted)"
                                 if bad else f"expected {what} to be {len(expected)} characters of 'é' lines, "
                                 f"got {len(got)}: {_show(got[:80])}")

    def step_exec_output_cap(self) -> None:
        self._need_exec()
        cap = self.output_cap
        if cap is None:
            raise StepSkipped("no output cap given (the cap your config sets: --output-cap BYTES, or "
                              "Target(output_cap=...))")
        line = UTF8_WORD + "\n"  # 19 bytes: a cut anywhere but a line's end splits a character
        lines = 2 * cap // len(line.encode()) + 1
        full = line * lines
        streamed: list[str] = []
        res = self.exec(["sh", "-c", f"yes '{UTF8_WORD}' | head -n {lines}; echo done >&2"],
                        on_output=lambda stream, text: streamed.append(text) if stream == "stdout" else None)
        kept = len(res.stdout.encode())
        _expect((res.exit_code, res.truncated, res.stderr), (0, True, "done\n"),
                f"(exit_code, truncated, stderr) of {len(full.encode())} bytes of stdout past a {cap}-byte cap")
        if not (cap - 4 < kept <= cap) or not full.startswith(res.stdout):
            raise StepFailed(f"expected the first {cap} bytes of stdout (less at most one split character), "
                             f"got {kept} bytes{'' if full.startswith(res.stdout) else ' that are not its start'}")
        _expect("".join(streamed), res.stdout, "the stdout streamed to on_output (the kept part, no more)")

    def step_snapshot(self) -> None:
        self._need("snapshots")
        if self.handle is None:
            raise StepSkipped("no ready sandbox")
        if self.ext.supports("exec"):
            res = self.exec(["sh", "-c", "echo kept > sbx-conformance-kept.txt"])
            _expect(res.exit_code, 0, "the exit code of writing a file to snapshot")
        out = self.call("snapshot", self.handle, deadline=self.manager.limits.snapshot)
        _json_ok("snapshot result", out, SnapshotResult)
        self.snap = SnapshotMeta(id=f"snap-conf-{self.run_id}", sandbox_id=self.sid, extension=self.ext.id,
                                 profile=self.profile.slug, consumer="conformance",
                                 created_at=datetime.now(timezone.utc), size_bytes=out.size_bytes,
                                 checksum=out.checksum, data=out.data, inputs=self.inputs)

    def step_restore(self) -> None:
        self._need("snapshots")
        if self.snap is None:
            raise StepSkipped("snapshot failed")
        sid = f"sbx-conf-{self.run_id}-r"
        handle = self.call("restore_from_snapshot", self._request(sid), self.snap, deadline=self.ext.deadline(self.eff))
        _json_ok("handle", handle, self.ext.Handle)
        self._made[sid] = handle
        try:
            self.call("wait_ready", handle, self.eff.ready_timeout,
                      deadline=self.eff.ready_timeout + self.manager.limits.ready_grace)
            if self.ext.supports("exec"):
                res = self.call("exec", handle, ["cat", "sbx-conformance-kept.txt"],
                                deadline=EXEC_LIMIT + TIMEOUT_SLACK_S)
                _expect((res.exit_code, res.stdout), (0, "kept\n"), "the restored sandbox's file (exit code, content)")
        finally:
            try:
                self.teardown(sid)
            finally:  # the snapshot's stored data goes even if the restored sandbox's teardown failed
                self.call("delete_snapshot", self.snap, deadline=self.manager.limits.snapshot)

    def step_teardown(self) -> None:
        if self.created is None:
            raise StepSkipped("provision failed")
        self.handle = None
        report = self.call("teardown", self.created, deadline=self.manager.limits.teardown)
        self._made.pop(self.sid, None)
        _json_ok("teardown report", report, TeardownReport)
        self.gone_handle = self.created
        self.reports.append(report)

    def step_teardown_again(self) -> None:
        if self.gone_handle is None:
            raise StepSkipped("teardown failed")
        report = self.call("teardown", self.gone_handle, deadline=self.manager.limits.teardown)
        _json_ok("teardown report", report, TeardownReport)
        self.reports.append(report)

    def step_teardown_already_gone(self) -> None:
        if len(self.reports) < 2:
            raise StepSkipped("teardown or teardown_again failed")
        got = [r.already_gone for r in self.reports]
        _expect(got, [False, True], "already_gone of the (first, second) teardown reports")

    def step_probe_gone(self) -> None:
        if self.gone_handle is None:
            raise StepSkipped("teardown failed")
        alive = self.call("probe", self.gone_handle, deadline=self.manager.limits.probe)
        if alive not in (False, None):
            raise StepFailed(f"expected probe of a torn-down sandbox to be False (or None), got {_show(alive)}")

    def step_list_owned(self) -> None:
        self._need("list_owned")
        owner = self.manager.owner_labels
        orphan, foreign = f"sbx-conf-{self.run_id}-o", f"sbx-conf-{self.run_id}-f"
        self.provision(orphan, owner)
        self.provision(foreign, self.foreign_labels)
        owned = self.call("list_owned", dict(owner), deadline=self.manager.limits.list_owned)
        ids = [o.sandbox_id for o in owned]
        if orphan not in ids:
            raise StepFailed(f"expected the orphan {orphan} (provisioned with owner labels {owner}) to be listed, "
                             f"got {ids}")
        if foreign in ids:
            raise StepFailed(f"expected {foreign} (other owner labels {self.foreign_labels}) not to be listed, "
                             f"got {ids}")
        if self.sid in ids and self.gone_handle is not None:
            raise StepFailed(f"expected the torn-down {self.sid} not to be listed, got {ids}")
        theirs = [o.sandbox_id for o in self.call("list_owned", dict(self.foreign_labels),
                                                          deadline=self.manager.limits.list_owned)]
        _expect(theirs, [foreign], "list_owned of the foreign owner labels")

    def step_manager_cycle(self) -> None:
        mgr = self.manager
        sb = mgr.create(SandboxCreateRequest(profile=self.profile.slug, consumer="conformance",
                                             inputs=self._given(), labels={"sandboxer.conformance": self.run_id}))
        try:
            _expect(sb.state.value, "ready", "the state after create")
            if self.ext.supports("exec"):
                res = mgr.exec(sb.id, ["sh", "-c", "echo via-manager"], timeout=EXEC_LIMIT)
                _expect((res.exit_code, res.stdout), (0, "via-manager\n"), "exec through the manager")
        finally:
            first = mgr.teardown(sb.id)
        _expect(first.state.value, "terminated", "the state after teardown")
        _expect(mgr.teardown(sb.id).state.value, "terminated", "the state after a second teardown")

    def _given(self) -> dict[str, Any]:
        defaults = self.profile.inputs.defaults
        return {k: v for k, v in self.inputs.items() if defaults.get(k) != v}

    def step_gc_orphan(self) -> None:
        self._need("list_owned")
        orphan = f"sbx-conf-{self.run_id}-o"
        if orphan not in self._made:
            raise StepSkipped("list_owned failed before its orphan was made")
        if self.ext.id not in self.manager.state.extensions_used():
            raise StepSkipped(f"gc asks only the backends its store has used; manager_cycle recorded nothing "
                              f"on {self.ext.id}")
        report = self.manager.gc()
        if orphan not in report.orphans:
            raise StepFailed(f"expected gc to reap the orphan {orphan}, got orphans {report.orphans}, "
                             f"errors {report.errors}")
        self._made.pop(orphan, None)
        foreign = f"sbx-conf-{self.run_id}-f"
        if foreign in report.orphans:
            raise StepFailed(f"expected gc to leave {foreign} (other owner labels) alone, it reaped it")
        left = [o.get("sandbox_id") for o in self.call("list_owned", dict(self.manager.owner_labels),
                                                        deadline=self.manager.limits.list_owned)]
        if orphan in left:
            raise StepFailed(f"expected the orphan gone after gc, list_owned still has it: {left}")

    def step_errors_from_tree(self) -> None:
        if self.gone_handle is not None and self.ext.supports("exec"):
            try:
                res = self.call("exec", self.gone_handle, ["true"], deadline=EXEC_LIMIT + TIMEOUT_SLACK_S)
            except Exception:  # noqa: BLE001 - a foreign one is recorded by call() and reported below
                pass
            else:
                if isinstance(res, ExecResult) and res.exit_code == 0:
                    raise StepFailed("expected exec in a torn-down sandbox to raise a SandboxerError "
                                     f"(or exit non-zero), got {_show(res)}")
        if self._foreign:
            raise StepFailed("expected every error to be a sandboxer.errors.SandboxerError (translate foreign "
                             "exceptions at the boundary), got: " + "; ".join(self._foreign))

    def step_nothing_left(self) -> None:
        self._cleanup()
        if not self.ext.supports("list_owned"):
            raise StepSkipped(f"{self.ext.id} does not declare 'list_owned': cannot look")
        for labels in (self.manager.owner_labels, self.foreign_labels):
            left = self.call("list_owned", dict(labels), deadline=self.manager.limits.list_owned)
            if left:
                ids = [o.get("sandbox_id") for o in left]
                raise StepFailed(f"expected nothing left under {labels}, got {_show(ids)}")

    def _cleanup(self) -> None:
        """Tear down whatever the suite still holds (a failed step's leftovers)."""
        problems = []
        for sid in list(self._made):
            try:
                self.teardown(sid)
            except Exception as exc:  # noqa: BLE001 - reported as this step's failure
                problems.append(f"teardown of {sid} failed: {exc}")
        if problems:
            raise StepFailed("; ".join(problems))

    # ---------------------------------------------------------------- run

    def run(self, on_step: Callable[[StepResult], None] | None = None) -> Report:
        """Run every step in order; returns the report (never raises for a failed step)."""
        try:
            for name in STEPS:
                result = self._run_step(name)
                self.report.steps.append(result)
                if on_step is not None:
                    on_step(result)
        finally:
            try:
                self._cleanup()
            except StepFailed:
                pass  # already reported by nothing_left, or the run was interrupted
        return self.report

    def _run_step(self, name: str) -> StepResult:
        began = time.monotonic()
        status, detail = PASS, ""
        try:
            getattr(self, f"step_{name}")()
        except StepSkipped as exc:
            status, detail = SKIP, str(exc)
        except StepFailed as exc:
            status, detail = FAIL, str(exc)
        except Exception as exc:  # noqa: BLE001 - any error fails this step, named
            status, detail = FAIL, f"raised {type(exc).__name__}: {exc}"
        return StepResult(self.ext.id, name, status, detail, time.monotonic() - began)


@dataclass
class Target:
    """What the pytest plugin runs the suite against: a Manager and one of its extensions.

    Attributes:
        manager: a Manager over a throwaway state store and the config defining ``extension``.
        extension: the extension id.
        profile: a profile slug using it (default: the first one, by slug).
        inputs: inputs a consumer would pass (``--input``), e.g. a repo for a compose profile.
    """

    manager: Any
    extension: str
    profile: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    output_cap: int | None = None

    @classmethod
    def from_config(cls, config_dirs: list[Any], extension: str, home: Any, profile: str | None = None,
                    inputs: dict[str, Any] | None = None, output_cap: int | None = None) -> "Target":
        """A target over a new Manager: ``config_dirs`` (plus the built-ins) and a state store in ``home``."""
        from sandboxer.manager import Manager  # the manager sits above this module's other imports

        return cls(Manager(config_dirs=list(config_dirs), home=home), extension, profile, dict(inputs or {}),
                   output_cap)

    def run(self, on_step: Callable[[StepResult], None] | None = None) -> Report:
        return run_conformance(self.manager, self.extension, self.profile, self.inputs, on_step, self.output_cap)


def run_conformance(manager: Any, extension: str, profile: str | None = None,
                    inputs: dict[str, Any] | None = None,
                    on_step: Callable[[StepResult], None] | None = None, output_cap: int | None = None) -> Report:
    """Run the whole suite against ``extension`` (see :class:`Conformance`); returns its report."""
    return Conformance(manager, extension, profile, inputs, output_cap).run(on_step)
