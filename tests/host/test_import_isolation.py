"""A ``runtime: process`` handler is never imported into the manager: its describe worker checks it.

Importing a third party's module runs its code with the manager's environment (its keys) and
its state store at hand; a crash at import would take the manager down with it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from sandboxer import Manager
from sandboxer.errors import ExtensionLoadError, ManifestError, ProfileError

MANIFEST = """
    id: ext.{name}
    title: {name}
    version: 0.1.0
    handler: {handler}
    capabilities: {{isolation_levels: [none], pricing_model: free, features: [exec, list_owned]}}
    {extra}
"""


def _write(cfg, name: str, handler: str, extra: str = "") -> None:  # type: ignore[no-untyped-def]
    cfg.write(f"ext.{name}.yaml", MANIFEST.format(name=name, handler=handler, extra=extra))


def test_a_process_handler_is_imported_by_a_worker_never_by_the_manager(installed_examples, cfg, home,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("SANDBOXER_TEST_SENTINEL", "the manager's secret")
    marker = installed_examples / "misbehaving_ext" / "imported-by.json"
    marker.unlink(missing_ok=True)
    _write(cfg, "noisy", "noisy-import")
    with Manager(config_dirs=[cfg.root], home=home) as mgr:
        loaded = mgr.catalog.extensions["ext.noisy"]
        assert loaded.handler is None and loaded.runtime == "process"
        assert loaded.info.features == {"exec", "list_owned"}
        assert "misbehaving_ext.noisy_import" not in sys.modules
        seen = json.loads(marker.read_text())
        assert seen["pid"] != os.getpid() and seen["sentinel"] is False  # a worker, with a minimal environment


def test_a_handler_that_aborts_at_import_fails_the_load_and_the_manager_lives(installed_examples, cfg, home) -> None:
    _write(cfg, "aborts", "abort-import")
    with pytest.raises(ExtensionLoadError) as err:
        Manager(config_dirs=[cfg.root], home=home)
    msg = str(err.value)
    assert msg.startswith(f"{cfg.root / 'extensions' / 'ext.aborts.yaml'}: field 'handler' (value 'abort-import'): "
                          "the worker loading the handler died of signal SIGABRT without an answer; last stderr: ")
    assert "abort_import: aborting at import" in msg


def test_a_process_extensions_bad_config_names_the_file_and_field(installed_examples, cfg, home) -> None:
    _write(cfg, "badcfg", "misbehaving", extra="config: {colour: blue}")
    with pytest.raises(ManifestError, match=r"ext\.badcfg\.yaml: field 'config\.colour' \(value 'blue'\): "
                                            r"unknown field$"):
        Manager(config_dirs=[cfg.root], home=home)


def test_a_profiles_bad_options_for_a_process_extension_name_the_profile(installed_examples, cfg, home) -> None:
    _write(cfg, "opts", "misbehaving")
    cfg.write("profile.opts.yaml", "slug: opts\nextension: ext.opts\noptions: {size: 3}\n")
    with pytest.raises(ProfileError, match=r"profile\.opts\.yaml: field 'options\.size' \(value 3\): unknown field$"):
        Manager(config_dirs=[cfg.root], home=home)


def test_an_override_of_a_process_extensions_config_is_checked_naming_the_override(installed_examples, cfg,
                                                                                      home, tmp_path) -> None:
    _write(cfg, "ovr", "misbehaving")
    other = tmp_path / "ops"
    (other / "extensions").mkdir(parents=True)
    (other / "extensions" / "ext.ovr.yaml").write_text("id: ext.ovr\noverride: config\nconfig: {bogus: 1}\n")
    with pytest.raises(ManifestError, match=rf"^{other / 'extensions' / 'ext.ovr.yaml'}: field 'config\.bogus'"):
        Manager(config_dirs=[cfg.root, other], home=home)
