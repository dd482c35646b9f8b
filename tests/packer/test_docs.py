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


def test_the_build_mode_examples_work_as_pasted(tmp_path, monkeypatch, packer_bin):
    blocks = _blocks()
    monkeypatch.setenv("HOME", str(tmp_path))
    tpl_title = "~/.config/sandboxer/packer/haskell-vm.pkr.hcl"
    tpl = Path(tpl_title).expanduser()
    tpl.parent.mkdir(parents=True)
    tpl.write_text(blocks[tpl_title])
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
