"""The command line: a thin shell over the Python API.

Tables for people, ``--json`` for scripts. Any sand-boxer error prints one
``error: ...`` message on stderr and exits 1; usage errors exit 2.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sandboxer.cli_trust import register as register_trust_commands
from sandboxer.errors import CapabilityError, ProfileNotFound, SandboxerError
from sandboxer.models import ExtensionManifest, Profile, SandboxCreateRequest, parse_duration

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    result = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", param_hint=flag)
        result[key] = val
    return result


def _secret_refs(values: tuple[str, ...]) -> dict[str, Any]:
    """``--secret NAME=env:VAR`` / ``NAME=file:PATH`` as references (resolved by the manager, here).

    A malformed one is refused without echoing what followed ``=``: it may be the value itself.
    """
    from sandboxer.secrets import SecretRef

    refs: dict[str, Any] = {}
    for v in values:
        name, sep, ref = v.partition("=")
        kind, colon, where = ref.partition(":")
        if not (sep and name and colon and where and kind in ("env", "file")):
            shown = f"secret {name!r}" if sep and name else "a secret"
            raise click.BadParameter(f"expected NAME=env:VARIABLE or NAME=file:PATH for {shown} (what follows '=' "
                                     "is not shown: give where the value is, never the value)", param_hint="--secret")
        refs[name] = SecretRef(env=where) if kind == "env" else SecretRef(file=Path(where).expanduser())
    return refs


class Ctx:
    def __init__(self, config: tuple[str, ...], home: str | None, state_url: str | None):
        self.config = [Path(c) for c in config] if config else None
        self.home = home
        self.state_url = state_url
        self._mgr = None

    def manager(self):  # type: ignore[no-untyped-def]
        if self._mgr is None:
            from sandboxer.manager import Manager

            # lazy: only what the command needs loads; no refill thread: a command is over in a
            # moment (`sandboxer pool fill` fills)
            self._mgr = Manager(config_dirs=self.config, home=self.home, state_url=self.state_url, lazy=True,
                                refill=False)
        return self._mgr

    def catalog(self):  # type: ignore[no-untyped-def]
        from sandboxer.loader import load_catalog

        if self._mgr:
            return self._mgr.catalog
        from sandboxer.state import default_home

        # what the manager loads: signed bundles installed in its home too
        return load_catalog(self.config, installed=Path(self.home) if self.home else default_home())


pass_ctx = click.make_pass_decorator(Ctx)


class Group(click.Group):
    """Turns every SandboxerError into ``error: ...`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SandboxerError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True) if err.is_terminal else click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=Group)
@click.option("--config", "config", multiple=True, envvar="SANDBOXER_CONFIG", type=click.Path(file_okay=False),
              help="Extra config directory (repeatable; env SANDBOXER_CONFIG, ':'-separated).")
@click.option("--home", envvar="SANDBOXER_HOME", type=click.Path(file_okay=False),
              help="Where the state store lives (env SANDBOXER_HOME).")
@click.option("--state-url", envvar="SANDBOXER_STATE_URL", default=None,
              help="A server database for the state store (env SANDBOXER_STATE_URL), e.g. postgresql+psycopg://…")
@click.version_option(package_name="sand-boxer")
@click.pass_context
def cli(ctx: click.Context, config: tuple[str, ...], home: str | None, state_url: str | None) -> None:
    """sand-boxer: create, use, meter and tear down sandboxes on any backend."""
    if len(config) == 1 and ":" in config[0]:
        config = tuple(p for p in config[0].split(":") if p)
    ctx.obj = Ctx(config, home, state_url)


def _status_table(items: list[Any]) -> Table:
    t = Table("ID", "PROFILE", "EXTENSION", "HOST", "STATE", "CONSUMER", "EXPIRES")
    for s in items:
        t.add_row(s.id, s.profile, s.extension, s.host or "-", s.state.value, s.consumer,
                  f"{s.expires_at:%Y-%m-%d %H:%M:%S}Z")
    return t


def _print_status(s: Any) -> None:
    out.print(f"id:           {s.id}")
    for label, value in (("profile", s.profile), ("extension", s.extension), ("host", s.host), ("state", s.state.value),
                         ("consumer", s.consumer), ("created", s.created_at), ("ready", s.ready_at),
                         ("expires", s.expires_at), ("terminated", s.terminated_at), ("last error", s.last_error)):
        if value is not None:
            out.print(f"{label + ':':<13} {value}")
    if s.policy:
        out.print(f"{'policy:':<13} {_describe_policy(s.policy)}")
    if s.reachability:
        out.print("reachability: " + json.dumps(s.reachability, sort_keys=True))


def _describe_policy(policy: dict[str, Any]) -> str:
    from sandboxer.policy import NetworkPolicy

    text = "network: " + NetworkPolicy.model_validate(policy.get("network") or {}).describe()
    if policy.get("secrets"):
        text += "; secrets: " + ", ".join(policy["secrets"])
    gpu = policy.get("gpu")
    if gpu:
        text += f"; gpu: {gpu['count']} x {gpu.get('type') or 'any'}"
    return text


@cli.command()
@pass_ctx
def validate(c: Ctx) -> None:
    """Load and check every manifest and profile."""
    cat = c.catalog()
    click.echo(f"ok: {len(cat.extensions)} extensions, {len(cat.profiles)} profiles")
    for ext in cat.extensions.values():
        for path in ext.config_overrides:
            click.echo(f"note: {ext.manifest.id}: config overridden by {path}")
        if ext.missing_extra:
            click.echo(f"note: {ext.missing_extra}")
    for warning in cat.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.group("extensions")
def extensions_group() -> None:
    """Backends."""


register_trust_commands(extensions_group)  # keygen, sign, verify, trust: sandboxer/cli_trust.py
__import__("sandboxer.cli_images").cli_images.register(cli)  # images build/list/gc: sandboxer/cli_images.py
__import__("sandboxer.cli_pools").cli_pools.register(cli)  # pool fill/status/drain: sandboxer/cli_pools.py
__import__("sandboxer.cli_files").cli_files.register(cli)  # cp LOCAL ID:PATH and back: sandboxer/cli_files.py


@extensions_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def extensions_list(c: Ctx, as_json: bool) -> None:
    """List the loaded extensions."""
    cat = c.catalog()
    rows = [{"id": e.manifest.id, "title": e.manifest.title, "version": e.manifest.version,
             "isolation": e.manifest.capabilities.isolation_levels, "pricing": e.manifest.capabilities.pricing_model,
             "features": e.manifest.capabilities.features, "enforces": sorted(e.enforces),
             "unavailable_here": e.unavailable,
             "available": e.missing_extra is None,
             "source": str(e.source), "config_overrides": [str(p) for p in e.config_overrides]}
            for e in cat.extensions.values()]
    if as_json:
        return _emit_json(rows)
    t = Table("ID", "TITLE", "ISOLATION", "PRICING", "FEATURES", "ENFORCES", "AVAILABLE", "CONFIG")
    for r in rows:
        t.add_row(r["id"], r["title"], ",".join(r["isolation"]), r["pricing"], ",".join(r["features"]),
                  ",".join(r["enforces"]) or "-",
                  "yes" if r["available"] else "needs extra",
                  "overridden" if r["config_overrides"] else "manifest")
    out.print(t)
    for r in rows:  # below the table: a path in a cell would wrap
        for path in r["config_overrides"]:
            click.echo(f"{r['id']}: config overridden by {path}")
        for what, why in r["unavailable_here"].items():
            click.echo(f"{r['id']}: does not enforce {what} on this host: {why}")


@cli.group("profiles")
def profiles_group() -> None:
    """Kinds of sandbox."""


@profiles_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def profiles_list(c: Ctx, as_json: bool) -> None:
    """List the loaded profiles."""
    cat = c.catalog()
    if as_json:
        return _emit_json([p.model_dump(mode="json") for p in cat.profiles.values()])
    t = Table("SLUG", "BACKENDS", "TTL (DEFAULT/MAX)", "REQUIRED INPUTS", "DESCRIPTION")
    for p in cat.profiles.values():
        t.add_row(p.slug, ",".join(ch.extension for ch in p.candidates), f"{p.ttl.default:g}s/{p.ttl.max:g}s",
                  ",".join(p.inputs.required) or "-", p.description)
    out.print(t)


@profiles_group.command("explain")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def profiles_explain(c: Ctx, slug: str, as_json: bool) -> None:
    """What PROFILE's policy needs, and for each backend what it will enforce and what it lacks."""
    from sandboxer.policy import ENFORCEMENTS, describe_lacking, lacking

    cat = c.catalog()
    prof = cat.profiles.get(slug)
    if prof is None:
        raise ProfileNotFound(f"unknown profile {slug!r}; known profiles: {', '.join(sorted(cat.profiles)) or 'none'}")
    need = prof.enforcements()
    rows = []
    for i, ch in enumerate(prof.candidates):
        ext = cat.extensions[ch.extension]
        lacks = lacking(need, ext.enforces)
        refused = ext.refusals.get((slug, i), [])
        rows.append({"backend": ch.extension, "qualifies": not lacks and not refused,
                     "enforces": [e for e in need if e not in lacks],
                     "lacks": lacks, "keeps_besides": sorted(ext.enforces - set(need)),
                     "unavailable_here": {e: why for e, why in ext.unavailable.items() if e in lacks},
                     "refuses": refused})
    if as_json:
        _emit_json({"profile": slug, "policy": prof.policy(), "needs": need, "backends": rows})
    else:
        click.echo(f"profile {slug}: {_describe_policy(prof.policy())}")
        click.echo("needs: " + "; ".join(f"{e} ({ENFORCEMENTS[e]})" for e in need))
        for r in rows:
            verdict = ("qualifies" if r["qualifies"] else "never chosen: " + (
                "it does not enforce " + describe_lacking(r["lacks"], r["unavailable_here"]) if r["lacks"]
                else "; ".join(r["refuses"])))
            click.echo(f"  {r['backend']}: {verdict}")
    if not any(r["qualifies"] for r in rows):
        raise CapabilityError(f"no backend of profile {slug!r} can keep its policy")


@cli.command()
@click.argument("profile")
@click.option("--input", "inputs", multiple=True, metavar="K=V", help="An input (repeatable).")
@click.option("--consumer", default="cli", show_default=True, help="Who the sandbox is for (attribution).")
@click.option("--ttl", default=None, help="Lifetime, e.g. 30m or 2h (capped by the profile's maximum).")
@click.option("--label", "labels", multiple=True, metavar="K=V")
@click.option("--name", default=None, help="Idempotency name: a second create with it returns the same sandbox.")
@click.option("--secret", "secret_refs", multiple=True, metavar="NAME=env:VAR|NAME=file:PATH",
              help="Where the value of a secret the profile declares is (repeatable); read here, never shown.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def create(c: Ctx, profile: str, inputs: tuple[str, ...], consumer: str, ttl: str | None, labels: tuple[str, ...],
           name: str | None, secret_refs: tuple[str, ...], as_json: bool) -> None:
    """Create a sandbox of PROFILE and wait until it is ready."""
    try:
        ttl_s = parse_duration(ttl) if ttl is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    from pydantic import ValidationError

    try:
        req = SandboxCreateRequest(profile=profile, inputs=_pairs(inputs, "--input"), consumer=consumer, ttl=ttl_s,
                                   labels=_pairs(labels, "--label"), name=name)
    except ValidationError as exc:
        from sandboxer.loader import describe_validation

        raise click.BadParameter(describe_validation("request", exc)) from None
    refs = _secret_refs(secret_refs)
    mgr = c.manager()
    if as_json or not err.is_terminal:
        sb = mgr.create(req, secrets=refs)
    else:
        with err.status(f"provisioning a {profile} sandbox..."):
            sb = mgr.create(req, secrets=refs)
    if as_json:
        return _emit_json(sb.model_dump(mode="json"))
    click.echo(sb.id)
    click.echo("reachability: " + json.dumps(sb.reachability, sort_keys=True))


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", default=None, help="Kill the command after this long (e.g. 30s).")
@pass_ctx
def exec_cmd(c: Ctx, sandbox_id: str, argv: tuple[str, ...], timeout: str | None) -> None:
    """Run a command in a sandbox: sandboxer exec ID -- CMD [ARG...]. Exits with its exit code.

    Output streams as it arrives, as UTF-8 whatever the terminal's locale (the exec convention
    hands over whole characters). A command killed at --timeout exits 124; output past the
    backend's cap is cut, and stderr says so.
    """
    def stream(kind: str, text: str) -> None:
        sink = sys.stdout if kind == "stdout" else sys.stderr
        raw = getattr(sink, "buffer", None)
        if raw is None:  # a text-only stream (e.g. under a test runner): its own encoding
            sink.write(text)
        else:
            sink.flush()
            raw.write(text.encode("utf-8", "surrogateescape"))
            raw.flush()
        sink.flush()

    res = c.manager().exec(sandbox_id, list(argv), timeout=parse_duration(timeout) if timeout else None, on_output=stream)
    if res.truncated:
        click.echo("warning: output was cut at the backend's output cap (the rest was not kept or shown);"
                   " write large output to a file in the sandbox instead", err=True)
    if res.timed_out:
        click.echo(f"error: command timed out after {timeout}", err=True)
    sys.exit(res.exit_code)


@cli.command()
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-refresh", is_flag=True, help="Do not ask the backend whether a ready sandbox still exists.")
@pass_ctx
def status(c: Ctx, sandbox_id: str, as_json: bool, no_refresh: bool) -> None:
    """Show one sandbox (a ready one is checked with its backend: one that is gone shows as lost)."""
    s = c.manager().get(sandbox_id, refresh=not no_refresh)
    _emit_json(s.model_dump(mode="json")) if as_json else _print_status(s)


@cli.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include terminated and failed sandboxes.")
@click.option("--pooled", is_flag=True, help="Include the idle sandboxes of warm pools (consumer sandboxer.pool).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def list_cmd(c: Ctx, show_all: bool, pooled: bool, as_json: bool) -> None:
    """List sandboxes (live ones unless --all; warm pools' idle ones only with --pooled)."""
    items = c.manager().list(all=show_all, pooled=pooled)
    if as_json:
        return _emit_json([s.model_dump(mode="json") for s in items])
    out.print(_status_table(items)) if items else click.echo("no sandboxes")


@cli.command()
@click.argument("sandbox_id")
@click.option("--force", is_flag=True, help="Take over whatever state it is in and retry the backend's teardown.")
@click.option("--forget", is_flag=True,
              help="With --force: if the backend still cannot confirm, record it terminated anyway "
                   "(only after you have checked that its resources are gone).")
@click.option("--yes", is_flag=True, help="Do not ask before --forget.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def teardown(c: Ctx, sandbox_id: str, force: bool, forget: bool, yes: bool, as_json: bool) -> None:
    """Tear a sandbox down (idempotent). A sandbox still being created is torn down once its create stops."""
    if forget and not force:
        raise click.UsageError("--forget needs --force")
    if forget and not yes:
        click.confirm(f"If the backend cannot confirm, {sandbox_id} is recorded terminated although its resources "
                      "may still exist. Have you checked that they are gone?", abort=True, err=True)
    s = c.manager().teardown(sandbox_id, force=force, forget=forget)
    _emit_json(s.model_dump(mode="json")) if as_json else click.echo(f"{s.id} {s.state.value}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def gc(c: Ctx, as_json: bool) -> None:
    """Reap expired sandboxes and orphans; retry failed teardowns."""
    r = c.manager().gc()
    if as_json:
        return _emit_json(r.model_dump(mode="json"))
    click.echo(f"expired: {len(r.expired)}  retried: {len(r.retried)}  orphans: {len(r.orphans)}  "
               f"stale: {len(r.stale_provisioning)}  lost: {len(r.lost)}  images: {len(r.images)}  "
               f"errors: {len(r.errors)}")
    for key, msg in r.errors.items():
        click.echo(f"  {key}: {msg}", err=True)
    if r.errors:
        sys.exit(1)


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write extension.schema.json and profile.schema.json here (default: print both).")
def schema(out_dir: str | None) -> None:
    """JSON Schemas for ext.*.yaml and profile.*.yaml, for editors."""
    schemas = {"extension.schema.json": ExtensionManifest.model_json_schema(),
               "profile.schema.json": Profile.model_json_schema()}
    if out_dir is None:
        return _emit_json(schemas)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, sch in schemas.items():
        (Path(out_dir) / name).write_text(json.dumps(sch, indent=2) + "\n")
        click.echo(str(Path(out_dir) / name))



@cli.command()
@click.argument("extension")
@click.option("--profile", default=None, help="A profile that uses EXTENSION (default: the first one, by slug).")
@click.option("--input", "inputs", multiple=True, metavar="K=V", help="An input the profile needs (repeatable).")
@click.option("--output-cap", type=click.IntRange(min=1), default=None, metavar="BYTES",
              help="The per-stream exec output cap your config sets, to check it (skipped without).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def conformance(c: Ctx, extension: str, profile: str | None, inputs: tuple[str, ...], output_cap: int | None,
                as_json: bool) -> None:
    """Run the contract suite against EXTENSION: a table of steps; exits 1 on any failure.

    The configuration is loaded as for every command; the state store is a throwaway one,
    so the suite's gc step never touches your sandboxes.
    """
    import tempfile

    from sandboxer.manager import Manager
    from sandboxer.testing import run_conformance

    given = _pairs(inputs, "--input")
    with tempfile.TemporaryDirectory(prefix="sandboxer-conformance-") as tmp:
        with Manager(config_dirs=c.config, home=tmp) as mgr:
            def progress(step: Any) -> None:
                if not as_json and err.is_terminal:
                    err.print(f"  {step.name}: {step.status}", highlight=False)

            report = run_conformance(mgr, extension, profile, given, on_step=progress, output_cap=output_cap)
    if as_json:
        _emit_json({"extension": report.extension, "profile": report.profile, "ok": report.ok,
                    "steps": [{"name": s.name, "status": s.status, "detail": s.detail, "seconds": round(s.seconds, 3)}
                              for s in report.steps]})
    else:
        t = Table("STEP", "RESULT", "SECONDS", "DETAIL", title=f"{report.extension} (profile {report.profile})")
        for s in report.steps:
            t.add_row(s.name, s.status, f"{s.seconds:.2f}", s.detail or "-")
        out.print(t)
        counts = {k: sum(1 for s in report.steps if s.status == k) for k in ("pass", "fail", "skip")}
        click.echo(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    if not report.ok:
        sys.exit(1)


# ------------------------------------------------------------------- snapshots

@cli.command()
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def snapshot(c: Ctx, sandbox_id: str, as_json: bool) -> None:
    """Snapshot a ready sandbox into the catalog."""
    s = c.manager().snapshot(sandbox_id)
    _emit_json(s.model_dump(mode="json")) if as_json else click.echo(s.id)


@cli.command()
@click.argument("snapshot_id")
@click.option("--profile", default=None, help="Restore as this profile (default: the snapshot's).")
@click.option("--input", "inputs", multiple=True, metavar="K=V", help="An input (repeatable).")
@click.option("--consumer", default=None, help="Who the sandbox is for (default: the snapshot's consumer).")
@click.option("--ttl", default=None, help="Lifetime, e.g. 30m or 2h (capped by the profile's maximum).")
@click.option("--label", "labels", multiple=True, metavar="K=V")
@click.option("--secret", "secret_refs", multiple=True, metavar="NAME=env:VAR|NAME=file:PATH",
              help="Where the value of a secret the profile declares is (repeatable); read here, never shown.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def restore(c: Ctx, snapshot_id: str, profile: str | None, inputs: tuple[str, ...], consumer: str | None,
            ttl: str | None, labels: tuple[str, ...], secret_refs: tuple[str, ...], as_json: bool) -> None:
    """Start a new sandbox from a snapshot and wait until it is ready."""
    try:
        ttl_s = parse_duration(ttl) if ttl is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    given, tags = _pairs(inputs, "--input"), _pairs(labels, "--label")  # usage errors before any state is opened
    refs = _secret_refs(secret_refs)
    s = c.manager().restore(snapshot_id, profile, inputs=given, consumer=consumer, ttl=ttl_s, labels=tags,
                            secrets=refs)
    _emit_json(s.model_dump(mode="json")) if as_json else click.echo(s.id)


@cli.group("snapshots")
def snapshots_group() -> None:
    """The snapshot catalog."""


@snapshots_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def snapshots_list(c: Ctx, as_json: bool) -> None:
    items = c.manager().snapshots()
    if as_json:
        return _emit_json([s.model_dump(mode="json") for s in items])
    t = Table("ID", "SANDBOX", "EXTENSION", "SIZE", "CHECKSUM", "CREATED")
    for s in items:
        t.add_row(s.id, s.sandbox_id, s.extension, str(s.size_bytes or "-"), s.checksum or "-", f"{s.created_at:%Y-%m-%d %H:%M:%S}Z")
    out.print(t)


@snapshots_group.command("delete")
@click.argument("snapshot_id")
@pass_ctx
def snapshots_delete(c: Ctx, snapshot_id: str) -> None:
    c.manager().delete_snapshot(snapshot_id)
    click.echo(f"{snapshot_id} deleted")


# ------------------------------------------------------------------------ cost

def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return datetime.now(timezone.utc).timestamp() - parse_duration(value)
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"use a duration ago (e.g. 7d) or an ISO date, got {value!r}", param_hint="--since") from None
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()


@cli.group("cost")
def cost_group() -> None:
    """Quotes and reports."""


@cost_group.command("estimate")
@click.argument("profile")
@click.option("--duration", default="1h", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def cost_estimate(c: Ctx, profile: str, duration: str, as_json: bool) -> None:
    """Quote PROFILE for a duration on each of its backends."""
    try:
        secs = parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    quotes = c.manager().quote(profile, secs)
    if as_json:
        return _emit_json([q.model_dump(mode="json") for q in quotes])
    t = Table("BACKEND", "PRICING", "AMOUNT", "BREAKDOWN")
    for q in quotes:
        t.add_row(q.extension, q.pricing_model, f"{q.amount:.4f} {q.currency}",
                  ", ".join(f"{k} {v:.4f}" for k, v in q.breakdown.items()) or "-")
    out.print(t)


@cost_group.command("report")
@click.option("--since", default=None, help="A duration ago (7d) or an ISO date.")
@click.option("--by", type=click.Choice(["consumer", "profile", "backend"]), default="consumer", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def cost_report(c: Ctx, since: str | None, by: str, as_json: bool) -> None:
    """Metered usage, grouped."""
    rep = c.manager().metering.report(_since(since), by)
    if as_json:
        return _emit_json(rep)
    t = Table(by.upper(), "SANDBOXES", "SECONDS", "AMOUNT")
    for k, v in sorted(rep.items()):
        t.add_row(k, str(v["sandboxes"]), f"{v['seconds']:.0f}", f"{v['amount']:.4f}")
    out.print(t)


@cli.group("meter")
def meter_group() -> None:
    """Usage export."""


@meter_group.command("export")
@click.option("--since", default=None)
@click.option("--sink", default=None, help="A sink from settings.yaml; without one, records go to stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@pass_ctx
def meter_export(c: Ctx, since: str | None, sink: str | None, fmt: str) -> None:
    """Export usage records (stable ids: exporting again never duplicates)."""
    from sandboxer.metering import render

    mgr = c.manager()
    if sink is None and not mgr.catalog.settings.default_sink:
        click.echo(render(mgr.metering.records(_since(since)), fmt), nl=False)
        return
    r = mgr.metering.export(_since(since), sink)
    click.echo(f"queued: {r['queued']}  delivered: {r['delivered']}  pending: {r['pending']}")
    if r["pending"]:
        click.echo("error: some records were not delivered; they stay queued and the next export retries them", err=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="sandboxer")


