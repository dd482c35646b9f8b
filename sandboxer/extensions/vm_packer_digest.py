"""The template digest of vm-packer's build mode: what a rebuild depends on, besides the variables.

An artifact is reused while the template digest and the variables digest are unchanged, so the
template digest must change whenever a file Packer reads changes. It covers:

* the template: the one file, or for a directory every ``*.pkr.hcl``, ``*.pkr.json`` and
  ``*.pkrvars.hcl`` file in it (not its subdirectories; Packer reads no others);
* every local file a provisioner names by a literal path: ``script``, ``scripts`` and ``source``
  of the JSON template's ``provisioners``, and ``script = "..."``, ``scripts = [...]``,
  ``source = "..."`` attributes in HCL2 files (a ``${path.root}`` prefix is understood); a
  relative path is taken from the template's directory, where Packer runs. A directory named
  (a ``file`` provisioner's ``source``) counts with every file under it; a path that does not exist
  counts as missing, so creating it later rebuilds too.

Paths built from variables or functions (``"${var.dir}/x.sh"``) cannot be followed: change a
variable, or name the file literally. A template that is one file naming no other file has the
digest of that file's bytes alone (the digest records made before references were followed have).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

#: the files of a directory template Packer reads
TEMPLATE_SUFFIXES = (".pkr.hcl", ".pkr.json", ".pkrvars.hcl")
#: at most this many files under one referenced directory
MAX_TREE_FILES = 10000
_HCL_ONE = re.compile(r'^\s*(script|source)\s*=\s*"([^"\n]*)"', re.MULTILINE)
_HCL_MANY = re.compile(r'^\s*scripts\s*=\s*\[([^\]]*)\]', re.MULTILINE)
_HCL_STRING = re.compile(r'"([^"\n]*)"')


class DigestError(ValueError):
    """A file the digest covers cannot be read (the message names it)."""


def template_files(template: Path) -> list[Path]:
    """The template's own files: the file, or a directory's Packer files, sorted."""
    if template.is_dir():
        return sorted(p for p in template.iterdir() if p.is_file() and p.name.endswith(TEMPLATE_SUFFIXES))
    return [template]


def _referenced_in(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.name.endswith(".json"):
        try:
            doc = json.loads(text)
        except ValueError:
            return []  # packer inspect refuses it with its own error
        found: list[str] = []
        provisioners = doc.get("provisioners") if isinstance(doc, dict) else None
        for prov in provisioners if isinstance(provisioners, list) else []:
            if not isinstance(prov, dict):
                continue
            for key in ("script", "source"):
                if isinstance(prov.get(key), str):
                    found.append(prov[key])
            if isinstance(prov.get("scripts"), list):
                found.extend(s for s in prov["scripts"] if isinstance(s, str))
        return found
    found = [m.group(2) for m in _HCL_ONE.finditer(text)]
    for m in _HCL_MANY.finditer(text):
        found.extend(_HCL_STRING.findall(m.group(1)))
    return found


def referenced_files(template: Path) -> list[str]:
    """The literal local paths the template's provisioners name, as written, in order, once each."""
    seen: dict[str, None] = {}
    for path in template_files(template):
        for ref in _referenced_in(path):
            seen.setdefault(ref, None)
    return [r for r in seen if r and "{{" not in r and "${" not in r.replace("${path.root}", "")]


def _resolve(ref: str, base: Path) -> Path:
    ref = ref.replace("${path.root}", str(base))
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base / path


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def template_digest(template: Path) -> str:
    """The sha256 of everything the module docstring lists, for ``template`` (a file or directory).

    Raises:
        DigestError: a covered file cannot be read, or a referenced directory holds too many files.
    """
    base = template if template.is_dir() else template.parent
    own = template_files(template)
    refs = referenced_files(template)
    try:
        if not template.is_dir() and not refs:
            return _file_sha(template)
        lines = [f"template {p.relative_to(base)} {_file_sha(p)}" for p in own]
        for ref in refs:
            path = _resolve(ref, base)
            if path.is_dir():
                tree = sorted(p for p in path.rglob("*") if p.is_file())
                if len(tree) > MAX_TREE_FILES:
                    raise DigestError(f"{path} (named by the template as {ref!r}) holds more than "
                                      f"{MAX_TREE_FILES} files")
                lines.append(f"dir {ref}")
                lines.extend(f"  {p.relative_to(path)} {_file_sha(p)}" for p in tree)
            elif path.is_file():
                lines.append(f"file {ref} {_file_sha(path)}")
            else:
                lines.append(f"missing {ref}")
    except OSError as exc:
        raise DigestError(f"cannot read {exc.filename or template}: {exc.strerror or exc}") from None
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
