"""docs/backends/vm-packer.md's build-mode examples as pasted: the template is one packer accepts
(with the variables sandboxer sets), and the profile loads with it in place."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from sandboxer.extensions.vm_packer import VMProfileOptions
from sandboxer.extensions.vm_packer_build import parse_inspect
from sandboxer.models import Profile

DOC = Path(__file__).resolve().parents[2] / "docs" / "backends" / "vm-packer.md"
FENCE = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```\n', re.MULTILINE | re.DOTALL)


def _blocks() -> dict[str, str]:
    return {title: body for _lang, title, body in FENCE.findall(DOC.read_text(encoding="utf-8"))}


def _paste_template(blocks: dict[str, str], home: Path, monkeypatch) -> Path:
    """The doc's template written where its title says, under ``home`` (made $HOME)."""
    monkeypatch.setenv("HOME", str(home))
    title = "~/.config/sandboxer/packer/haskell-vm.pkr.hcl"
    tpl = Path(title).expanduser()
    tpl.parent.mkdir(parents=True)
    tpl.write_text(blocks[title])
    return tpl


def test_the_build_mode_examples_work_as_pasted(tmp_path, monkeypatch, packer_bin):
    blocks = _blocks()
    tpl = _paste_template(blocks, tmp_path, monkeypatch)
    profile = Profile.model_validate(yaml.safe_load(blocks["profiles/profile.vm-haskell-packer.yaml"]))
    opts = VMProfileOptions.model_validate(profile.options)
    assert opts.packer.template == tpl and opts.packer.timeout == 1800
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CHECKPOINT_DISABLE": "1"}
    res = subprocess.run([packer_bin, "inspect", "-machine-readable", str(tpl)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    info = parse_inspect(res.stdout)
    assert info.builders == ["null"]
    assert set(opts.packer.variables) <= info.variables
    assert {"sandboxer_ssh_host", "sandboxer_ssh_port", "sandboxer_ssh_username",
            "sandboxer_ssh_private_key_file"} <= info.variables
    assert shutil.which("packer")


def test_the_build_mode_console_example_builds_as_pasted(tmp_path, monkeypatch, packer_bin, vm, known_hosts):
    """The template and profile as pasted, on a manifest whose inventory's haskell-builder-1 is a real
    sshd: ``sandboxer images build vm-haskell-packer`` prints what the console example shows."""
    from click.testing import CliRunner

    from sandboxer.cli import cli

    blocks = _blocks()
    tpl = _paste_template(blocks, tmp_path, monkeypatch)
    cfg = tmp_path / "cfg"
    (cfg / "profiles").mkdir(parents=True)
    (cfg / "extensions").mkdir()
    (cfg / "profiles" / "profile.vm-haskell-packer.yaml").write_text(blocks["profiles/profile.vm-haskell-packer.yaml"])
    manifest = {"id": "ext.vm-packer", "override": "config", "config": {
        "packer": packer_bin,
        "vms": {"haskell-builder-1": {**vm.host_config(known_hosts), "workspace_root": str(tmp_path / "ws")}}}}
    (cfg / "extensions" / "ext.vm-packer.yaml").write_text(yaml.safe_dump(manifest))
    base = ["--home", str(tmp_path / "home"), "--config", str(cfg)]
    res = CliRunner().invoke(cli, [*base, "images", "build", "vm-haskell-packer"])
    assert res.exit_code == 0, res.output
    console = re.search(r"```console\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL).group(1).splitlines()
    assert console[1].startswith("==> null.vm: Using ssh communicator to connect: ")
    assert any(line.startswith("==> null.vm: Using ssh communicator to connect: 127.0.0.1")
               for line in res.output.splitlines()), res.output
    assert "provisioning ghc 9.4.8" in res.output
    shown = re.escape(console[3]).replace("3f2a9c0d1e2b4a5c", "[0-9a-f]{16}").replace(
        re.escape("/home/me/.config/sandboxer/packer/haskell-vm.pkr.hcl"), re.escape(str(tpl)))
    assert re.fullmatch(shown, res.output.rstrip().splitlines()[-1]), res.output.splitlines()[-1]
    listed = CliRunner().invoke(cli, [*base, "images", "list", "--json"])
    [image] = __import__("json").loads(listed.output)
    assert image["profile"] == "vm-haskell-packer" and image["state"] == "ready"
