"""The sandbox commands: create, list, status, exec, teardown, events (and its alias logs).

A sandbox is named by its id or by its ``--name``. Ctrl-C is handled where it lands: during
``exec`` the command is killed inside the sandbox (every process carrying the exec's
``SANDBOXER_EXEC_ID``), during ``create`` the sandbox being made is torn down; both then exit 130.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from typing import Any

import click

from sandboxer import cli_errors
from sandboxer.cli_common import (
    DURATION,
    any_filter,
    filter_options,
    in_background,
    matching,
    pairs,
    pass_ctx,
    resolve,
    secret_refs,
)
from sandboxer.cli_output import CreateProgress, emit_json, print_table, short_time, table
from sandboxer.errors import SandboxerError

#: How long a Ctrl-C'd create may take to undo what it started before the CLI gives up on it.
CREATE_CLEANUP_S = 300.0
#: How long a Ctrl-C'd exec's call may take to return once its processes are killed.
EXEC_STOP_S = 15.0


def _status_table(items: list[Any]) -> Any:
    t = table("ID", "NAME", "PROFILE", "EXTENSION", "HOST", "STATE", "CONSUMER", "EXPIRES")
    for s in items:
        t.add_row(s.id, s.name or "-", s.profile, s.extension, s.host or "-", s.state.value, s.consumer,
                  short_time(s.expires_at))
    return t


def describe_policy(policy: dict[str, Any]) -> str:
    from sandboxer.policy import NetworkPolicy

    text = "network: " + NetworkPolicy.model_validate(policy.get("network") or {}).describe()
    if policy.get("secrets"):
        text += "; secrets: " + ", ".join(policy["secrets"])
    gpu = policy.get("gpu")
    if gpu:
        text += f"; gpu: {gpu['count']} x {gpu.get('type') or 'any'}"
    return text


def _print_status(s: Any) -> None:
    click.echo(f"id:           {s.id}")
    for label, value in (("name", s.name), ("profile", s.profile), ("extension", s.extension), ("host", s.host),
                         ("state", s.state.value), ("consumer", s.consumer), ("labels", s.labels or None),
                         ("created", s.created_at), ("ready", s.ready_at), ("expires", s.expires_at),
                         ("terminated", s.terminated_at), ("last error", s.last_error)):
        if value is not None:
            shown = short_time(value) if hasattr(value, "tzinfo") else value
            shown = ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else shown
            click.echo(f"{label + ':':<13} {shown}")
    if s.policy:
        click.echo(f"{'policy:':<13} {describe_policy(s.policy)}")
    if s.reachability:
        click.echo("reachability: " + json.dumps(s.reachability, sort_keys=True))


# ------------------------------------------------------------------ create

@click.command()
@click.argument("profile")
@click.option("--input", "inputs", multiple=True, metavar="K=V", help="An input (repeatable).")
@click.option("--consumer", default="cli", show_default=True, help="Who the sandbox is for (attribution).")
@click.option("--ttl", type=DURATION, default=None, help="Lifetime, e.g. 30m or 1h30m (capped by the profile's maximum).")
@click.option("--label", "labels", multiple=True, metavar="K=V")
@click.option("--name", default=None, help="Idempotency name: a second create with it and the same parameters "
              "returns the same sandbox; with other parameters it is a conflict (exit 67).")
@click.option("--secret", "secret_refs_", multiple=True, metavar="NAME=env:VAR|NAME=file:PATH",
              help="Where the value of a secret the profile declares is (repeatable); read here, never shown.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (a fallback is still shown).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def create(c: Any, profile: str, inputs: tuple[str, ...], consumer: str, ttl: float | None, labels: tuple[str, ...],
           name: str | None, secret_refs_: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Create a sandbox of PROFILE and wait until it is ready.

    Progress goes to stderr: a spinner with the stage and the time elapsed on a terminal, else
    one line per stage. Ctrl-C tears down what was started, then exits 130.
    """
    from pydantic import ValidationError

    from sandboxer.models import SandboxCreateRequest

    try:
        req = SandboxCreateRequest(profile=profile, inputs=pairs(inputs, "--input"), consumer=consumer, ttl=ttl,
                                   labels=pairs(labels, "--label"), name=name)
    except ValidationError as exc:
        from sandboxer.loader import describe_validation

        raise click.BadParameter(describe_validation("request", exc)) from None
    refs = secret_refs(secret_refs_)
    mgr = c.manager()
    progress = CreateProgress(profile, quiet=quiet)
    box: dict[str, Any] = {}

    def run() -> Any:
        box["value"] = mgr.create(req, secrets=refs, on_progress=progress)
        return box["value"]

    def undo(worker: threading.Thread) -> None:
        click.echo("interrupted: cleaning up (Ctrl-C again to leave it to `sandboxer gc`)", err=True)
        done: set[str] = set()
        until = time.monotonic() + CREATE_CLEANUP_S
        while True:
            for sid in [*progress.sandbox_ids, *([box["value"].id] if "value" in box else [])]:
                if sid not in done:
                    done.add(sid)
                    try:
                        mgr.teardown(sid)
                    except SandboxerError as exc:
                        click.echo(f"warning: {sid}: {exc}", err=True)
            if not worker.is_alive() or time.monotonic() > until:
                break
            worker.join(0.05)
        if "value" in box and box["value"].id not in done:
            mgr.teardown(box["value"].id)

    with progress.spinning():
        sb = in_background(run, undo)
    if as_json:
        return emit_json(sb)
    click.echo(sb.id)
    click.echo("reachability: " + json.dumps(sb.reachability, sort_keys=True))


