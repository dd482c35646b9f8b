"""The trust commands of ``sandboxer extensions``: keygen, sign, verify, trust add-key/list/revoke, and the
registry and installer: search, info, install, upgrade, remove, enable, disable, audit.

A thin shell over :mod:`sandboxer.trust`. A passphrase is only ever named (``--passphrase-env
NAME``), never given on the command line; no command prints private key material. trust.yaml is
read from, and written to, the operator's config dirs (``--config`` / ``SANDBOXER_CONFIG``) only.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from sandboxer.errors import ConfigError, TrustError


def _config_dirs() -> list[Path] | None:
    return click.get_current_context().find_root().obj.config


def _write_dir(to: str | None) -> Path:
    if to:
        return Path(to)
    dirs = _config_dirs()
    if not dirs:
        raise ConfigError("no config directory to keep trust.yaml in: pass --config DIR (or set SANDBOXER_CONFIG), "
                          "or --to DIR")
    return dirs[0]


def _publisher(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value):
        raise click.BadParameter(f"{value!r} is not a publisher name (lowercase letters, digits and '-')")
    return value


def _expires(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    from sandboxer.durations import parse_flag

    try:
        seconds = parse_flag(value, "--expires")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter(f"{value!r}: a signature must expire in the future")
    return timedelta(seconds=seconds)


def _json(data: Any) -> None:
    from sandboxer.cli_output import emit_json

    emit_json(data)


@click.command("keygen")
@click.option("--publisher", required=True, callback=_publisher, help="The publisher's name, as manifests say it.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the key files.")
@click.option("--passphrase-env", default=None, metavar="NAME",
              help="Encrypt the private key with the passphrase in this environment variable.")
def keygen(publisher: str, out_dir: str, passphrase_env: str | None) -> None:
    """Make an Ed25519 key pair: OUT/PUBLISHER.key (private, 0600) and OUT/PUBLISHER.pub."""
    from sandboxer.trust import SigningKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    path = key.save(out / f"{publisher}.key", passphrase_env=passphrase_env)
    pub = out / f"{publisher}.pub"
    pub.write_text(key.public_key_b64() + "\n", encoding="ascii")
    pub.chmod(0o644)
    click.echo(f"key id: {key.key_id}")
    click.echo(f"private key: {path} (mode 0600{', encrypted' if passphrase_env else ''}; keep it secret)")
    click.echo(f"public key: {pub} (give it to operators: sandboxer extensions trust add-key --publisher "
               f"{publisher} --public-key-file {pub})")


@click.command("sign")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="The private key file.")
@click.option("--artifact", required=True, type=click.Path(dir_okay=False), help="The bundle's wheel or tarball.")
@click.option("--expires", default="90d", callback=_expires, show_default=True, help="How long the signature holds.")
@click.option("--passphrase-env", default=None, metavar="NAME", help="The variable holding the key's passphrase.")
def sign(manifest: str, key_path: str, artifact: str, expires: timedelta, passphrase_env: str | None) -> None:
    """Fill MANIFEST's artifact digest and write MANIFEST.sig."""
    from sandboxer.trust import load_signing_key, sign_bundle
    from sandboxer.trust.bundle import read_signature

    key = load_signing_key(Path(key_path), passphrase_env=passphrase_env)
    sig_path = sign_bundle(Path(manifest), key, Path(artifact), expires_in=expires)
    sig = read_signature(Path(manifest))
    assert sig is not None
    click.echo(f"signed {manifest} with key {key.key_id} (expires {sig.expires}): {sig_path}")


@click.command("verify")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--artifact", default=None, type=click.Path(dir_okay=False),
              help="The artifact (default: the manifest's artifact.file beside it).")
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(manifest: str, artifact: str | None, as_json: bool) -> None:
    """Check MANIFEST's signature against trust.yaml of the config dirs; exit 1 with the reason if refused.

    Rollback is checked by the installer, which knows what was installed; here nothing is.
    """
    from sandboxer.trust import load_trust, verify

    trust = load_trust(_config_dirs())
    try:
        vb = verify(Path(manifest), Path(artifact) if artifact else None, trust, {})
    except TrustError as exc:
        if not as_json:
            raise
        _json({"verified": False, "reason": exc.reason, "file": exc.path, "error": str(exc)})
        from sandboxer.cli_errors import TRUST

        raise SystemExit(TRUST) from None  # --json never changes the exit code
    if as_json:
        _json({"verified": True, "id": vb.manifest.id, "version": vb.manifest.version, "publisher": vb.publisher,
               "key_id": vb.key_id, "expires": vb.expires,
               "artifact": str(vb.artifact_path), "sha256": vb.sha256, "abi": vb.manifest.abi,
               "grants": vb.manifest.capabilities.grants, "dependencies": vb.manifest.dependencies})
        return
    click.echo(f"verified: {vb.manifest.id} {vb.manifest.version} from {vb.publisher}, key {vb.key_id}, "
               f"artifact {vb.artifact_path.name} sha256 {vb.sha256}, signature expires "
               f"{vb.expires:%Y-%m-%dT%H:%M:%SZ}")


