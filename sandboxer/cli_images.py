"""``sandboxer images``: machine images built with Packer for vm-packer's build mode (build, list, gc).

A thin shell over :meth:`~sandboxer.extensions.vm_packer.VMPacker.build_image` and the state store's
image records (:mod:`sandboxer.state.images`); docs/backends/vm-packer.md#build-mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sandboxer.errors import InputError


def _root() -> Any:
    return click.get_current_context().find_root().obj


def _when(ts: float | None) -> str | None:
    from sandboxer.cli_output import timestamp

    return None if ts is None else timestamp(ts)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "profile", "extension", "builder", "state", "artifact_id", "template", "template_sha256",
            "variables_sha256", "owner")
    return {**{k: row.get(k) for k in keys}, "created_at": _when(row["created_at"]),
            "updated_at": _when(row["updated_at"]), "detail": row.get("detail") or {}}


def _builders(mgr: Any) -> list[Any]:
    """The loaded extensions that have a build mode."""
    found = []
    for ext_id, loaded in mgr.catalog.extensions.items():
        handler = loaded.handler
        if handler is not None and hasattr(handler, "build_image") and not loaded.missing_extra:
            found.append(mgr.extension(ext_id))
    return found


@click.group("images")
def images_group() -> None:
    """Machine images built with Packer (vm-packer's build mode)."""


@images_group.command("build")
@click.argument("profile")
@click.option("--input", "-i", "inputs", multiple=True, metavar="KEY=VALUE",
              help="vm, ssh_target or ssh_port: the VM to build on (default: the profile's).")
def build_cmd(profile: str, inputs: tuple[str, ...]) -> None:
    """Build PROFILE's Packer template now (or reuse the image recorded for it), streaming Packer's output."""
    from sandboxer.cli_common import pairs

    given: dict[str, Any] = dict(pairs(inputs, "--input"))
    if "ssh_port" in given:
        try:
            given["ssh_port"] = int(given["ssh_port"])
        except ValueError:
            raise click.BadParameter(f"ssh_port {given['ssh_port']!r} is not a port number", param_hint="--input")
    mgr = _root().manager()
    prof = mgr.profile(profile)
    for index, choice in enumerate(prof.candidates):
        ext = mgr.extension(choice.extension)
        if not hasattr(ext, "build_image"):
            continue
        eff = mgr.effective_profile(prof, index)
        if ext.options(eff).packer is None:
            continue
        image = ext.build_image(eff, given, state=mgr.state, on_progress=click.echo)
        verb = "reused" if image["reused"] else "built"
        click.echo(f"{verb} image {image['id']} (builder {image['builder']}, artifact {image['artifact_id']}) "
                   f"for profile {profile} from {image['template']}")
        return
    raise InputError(f"profile {profile!r} names no Packer template (options.packer.template); nothing to build")


@images_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(as_json: bool) -> None:
    """The image records: ready ones, and builds under way."""
    from sandboxer.state import StateStore, default_home

    obj = _root()
    state = StateStore(obj.state_url, home=Path(obj.home) if obj.home else default_home())
    try:
        rows = [_public(r) for r in state.list_images()]
    finally:
        state.close()
    if as_json:
        from sandboxer.cli_output import emit_json

        emit_json(rows)
        return
    if not rows:
        click.echo("no images")
        return
    from sandboxer.cli_output import print_table, table

    t = table("ID", "PROFILE", "BUILDER", "STATE", "ARTIFACT", "TEMPLATE SHA256", "CREATED")
    for r in rows:
        t.add_row(r["id"], r["profile"], r["builder"], r["state"], str(r["artifact_id"] or "-"),
                  r["template_sha256"][:12], r["created_at"])
    print_table(t)


@images_group.command("gc")
def gc_cmd() -> None:
    """Remove build records left by crashed builds (past their deadline) and their private directories."""
    mgr = _root().manager()
    removed = [row for ext in _builders(mgr) for row in ext.reap_images(state=mgr.state)]
    for row in removed:
        click.echo(f"removed stale build {row['id']} (profile {row['profile']}, owner {row['owner']})")
    if not removed:
        click.echo("no stale builds")


def register(group: click.Group) -> None:
    """Add ``images`` to the ``sandboxer`` command group."""
    group.add_command(images_group)
