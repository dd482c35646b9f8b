"""``sandboxer cp``: copy a file into or out of a sandbox (feature ``files``), streamed.

``sandboxer cp LOCAL ID:PATH`` uploads, ``sandboxer cp ID:PATH LOCAL`` downloads; ``-`` as LOCAL is
stdin or stdout. One side must name a sandbox (``ID:PATH``, split at the first colon; a local path
that has a colon is written ``./a:b``). A thin shell over :class:`~sandboxer.sandbox.SandboxFiles`
(docs/files.md); every failure is one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import os
import posixpath
import sys
from pathlib import Path
from typing import Any

import click

from sandboxer.cli_common import resolve
from sandboxer.errors import InputError


def split_remote(arg: str) -> tuple[str, str] | None:
    """``(sandbox id, path)`` of ``ID:PATH``, or None for a local path.

    Raises:
        click.UsageError: a colon with nothing before or after it.
    """
    if arg == "-" or ":" not in arg or arg.startswith(("./", "../", "/")):
        return None
    sandbox_id, _, path = arg.partition(":")
    if not sandbox_id:
        raise click.UsageError(f"{arg!r}: no sandbox id before the colon; write ID:PATH, e.g. sb-0123abcd:/work/out.txt")
    if not path:
        raise click.UsageError(f"{arg!r}: no path after the colon; write ID:PATH, e.g. {sandbox_id}:/work/out.txt")
    return sandbox_id, path


def _mode(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise click.BadParameter(f"{text!r}: give octal permission bits, e.g. 644 or 0755", param_hint="--mode")
    return value


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@click.option("--mode", default=None, metavar="OCTAL",
              help="Permission bits of a file written in the sandbox (default: the local file's; 644 from stdin).")
@click.pass_context
def cp_cmd(ctx: click.Context, src: str, dst: str, mode: str | None) -> None:
    """Copy a file into a sandbox (cp LOCAL ID:PATH) or out of one (cp ID:PATH LOCAL); '-' is stdin/stdout.

    A relative PATH is relative to the sandbox's working directory; missing parent directories
    are created. The data is streamed, never held whole in memory.
    """
    source, target = split_remote(src), split_remote(dst)
    if source is None and target is None:
        raise click.UsageError(f"cp needs one side in a sandbox, written ID:PATH (e.g. sb-0123abcd:/work/out.txt); "
                               f"neither {src!r} nor {dst!r} has a colon")
    if source is not None and target is not None:
        raise click.UsageError("cp copies between this machine and one sandbox; to copy between two sandboxes, "
                               "copy to a local file first")
    bits = _mode(mode)
    from sandboxer.sandbox import SandboxFiles

    mgr: Any = ctx.find_root().obj.manager()
    if target is not None:
        sandbox_id, path = target
        files = SandboxFiles(mgr, resolve(mgr, sandbox_id))
        if src == "-":
            files.write(path, sys.stdin.buffer, mode=bits)
            return
        if path.endswith("/"):
            path += os.path.basename(src)
        try:
            files.upload(src, path, mode=bits)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise InputError(f"cannot read the local file {src!r}: {exc.strerror}") from None
        return
    assert source is not None
    sandbox_id, path = source
    files = SandboxFiles(mgr, resolve(mgr, sandbox_id))
    if dst == "-":
        out = sys.stdout.buffer
        files.read(path, into=out)
        out.flush()
        return
    local = Path(dst)
    if local.is_dir():
        local = local / posixpath.basename(path.rstrip("/"))
    try:
        files.download(path, local)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise InputError(f"cannot write the local file {str(local)!r}: {exc.strerror}") from None


def register(cli: click.Group) -> None:
    cli.add_command(cp_cmd)
