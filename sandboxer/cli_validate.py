"""``sandboxer validate``: every problem in every config file, not only the first.

Each problem is one ``error:`` line naming the file, field and value. A file that looks like
config but is not loaded because of its name (``profile.x.yml``, ``ext.y.yml``,
``profile-x.yaml``, any other YAML file in ``extensions/`` or ``profiles/``) is a problem too:
it was surely meant to load. Exit 78 (config) on any problem, 0 otherwise.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click

from sandboxer import cli_errors
from sandboxer.cli_common import pass_ctx

_LOADED = {"extensions": re.compile(r"ext\..+\.yaml"), "profiles": re.compile(r"profile\..+\.yaml")}
_LOOKS = re.compile(r"(ext|extension|profile)s?[._-].*\.(ya?ml|json)|.*\.ya?ml", re.IGNORECASE)
_TOP_LEVEL_OK = {"settings.yaml", "trust.yaml"}


def _expected(name: str, kind: str) -> str:
    """The name a misnamed file was probably meant to have."""
    stem = re.sub(r"\.(ya?ml|json)$", "", name, flags=re.IGNORECASE)
    stem = re.sub(r"^(ext|extension|profile)s?[._-]", "", stem, flags=re.IGNORECASE)
    return f"{'ext' if kind == 'extensions' else 'profile'}.{stem}.yaml"


def misnamed(dirs: list[Path]) -> list[str]:
    """Files in config dirs that look like config but are not loaded for their name."""
    found = []
    for d in dirs:
        for base, kind in ((d, None), (d / "extensions", "extensions"), (d / "profiles", "profiles")):
            if not base.is_dir():
                continue
            for path in sorted(p for p in base.iterdir() if p.is_file()):
                name = path.name
                if kind is None and name in _TOP_LEVEL_OK:
                    continue
                if any(rx.fullmatch(name) for rx in _LOADED.values()):
                    continue
                if not _LOOKS.fullmatch(name):
                    continue
                guess = kind or ("extensions" if name.lower().startswith("ext") else
                                 "profiles" if name.lower().startswith("profile") else None)
                if guess is None:
                    continue  # some other YAML beside the config (not in extensions/ or profiles/)
                found.append(f"{path}: not loaded: {guess[:-1] if guess == 'profiles' else 'extension manifest'} "
                             f"files are named {'ext.<name>.yaml' if guess == 'extensions' else 'profile.<slug>.yaml'}; "
                             f"rename it (to {_expected(name, guess)}?)")
    return found


@click.command()
@pass_ctx
def validate(c: Any) -> None:
    """Load and check every manifest and profile; report every problem in every file."""
    from sandboxer.errors import ConfigError
    from sandboxer.loader import config_dirs_from_env, load_catalog
    from sandboxer.state import default_home

    problems: list[ConfigError] = []
    cat = load_catalog(c.config, installed=Path(c.home) if c.home else default_home(), problems=problems)
    lines = [line for exc in problems for line in str(exc).splitlines() if line.strip()]
    lines += misnamed(c.config if c.config is not None else config_dirs_from_env())
    for line in lines:
        click.echo(f"error: {line}", err=True)
    for warning in cat.warnings:
        click.echo(f"warning: {warning}", err=True)
    if lines:
        files = {line.split(": ", 1)[0] for line in lines}
        click.echo(f"invalid: {len(lines)} problem{'s' * (len(lines) != 1)} in {len(files)} "
                   f"file{'s' * (len(files) != 1)}")
        sys.exit(cli_errors.CONFIG)
    click.echo(f"ok: {len(cat.extensions)} extensions, {len(cat.profiles)} profiles")
    for ext in cat.extensions.values():
        for path in ext.config_overrides:
            click.echo(f"note: {ext.manifest.id}: config overridden by {path}")
        if ext.missing_extra:
            click.echo(f"note: {ext.missing_extra}")