@click.group("trust")
def trust_group() -> None:
    """The publisher keys this operator trusts (trust.yaml of the config dirs)."""


@trust_group.command("add-key")
@click.option("--publisher", required=True, callback=_publisher)
@click.option("--public-key", default=None, help="The base64 public key.")
@click.option("--public-key-file", default=None, type=click.Path(dir_okay=False), help="A .pub file from keygen.")
@click.option("--not-after", default=None, help="Stop trusting the key after this UTC time (ISO 8601).")
@click.option("--to", default=None, type=click.Path(file_okay=False), help="Config dir (default: the first --config).")
def trust_add_key(publisher: str, public_key: str | None, public_key_file: str | None, not_after: str | None,
                  to: str | None) -> None:
    """Trust a publisher's public key."""
    from sandboxer.trust import add_trusted_key

    if (public_key is None) == (public_key_file is None):
        raise click.UsageError("give exactly one of --public-key or --public-key-file")
    if public_key_file is not None:
        try:
            public_key = Path(public_key_file).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{public_key_file}: cannot read the public key: {exc}") from None
    when = None
    if not_after is not None:
        try:
            when = datetime.fromisoformat(not_after.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(f"{not_after!r} is not an ISO 8601 time", param_hint="--not-after") from None
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    target = _write_dir(to)
    assert public_key is not None
    key = add_trusted_key(target, publisher, public_key, not_after=when)
    click.echo(f"trusted key {key.id} of publisher {publisher} in {target / 'trust.yaml'}")


@trust_group.command("revoke")
@click.argument("key")
@click.option("--to", default=None, type=click.Path(file_okay=False), help="Config dir (default: the first --config).")
def trust_revoke(key: str, to: str | None) -> None:
    """Revoke a key, by its id (or its .pub file): bundles it signed are refused from now on."""
    from sandboxer.trust import key_id, revoke_key
    from sandboxer.trust.keys import decode_public_key

    kid = key
    if not re.fullmatch(r"[0-9a-f]{16}", key) and Path(key).is_file():
        try:
            kid = key_id(decode_public_key(Path(key).read_text(encoding="ascii")))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{key}: not a public key file: {exc}") from None
    if not re.fullmatch(r"[0-9a-f]{16}", kid):
        raise ConfigError(f"key id {kid!r}: expected 16 lowercase hex digits (as `sandboxer extensions keygen` "
                          f"prints), or a .pub file")
    path = revoke_key(_write_dir(to), kid)
    click.echo(f"revoked key {kid} in {path}")


@trust_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def trust_list(as_json: bool) -> None:
    """The trusted keys, and which are revoked."""
    from sandboxer.trust import load_trust

    store = load_trust(_config_dirs())
    rows = [{"id": kid, "publisher": e.publisher, "revoked": kid in store.revoked, "source": str(e.source),
             "not_after": e.key.not_after}
            for kid, e in sorted(store.keys.items(), key=lambda kv: (kv[1].publisher, kv[0]))]
    if as_json:
        _json(rows)
        return
    if not rows:
        click.echo(store.describe_sources())
    for r in rows:
        click.echo(f"{r['publisher']}  {r['id']}  {'REVOKED' if r['revoked'] else 'trusted'}"
                   f"{'  until ' + r['not_after'] if r['not_after'] else ''}  ({r['source']})")


def _registries() -> Any:
    from sandboxer.trust.registry import Registries, configured_registries

    return Registries.load(configured_registries(_config_dirs()))


def _state() -> Any:
    from sandboxer.state import StateStore, default_home

    obj = click.get_current_context().find_root().obj
    return StateStore(obj.state_url, home=Path(obj.home) if obj.home else default_home())


def _listing_line(x: Any) -> str:
    flag = f"  DEPRECATED{f' ({x.reason})' if x.reason else ''}" if x.deprecated else ""
    return f"{x.id}  {x.version}  {x.manifest.publisher}{flag}  {x.manifest.title}"


@click.command("search")
@click.argument("text", required=False)
@click.option("--json", "as_json", is_flag=True)
def search_cmd(text: str | None, as_json: bool) -> None:
    """List the bundles of every registry (the built-in one and trust.yaml's), or those matching TEXT."""
    found = _registries().search(text)
    if as_json:
        _json([x.to_json() for x in found])
        return
    if not found:
        click.echo("no bundle matches")
    for x in found:
        click.echo(_listing_line(x))


@click.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def info_cmd(name: str, as_json: bool) -> None:
    """Every listed version of NAME, the one install would choose, and what is installed."""
    from sandboxer.trust.registry import RegistryError

    regs = _registries()
    versions = regs.versions(name)
    try:
        latest = regs.choose(name)
        chosen: str | None = latest.version
    except RegistryError:
        if not versions:
            raise  # names the registries searched
        latest, chosen = versions[-1], None  # only deprecated versions: shown, none chosen
    state = _state()
    try:
        installed = state.installed_extension(latest.id)
    finally:
        state.close()
    if as_json:
        _json({"id": latest.id, "latest": chosen, "versions": [x.to_json() for x in versions],
               "installed": {"version": installed["version"], "state": installed["state"]} if installed else None})
        return
    m = latest.manifest
    click.echo(f"{m.id}: {m.title}, publisher {m.publisher}")
    click.echo(f"latest: {chosen or 'none (only deprecated versions are listed; install one with ==VERSION)'}")
    click.echo(f"grants: {', '.join(m.capabilities.grants) or 'none'}")
    deps = ", ".join(f"{k}{v}" for k, v in m.dependencies.items())
    click.echo(f"dependencies: {deps or 'none'}")
    click.echo(f"installed: {installed['version'] + ' (' + installed['state'] + ')' if installed else 'no'}")
    click.echo("versions:")
    for x in versions:
        click.echo(f"  {_listing_line(x)}  ({x.location})")


class _InstallerCtx:
    """An Installer over the CLI's home, state store, trust.yaml and registries; closes the store."""

    def __enter__(self) -> Any:
        from sandboxer.state import default_home
        from sandboxer.trust import load_trust
        from sandboxer.trust.installer import Installer

        obj = click.get_current_context().find_root().obj
        self.state = _state()
        home = Path(obj.home) if obj.home else default_home()
        return Installer(home, self.state, load_trust(_config_dirs()), _registries)

    def __exit__(self, *exc: object) -> None:
        self.state.close()


def _row_line(verb: str, row: dict[str, Any]) -> str:
    return f"{verb} {row['id']} {row['version']} from {row['publisher']}: {row['state']}"


@click.command("install")
@click.argument("target", metavar="NAME[==VERSION]|FILE")
@click.option("--allow-deprecated", is_flag=True, help="Install the latest version even if it is deprecated.")
def install_cmd(target: str, allow_deprecated: bool) -> None:
    """Verify, then install a bundle from the registries (NAME, NAME==VERSION) or its manifest FILE."""
    with _InstallerCtx() as inst:
        row = inst.install(target, allow_deprecated=allow_deprecated)
    click.echo(_row_line("installed", row) + f" ({row['path']})")


@click.command("upgrade")
@click.argument("name")
@click.option("--allow-deprecated", is_flag=True)
def upgrade_cmd(name: str, allow_deprecated: bool) -> None:
    """Install the latest listed version of NAME in place of the installed one."""
    with _InstallerCtx() as inst:
        old = inst._row(name)["version"]
        row = inst.upgrade(name, allow_deprecated=allow_deprecated)
    click.echo(f"upgraded {row['id']} {old} -> {row['version']} from {row['publisher']}: {row['state']}")


@click.command("remove")
@click.argument("name")
def remove_cmd(name: str) -> None:
    """Remove an installed extension (refused while it has live sandboxes)."""
    with _InstallerCtx() as inst:
        row = inst.remove(name)
    click.echo(f"removed {row['id']} {row['version']}")


@click.command("enable")
@click.argument("name")
def enable_cmd(name: str) -> None:
    """disabled -> active: the extension takes new sandboxes again."""
    with _InstallerCtx() as inst:
        row = inst.enable(name)
    click.echo(_row_line("enabled", row))


@click.command("disable")
@click.argument("name")
@click.option("--reason", default=None, help="Why, for the audit trail.")
def disable_cmd(name: str, reason: str | None) -> None:
    """active -> disabled: no new sandboxes; live ones can still be torn down."""
    with _InstallerCtx() as inst:
        row = inst.disable(name, reason=reason)
    click.echo(_row_line("disabled", row))


@click.command("audit")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def audit_cmd(name: str | None, as_json: bool) -> None:
    """The trust audit trail: transitions, verification failures, installs and removes (of NAME)."""
    from sandboxer.cli_output import timestamp

    state = _state()
    try:
        ext_id = name if name is None or name.startswith("ext.") else f"ext.{name}"
        rows = state.audit_events(ext_id)
    finally:
        state.close()
    for r in rows:
        r["when"] = timestamp(r["ts"])
    if as_json:
        _json(rows)
        return
    if not rows:
        click.echo("no audit events")
    for r in rows:
        what = r["what"] + (f" {r['from_state'] or '-'} -> {r['to_state']}" if r["what"] == "transition" else "")
        why = f"  ({r['reason']})" if r["reason"] else ""
        if r["what"] == "capability":  # a broker decision: what was asked, and under which grant
            d = r.get("detail") or {}
            why = f"  ({r['reason']}: {d.get('op')} {d.get('target')}" + (
                f" under {d['grant']}" if d.get("grant") else "") + (f"; {d['why']}" if d.get("why") else "") + ")"
        click.echo(f"{r['when']}  {r['who']}  {r['extension'] or '-'} {r['version'] or ''}  {what}{why}")


def register(group: click.Group) -> None:
    """Add the trust, registry and installer commands to ``sandboxer extensions``."""
    for command in (keygen, sign, verify_cmd, trust_group, search_cmd, info_cmd, install_cmd, upgrade_cmd,
                    remove_cmd, enable_cmd, disable_cmd, audit_cmd):
        group.add_command(command)
