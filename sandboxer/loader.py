"""YAML -> validated models, and nothing else.

Rules kept here: YAML is read with ``yaml.safe_load`` only; every error names
the file, the field path and the bad value; everything is checked at load
time (registry capabilities, duplicate ids, handler allow-list, each
handler's own config and profile-options models), never on first use.

A config directory may change the ``config:`` of an extension defined elsewhere
(a built-in one, say) with an explicit override file of the same name holding
``id``, ``override: config`` and ``config``; nothing else of a manifest can be
overridden, and a plain second manifest with the same id stays an error.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ValidationError

from sandboxer.errors import (
    CapabilityError,
    ConfigError,
    ManifestError,
    MissingExtra,
    ProfileError,
)
from sandboxer.extensions.base import RESERVED_INPUTS, SandboxExtension, check_features, check_signatures
from sandboxer.deadline import CallLimits
from sandboxer.extensions.registry import builtin_modules, resolve_handler
from sandboxer.models import ExtensionManifest, Profile, Settings
from sandboxer.policy import ENFORCEMENTS, describe_lacking, lacking

_PKG_DIR = Path(__file__).resolve().parent


def builtin_dir(kind: str) -> Path:
    """Where the shipped ``extensions``, ``profiles`` or ``registry`` live.

    In an installed wheel they are package data under ``sandboxer/_data``; in a
    source checkout (or editable install) they are the repository's top-level folders.
    """
    packaged = _PKG_DIR / "_data" / kind
    return packaged if packaged.is_dir() else _PKG_DIR.parent / kind


#: The entry-point group through which an installed package ships manifests and profiles.
CONFIG_GROUP = "sandboxer.config"
_CONFIG_VALUE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):([A-Za-z0-9_][A-Za-z0-9_-]*)")


def package_config_dirs() -> list[Path]:
    """Config directories shipped by installed packages, in entry-point name order.

    A package declares ``[project.entry-points."sandboxer.config"] NAME = "package:dir"``: the
    directory ``dir`` inside the top-level package ``package`` holds ``extensions/`` and
    ``profiles/``, loaded after the built-ins and before the user's config dirs. The package is
    found, not imported (no code of it runs here). ``SANDBOXER_PACKAGE_CONFIG=0`` turns this off.

    Raises:
        ConfigError: an entry point is malformed, its package is missing, or the directory is not there.
    """
    if os.environ.get("SANDBOXER_PACKAGE_CONFIG", "1").strip().lower() in ("0", "no", "false", "off"):
        return []
    from importlib.metadata import entry_points

    out: list[Path] = []
    for ep in sorted(entry_points(group=CONFIG_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        where = (f"entry point {ep.name!r} = {ep.value!r} of group {CONFIG_GROUP}"
                 + (f" (distribution {dist.name} {dist.version})" if dist is not None else ""))
        m = _CONFIG_VALUE.fullmatch(ep.value.strip())
        if m is None:
            raise ConfigError(f"{where}: expected 'package:directory' (a top-level package and a directory in it)")
        try:
            spec = importlib.util.find_spec(m.group(1))  # a top-level package: located, never imported
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{where}: no installed package {m.group(1)!r}")
        d = Path(next(iter(spec.submodule_search_locations))) / m.group(2)
        if not d.is_dir():
            raise ConfigError(f"{where}: directory {str(d)!r} does not exist")
        out.append(d)
    return out


def config_dirs_from_env() -> list[Path]:
    raw = os.environ.get("SANDBOXER_CONFIG", "")
    return [Path(p) for p in raw.split(os.pathsep) if p]


def read_yaml(path: Path, error: type[ConfigError], *, empty_ok: bool = False) -> dict[str, Any]:
    """Parse one YAML file safely into a mapping; errors name the file (and line).

    ``empty_ok`` lets an empty file stand for an empty mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}: invalid YAML{where}: {problem}") from exc
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


_SECRET_WORDS = ("key", "token", "secret", "password", "credential")
#: fields named like secrets that are not: shown in messages like any other value
_NOT_SECRET = frozenset({"public_key", "key_id", "keys", "known_hosts", "key_file"})