# -------------------------------------------------------------------- exec

class ExecCommand(click.Command):
    """``exec [OPTIONS] ID [--] CMD [ARG...]``: sand-boxer's options go before the command (before
    ``--``); everything after ``--`` (or from the command's first word on) is the command's.

    One thing after ``--`` is refused because it is surely a mistake: the README's old
    ``-- CMD --timeout 30s``, a separate ``--timeout`` and a duration with a unit as the last two
    words. A command that takes that option can have it as ``--timeout=30s``.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {o for p in self.params if isinstance(p, click.Option) and not p.is_flag for o in p.opts}
        head: list[str] = []
        command: list[str] | None = None
        dashed = False
        seen_id = False
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                command, dashed = args[i + 1:], True
                break
            if a.startswith("-") and a != "-":
                head.append(a)
                if a in takes_value and i + 1 < len(args):
                    head.append(args[i + 1])
                    i += 1
            elif not seen_id:
                head.append(a)
                seen_id = True
            else:
                command = args[i:]
                break
            i += 1
        if dashed and command and len(command) >= 3 and command[-2] == "--timeout":
            from sandboxer import durations

            try:
                durations.parse_flag(command[-1], "--timeout")
            except ValueError:
                pass
            else:
                raise click.UsageError(
                    f"--timeout {command[-1]} after '--' would go to the command: sand-boxer's options go before "
                    f"'--' (sandboxer exec --timeout {command[-1]} ID -- CMD); if the command itself takes it, "
                    f"write --timeout={command[-1]}", ctx=ctx)
        ctx.meta["sandboxer.exec.argv"] = list(command or [])
        rest = super().parse_args(ctx, head)
        if not ctx.meta["sandboxer.exec.argv"] and not ctx.resilient_parsing:
            raise click.UsageError("no command to run: sandboxer exec [OPTIONS] ID -- CMD [ARG...]", ctx=ctx)
        return rest


def _stream(kind: str, text: str) -> None:
    sink = sys.stdout if kind == "stdout" else sys.stderr
    raw = getattr(sink, "buffer", None)
    if raw is None:  # a text-only stream (e.g. under a test runner): its own encoding
        sink.write(text)
    else:
        sink.flush()
        raw.write(text.encode("utf-8", "surrogateescape"))
        raw.flush()
    sink.flush()


def _stdin(no_stdin: bool) -> bytes | None:
    """What the command gets on stdin: ours, read to its end, unless it is a terminal or ``--no-stdin``."""
    if no_stdin or sys.stdin is None or sys.stdin.isatty():
        return None
    src = getattr(sys.stdin, "buffer", sys.stdin)
    data = src.read()
    data = data.encode() if isinstance(data, str) else data
    return data or None


@click.command("exec", cls=ExecCommand)
@click.argument("sandbox")
@click.option("--timeout", type=DURATION, default=None, help="Kill the command after this long (e.g. 30s, 1h30m).")
@click.option("--no-stdin", "-n", "no_stdin", is_flag=True,
              help="Do not forward stdin (by default a stdin that is not a terminal is read to its end and given "
                   "to the command).")
@pass_ctx
def exec_cmd(c: Any, sandbox: str, timeout: float | None, no_stdin: bool) -> None:
    """Run a command in a sandbox (by id or name): sandboxer exec [--timeout 30s] ID -- CMD [ARG...].

    Exits with the command's exit code. Output streams as it arrives, as UTF-8. A command killed
    at --timeout exits 124; output past the backend's cap is cut, and stderr says so. Ctrl-C
    kills the command inside the sandbox and exits 130.
    """
    from sandboxer.execution import EXEC_MARKER

    argv = click.get_current_context().meta["sandboxer.exec.argv"]
    mgr = c.manager()
    sid = resolve(mgr, sandbox)
    data = _stdin(no_stdin)
    marker = uuid.uuid4().hex

    def stop(worker: threading.Thread) -> None:
        mgr.kill_exec(sid, marker)
        worker.join(EXEC_STOP_S)

    res = in_background(lambda: mgr.exec(sid, argv, timeout=timeout, stdin=data, env={EXEC_MARKER: marker},
                                         on_output=_stream), stop)
    if res.truncated:
        click.echo("warning: output was cut at the backend's output cap (the rest was not kept or shown);"
                   " write large output to a file in the sandbox instead", err=True)
    if res.timed_out:
        from sandboxer.models import format_duration

        click.echo(f"error: command timed out after {format_duration(timeout or 0)}", err=True)
    sys.exit(res.exit_code)


# ---------------------------------------------------------- status / list

@click.command()
@click.argument("sandbox")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-refresh", is_flag=True, help="Do not ask the backend whether a ready sandbox still exists.")
@pass_ctx
def status(c: Any, sandbox: str, as_json: bool, no_refresh: bool) -> None:
    """Show one sandbox, by id or name (a ready one is checked with its backend: one that is gone shows as lost)."""
    mgr = c.manager()
    s = mgr.get(resolve(mgr, sandbox), refresh=not no_refresh)
    emit_json(s) if as_json else _print_status(s)


@click.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include terminated and failed sandboxes.")
@click.option("--pooled", is_flag=True, help="Include the idle sandboxes of warm pools (consumer sandboxer.pool).")
@filter_options
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C (or --count refreshes).")
@click.option("--interval", type=DURATION, default="2s", show_default=True, help="With --watch: between refreshes.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="With --watch: stop after N refreshes.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array (with --watch: one compact array a line).")
@pass_ctx
def list_cmd(c: Any, show_all: bool, pooled: bool, watch: bool, interval: float, count: int | None, as_json: bool,
             **filters: Any) -> None:
    """List sandboxes (live ones unless --all; warm pools' idle ones only with --pooled), filtered by profile,
    consumer, label, state, backend."""
    pairs(filters["f_labels"], "--label")  # a bad one is a usage error before anything is opened
    mgr = c.manager()
    every = show_all or filters["f_state"] is not None
    rounds = 0
    while True:
        items = matching(mgr.list(all=every, pooled=pooled), **filters)
        if watch and not as_json and sys.stdout.isatty():
            click.clear()
        if as_json:
            emit_json(items, compact=watch)
        elif items:
            print_table(_status_table(items))
        else:
            click.echo("no sandboxes")
        rounds += 1
        if not watch or (count is not None and rounds >= count):
            return
        sys.stdout.flush()
        time.sleep(interval)


# ---------------------------------------------------------------- teardown

@click.command()
@click.argument("sandboxes", nargs=-1)
@filter_options
@click.option("--all", "all_live", is_flag=True, help="Every live sandbox (with a filter: every one it matches).")
@click.option("--force", is_flag=True, help="Take over whatever state it is in and retry the backend's teardown.")
@click.option("--forget", is_flag=True,
              help="With --force: if the backend still cannot confirm, record it terminated anyway "
                   "(only after you have checked that its resources are gone).")
@click.option("--yes", is_flag=True, help="Do not ask before --forget.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def teardown(c: Any, sandboxes: tuple[str, ...], all_live: bool, force: bool, forget: bool, yes: bool,
             as_json: bool, **filters: Any) -> None:
    """Tear down sandboxes (idempotent): IDs or names, or every live one a filter matches.

    A sandbox still being created is torn down once its create stops. A filter needs no --all;
    tearing down every live sandbox does. Exits with the code of the first failure, after trying all.
    """
    if forget and not force:
        raise click.UsageError("--forget needs --force")
    filtered = any_filter(**filters)
    if sandboxes and (filtered or all_live):
        raise click.UsageError("give sandboxes (ids or names) or a filter/--all, not both")
    if not sandboxes and not (filtered or all_live):
        raise click.UsageError("name the sandboxes to tear down (ids or names), or choose them with a filter "
                               "(--profile, --consumer, --label, --state, --backend), or --all for every live one")
    pairs(filters["f_labels"], "--label")
    mgr = c.manager()
    if sandboxes:
        ids = list(dict.fromkeys(resolve(mgr, ref) for ref in sandboxes))  # all found before any is touched
    else:
        ids = [s.id for s in matching(mgr.list(), **filters)]
    if forget and not yes:
        click.confirm(f"If the backend cannot confirm, {', '.join(ids)} will be recorded terminated although "
                      "their resources may still exist. Have you checked that they are gone?", abort=True, err=True)
    done, first_failure = [], None
    for sid in ids:
        try:
            s = mgr.teardown(sid, force=force, forget=forget)
        except SandboxerError as exc:
            click.echo(f"error: {exc}", err=True)
            first_failure = first_failure if first_failure is not None else cli_errors.code_for(exc)
            continue
        done.append(s)
        if not as_json:
            click.echo(f"{s.id} {s.state.value}")
    if as_json and (done or len(sandboxes) != 1):  # one sandbox: its object (nothing if it failed)
        emit_json(done[0] if len(sandboxes) == 1 else done)
    if first_failure is not None:
        sys.exit(first_failure)


# ------------------------------------------------------------------ events

@click.command()
@click.argument("sandbox")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def events(c: Any, sandbox: str, as_json: bool) -> None:
    """A sandbox's history, by id or name: every transition and event, oldest first (`logs` is the same)."""
    mgr = c.manager()
    rows = mgr.events(resolve(mgr, sandbox))
    if as_json:
        return emit_json(rows)
    from sandboxer.records import dt

    t = table("TIME", "EVENT", "FROM", "TO", "DETAIL")
    for r in rows:
        t.add_row(short_time(dt(r["ts"])), r["kind"], r.get("from_state") or "-", r.get("to_state") or "-",
                  json.dumps(r.get("detail") or {}, sort_keys=True) if r.get("detail") else "-")
    print_table(t)


def register(cli: click.Group) -> None:
    """Add the sandbox commands to the root group."""
    for cmd in (create, exec_cmd, status, list_cmd, teardown, events):
        cli.add_command(cmd)
    cli.add_command(events, "logs")
