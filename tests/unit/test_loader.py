"""Bad manifests and profiles fail at load time with a message naming file, field and value."""

from __future__ import annotations

import sys

import pytest

from sandboxer import Manager, load_catalog
from sandboxer.errors import (
    CapabilityError,
    ConfigError,
    ExtensionLoadError,
    ManifestError,
    ProfileError,
    SandboxerError,
)
from tests.conftest import FAKE_EXT, FAKE_PROFILE


def test_builtin_catalog_loads():
    cat = load_catalog([])
    assert {"ext.local", "ext.saas-stub"} <= set(cat.extensions)
    assert {"local", "saas-stub"} <= set(cat.profiles)


def test_user_config_adds_extension_and_profile(cfg):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.fake.yaml", FAKE_PROFILE)
    cat = load_catalog([cfg.root])
    assert cat.profiles["fake"].candidates[0].extension == "ext.fake"


def test_config_dirs_from_environment(cfg, monkeypatch):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    monkeypatch.setenv("SANDBOXER_CONFIG", str(cfg.root))
    assert "ext.fake" in load_catalog().extensions


def test_malformed_yaml_names_file_and_line(cfg):
    path = cfg.write("ext.fake.yaml", "id: ext.fake\ntitle: [unclosed\n")
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    assert str(path) in str(e.value) and "invalid YAML" in str(e.value) and "line" in str(e.value)


def test_unknown_field(cfg):
    path = cfg.write("ext.fake.yaml", FAKE_EXT + "    colour: red\n")
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    assert f"{path}: field 'colour'" in str(e.value) and "unknown field" in str(e.value)


def test_unknown_capability(cfg):
    cfg.write("ext.fake.yaml", FAKE_EXT.replace("[exec, snapshots, list_owned]", "[exec, teleport]"))
    with pytest.raises(CapabilityError) as e:
        load_catalog([cfg.root])
    assert "capabilities.features" in str(e.value) and "'teleport'" in str(e.value) and "unknown capability" in str(e.value)


def test_unknown_isolation_level_and_pricing_model(cfg):
    cfg.write("ext.fake.yaml", FAKE_EXT.replace("[none]", "[quantum]"))
    with pytest.raises(CapabilityError, match=r"isolation_levels.*'quantum'.*allowed: process"):
        load_catalog([cfg.root])
    cfg.write("ext.fake.yaml", FAKE_EXT.replace("pricing_model: free", "pricing_model: barter"))
    with pytest.raises(CapabilityError, match=r"pricing_model.*'barter'"):
        load_catalog([cfg.root])


def test_feature_the_handler_does_not_implement(cfg):
    text = FAKE_EXT.replace("sandboxer.extensions.fake:FakeExtension", "sandboxer.extensions.local:LocalExtension")
    cfg.write("ext.fake.yaml", text.replace("[exec, snapshots, list_owned]", "[exec, metering]"))
    with pytest.raises(CapabilityError, match="'metering'.*LocalExtension does not implement it"):
        load_catalog([cfg.root])


def test_profile_naming_missing_extension(cfg):
    path = cfg.write("profile.fake.yaml", FAKE_PROFILE)
    with pytest.raises(ProfileError) as e:
        load_catalog([cfg.root])
    assert f"{path}: field 'extension' (value 'ext.fake'): no such extension" in str(e.value)