def describe_validation(source: str, exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``file: field 'a.b': value 'x': why``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        value = err.get("input")
        secretish = any(w in str(p).lower() for p in err["loc"] if str(p).lower() not in _NOT_SECRET
                        for w in _SECRET_WORDS)
        shown = "" if isinstance(value, dict) else " (value redacted)" if secretish else f" (value {value!r})"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{source}: field {loc or '<root>'!r}{shown}: {msg}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Registry:
    """Capability metadata from ``registry/capabilities.yaml``."""

    isolation_levels: dict[str, str]
    pricing_models: dict[str, str]
    features: dict[str, str]

    @classmethod
    def load(cls, path: Path | None = None) -> "Registry":
        path = path or builtin_dir("registry") / "capabilities.yaml"
        data = read_yaml(path, ConfigError)
        try:
            return cls(
                isolation_levels=dict(data["isolation_levels"]),
                pricing_models=dict(data["pricing_models"]),
                features=dict(data["features"]),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: capability registry is malformed: {exc}") from exc


def is_builtin_handler(spec: str) -> bool:
    """Whether a manifest's ``handler`` names a module shipped in ``sandboxer.extensions``."""
    module, sep, _ = spec.partition(":")
    return bool(sep) and module.startswith("sandboxer.extensions.") and \
        module.removeprefix("sandboxer.extensions.") in builtin_modules()


def _is_process(manifest: ExtensionManifest) -> bool:
    if manifest.runtime is not None:
        return manifest.runtime == "process"
    return not is_builtin_handler(manifest.handler)


@dataclass(frozen=True)
class HandlerInfo:
    """What the manager knows of a handler class without holding it.

    For an in-process extension it is read from the class; for a ``runtime: process`` one it
    comes from a short-lived worker (``python -m sandboxer.host --describe``), so the handler's
    module is never imported into the manager.
    """

    name: str
    features: frozenset[str]
    exclusive_inputs: tuple[frozenset[str], ...] = ()
    names_resources: bool = False
    #: environment variables the config's secret references name (they alone reach a worker)
    secret_envs: tuple[str, ...] = ()
    #: the parts of the sandbox policy it keeps: the manifest's ``capabilities.enforces``, else the class's
    enforces: frozenset[str] = frozenset()
    #: the parts it would keep but this host cannot (taken out of ``enforces``), each with why
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, handler: type[SandboxExtension], config: BaseModel,
           manifest: ExtensionManifest | None = None) -> "HandlerInfo":
        from sandboxer.secrets import secret_env_names

        declared = manifest.capabilities.enforces if manifest is not None else None
        keeps = frozenset(handler.enforces if declared is None else declared)
        missing = {k: v for k, v in handler.unavailable(config).items() if k in keeps}
        return cls(name=f"{handler.__module__}:{handler.__qualname__}", features=frozenset(handler.features),
                   exclusive_inputs=tuple(frozenset(g) for g in handler.exclusive_inputs),
                   names_resources=handler.resource_names is not SandboxExtension.resource_names,
                   secret_envs=tuple(secret_env_names(config)),
                   enforces=keeps - missing.keys(), unavailable=missing)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "features": sorted(self.features),
                "exclusive_inputs": [sorted(g) for g in self.exclusive_inputs],
                "names_resources": self.names_resources, "secret_envs": list(self.secret_envs),
                "enforces": sorted(self.enforces), "unavailable": dict(self.unavailable)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HandlerInfo":
        return cls(name=str(data["name"]), features=frozenset(data["features"]),
                   exclusive_inputs=tuple(frozenset(g) for g in data["exclusive_inputs"]),
                   names_resources=bool(data["names_resources"]), secret_envs=tuple(data["secret_envs"]),
                   enforces=frozenset(data.get("enforces") or ()),
                   unavailable={str(k): str(v) for k, v in (data.get("unavailable") or {}).items()})


@dataclass
class LoadedExtension:
    manifest: ExtensionManifest
    source: Path
    #: the handler class; None for a ``runtime: process`` extension (never imported here)
    handler: type[SandboxExtension] | None
    #: the config as the handler's model validated it (a plain mapping for a process extension,
    #: validated by its describe worker)
    config: Any
    missing_extra: str | None = None
    #: override files whose ``config:`` was merged over the manifest's, in the order applied
    config_overrides: list[Path] = field(default_factory=list)
    info: HandlerInfo | None = None
    #: a process extension's profile options, validated together by its describe worker
    pending_options: list[dict[str, Any]] = field(default_factory=list, repr=False)
    #: (profile slug, candidate index) -> what of that profile's policy it cannot keep in combination
    refusals: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    #: an installed bundle's unpacked package (sandboxer.trust.installer): its worker's import path
    import_path: Path | None = None
    #: an installed bundle's grants in effect (sandboxer.trust.grants.GrantSet), as the operator narrowed them
    grants: Any = None
    _instance: SandboxExtension | None = field(default=None, repr=False)

    @property
    def exclusive_inputs(self) -> tuple[frozenset[str], ...]:
        return self.info.exclusive_inputs if self.info is not None else ()

    @property
    def enforces(self) -> frozenset[str]:
        """The parts of the sandbox policy this extension keeps (see :mod:`sandboxer.policy`)."""
        return self.info.enforces if self.info is not None else frozenset()

    @property
    def unavailable(self) -> dict[str, str]:
        """What it would enforce but this host cannot, each with why (not in :attr:`enforces`)."""
        return self.info.unavailable if self.info is not None else {}

    @property
    def runtime(self) -> str:
        """Where the handler runs: the manifest's ``runtime``, else ``process`` for a handler
        published by an installed package (an entry point) and ``in-process`` for a built-in."""
        return "process" if _is_process(self.manifest) else "in-process"

    def instance(self, home: Path | None = None, limits: CallLimits | None = None,
                 state: Any = None) -> SandboxExtension:
        """The shared handler instance (created on first use, bound to the manager's home).

        For a ``runtime: process`` extension it is a :class:`~sandboxer.host.client.ProcessExtension`
        proxy, whose worker process starts on the first call; ``limits`` are the manager's call
        deadlines, past which (plus a grace) it kills a worker that has not answered. An installed
        bundle's broker records its decisions in ``state`` (the manager's state store).
        """
        if self.missing_extra:
            raise MissingExtra(self.missing_extra)
        if self._instance is None:
            if self.runtime == "process":
                from sandboxer.host.client import ProcessExtension  # the host sits above the loader

                assert self.info is not None, "described at load"
                from sandboxer.state import default_home  # the state store's module is heavy: only here

                where = home if home is not None else default_home()
                if self.import_path is not None:
                    from sandboxer.trust.installed import InstalledProcessExtension

                    self._instance = InstalledProcessExtension(self.manifest, self.info, home=where, limits=limits,
                                                               import_path=self.import_path, grants=self.grants,
                                                               state=state)
                else:
                    self._instance = ProcessExtension(self.manifest, self.info, home=where, limits=limits)
            else:
                assert self.handler is not None
                inst = self.handler(self.manifest, self.config)
                if home is not None:
                    inst.home = home
                if state is not None and hasattr(inst, "state_store"):  # records of its own (vm-packer's images)
                    inst.state_store = state
                self._instance = inst
        return self._instance


@dataclass
class Catalog:
    """Everything loaded from the config directories, fully validated."""

    registry: Registry
    extensions: dict[str, LoadedExtension]
    profiles: dict[str, Profile]
    profile_sources: dict[str, Path]
    dirs: list[Path]
    settings: Settings = field(default_factory=Settings)
    #: Config dirs shipped by installed packages (entry-point group ``sandboxer.config``).
    package_dirs: list[Path] = field(default_factory=list)
    #: What is valid but cannot work: a profile backend that can never keep the profile's policy.
    warnings: list[str] = field(default_factory=list)


def _files(dirs: list[Path], sub: str, pattern: str) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"config directory {str(d)!r} does not exist")
        for base in (d, d / sub):
            if base.is_dir():
                out.extend(sorted(base.glob(pattern)))
    # the same file reached twice (a dir given twice) is not a duplicate
    seen: dict[Path, Path] = {}
    for p in out:
        seen.setdefault(p.resolve(), p)
    return list(seen.values())


