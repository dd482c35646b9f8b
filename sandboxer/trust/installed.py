"""Running an installed bundle: a brokered worker, which reaches only what the bundle's grants allow.

An installed extension (:mod:`sandboxer.trust.installer`) always runs out of process, and always
confined by bubblewrap (whatever its manifest's ``worker`` says), in the view :func:`confine_brokered`
builds: a root of its own holding the system's libraries and programs (read-only), the Python it
runs on and what the manager imports (read-only), the bundle's package (read-only, first on the
worker's import path), its private home (read-only but for the ``fs:write`` grants), a private
``/tmp``, and the capability broker's socket (:mod:`sandboxer.host.broker`). Not there: the
manager's home and state store, the rest of ``/etc``, ``/home``, ``/root``, ``/run`` and its
sockets (the Docker engine's only under ``docker:engine``), and any network but its own
loopback. Secrets are not in its environment: the broker hands out the granted ones on request.
The manager's own ``sys.path`` never holds the bundle, so nothing of it is imported here.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from sandboxer.errors import CapabilityError
from sandboxer.host.broker import WORKER_DIR, Broker
from sandboxer.host.client import ProcessExtension, describe_process
from sandboxer.models import ExtensionManifest

#: System directories every worker sees read-only (a symlink, as /usr-merged systems have, stays one).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: What of /etc a worker sees: name lookups, CA certificates, time zones, the loader's cache.
ETC_FILES = ("/etc/ssl", "/etc/ca-certificates", "/etc/ca-certificates.conf", "/etc/passwd", "/etc/group",
             "/etc/nsswitch.conf", "/etc/hosts", "/etc/localtime", "/etc/ld.so.cache", "/etc/alternatives",
             "/etc/os-release", "/etc/mime.types")


def import_env(import_path: Path) -> dict[str, str]:
    """PYTHONPATH for a worker of an installed bundle: its package first, then what the manager imports."""
    return {"PYTHONPATH": os.pathsep.join([str(import_path), *(p for p in sys.path if p)])}


def docker_socket() -> Path | None:
    """The Docker engine's Unix socket the manager would use (``DOCKER_HOST``, else the default), if it exists."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None
    path = Path(host[len("unix://"):])
    return path if path.exists() else None


def _python_paths() -> list[str]:
    import sandboxer

    out = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sandboxer.__file__).resolve().parent.parent)}
    out.update(p for p in sys.path if p and os.path.isabs(p))
    return sorted(p for p in out if os.path.exists(p) and not p.startswith(SYSTEM_DIRS))


