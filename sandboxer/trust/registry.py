"""Registries of signed bundles: a directory or an HTTP(S) index of the same layout, and choosing a version.

A registry is a folder (or a URL serving one) holding ``index.yaml``::

    bundles:
      - manifest: workspace/0.2.0/ext.workspace.yaml     # relative to index.yaml
      - manifest: workspace/0.1.0/ext.workspace.yaml
        deprecated: true
        reason: the 0.1 line writes outside its home   # optional, shown by search and info

Each manifest has its ``<manifest>.sig`` and its artifact (the manifest's ``artifact.file``) beside
it. The built-in registry is the top-level ``registry/`` folder; an operator adds others under
``registries:`` of their ``trust.yaml`` (a path, relative to that file, or an http(s) URL). What a
registry says is only a listing: nothing is trusted until :func:`~sandboxer.trust.verify` passes on
the files fetched. Nothing here imports or runs any of a bundle.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pydantic import Field, ValidationError

from sandboxer.errors import ConfigError, RegistryError
from sandboxer.models import Strict
from sandboxer.trust.bundle import BundleManifest, parse_manifest, signature_path

INDEX = "index.yaml"
#: Seconds an HTTP registry has to answer one request.
HTTP_TIMEOUT = 30.0
#: The largest file fetched from an HTTP registry (an artifact included).
HTTP_MAX_BYTES = 256 * 1024 * 1024


class IndexEntry(Strict):
    manifest: str = Field(min_length=1, description="the bundle manifest, relative to index.yaml")
    deprecated: bool = False
    reason: str | None = None


class IndexFile(Strict):
    bundles: list[IndexEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Listing:
    """One bundle as a registry lists it (unverified: verify the fetched files before trusting any of it)."""

    manifest: BundleManifest
    #: where the manifest is: a local path or a URL
    location: str
    registry: "Registry"
    deprecated: bool = False
    reason: str | None = None

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def version(self) -> str:
        return self.manifest.version

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {"id": m.id, "version": m.version, "title": m.title, "publisher": m.publisher,
                "grants": list(m.capabilities.grants), "dependencies": dict(m.dependencies),
                "deprecated": self.deprecated, "reason": self.reason, "registry": self.registry.where,
                "manifest": self.location}

    def fetch(self, into: Path) -> Path:
        """The manifest's local path, with its .sig and artifact beside it (downloaded into ``into`` if remote)."""
        return self.registry.fetch(self, into)