def load_manifest(path: Path, registry: Registry, data: dict[str, Any] | None = None) -> LoadedExtension:
    """Validate one manifest file (``data``: its already-parsed contents, if read)."""
    if data is None:
        data = read_yaml(path, ManifestError)
    try:
        manifest = ExtensionManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(describe_validation(str(path), exc)) from None
    _check_id_matches_name(path, manifest.id)
    caps = manifest.capabilities
    for level in caps.isolation_levels:
        if level not in registry.isolation_levels:
            raise CapabilityError(
                f"{path}: field 'capabilities.isolation_levels' (value {level!r}): unknown isolation level; "
                f"allowed: {', '.join(registry.isolation_levels)}"
            )
    if caps.pricing_model not in registry.pricing_models:
        raise CapabilityError(
            f"{path}: field 'capabilities.pricing_model' (value {caps.pricing_model!r}): unknown pricing model; "
            f"allowed: {', '.join(registry.pricing_models)}"
        )
    for what in caps.enforces or ():
        if what not in ENFORCEMENTS:
            raise CapabilityError(
                f"{path}: field 'capabilities.enforces' (value {what!r}): not a part of the sandbox policy; "
                f"allowed: {', '.join(ENFORCEMENTS)}")
    for feat in caps.features:
        if feat not in registry.features:
            raise CapabilityError(
                f"{path}: field 'capabilities.features' (value {feat!r}): unknown capability; "
                f"allowed: {', '.join(registry.features)}"
            )
    if _is_process(manifest):  # never imported here: its describe worker checks it (describe_process)
        return LoadedExtension(manifest=manifest, source=path, handler=None, config=dict(manifest.config))
    handler = resolve_handler(manifest.handler, where=f"{path}: field 'handler'")
    config, missing = check_handler(str(path), manifest, handler)
    return LoadedExtension(manifest=manifest, source=path, handler=handler, config=config, missing_extra=missing,
                           info=HandlerInfo.of(handler, config, manifest))


