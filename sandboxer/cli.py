"""The command line: a thin shell over the Python API.

Tables for people, ``--json`` for scripts. A failure prints one ``error: ...`` line on stderr
and exits with a code of sandboxer/cli_errors.py's table (docs/cli.md); ``--debug`` adds the
traceback. The commands live in modules by subject; this one holds the root group and registers them.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from sandboxer import cli_errors
from sandboxer.cli_common import DURATION, Ctx, pairs, pass_ctx, secret_refs
from sandboxer.cli_output import emit_json, print_table, short_time, table
from sandboxer.cli_sandboxes import describe_policy
from sandboxer.cli_trust import register as register_trust_commands
from sandboxer.errors import CapabilityError, ProfileNotFound


class Group(click.Group):
    """The root group: every failure becomes one ``error:`` line and its exit code (cli_errors)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place failures become exit codes
            code = cli_errors.report(exc, cli_errors.wants_debug(argv))
            if not standalone_mode:
                raise
            sys.exit(code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # past Click's own handler, which would print a blank line first
            raise cli_errors.Interrupted() from exc


EXIT_CODES = "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {what}" for code, what in cli_errors.TABLE)


@click.group(cls=Group, epilog=EXIT_CODES)
@click.option("--config", "config", multiple=True, envvar="SANDBOXER_CONFIG", type=click.Path(file_okay=False),
              help="Extra config directory (repeatable; env SANDBOXER_CONFIG, ':'-separated).")
@click.option("--home", envvar="SANDBOXER_HOME", type=click.Path(file_okay=False),
              help="Where the state store lives (env SANDBOXER_HOME).")
@click.option("--state-url", envvar="SANDBOXER_STATE_URL", default=None,
              help="A server database for the state store (env SANDBOXER_STATE_URL), e.g. postgresql+psycopg://…")
@click.option("--debug", is_flag=True, envvar="SANDBOXER_DEBUG", help="On a failure, print the traceback too.")
@click.version_option(package_name="sand-boxer")
@click.pass_context
def cli(ctx: click.Context, config: tuple[str, ...], home: str | None, state_url: str | None, debug: bool) -> None:
    """sand-boxer: create, use, meter and tear down sandboxes on any backend."""
    if len(config) == 1 and ":" in config[0]:
        config = tuple(p for p in config[0].split(":") if p)
    ctx.obj = Ctx(config, home, state_url, debug)


@cli.group("extensions")
def extensions_group() -> None:
    """Backends."""


# one line per module of commands (keep it so: each merges on its own)
register_trust_commands(extensions_group)  # keygen, sign, verify, trust: sandboxer/cli_trust.py
__import__("sandboxer.cli_images").cli_images.register(cli)  # images build/list/gc: sandboxer/cli_images.py
__import__("sandboxer.cli_sandboxes").cli_sandboxes.register(cli)  # create/list/status/exec/teardown/events
cli.add_command(__import__("sandboxer.cli_validate").cli_validate.validate)  # validate
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
        return emit_json(rows)
    t = table("ID", "TITLE", "ISOLATION", "PRICING", "FEATURES", "ENFORCES", "AVAILABLE", "CONFIG")
    for r in rows:
        t.add_row(r["id"], r["title"], ",".join(r["isolation"]), r["pricing"], ",".join(r["features"]),
                  ",".join(r["enforces"]) or "-",
                  "yes" if r["available"] else "needs extra",
                  "overridden" if r["config_overrides"] else "manifest")
    print_table(t)
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
        return emit_json([p.model_dump(mode="json") for p in cat.profiles.values()])
    t = table("SLUG", "BACKENDS", "TTL (DEFAULT/MAX)", "REQUIRED INPUTS", "DESCRIPTION")
    for p in cat.profiles.values():
        t.add_row(p.slug, ",".join(ch.extension for ch in p.candidates), f"{p.ttl.default:g}s/{p.ttl.max:g}s",
                  ",".join(p.inputs.required) or "-", p.description)
    print_table(t)


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
        emit_json({"profile": slug, "policy": prof.policy(), "needs": need, "backends": rows})
    else:
        click.echo(f"profile {slug}: {describe_policy(prof.policy())}")
        click.echo("needs: " + "; ".join(f"{e} ({ENFORCEMENTS[e]})" for e in need))
        for r in rows:
            verdict = ("qualifies" if r["qualifies"] else "never chosen: " + (
                "it does not enforce " + describe_lacking(r["lacks"], r["unavailable_here"]) if r["lacks"]
                else "; ".join(r["refuses"])))
            click.echo(f"  {r['backend']}: {verdict}")
    if not any(r["qualifies"] for r in rows):
        raise CapabilityError(f"no backend of profile {slug!r} can keep its policy")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def gc(c: Ctx, as_json: bool) -> None:
    """Reap expired sandboxes and orphans; retry failed teardowns."""
    r = c.manager().gc()
    if as_json:
        return emit_json(r)
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
    import json

    from sandboxer.models import ExtensionManifest, Profile

    schemas = {"extension.schema.json": ExtensionManifest.model_json_schema(),
               "profile.schema.json": Profile.model_json_schema()}
    if out_dir is None:
        return emit_json(schemas)
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

    given = pairs(inputs, "--input")
    with tempfile.TemporaryDirectory(prefix="sandboxer-conformance-") as tmp:
        with Manager(config_dirs=c.config, home=tmp) as mgr:
            def progress(step: Any) -> None:
                if not as_json and sys.stderr.isatty():
                    click.echo(f"  {step.name}: {step.status}", err=True)

            report = run_conformance(mgr, extension, profile, given, on_step=progress, output_cap=output_cap)
    if as_json:
        emit_json({"extension": report.extension, "profile": report.profile, "ok": report.ok,
                    "steps": [{"name": s.name, "status": s.status, "detail": s.detail, "seconds": round(s.seconds, 3)}
                              for s in report.steps]})
    else:
        t = table("STEP", "RESULT", "SECONDS", "DETAIL", title=f"{report.extension} (profile {report.profile})")
        for s in report.steps:
            t.add_row(s.name, s.status, f"{s.seconds:.2f}", s.detail or "-")
        print_table(t)
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
    emit_json(s) if as_json else click.echo(s.id)


