"""Installing signed bundles into the manager's home: verify first, then unpack atomically; upgrade,
remove, enable, disable; every step an audit event in the state store.

An installed extension lives in ``<home>/extensions/<id>/<version>/``::

    ext.<name>.yaml        the manifest the loader reads (the bundle's ext.<name>.yaml part; runtime: process)
    bundle.yaml(.sig)      the signed manifest and its signature, as verified
    artifact/<file>        the artifact, re-hashed after copying
    lib/                   the unpacked wheel (or tarball): the worker's import path, never the manager's

and ``<home>/extensions/<id>/current`` is a symlink to the version in use. Unpacking goes into a
temporary directory beside the version's, which is fsynced and renamed into place only once
complete: an interrupted install leaves no version directory, no ``current`` and no state row.
Nothing of a bundle is imported here; it runs only in its out-of-process worker.
"""

from __future__ import annotations

import getpass
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from sandboxer.errors import ArtifactMismatch, BundleError, DependencyError, SandboxStateError, TrustError
from sandboxer.state.extensions import LifecycleError
from sandboxer.trust.bundle import read_manifest_data, sha256_file, signature_path
from sandboxer.trust.grants import Grants
from sandboxer.trust.layout import CURRENT, EXTENSIONS_DIR, installed_manifests  # noqa: F401 - installed_manifests re-exported
from sandboxer.trust.registry import Listing, Registries, RegistryError, remove_tree, staging_dir
from sandboxer.trust.store import TrustStore
from sandboxer.trust.verify import VerifiedBundle, verify