def confine_brokered(argv: list[str], *, home: Path, private: Path, import_path: Path, grants: Any,
                     broker_dir: Path | None, ext_id: str) -> list[str]:
    """The command line of an installed bundle's worker: ``argv`` under bubblewrap, in the view the module describes.

    Raises:
        CapabilityError: bubblewrap is not installed (an installed bundle never runs unconfined).
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise CapabilityError(f"{ext_id}: an installed bundle runs only confined, and bubblewrap (bwrap) is not "
                              f"installed; install it (Debian: apt-get install bubblewrap)")
    out = [bwrap, "--unshare-all", "--new-session", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            out += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            out += ["--ro-bind", d, d]
    for f in ETC_FILES:
        out += ["--ro-bind-try", f, f]
    for p in _python_paths():
        out += ["--ro-bind", p, p]
    # The manager's home may lie under a path bound above: hide it, then show the bundle's package
    # (which is under it) and the private dir alone.
    out += ["--tmpfs", str(home), "--ro-bind", str(import_path), str(import_path),
            "--ro-bind", str(private), str(private)]
    for rel in grants.writable:
        where = private / rel
        where.mkdir(parents=True, exist_ok=True)
        out += ["--bind", str(where), str(where)]
    if grants.docker and (sock := docker_socket()) is not None:
        out += ["--bind", str(sock), str(sock)]
    if broker_dir is not None:
        out += ["--bind", str(broker_dir), WORKER_DIR]
    return out + ["--chdir", str(private), "--", *argv]


class InstalledProcessExtension(ProcessExtension):
    """A :class:`ProcessExtension` for an installed bundle: a brokered worker, confined as the module says.

    Args:
        grants: the bundle's :class:`~sandboxer.trust.grants.GrantSet` (as the operator narrowed it).
        state: the manager's state store (the broker's audit events and ``state:own-tables``).
    """

    def __init__(self, manifest: ExtensionManifest, info: Any, *, home: Path, import_path: Path, grants: Any,
                 state: Any = None, **kw: Any):
        super().__init__(manifest, info, home=home, **kw)
        self.import_path = Path(import_path)
        self.grants = grants
        self.broker = Broker(manifest.id, grants, version=manifest.version, state=state)

    def confine(self, argv: list[str]) -> list[str]:
        return confine_brokered(argv, home=self.home, private=self.private_dir, import_path=self.import_path,
                                grants=self.grants, broker_dir=self.broker.start(), ext_id=self.id)

    def secrets(self) -> dict[str, str]:
        # No secret crosses in the environment (the broker hands out the granted ones); PYTHONPATH here
        # replaces the manager's in worker_env().
        env = import_env(self.import_path)
        if self.grants.docker and (sock := docker_socket()) is not None:
            env["DOCKER_HOST"] = f"unix://{sock}"
        return env

    def handshake_extra(self) -> dict[str, Any]:
        return {"broker_token": self.broker.token}

    def close(self) -> None:
        super().close()
        self.broker.close()


def describe_installed(loaded: Any, import_path: Path) -> None:
    """:func:`~sandboxer.host.client.describe_process` for an installed bundle, in a brokered worker's view.

    Raises:
        ConfigError (the subclass the worker named): the handler or its config is refused.
        ExtensionLoadError: the worker crashed, hung, or answered garbage.
    """
    grants = loaded.grants

    def confine_with(m: ExtensionManifest, hidden: Path, private: Path, argv: list[str]) -> list[str]:
        return confine_brokered(argv, home=hidden, private=private, import_path=import_path, grants=grants,
                                broker_dir=None, ext_id=m.id)

    describe_process(loaded, confine_with=confine_with, extra_env=import_env(import_path), brokered=True)


def bundle_grants(manifest_path: Path, ext_id: str, config_dirs: list[Path] | None) -> Any:
    """The grants in effect for an installed bundle: its signed ``bundle.yaml``'s, narrowed by the operator's trust.yaml.

    Raises:
        UnknownCapability: a grant outside this host's vocabulary (checked at load as at install).
        ConfigError: the bundle.yaml is missing or malformed, or a trust.yaml narrows to a grant not declared.
    """
    from sandboxer.errors import ManifestError
    from sandboxer.loader import read_yaml
    from sandboxer.trust.grants import load_grants
    from sandboxer.trust.store import load_trust

    signed = Path(manifest_path).parent / "bundle.yaml"
    if not signed.is_file():
        raise ManifestError(f"{manifest_path}: the installed bundle's signed manifest {signed} is missing; "
                            f"reinstall it (sandboxer extensions remove, install)")
    caps = read_yaml(signed, ManifestError).get("capabilities") or {}
    declared = caps.get("grants") or [] if isinstance(caps, dict) else []
    if not isinstance(declared, list):
        raise ManifestError(f"{signed}: field 'capabilities.grants' (value {declared!r}): expected a list")
    load_grants().check([str(g) for g in declared], str(signed))
    return load_trust(config_dirs).grants_for(ext_id, [str(g) for g in declared])


def check_secrets_granted(loaded: Any) -> None:
    """Refuse an installed bundle whose (merged) config references a secret its grants do not name.

    Raises:
        UndeclaredSecret: naming the config's file, the reference and the grant it would need.
    """
    from sandboxer.errors import UndeclaredSecret
    from sandboxer.trust.grants import config_secret_refs

    granted = set(loaded.grants.secret_refs)
    source = str(loaded.config_overrides[-1]) if loaded.config_overrides else str(loaded.source)
    asked = [(f"config.{name}", f"env:{name}") for name in loaded.info.secret_envs]
    for where, ref in config_secret_refs(loaded.config) + asked:
        if ref not in granted:
            raise UndeclaredSecret(f"{source}: field '{where}' (value {ref!r}): {loaded.manifest.id} asks for a "
                                   f"secret its bundle does not declare (it would need the grant "
                                   f"'secrets:read:{ref}'); an installed bundle gets only the secrets it "
                                   f"declares", path=source)