def check_handler(source: str, manifest: ExtensionManifest, handler: type[SandboxExtension],
                  config_source: str | None = None) -> tuple[BaseModel, str | None]:
    """Check ``handler`` against its manifest: declared features implemented, every overridden contract
    method callable as the manager calls it, the config valid for its ``Config``.

    Returns:
        The validated config, and the MissingExtra message if its optional SDK is not installed.

    Raises:
        CapabilityError, ManifestError: naming ``source`` (``config_source`` for config errors:
            the override file that last changed it).
    """
    for feat in manifest.capabilities.features:
        problem = check_features(handler, [feat])
        if problem:
            raise CapabilityError(
                f"{source}: field 'capabilities.features' (value {feat!r}): handler "
                f"{handler.__name__} does not implement it: {problem}"
            )
    problem = check_signatures(handler)
    if problem:
        raise CapabilityError(f"{source}: field 'handler' (value {manifest.handler!r}): {problem}")
    for what in manifest.capabilities.enforces or ():
        if what not in handler.enforces:
            keeps = ", ".join(sorted(handler.enforces)) or "nothing"
            raise CapabilityError(
                f"{source}: field 'capabilities.enforces' (value {what!r}): handler {handler.__name__} does not "
                f"enforce it (it keeps: {keeps}); a manifest may declare fewer enforcements than its class, never more")
    try:
        config = handler.Config.model_validate(manifest.config)
    except ValidationError as exc:
        raise ManifestError(describe_validation(config_source or source, exc, prefix="config")) from None
    missing = None
    req = getattr(handler, "requires", None)
    if req is not None:
        module, extra = req
        if importlib.util.find_spec(module) is None:
            missing = f"{manifest.id} needs the Python package {module!r}; {_install_hint(handler, module, extra)}"
    return config, missing


def check_options(handler: type[SandboxExtension], where: str, field_name: str, options: dict[str, Any],
                  profile: Profile | None = None, config: Any = None) -> list[str]:
    """A profile's options for ``handler``, validated by its ``ProfileOptions``; with the ``profile``,
    also that they only narrow its sandbox policy (:meth:`~SandboxExtension.policy_conflicts`).

    Returns:
        what of the profile's policy the handler cannot keep in combination
        (:meth:`~SandboxExtension.policy_refusals`; ``[]`` without a profile).

    Raises:
        ProfileError: naming the profile file (``where``) and ``field_name`` (and the policy field).
    """
    try:
        model = handler.ProfileOptions.model_validate(options)
    except ValidationError as exc:
        raise ProfileError(describe_validation(where, exc, prefix=field_name)) from None
    if profile is None:
        return []
    try:
        conflicts = handler.policy_conflicts(profile, model)
    except ProfileError as exc:  # the handler names the field; the file is ours to name
        raise ProfileError(f"{where}: {exc}") from None
    for option, policy_field in conflicts:
        value: Any = profile
        for part in policy_field.split("."):
            value = getattr(value, part)
        raise ProfileError(
            f"{where}: field '{field_name}.{option}' (value {options.get(option)!r}) widens field {policy_field!r} "
            f"(value {value!r}): backend options may narrow the profile's policy, never widen it; change the "
            f"policy field, or drop the option")
    return list(handler.policy_refusals(profile, model, config))