def test_python_object_tag_is_refused(cfg, tmp_path):
    marker = tmp_path / "pwned"
    path = cfg.write("ext.fake.yaml", f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    assert str(path) in str(e.value) and "python/object/apply" in str(e.value)
    assert not marker.exists()


def test_handler_outside_allowed_set_is_never_imported(cfg, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    pkg = tmp_path / "evilpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for handler in ("evilpkg:Evil", "sandboxer.extensions.nope:X", "sandboxer.extensions.local", "os:system"):
        cfg.write("ext.fake.yaml", FAKE_EXT.replace("sandboxer.extensions.fake:FakeExtension", handler))
        with pytest.raises(ExtensionLoadError) as e:
            load_catalog([cfg.root])
        assert f"handler {handler!r} is not allowed and was not imported" in str(e.value)
    assert not marker.exists() and "evilpkg" not in sys.modules


def test_handler_must_subclass_contract(cfg):
    cfg.write("ext.fake.yaml", FAKE_EXT.replace("fake:FakeExtension", "fake:ExecError"))
    with pytest.raises(ExtensionLoadError, match="not a SandboxExtension subclass"):
        load_catalog([cfg.root])


def test_duplicate_ids(cfg, tmp_path):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    other = tmp_path / "other"
    (other / "extensions").mkdir(parents=True)
    (other / "extensions" / "ext.fake.yaml").write_text((cfg.root / "extensions" / "ext.fake.yaml").read_text())
    with pytest.raises(ManifestError, match="duplicate id, already defined in"):
        load_catalog([cfg.root, other])
    cfg.write("ext.local.yaml", FAKE_EXT.replace("ext.fake", "ext.local"))
    with pytest.raises(ManifestError, match="'ext.local'.*duplicate id"):
        load_catalog([cfg.root])


def test_id_must_match_file_name(cfg):
    cfg.write("ext.other.yaml", FAKE_EXT)
    with pytest.raises(ManifestError, match="must match the file name 'ext.other'"):
        load_catalog([cfg.root])


def test_handler_config_validated_by_its_own_model(cfg):
    text = FAKE_EXT.replace("sandboxer.extensions.fake:FakeExtension", "sandboxer.extensions.saas_stub:SaasStubExtension")
    cfg.write("ext.fake.yaml", text.replace("[exec, snapshots, list_owned]", "[exec]") + "    config:\n      capacity: -3\n")
    with pytest.raises(ManifestError, match=r"field 'config.capacity' \(value -3\)"):
        load_catalog([cfg.root])


def test_profile_options_validated_by_backend_model(cfg):
    cfg.write("profile.x.yaml", "slug: x\nextension: ext.local\noptions: {netwrk: true}\n")
    with pytest.raises(ProfileError, match=r"field 'options.netwrk'.*unknown field"):
        load_catalog([cfg.root])


@pytest.mark.parametrize("ttl, msg", [
    ("{default: -5m, max: 1h}", "must not be negative"),
    ("{default: 2h, max: 1h}", "over max"),
    ("{default: soon}", "not a duration"),
])
def test_bad_ttl_in_profile(cfg, ttl, msg):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.fake.yaml", FAKE_PROFILE.replace("{default: 10m, max: 1h}", ttl))
    with pytest.raises(ProfileError, match=msg) as e:
        load_catalog([cfg.root])
    assert "profile.fake.yaml: field 'ttl" in str(e.value)


def test_profile_isolation_must_be_offered(cfg):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.fake.yaml", FAKE_PROFILE + "    isolation: vm\n")
    with pytest.raises(ProfileError, match="'isolation' \\(value 'vm'\\): ext.fake offers only none"):
        load_catalog([cfg.root])


def test_reserved_inputs_in_profile(cfg):
    cfg.write("ext.fake.yaml", FAKE_EXT)
    cfg.write("profile.fake.yaml", FAKE_PROFILE.replace("{color: blue}", "{sandbox_id: x}"))
    with pytest.raises(ProfileError, match="reserved for the manager"):
        load_catalog([cfg.root])


def test_missing_config_dir_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_catalog([tmp_path / "nope"])


def test_manager_start_fails_on_broken_manifest(cfg, home):
    cfg.write("ext.fake.yaml", FAKE_EXT + "    bogus: 1\n")
    with pytest.raises(ManifestError, match="bogus"):
        Manager(config_dirs=[cfg.root], home=home)


def test_json_schemas_for_both_kinds():
    from sandboxer.models import ExtensionManifest, Profile

    assert ExtensionManifest.model_json_schema()["additionalProperties"] is False
    assert "ttl" in Profile.model_json_schema()["properties"]


# ------------------------------------------------- overriding a built-in's config

def test_config_override_reaches_the_manager(cfg, make_manager):
    path = cfg.write("ext.saas-stub.yaml", """
        # point the shipped stand-in at my own limits
        id: ext.saas-stub
        override: config
        config: {capacity: 1}
    """)
    cat = load_catalog([cfg.root])
    loaded = cat.extensions["ext.saas-stub"]
    assert loaded.config.capacity == 1
    assert loaded.config.latency_s == 0.05  # keys left out keep the built-in's values
    assert loaded.manifest.config == {"latency_s": 0.05, "capacity": 1}
    assert loaded.config_overrides == [path] and loaded.source.name == "ext.saas-stub.yaml"
    assert loaded.source != path and loaded.manifest.handler.endswith("SaasStubExtension")
    mgr = make_manager()
    assert mgr.extension("ext.saas-stub").config.capacity == 1
    mgr.create(profile="saas-stub")
    with pytest.raises(SandboxerError, match="capacity"):
        mgr.create(profile="saas-stub")


def test_later_config_dir_overrides_on_top(cfg, tmp_path):
    cfg.write("ext.saas-stub.yaml", "id: ext.saas-stub\noverride: config\nconfig: {capacity: 3, latency_s: 0}\n")
    other = tmp_path / "other"
    (other / "extensions").mkdir(parents=True)
    second = other / "extensions" / "ext.saas-stub.yaml"
    second.write_text("id: ext.saas-stub\noverride: config\nconfig: {capacity: 7}\n")
    loaded = load_catalog([cfg.root, other]).extensions["ext.saas-stub"]
    assert (loaded.config.capacity, loaded.config.latency_s) == (7, 0)
    assert loaded.config_overrides == [cfg.root / "extensions" / "ext.saas-stub.yaml", second]


def test_bad_override_value_names_file_and_field(cfg):
    path = cfg.write("ext.saas-stub.yaml", "id: ext.saas-stub\noverride: config\nconfig: {capacity: -3}\n")
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    assert str(e.value).startswith(f"{path}: field 'config.capacity' (value -3)")
    path.write_text("id: ext.saas-stub\noverride: config\nconfig: {capacty: 3}\n")
    with pytest.raises(ManifestError, match=r"ext.saas-stub.yaml: field 'config.capacty'.*unknown field"):
        load_catalog([cfg.root])


def test_override_of_unknown_id_is_an_error(cfg):
    path = cfg.write("ext.nope.yaml", "id: ext.nope\noverride: config\nconfig: {capacity: 1}\n")
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    assert str(e.value).startswith(f"{path}: field 'id' (value 'ext.nope'): no extension to override; known: ")


@pytest.mark.parametrize("extra, message", [
    ("handler: sandboxer.extensions.fake:FakeExtension\n", "field 'handler': an override may change only 'config'"),
    ("capabilities: {isolation_levels: [none], pricing_model: free}\n",
     "field 'capabilities': an override may change only 'config'"),
])
def test_override_may_change_only_config(cfg, extra, message):
    path = cfg.write("ext.saas-stub.yaml", "id: ext.saas-stub\noverride: config\nconfig: {capacity: 1}\n" + extra)
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    assert str(e.value).startswith(f"{path}: {message}")


def test_copied_manifest_marked_override_lists_what_cannot_change(cfg):
    from sandboxer.loader import builtin_dir

    shipped = builtin_dir("extensions") / "ext.saas-stub.yaml"
    path = cfg.write("ext.saas-stub.yaml", shipped.read_text() + "override: config\n")
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    assert str(e.value).startswith(
        f"{path}: fields 'title', 'version', 'handler', 'capabilities', 'pricing': an override may change only "
        f"'config' (the rest stays as in {shipped}); remove them")


def test_override_kind_and_config_are_checked(cfg):
    path = cfg.write("ext.saas-stub.yaml", "id: ext.saas-stub\noverride: handler\nconfig: {}\n")
    with pytest.raises(ManifestError, match=r"field 'override' \(value 'handler'\): only 'config' can be overridden"):
        load_catalog([cfg.root])
    path.write_text("id: ext.saas-stub\noverride: config\n")
    with pytest.raises(ManifestError, match=r"field 'config': missing"):
        load_catalog([cfg.root])
    path.write_text("id: ext.saas-stub\noverride: config\nconfig: [capacity, 1]\n")
    with pytest.raises(ManifestError, match=r"field 'config': expected a mapping of config keys, got list"):
        load_catalog([cfg.root])


def test_accidental_duplicate_of_builtin_says_how_to_override(cfg):
    from sandboxer.loader import builtin_dir

    shipped = builtin_dir("extensions") / "ext.saas-stub.yaml"
    path = cfg.write("ext.saas-stub.yaml", shipped.read_text().replace("capacity: 20", "capacity: 2"))
    with pytest.raises(ManifestError) as e:
        load_catalog([cfg.root])
    msg = str(e.value)
    assert msg.startswith(f"{path}: field 'id' (value 'ext.saas-stub'): duplicate id, already defined in {shipped}")
    assert "override: config" in msg and "\n" not in msg


def test_compose_ssh_pointed_at_my_hosts(cfg):
    path = cfg.write("ext.compose-ssh.yaml", """
        id: ext.compose-ssh
        override: config
        config:
          hosts:   # replaces the shipped list whole
            - {name: build1, address: 10.0.0.5, user: ci, key_file: /keys/ci, capacity: 8}
    """)
    loaded = load_catalog([cfg.root]).extensions["ext.compose-ssh"]
    assert [(h.name, h.address, h.capacity) for h in loaded.config.hosts] == [("build1", "10.0.0.5", 8)]
    assert loaded.config.workspace_root == "/var/lib/sandboxer/compose" and loaded.config_overrides == [path]
    path.write_text("id: ext.compose-ssh\noverride: config\nconfig:\n  hosts: [{name: b, address: 'h x', user: ci}]\n")
    with pytest.raises(ManifestError, match=r"ext.compose-ssh.yaml: field 'config.hosts.0.address' \(value 'h x'\)"):
        load_catalog([cfg.root])


# ------------------------------------------------------------ features checked against the class (issue 9)

def _handler(**methods):
    from sandboxer.extensions.base import SandboxExtension

    def _req(self, *a, **k):  # noqa: ANN001 - the required trio
        return {}

    body = {"provision": _req, "wait_ready": _req, "teardown": _req,
            "features": frozenset({"exec", "snapshots", "list_owned", "metering"}), **methods}
    return type("Broken", (SandboxExtension,), body)


@pytest.mark.parametrize("methods, feature, message", [
    ({}, "snapshots", "Broken declares 'snapshots' but does not implement snapshot()"),
    ({"snapshot": lambda self, handle: {}}, "snapshots",
     "Broken declares 'snapshots' but does not implement restore_from_snapshot()"),
    ({"exec": lambda self, handle: None}, "exec", "does not take the argument 'argv'"),
    ({"exec": lambda self, handle, argv, *, env=None, timeout=None: None}, "exec",
     "does not take the keyword argument 'cwd'"),
    ({"list_owned": lambda self, owner_labels, region: []}, "list_owned",
     "requires arguments the manager never passes: region"),
])
def test_a_declared_feature_must_be_implemented_with_the_contracts_signature(methods, feature, message):
    from sandboxer.extensions.base import check_features

    assert message in check_features(_handler(**methods), [feature])


def test_a_feature_implemented_with_kwargs_passes():
    from sandboxer.extensions.base import check_features

    cls = _handler(exec=lambda self, handle, argv, **kw: None, list_owned=lambda self, *a: [])
    assert check_features(cls, ["exec", "list_owned"]) is None


def test_loading_a_manifest_whose_class_lacks_a_declared_feature_names_both(cfg, monkeypatch):
    import sandboxer.loader as loader

    real = loader.resolve_handler
    monkeypatch.setattr(loader, "resolve_handler",
                        lambda spec, where: _handler() if "ext.broken" in where else real(spec, where=where))
    cfg.write("ext.broken.yaml", """
        id: ext.broken
        title: broken
        version: 1.0.0
        handler: sandboxer.extensions.fake:FakeExtension
        capabilities: {isolation_levels: [none], pricing_model: free, features: [snapshots]}
    """)
    with pytest.raises(CapabilityError, match=r"ext.broken.yaml: field 'capabilities.features' \(value 'snapshots'\): "
                                              r"handler Broken does not implement it: Broken declares 'snapshots' but "
                                              r"does not implement snapshot\(\)"):
        load_catalog([cfg.root])


def test_a_contract_method_written_for_the_old_contract_fails_the_load_naming_it(cfg, monkeypatch):
    """Not only feature methods: resource_names(profile, inputs, host) used to load, then fail on the first create."""
    import sandboxer.loader as loader

    old = _handler(resource_names=lambda self, profile, inputs, host: [])
    real = loader.resolve_handler
    monkeypatch.setattr(loader, "resolve_handler",
                        lambda spec, where: old if "ext.old" in where else real(spec, where=where))
    cfg.write("ext.old.yaml", """
        id: ext.old
        title: old
        version: 1.0.0
        handler: sandboxer.extensions.fake:FakeExtension
        capabilities: {isolation_levels: [none], pricing_model: free}
    """)
    with pytest.raises(CapabilityError, match=r"ext.old.yaml: field 'handler' \(value 'sandboxer.extensions.fake:"
                                              r"FakeExtension'\): Broken.resource_names\(self, profile, inputs, host\) "
                                              r"requires arguments the manager never passes: profile, inputs, host \(the contract: "
                                              r"resource_names\(self, request: 'ProvisionRequest'\)"):
        load_catalog([cfg.root])