@cli.command()
@click.argument("snapshot_id")
@click.option("--profile", default=None, help="Restore as this profile (default: the snapshot's).")
@click.option("--input", "inputs", multiple=True, metavar="K=V", help="An input (repeatable).")
@click.option("--consumer", default=None, help="Who the sandbox is for (default: the snapshot's consumer).")
@click.option("--ttl", type=DURATION, default=None, help="Lifetime, e.g. 30m or 1h30m (capped by the profile's maximum).")
@click.option("--label", "labels", multiple=True, metavar="K=V")
@click.option("--secret", "secrets_", multiple=True, metavar="NAME=env:VAR|NAME=file:PATH",
              help="Where the value of a secret the profile declares is (repeatable); read here, never shown.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def restore(c: Ctx, snapshot_id: str, profile: str | None, inputs: tuple[str, ...], consumer: str | None,
            ttl: float | None, labels: tuple[str, ...], secrets_: tuple[str, ...], as_json: bool) -> None:
    """Start a new sandbox from a snapshot and wait until it is ready."""
    given, tags = pairs(inputs, "--input"), pairs(labels, "--label")  # usage errors before any state is opened
    refs = secret_refs(secrets_)
    s = c.manager().restore(snapshot_id, profile, inputs=given, consumer=consumer, ttl=ttl, labels=tags,
                            secrets=refs)
    emit_json(s) if as_json else click.echo(s.id)


@cli.group("snapshots")
def snapshots_group() -> None:
    """The snapshot catalog."""


@snapshots_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def snapshots_list(c: Ctx, as_json: bool) -> None:
    items = c.manager().snapshots()
    if as_json:
        return emit_json(items)
    t = table("ID", "SANDBOX", "EXTENSION", "SIZE", "CHECKSUM", "CREATED")
    for s in items:
        t.add_row(s.id, s.sandbox_id, s.extension, str(s.size_bytes or "-"), s.checksum or "-", short_time(s.created_at))
    print_table(t)


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
    from sandboxer import durations

    try:
        return datetime.now(timezone.utc).timestamp() - durations.seconds(value, bare_ok=False)
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"use a duration ago (e.g. 7d, 1h30m) or an ISO date, got {value!r}",
                                 param_hint="--since") from None
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()


@cli.group("cost")
def cost_group() -> None:
    """Quotes and reports."""


@cost_group.command("estimate")
@click.argument("profile")
@click.option("--duration", type=DURATION, default="1h", show_default=True, help="How long, e.g. 2h or 1h30m.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def cost_estimate(c: Ctx, profile: str, duration: float, as_json: bool) -> None:
    """Quote PROFILE for a duration on each of its backends (a warning if it is over the profile's maximum TTL)."""
    from sandboxer.models import format_duration

    mgr = c.manager()
    prof = mgr.profile(profile)
    if duration > prof.ttl.max:
        click.echo(f"warning: {format_duration(duration)} is over profile {profile!r}'s maximum TTL of "
                   f"{format_duration(prof.ttl.max)}: one sandbox cannot live that long (quoted anyway)", err=True)
    quotes = mgr.quote(profile, duration)
    if as_json:
        return emit_json(quotes)
    t = table("BACKEND", "PRICING", "AMOUNT", "BREAKDOWN")
    for q in quotes:
        t.add_row(q.extension, q.pricing_model, f"{q.amount:.4f} {q.currency}",
                  ", ".join(f"{k} {v:.4f}" for k, v in q.breakdown.items()) or "-")
    print_table(t)


@cost_group.command("report")
@click.option("--since", default=None, help="A duration ago (7d) or an ISO date.")
@click.option("--by", type=click.Choice(["consumer", "profile", "backend"]), default="consumer", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def cost_report(c: Ctx, since: str | None, by: str, as_json: bool) -> None:
    """Metered usage, grouped."""
    rep = c.manager().metering.report(_since(since), by)
    if as_json:  # one object per group, the group's key under the field name a sandbox uses for it
        field = "extension" if by == "backend" else by
        return emit_json([{field: k, **v} for k, v in sorted(rep.items())])
    t = table(by.upper(), "SANDBOXES", "SECONDS", "AMOUNT")
    for k, v in sorted(rep.items()):
        t.add_row(k, str(v["sandboxes"]), f"{v['seconds']:.0f}", f"{v['amount']:.4f}")
    print_table(t)


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