def _check_id_matches_name(path: Path, ext_id: Any) -> None:
    expected = path.name.removesuffix(".yaml").removesuffix(".yml")
    if ext_id != expected:
        raise ManifestError(f"{path}: field 'id' (value {ext_id!r}): must match the file name {expected!r}")


#: the only part of a manifest an override file may change
OVERRIDABLE = ("config",)
_OVERRIDE_KEYS = frozenset({"id", "override", *OVERRIDABLE})


def apply_override(path: Path, data: dict[str, Any], extensions: dict[str, LoadedExtension]) -> None:
    """Merge an override file's ``config:`` over the extension of its ``id``, and re-validate it.

    Each top-level key of the override replaces the extension's value for that key (a
    list such as compose-ssh's ``hosts`` is replaced whole); keys left out keep their
    values. The merged config is validated by the handler's own ``Config`` model, and
    errors name the override file.

    Raises:
        ManifestError: the override names no known extension, tries to change anything
            but ``config``, or gives a config the handler's model refuses.
    """
    kind = data["override"]
    if kind not in OVERRIDABLE:
        raise ManifestError(
            f"{path}: field 'override' (value {kind!r}): only 'config' can be overridden; "
            f"to change anything else, give the extension a new id in a manifest of its own"
        )
    ext_id = data.get("id")
    if not isinstance(ext_id, str):
        raise ManifestError(f"{path}: field 'id': missing; an override names the extension it changes")
    _check_id_matches_name(path, ext_id)
    loaded = extensions.get(ext_id)
    if loaded is None:
        known = ", ".join(sorted(extensions)) or "none"
        raise ManifestError(f"{path}: field 'id' (value {ext_id!r}): no extension to override; known: {known}")
    extra = [str(k) for k in data if k not in _OVERRIDE_KEYS]
    if extra:
        named = f"field {extra[0]!r}" if len(extra) == 1 else "fields " + ", ".join(repr(k) for k in extra)
        raise ManifestError(
            f"{path}: {named}: an override may change only 'config' (the rest stays as in {loaded.source}); "
            f"remove {'it' if len(extra) == 1 else 'them'}, or give your extension a new id in a manifest of its own"
        )
    if "config" not in data:
        raise ManifestError(f"{path}: field 'config': missing; an override gives the config keys it changes")
    change = data["config"]
    if not isinstance(change, dict):
        raise ManifestError(f"{path}: field 'config': expected a mapping of config keys, got {type(change).__name__}")
    merged = {**loaded.manifest.config, **change}
    if loaded.handler is None:
        loaded.config = merged  # a process extension's: validated by its describe worker, naming this file
    else:
        try:
            loaded.config = loaded.handler.Config.model_validate(merged)
        except ValidationError as exc:
            raise ManifestError(describe_validation(str(path), exc, prefix="config")) from None
        loaded.info = HandlerInfo.of(loaded.handler, loaded.config, loaded.manifest)
    loaded.manifest = loaded.manifest.model_copy(update={"config": merged})
    loaded.config_overrides.append(path)


def _install_hint(handler: type, module: str, extra: str) -> str:
    """How to install an optional SDK: the extra of the distribution that ships ``handler``
    (``sand-boxer[ssh]`` for a built-in, ``my-backend[sdk]`` for a third party's)."""
    from importlib.metadata import packages_distributions

    top = handler.__module__.split(".")[0]
    dists = packages_distributions().get(top) or (["sand-boxer"] if top == "sandboxer" else [])
    if not dists:  # a handler not installed as a distribution (a source tree on the path)
        return f"install it (pip install {module}), or the extra {extra!r} of the package that ships {handler.__module__}"
    return f"install it with: pip install '{dists[0]}[{extra}]'"


