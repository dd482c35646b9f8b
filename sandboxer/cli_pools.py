"""``sandboxer pool``: the warm pools of pooled profiles (fill, status, drain); docs/pools.md.

A thin shell over :class:`~sandboxer.pools.Pools`. The CLI's manager never refills in the
background (a command is over in a moment): ``pool fill`` fills once, on a schedule like ``gc``.
"""

from __future__ import annotations

from typing import Any

import click

from sandboxer.cli_output import emit_json


def _mgr() -> Any:
    return click.get_current_context().find_root().obj.manager()


def _emit(report: Any, as_json: bool, verb: str) -> None:
    data = report.to_json()
    if as_json:
        emit_json(data)
    else:
        for slug, ids in sorted(data["made"].items()):
            click.echo(f"{slug}: {verb} {len(ids)}: {' '.join(ids)}")
        for slug, ids in sorted(data["removed"].items()):
            click.echo(f"{slug}: removed {len(ids)}: {' '.join(ids)}")
        for where, error in sorted(data["errors"].items()):
            click.echo(f"error: {where}: {error}", err=True)
        if not any(data.values()):
            click.echo("nothing to do")
    if data["errors"]:
        raise SystemExit(1)


@click.group("pool")
def pool_group() -> None:
    """Warm pools: sandboxes of pooled profiles kept ready (docs/pools.md)."""


@pool_group.command("fill")
@click.argument("profile", required=False)
@click.option("--json", "as_json", is_flag=True)
def fill_cmd(profile: str | None, as_json: bool) -> None:
    """Fill every pool (or PROFILE's) up to its size now, after reaping pooled sandboxes past max_age."""
    _emit(_mgr().fill_pools(profile), as_json, "created")


@pool_group.command("drain")
@click.argument("profile", required=False)
@click.option("--json", "as_json", is_flag=True)
def drain_cmd(profile: str | None, as_json: bool) -> None:
    """Tear down the idle sandboxes of every pool (or PROFILE's); handed-out ones are not touched."""
    mgr = _mgr()
    if profile:
        mgr.profile(profile)  # an unknown one is an error, not "nothing to do"
    _emit(mgr.pools.drain(profile), as_json, "removed")


@pool_group.command("status")
@click.option("--json", "as_json", is_flag=True)
def status_cmd(as_json: bool) -> None:
    """Each pooled profile's size and max_age, and how many of its sandboxes are ready or being made."""
    from sandboxer.models import POOL_CONSUMER, format_duration  # here: registering the group stays light

    mgr = _mgr()
    rows = mgr.state.list(where={"consumer": POOL_CONSUMER})
    out = []
    for p in mgr.pools.profiles():
        mine = [r for r in rows if r["profile"] == p.slug]
        out.append({"profile": p.slug, "size": p.pool.size, "max_age": format_duration(p.pool.max_age),
                    "ready": sum(r["state"] == "ready" for r in mine),
                    "provisioning": sum(r["state"] == "provisioning" for r in mine)})
    if as_json:
        emit_json(out)
        return
    if not out:
        click.echo("no profile has a pool")
    for o in out:
        click.echo(f"{o['profile']}: {o['ready']}/{o['size']} ready, {o['provisioning']} being made "
                   f"(max_age {o['max_age']})")


def register(cli: click.Group) -> None:
    cli.add_command(pool_group)
