"""Remote workspaces of the SSH backends: their handle's base, path, repo and ref checks, the clone
script, snapshot archives.

Rules kept here: every value that reaches a remote shell or path is checked with ``re.fullmatch``
(a trailing newline is refused) and refused as an InputError naming the field; archives are
checked against their recorded checksum before use.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from sandboxer.contract import Handle, OwnedSandbox
from sandboxer.errors import InputError, SnapshotError
from sandboxer.models import SnapshotMeta


class WorkspaceHandle(Handle):
    """What every SSH backend's handle holds: a workspace directory on a host, maybe a clone in it.

    Stored in the state store and in the workspace's ``.sandboxer`` meta file (so never a secret).
    Unknown keys are dropped, so a record written by an older version still loads.
    """

    model_config = ConfigDict(extra="ignore")

    host: str = Field(description="the pool host or VM (or user@address target) the workspace is on")
    sandbox_id: str = Field(min_length=1)
    remote_dir: str = Field(min_length=1, description="the workspace directory on the host")
    repo: str = Field(default="", description="what was cloned into it ('' none)")
    ref: str = Field(default="", description="the ref checked out ('' the default branch)")


def remote_path_ok(root: str, name: str) -> str:
    """``root/name`` after checking ``name`` is one plain path component.

    Raises:
        InputError: ``name`` is empty, ``.``/``..``, has a ``/`` or a control character,
            or starts with ``-``.
    """
    if (not name or name in (".", "..") or "/" in name or name.startswith("-")
            or any(ord(c) < 32 or c == "\x7f" for c in name)):
        raise InputError(f"{name!r} is not a single plain path component")
    return root.rstrip("/") + "/" + name


# used with fullmatch only: re.match(r"...$") would accept a trailing newline
_SCP_LIKE = re.compile(r"[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+:[A-Za-z0-9_./~-][A-Za-z0-9_./~+-]*")
_URL = re.compile(r"(https|ssh)://[A-Za-z0-9_.~%@:\[\]-]+(/[A-Za-z0-9_./~%+@:-]*)?")
_ABS_PATH = re.compile(r"/[A-Za-z0-9_./~+@:-]*")
_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./+-]{0,199}")
_ROOT = re.compile(r"[A-Za-z0-9_./-]+")


def check_repo(repo: Any, *, field: str = "repo") -> str:
    """Accept an https or ssh git URL, ``user@host:path``, or an absolute path on the host.

    Raises:
        InputError: anything else: a leading ``-`` (option injection), ``ext::``
            and other ``<transport>::`` helpers, other schemes, control characters
            (a trailing newline too).
    """
    if not isinstance(repo, str) or not repo:
        raise InputError(f"input {field} must be a non-empty string, got {repo!r}")
    if repo.startswith("-"):
        raise InputError(f"input {field} {repo!r} starts with '-' and would be read as an option")
    if "::" in repo:
        raise InputError(f"input {field} {repo!r} uses a git remote helper ('<transport>::'); only https, ssh "
                         "and paths on the host are allowed")
    if ".." in repo.split("/"):
        raise InputError(f"input {field} {repo!r} contains a '..' path component")
    if not (_URL.fullmatch(repo) or _SCP_LIKE.fullmatch(repo) or _ABS_PATH.fullmatch(repo)):
        raise InputError(f"input {field} {repo!r} is not an https:// or ssh:// URL, user@host:path, "
                         "or an absolute path on the host")
    return repo


def check_root(v: str) -> str:
    """A remote workspace root: absolute, plain characters, no ``..``, not ``/`` itself.

    Raises:
        ValueError: (a config value: pydantic reports it as the field's error, naming the file).
    """
    norm = posixpath.normpath(v)
    if not v.startswith("/") or norm == "/" or ".." in v.split("/") or not _ROOT.fullmatch(v):
        raise ValueError(f"workspace_root must be an absolute plain path below '/', got {v!r}")
    return norm


def check_ref(ref: Any, *, field: str = "ref") -> str:
    """A branch, tag or commit name that cannot be read as an option."""
    if not isinstance(ref, str) or not _REF.fullmatch(ref) or ".." in ref:
        raise InputError(f"input {field} {ref!r} is not a plain branch, tag or commit name")
    return ref


#: Clone ``$1`` into ``$2`` and check out ``$3`` (may be empty). Only https, ssh
#: and local paths are allowed transports; ``--`` ends the options.
GIT_CLONE_SCRIPT = r"""
git_clone() {
  GIT_TERMINAL_PROMPT=0 GIT_SSH_COMMAND="ssh -o BatchMode=yes" git     -c protocol.allow=never -c protocol.https.allow=always -c protocol.ssh.allow=always     -c protocol.file.allow=always -c protocol.ext.allow=never     clone -q -- "$1" "$2" || return 81
  if [ -n "$3" ]; then
    c=$(git -C "$2" rev-parse -q --verify "refs/remotes/origin/$3^{commit}"         || git -C "$2" rev-parse -q --verify "$3^{commit}") || return 82
    git -C "$2" checkout -q --detach "$c" || return 82
  fi
}
"""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file (snapshot archives)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------ workspaces and archives shared by the SSH backends

def workspace_cwd(remote_dir: str, base: str, cwd: str | None, sandbox_id: str) -> str:
    """``cwd`` resolved against ``base``; it must stay inside ``remote_dir``.

    Raises:
        InputError: ``cwd`` leads outside the workspace.
    """
    if not cwd:
        return base
    where = posixpath.normpath(posixpath.join(base, cwd))
    if not (where + "/").startswith(remote_dir.rstrip("/") + "/"):
        raise InputError(f"sandbox {sandbox_id}: cwd {cwd!r} is outside the workspace {remote_dir}")
    return where


def owned_from_meta(text: str, owner_labels: dict[str, str], handle_cls: type[WorkspaceHandle]) -> list[OwnedSandbox]:
    """Parse one ``{"handle": ..., "owner_labels": ...}`` JSON per line; keep those carrying
    ``owner_labels`` whose handle fits ``handle_cls``."""
    found = []
    for line in text.splitlines():
        try:
            meta = json.loads(line)
            labels = meta.get("owner_labels") or {}
            if all(labels.get(k) == v for k, v in owner_labels.items()):
                handle = handle_cls.model_validate(meta["handle"])
                found.append(OwnedSandbox(sandbox_id=handle.sandbox_id, handle=handle))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a foreign or damaged file is not ours (pydantic's ValidationError is a ValueError)
    return found


def checked_archive(snapshot_meta: SnapshotMeta, backend: str) -> Path:
    """The snapshot's local archive, after checking it exists and matches its sha256.

    Raises:
        SnapshotError: missing, or its checksum does not match.
    """
    archive = Path(snapshot_meta.data.get("archive", ""))
    if not archive.is_file():
        raise SnapshotError(f"{backend}: snapshot {snapshot_meta.id}: archive {archive} is missing", backend=backend)
    if snapshot_meta.checksum and snapshot_meta.checksum != f"sha256:{sha256_file(archive)}":
        raise SnapshotError(f"{backend}: snapshot {snapshot_meta.id}: archive {archive} does not match its "
                            f"checksum {snapshot_meta.checksum}; refusing to restore", backend=backend)
    return archive


def delete_archive(snapshot_meta: SnapshotMeta, store: Path) -> None:
    """Remove a snapshot's archive, but only from inside ``store``. Idempotent."""
    archive = snapshot_meta.data.get("archive")
    if archive and Path(archive).resolve().parent == store.resolve():
        Path(archive).unlink(missing_ok=True)