def load_profile(path: Path, extensions: dict[str, LoadedExtension]) -> Profile:
    data = read_yaml(path, ProfileError)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(describe_validation(str(path), exc)) from None
    expected = path.name.removesuffix(".yaml").removesuffix(".yml").removeprefix("profile.")
    if profile.slug != expected:
        raise ProfileError(f"{path}: field 'slug' (value {profile.slug!r}): must match the file name {expected!r}")
    bad = RESERVED_INPUTS & (set(profile.inputs.defaults) | set(profile.inputs.required))
    if bad:
        raise ProfileError(f"{path}: field 'inputs': {sorted(bad)} are reserved for the manager")
    if profile.pool is not None and profile.pool.size:
        unset = [k for k in profile.inputs.required if profile.inputs.defaults.get(k) in (None, "")]
        if unset:  # a pooled sandbox is made before any request: from the defaults alone
            raise ProfileError(
                f"{path}: field 'pool' (value size {profile.pool.size}): input {unset[0]!r} is required and has no "
                f"default, and a pooled sandbox is created before any request, from the defaults alone; give "
                f"'inputs.defaults.{unset[0]}', or drop the pool (docs/pools.md)")
    for i, choice in enumerate(profile.candidates):
        field_name = "extension" if profile.backends is None else f"backends.{i}.extension"
        loaded = extensions.get(choice.extension)
        if loaded is None:
            known = ", ".join(sorted(extensions)) or "none"
            raise ProfileError(
                f"{path}: field {field_name!r} (value {choice.extension!r}): no such extension; known: {known}"
            )
        levels = loaded.manifest.capabilities.isolation_levels
        if profile.isolation is not None and profile.isolation not in levels:
            raise ProfileError(
                f"{path}: field 'isolation' (value {profile.isolation!r}): {choice.extension} offers only "
                f"{', '.join(levels)}"
            )
        opts_field = "options" if profile.backends is None else f"backends.{i}.options"
        if loaded.handler is None:
            loaded.pending_options.append({"where": str(path), "field": opts_field, "options": choice.options,
                                           "profile": profile.model_dump(mode="json"), "index": i})
        else:
            refused = check_options(loaded.handler, str(path), opts_field, choice.options, profile, loaded.config)
            if refused:
                loaded.refusals[(profile.slug, i)] = refused
    return profile


def load_catalog(config_dirs: list[Path] | None = None, *, builtins: bool = True,
                 packages: bool | None = None, installed: Path | None = None,
                 only: frozenset[str] | None = None, problems: list[ConfigError] | None = None) -> Catalog:
    """Load and validate the built-in config, installed packages' config, then ``config_dirs``.

    Args:
        config_dirs: the user's config dirs (default: ``SANDBOXER_CONFIG``).
        builtins: include the built-in manifests and profiles.
        packages: include what installed packages ship (:func:`package_config_dirs`); default: with the built-ins.
        installed: a manager's home: include the signed bundles installed there (``<home>/extensions``,
            :mod:`sandboxer.trust.installer`), each run out of process with its package on its worker's path.
        only: load just these extension ids (their manifests and overrides, checked as always) and no
            profiles: what a command about one existing sandbox needs. Every file is still read, so a
            duplicate id or a broken file of another extension is not noticed.
        problems: collect every problem here instead of raising the first (``sandboxer validate``):
            a file with one is left out, and what needs it may add problems of its own.

    Raises:
        ConfigError: (a subclass naming file, field and value) on the first problem, unless ``problems``.
    """
    def guard(step: Callable[[], Any]) -> Any:
        if problems is None:
            return step()
        try:
            return step()
        except ConfigError as exc:
            problems.append(exc)
            return None

    registry = Registry.load()
    user_dirs = list(config_dirs) if config_dirs is not None else config_dirs_from_env()
    pkg_dirs = package_config_dirs() if (builtins if packages is None else packages) else []
    ext_files = (sorted(builtin_dir("extensions").glob("ext.*.yaml")) if builtins else [])
    ext_files += _files(pkg_dirs + user_dirs, "extensions", "ext.*.yaml")
    bundles: dict[Path, Path] = {}
    if installed is not None:
        from sandboxer.bundle_dirs import installed_manifests

        bundles = dict(installed_manifests(installed))
        ext_files += list(bundles)
    prof_files = (sorted(builtin_dir("profiles").glob("profile.*.yaml")) if builtins else [])
    prof_files += _files(pkg_dirs + user_dirs, "profiles", "profile.*.yaml")
    if only is not None:
        prof_files = []

    extensions: dict[str, LoadedExtension] = {}
    overrides: list[tuple[Path, dict[str, Any]]] = []
    def one_manifest(path: Path) -> None:
        data = read_yaml(path, ManifestError)
        if only is not None and data.get("id") not in only:
            return
        if "override" in data:
            overrides.append((path, data))
            return
        if path in bundles and data.get("runtime") != "process":  # checked before any handler is resolved
            raise ManifestError(f"{path}: field 'runtime' (value {data.get('runtime')!r}): an installed bundle "
                                f"always runs out of process; reinstall it (sandboxer extensions remove, install)")
        loaded = load_manifest(path, registry, data)
        if path in bundles:
            from sandboxer.trust.installed import bundle_grants

            loaded.import_path = bundles[path]
            loaded.grants = bundle_grants(path, loaded.manifest.id, user_dirs)
        prior = extensions.get(loaded.manifest.id)
        if prior is not None:
            raise ManifestError(
                f"{path}: field 'id' (value {loaded.manifest.id!r}): duplicate id, already defined in {prior.source}; "
                f"to change only its config, make this file hold just 'id: {loaded.manifest.id}', "
                f"'override: config' and the 'config:' keys to change, or give your extension a new id"
            )
        extensions[loaded.manifest.id] = loaded

    for path in ext_files:
        guard(lambda: one_manifest(path))
    # Overrides apply once every manifest is known, in file order (a later config dir's wins).
    for path, data in overrides:
        guard(lambda: apply_override(path, data, extensions))

    profiles: dict[str, Profile] = {}
    sources: dict[str, Path] = {}

    def one_profile(path: Path) -> None:
        profile = load_profile(path, extensions)
        if profile.slug in profiles:
            raise ProfileError(
                f"{path}: field 'slug' (value {profile.slug!r}): duplicate slug, already defined in {sources[profile.slug]}"
            )
        profiles[profile.slug] = profile
        sources[profile.slug] = path

    for path in prof_files:
        guard(lambda: one_profile(path))
    pending = [x for x in extensions.values() if x.handler is None]
    if pending:
        from sandboxer.host.client import describe_process  # the host sits above the loader

        def describe(loaded: LoadedExtension) -> None:
            if loaded.import_path is not None:
                from sandboxer.trust.installed import check_secrets_granted, describe_installed

                describe_installed(loaded, loaded.import_path)
                check_secrets_granted(loaded)
            else:
                describe_process(loaded)

        for loaded in pending:
            guard(lambda: describe(loaded))
    warnings = [w for slug, prof in profiles.items() for w in _never_qualifies(sources[slug], prof, extensions)]
    # settings (budgets, sinks) are the operator's: never from a package
    settings = guard(lambda: load_settings(user_dirs)) or Settings()
    return Catalog(registry, extensions, profiles, sources, user_dirs, settings, pkg_dirs, warnings)


