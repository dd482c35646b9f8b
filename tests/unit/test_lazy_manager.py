"""A lazy Manager (what the CLI makes): nothing of the catalog loads until asked, then only what is asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sandboxer import Manager, SandboxCreateRequest

BACKEND_MODULES = """
import json, sys
from sandboxer.manager import Manager
mgr = Manager(home=sys.argv[1], lazy=True)
{body}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("sandboxer.extensions.")
                        and m.rsplit(".", 1)[-1] not in ("base", "registry"))))
"""


def _modules(home, body: str) -> list[str]:
    p = subprocess.run([sys.executable, "-c", BACKEND_MODULES.format(body=body), str(home)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "SANDBOXER_CONFIG": ""})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_list_and_status_import_no_backend(home):
    with Manager(home=home) as mgr:
        sb = mgr.create(SandboxCreateRequest(profile="local", consumer="t", ttl=600))
    try:
        assert _modules(home, f"mgr.list(); mgr.get({sb.id!r})") == []
        # exec needs the sandbox's own extension, and no other
        loaded = _modules(home, f"assert mgr.exec({sb.id!r}, ['true']).exit_code == 0")
        assert "sandboxer.extensions.local" in loaded
        others = {"docker", "e2b", "modal", "daytona", "compose_ssh", "vm_packer", "saas_stub"}
        assert not others & {m.rsplit(".", 1)[-1] for m in loaded}, loaded
    finally:
        with Manager(home=home) as mgr:
            mgr.teardown(sb.id)


def test_one_extension_then_the_whole_catalog_share_one_instance(home):
    with Manager(home=home) as mgr:
        sb = mgr.create(SandboxCreateRequest(profile="local", consumer="t", ttl=600))
    with Manager(home=home, lazy=True) as lazy:
        assert lazy.exec(sb.id, ["echo", "hi"]).stdout == "hi\n"
        first = lazy.extension("ext.local")
        assert lazy._catalog is None  # only ext.local's manifest was loaded
        assert "local" in lazy.catalog.profiles  # now everything, checked
        assert lazy.extension("ext.local") is first
        assert lazy.teardown(sb.id).state == "terminated"


def test_a_broken_manifest_surfaces_at_first_use(home, cfg):
    path = cfg.write("ext.broken.yaml", "id: ext.broken\n")
    lazy = Manager(config_dirs=[cfg.root], home=home, lazy=True)
    try:
        assert lazy.list() == []
        try:
            lazy.profile("local")
        except Exception as exc:  # noqa: BLE001 - the loader's own ConfigError
            assert str(path) in str(exc) and "field 'title'" in str(exc)
        else:
            raise AssertionError("a broken manifest loaded")
    finally:
        lazy.close()