def default_who(consumer: str | None = None) -> str:
    """Who asked, for audit events: the OS user, and the consumer if one is given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user} (consumer {consumer})" if consumer else user


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _extract(artifact: Path, into: Path) -> None:
    """Unpack a wheel (zip) or a tarball into ``into``: regular files and directories only, all inside it.

    Raises:
        BundleError: the artifact is neither, or holds a link, a device, or a path outside ``into``.
    """
    into.mkdir()
    where = str(artifact)
    if zipfile.is_zipfile(artifact):
        with zipfile.ZipFile(artifact) as zf:
            for info in zf.infolist():
                name = info.filename
                parts = name.split("/")
                if name.startswith("/") or ".." in parts or "\\" in name:
                    raise BundleError(f"{where}: member {name!r} would be written outside the extension's "
                                      f"directory", path=where)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise BundleError(f"{where}: member {name!r} is a symbolic link; a bundle holds files only",
                                      path=where)
            zf.extractall(into)
        return
    if tarfile.is_tarfile(artifact):
        with tarfile.open(artifact) as tf:
            for m in tf.getmembers():
                if not (m.isfile() or m.isdir()):
                    raise BundleError(f"{where}: member {m.name!r} is not a file or a directory", path=where)
            tf.extractall(into, filter="data")
        return
    raise BundleError(f"{where}: the artifact is neither a wheel nor a tarball", path=where)


class Installer:
    """Install, upgrade and remove bundles in ``home``, and move them through their lifecycle.

    Args:
        home: the manager's home (bundles go to ``<home>/extensions``).
        state: the state store (installed extensions, highest versions, audit trail).
        trust: the operator's trusted keys.
        registries: where NAME[==VERSION] and dependencies are found, or a callable reading them when first
            needed (None: only files can be installed).
        who: who asks, for audit events (default: the OS user).
    """

    def __init__(self, home: Path, state: Any, trust: TrustStore,
                 registries: Registries | Callable[[], Registries] | None = None, *,
                 who: str | None = None, grants: Grants | None = None):
        self.home = Path(home)
        self.root = self.home / EXTENSIONS_DIR
        self.state = state
        self.trust = trust
        self.registries = registries
        self.who = who or default_who()
        self.grants = grants

    # ------------------------------------------------------------ finding

    def _registries(self) -> Registries:
        if self.registries is None:
            raise RegistryError("no registry is configured: install a bundle's manifest file instead")
        if callable(self.registries):  # read on first use: a file's install needs none unless it has dependencies
            self.registries = self.registries()
        return self.registries

    def _choose(self, target: str, allow_deprecated: bool) -> Listing:
        name, sep, version = target.partition("==")
        return self._registries().choose(name.strip(), version=version.strip() if sep else None,
                                         allow_deprecated=allow_deprecated)

    @staticmethod
    def is_file(target: str) -> bool:
        return target.endswith((".yaml", ".yml")) or os.sep in target or Path(target).is_file()

    # ----------------------------------------------------------- verifying

    def verify(self, manifest_path: Path) -> VerifiedBundle:
        """:func:`verify` with the highest versions ever installed; a refusal is audited with its reason."""
        try:
            return verify(manifest_path, None, self.trust, self.state.installed_versions(), grants=self.grants)
        except TrustError as exc:
            ext_id = version = None
            try:
                data = read_manifest_data(manifest_path)
                ext_id, version = (str(data["id"]) if "id" in data else None), (
                    str(data["version"]) if "version" in data else None)
            except (TrustError, TypeError):
                pass
            self.state.record_audit(self.who, "verify_failed", extension=ext_id, version=version, reason=exc.reason,
                                    detail={"file": exc.path or str(manifest_path), "error": str(exc)})
            raise

    # ---------------------------------------------------------- installing

    def install(self, target: str, *, allow_deprecated: bool = False) -> dict[str, Any]:
        """Install ``NAME[==VERSION]`` from the registries, or a bundle manifest file.

        Returns:
            The installed extension's state row (state ``active``).

        Raises:
            TrustError: verification refused it (audited, nothing installed); DependencyError too.
            RegistryError: nothing listed matches.
            LifecycleError: it is already installed (use upgrade).
        """
        return self._install(target, allow_deprecated=allow_deprecated, chain=())

    def _install(self, target: str, *, allow_deprecated: bool, chain: tuple[str, ...],
                 upgrade: bool = False) -> dict[str, Any]:
        staging = staging_dir(self.root)
        try:
            if self.is_file(target):
                manifest_path, source = Path(target), str(Path(target).resolve())
            else:
                listing = self._choose(target, allow_deprecated)
                manifest_path, source = listing.fetch(staging), listing.location
            vb = self.verify(manifest_path)
            return self._install_verified(vb, source, chain=chain, upgrade=upgrade)
        finally:
            remove_tree(staging)

    def _install_verified(self, vb: VerifiedBundle, source: str, *, chain: tuple[str, ...],
                          upgrade: bool) -> dict[str, Any]:
        m = vb.manifest
        old = self.state.installed_extension(m.id)
        if old is not None and not upgrade:
            raise LifecycleError(f"{m.id} is already installed (version {old['version']}, {old['state']}); "
                                 f"`sandboxer extensions upgrade {m.id}` installs a newer version")
        if old is not None and Version(old["version"]) >= m.parsed_version:
            raise LifecycleError(f"{m.id} {old['version']} is installed ({old['state']}); {m.version} is not newer")
        self._dependencies(vb, chain + (m.id,))
        fields = {"publisher": vb.publisher, "version": m.version, "sha256": vb.sha256, "key_id": vb.key_id,
                  "grants": list(m.capabilities.grants), "dependencies": dict(m.dependencies), "source": source}
        if old is None:
            self.state.extension_transition(m.id, "verified", who=self.who, reason=f"signed by key {vb.key_id}",
                                            **fields)
        try:
            dest = self._unpack(vb)
        except BaseException as exc:
            if old is None:
                self.state.forget_extension(m.id, who=self.who, what="install_failed",
                                            reason=getattr(exc, "reason", type(exc).__name__),
                                            detail={"error": str(exc)})
            raise
        if old is not None:  # the new version is in place: the old one's record gives way
            self.state.forget_extension(m.id, who=self.who, what="upgrade", reason=f"{old['version']} -> {m.version}")
            self.state.extension_transition(m.id, "verified", who=self.who, reason=f"signed by key {vb.key_id}",
                                            **fields)
        self.state.extension_transition(m.id, "installed", who=self.who, path=str(dest))
        self._point_current(dest)
        row = self.state.extension_transition(m.id, "active", who=self.who)
        if old is not None and old["state"] == "disabled":
            row = self.state.extension_transition(m.id, "disabled", who=self.who,
                                                  reason="it was disabled before the upgrade")
        if old is not None and old.get("path") and Path(old["path"]) != dest:
            remove_tree(Path(old["path"]))
        self.state.record_audit(self.who, "upgrade" if old else "install", extension=m.id, version=m.version,
                                detail={"source": source, "sha256": vb.sha256, "path": str(dest)})
        return row

    def _dependencies(self, vb: VerifiedBundle, chain: tuple[str, ...]) -> None:
        m = vb.manifest
        for dep, spec in m.dependencies.items():
            wanted = SpecifierSet(spec, prereleases=True)
            have = self.state.installed_extension(dep)
            if have is not None and have["state"] != "verified" and wanted.contains(Version(have["version"])):
                continue
            if dep in chain:
                raise self._refuse(vb, DependencyError(f"{vb.manifest_path}: dependency {dep}{spec} of {m.id} "
                                                       f"depends on {m.id} in turn ({' -> '.join(chain + (dep,))})",
                                                       path=str(vb.manifest_path)))
            if have is not None:
                raise self._refuse(vb, DependencyError(
                    f"{vb.manifest_path}: {m.id} needs {dep}{spec}, but {dep} {have['version']} is installed; "
                    f"upgrade or remove it first", path=str(vb.manifest_path)))
            try:
                listing = self._registries().choose(dep, specifier=spec)
            except RegistryError as exc:
                raise self._refuse(vb, DependencyError(
                    f"{vb.manifest_path}: {m.id} needs {dep}{spec}, which is not installed and cannot be installed "
                    f"from a registry ({exc})", path=str(vb.manifest_path))) from None
            self._install(f"{listing.id}=={listing.version}", allow_deprecated=False, chain=chain)

    def _refuse(self, vb: VerifiedBundle, exc: TrustError) -> TrustError:
        self.state.record_audit(self.who, "install_refused", extension=vb.manifest.id, version=vb.manifest.version,
                                reason=exc.reason, detail={"error": str(exc)})
        return exc

    def _before_rename(self, tmp: Path) -> None:
        """The seam between a complete unpack and its rename into place (a test injects a fault here)."""

    def _unpack(self, vb: VerifiedBundle) -> Path:
        m = vb.manifest
        base = self.root / m.id
        base.mkdir(parents=True, exist_ok=True)
        dest = base / m.version
        if dest.exists():  # left by an install whose record is gone (a crash after the rename)
            remove_tree(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{m.version}.", dir=base))
        try:
            art = tmp / "artifact" / vb.artifact_path.name
            art.parent.mkdir()
            shutil.copyfile(vb.artifact_path, art)
            digest = sha256_file(art)
            if digest != vb.sha256:  # the copy is what gets unpacked: it must be the bytes verified
                raise ArtifactMismatch(f"{art}: sha256 {digest} of the copy is not the verified {vb.sha256}; the "
                                       f"artifact changed while it was being installed", path=str(art))
            _extract(art, tmp / "lib")
            ext = vb.extension_data()
            ext["runtime"] = "process"  # an installed bundle never runs in the manager's process
            (tmp / f"{m.id}.yaml").write_text(
                f"# Installed from a signed bundle (key {vb.key_id}); see bundle.yaml.\n"
                + yaml.safe_dump(ext, sort_keys=False, allow_unicode=True), encoding="utf-8")
            shutil.copyfile(vb.manifest_path, tmp / "bundle.yaml")
            shutil.copyfile(signature_path(vb.manifest_path), tmp / "bundle.yaml.sig")
            _fsync_tree(tmp)
            self._before_rename(tmp)
            os.rename(tmp, dest)
            _fsync(base)
        except BaseException:
            remove_tree(tmp)
            raise
        return dest

    def _point_current(self, dest: Path) -> None:
        link = dest.parent / CURRENT
        tmp = dest.parent / f".{CURRENT}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(dest.name)
        os.replace(tmp, link)
        _fsync(dest.parent)

    # ----------------------------------------------------------- the rest

    def _row(self, name: str) -> dict[str, Any]:
        ext_id = name if name.startswith("ext.") else f"ext.{name}"
        row = self.state.installed_extension(ext_id)
        if row is None:
            raise LifecycleError(f"{ext_id} is not installed; `sandboxer extensions install {ext_id}` installs it")
        return row

    def upgrade(self, name: str, *, allow_deprecated: bool = False) -> dict[str, Any]:
        """Install the registries' latest version of an installed extension in place of its current one.

        Raises:
            LifecycleError: not installed, or nothing newer is listed.
        """
        row = self._row(name)
        latest = self._registries().choose(row["id"], allow_deprecated=allow_deprecated)
        if latest.manifest.parsed_version <= Version(row["version"]):
            raise LifecycleError(f"{row['id']} {row['version']} is installed and is the latest listed")
        return self._install(f"{latest.id}=={latest.version}", allow_deprecated=True, chain=(), upgrade=True)

    def remove(self, name: str) -> dict[str, Any]:
        """Remove an installed extension: its files and its record (the highest version stays, against rollback).

        Raises:
            SandboxStateError: it still has live sandboxes (named), or another installed extension needs it.
        """
        row = self._row(name)
        ext_id = row["id"]
        live = [r["id"] for r in self.state.list(where={"extension": ext_id})]
        if live:
            raise SandboxStateError(f"{ext_id} has live sandboxes ({', '.join(live)}); tear them down first "
                                    f"(`sandboxer teardown ID`)")
        needs = [r["id"] for r in self.state.installed_extension_list() if ext_id in (r.get("dependencies") or {})]
        if needs:
            raise SandboxStateError(f"{ext_id} is needed by {', '.join(needs)}; remove {'them' if len(needs) > 1 else 'it'}"
                                    f" first")
        base = self.root / ext_id
        if base.is_dir():  # out of the loader's sight at once, then deleted
            gone = self.root / f".removed-{ext_id}-{os.getpid()}"
            os.rename(base, gone)
            remove_tree(gone)
        self.state.forget_extension(ext_id, who=self.who, what="remove", detail={"path": row.get("path")})
        return row

    def enable(self, name: str) -> dict[str, Any]:
        """disabled -> active (LifecycleError naming the current state otherwise)."""
        return self.state.extension_transition(self._row(name)["id"], "active", who=self.who, reason="enabled")

    def disable(self, name: str, *, reason: str | None = None) -> dict[str, Any]:
        """active -> disabled: it takes no new sandboxes; its live ones can still be torn down."""
        return self.state.extension_transition(self._row(name)["id"], "disabled", who=self.who,
                                               reason=reason or "disabled")