def _never_qualifies(path: Path, profile: Profile, extensions: dict[str, LoadedExtension]) -> list[str]:
    need = profile.enforcements()
    out = []
    for i, choice in enumerate(profile.candidates):
        ext = extensions[choice.extension]
        missing = lacking(need, ext.enforces)
        refused = ext.refusals.get((profile.slug, i))
        if refused and not missing:
            field_name = "extension" if profile.backends is None else f"backends.{i}.extension"
            out.append(f"{path}: field {field_name!r} (value {choice.extension!r}): it can never run this profile's "
                       f"sandboxes: {'; '.join(refused)}")
        if missing:
            field_name = "extension" if profile.backends is None else f"backends.{i}.extension"
            out.append(f"{path}: field {field_name!r} (value {choice.extension!r}): it can never run this profile's "
                       f"sandboxes: it does not enforce {describe_lacking(missing, ext.unavailable)} (the profile's policy needs "
                       f"{', '.join(need)}); `sandboxer profiles explain {profile.slug}` says more")
    return out


def load_settings(dirs: list[Path]) -> Settings:
    """Merge ``settings.yaml`` of each config dir; a later dir's entries win."""
    merged: dict[str, Any] = {"budgets": {}, "sinks": {}}
    for d in dirs:
        path = d / "settings.yaml"
        if not path.is_file():
            continue
        data = read_yaml(path, ConfigError, empty_ok=True)
        try:
            one = Settings.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe_validation(str(path), exc)) from None
        merged["budgets"].update(one.model_dump()["budgets"])
        merged["sinks"].update(one.model_dump()["sinks"])
        if one.default_sink:
            merged["default_sink"] = one.default_sink
    settings = Settings.model_validate(merged)
    if settings.default_sink and settings.default_sink not in settings.sinks:
        raise ConfigError(f"settings: field 'default_sink' (value {settings.default_sink!r}): no such sink")
    return settings