@dataclass
class Registry:
    """One registry: a local directory or an http(s) URL of one."""

    where: str
    listings: list[Listing] = field(default_factory=list)

    @property
    def remote(self) -> bool:
        return urllib.parse.urlsplit(self.where).scheme in ("http", "https")

    def _url(self, rel: str) -> str:
        return urllib.parse.urljoin(self.where.rstrip("/") + "/", rel)

    def _local(self, rel: str) -> Path:
        return Path(self.where) / rel

    def read(self, rel: str) -> bytes:
        """One file of the registry, by its path relative to the index."""
        if not self.remote:
            path = self._local(rel)
            try:
                return path.read_bytes()
            except OSError as exc:
                raise RegistryError(f"registry {self.where}: cannot read {path}: {exc.strerror}") from None
        url = self._url(rel)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:  # noqa: S310 - http(s) only
                data = resp.read(HTTP_MAX_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise RegistryError(f"registry {self.where}: GET {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryError(f"registry {self.where}: GET {url}: {getattr(exc, 'reason', exc)}") from None
        if len(data) > HTTP_MAX_BYTES:
            raise RegistryError(f"registry {self.where}: GET {url}: larger than {HTTP_MAX_BYTES} bytes")
        return data

    def load(self) -> "Registry":
        """Read the index and every manifest it lists.

        Raises:
            RegistryError: unreadable, malformed (naming the file and field), or one id and version listed twice.
        """
        from sandboxer.loader import describe_validation

        index_where = self._url(INDEX) if self.remote else str(self._local(INDEX))
        try:
            data = yaml.safe_load(self.read(INDEX).decode("utf-8")) or {}
            index = IndexFile.model_validate(data)
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RegistryError(f"{index_where}: not YAML: {exc}") from None
        except ValidationError as exc:
            raise RegistryError(describe_validation(index_where, exc)) from None
        seen: dict[tuple[str, str], str] = {}
        self.listings = []
        for i, entry in enumerate(index.bundles):
            rel = entry.manifest
            if rel.startswith("/") or ".." in rel.split("/") or "://" in rel:
                raise RegistryError(f"{index_where}: field 'bundles.{i}.manifest' (value {rel!r}): must be a "
                                    f"path inside the registry")
            location = self._url(rel) if self.remote else str(self._local(rel))
            try:
                raw = yaml.safe_load(self.read(rel).decode("utf-8"))
            except (UnicodeDecodeError, yaml.YAMLError) as exc:
                raise RegistryError(f"{location}: not YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise RegistryError(f"{location}: expected a mapping (a bundle manifest)")
            try:
                manifest = parse_manifest(Path(location), raw)
            except ConfigError as exc:
                raise RegistryError(str(exc)) from None
            except Exception as exc:  # BundleError is a TrustError: a listing is a config problem here
                raise RegistryError(str(exc)) from None
            key = (manifest.id, str(manifest.parsed_version))
            if key in seen:
                raise RegistryError(f"{index_where}: {manifest.id} {manifest.version} is listed twice: in "
                                    f"{seen[key]} and in {location}; remove one of them")
            seen[key] = location
            self.listings.append(Listing(manifest, location, self, entry.deprecated, entry.reason))
        return self

    def fetch(self, listing: Listing, into: Path) -> Path:
        """Local copies of the manifest, its .sig and its artifact (the directory's own files if local)."""
        if not self.remote:
            return Path(listing.location)
        rel = urllib.parse.urlsplit(listing.location).path
        base_rel = urllib.parse.urlsplit(self._url("")).path
        rel = rel[len(base_rel):] if rel.startswith(base_rel) else rel
        name = rel.rsplit("/", 1)[-1]
        folder = rel[: -len(name)]
        into.mkdir(parents=True, exist_ok=True)
        manifest = into / name
        manifest.write_bytes(self.read(rel))
        try:
            sig = self.read(folder + signature_path(Path(name)).name)
        except RegistryError:
            sig = None  # unsigned: verify says so, with its own reason
        if sig is not None:
            signature_path(manifest).write_bytes(sig)
        (into / listing.manifest.artifact.file).write_bytes(self.read(folder + listing.manifest.artifact.file))
        return manifest


def builtin_registry() -> str:
    """The built-in registry: the top-level ``registry/`` folder (package data when installed)."""
    from sandboxer.loader import builtin_dir

    return str(builtin_dir("registry"))


def configured_registries(config_dirs: list[Path] | None) -> list[str]:
    """The built-in registry, then each ``registries:`` entry of the operator's trust.yaml files."""
    from sandboxer.trust import load_trust

    out = [builtin_registry()]
    store = load_trust(config_dirs)
    for path, entries in store.registries:
        for where in entries:
            if urllib.parse.urlsplit(where).scheme in ("http", "https"):
                out.append(where)
            else:
                p = Path(where).expanduser()
                out.append(str(p if p.is_absolute() else path.parent / p))
    return out


def _matches(text: str, listing: Listing) -> bool:
    t = text.lower()
    m = listing.manifest
    return any(t in s.lower() for s in (m.id, m.title, m.description, m.publisher))


@dataclass
class Registries:
    """Every configured registry, read; what to search and what to install."""

    registries: list[Registry]

    @classmethod
    def load(cls, where: list[str]) -> "Registries":
        return cls([Registry(w).load() for w in where])

    def all(self) -> list[Listing]:
        out = [x for r in self.registries for x in r.listings]
        seen: dict[tuple[str, str], Listing] = {}
        for x in out:
            key = (x.id, str(x.manifest.parsed_version))
            if key in seen:
                raise RegistryError(f"{x.id} {x.version} is listed twice: in {seen[key].location} and in "
                                    f"{x.location}; remove one of them")
            seen[key] = x
        return sorted(out, key=lambda x: (x.id, x.manifest.parsed_version))

    def search(self, text: str | None = None) -> list[Listing]:
        return [x for x in self.all() if text is None or _matches(text, x)]

    def versions(self, name: str) -> list[Listing]:
        """Every listed version of ``name`` (``ext.`` may be left out), oldest first."""
        ext_id = name if name.startswith("ext.") else f"ext.{name}"
        return [x for x in self.all() if x.id == ext_id]

    def choose(self, name: str, *, version: str | None = None, specifier: str | None = None,
               allow_deprecated: bool = False) -> Listing:
        """The version to install: ``version`` exactly (deprecated or not), else the highest matching
        ``specifier`` that is not deprecated (deprecated ones too with ``allow_deprecated``).

        Raises:
            RegistryError: nothing listed matches, naming what is listed and how to ask for a deprecated one.
        """
        found = self.versions(name)
        ext_id = name if name.startswith("ext.") else f"ext.{name}"
        where = ", ".join(r.where for r in self.registries)
        if not found:
            raise RegistryError(f"{ext_id}: not in any registry ({where}); `sandboxer extensions search` lists "
                                f"what is")
        if version is not None:
            want = Version(version)
            for x in found:
                if x.manifest.parsed_version == want:
                    return x
            raise RegistryError(f"{ext_id}: no version {version} in the registries; listed: "
                                f"{', '.join(x.version for x in found)}")
        spec = SpecifierSet(specifier or "", prereleases=True) if specifier else None
        fits = [x for x in found if spec is None or spec.contains(x.manifest.parsed_version)]
        usable = [x for x in fits if allow_deprecated or not x.deprecated]
        if usable:
            return usable[-1]
        wanted = f"{ext_id}{specifier or ''}"
        if fits:
            deprecated = ", ".join(x.version for x in fits)
            raise RegistryError(f"{wanted}: only deprecated versions are listed ({deprecated}); install one "
                                f"with {ext_id}=={fits[-1].version} or --allow-deprecated")
        raise RegistryError(f"{wanted}: no listed version matches; listed: {', '.join(x.version for x in found)}")


def staging_dir(parent: Path) -> Path:
    """A fresh directory for downloaded bundle files (the caller removes it)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".fetch-", dir=parent))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
