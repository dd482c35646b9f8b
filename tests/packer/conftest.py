"""Fixtures for vm-packer's build mode: Debian's real ``packer``, a real sshd standing in for the VM
Packer provisions (its null builder) and vm-packer then attaches to, and a config dir as an operator
writes it, with a ``packer`` wrapper that counts the builds it runs."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from sandboxer import Manager
from tests.support.sshd import SSHD, sshd_or_skip

pytest.importorskip("paramiko", reason="the ssh extra (paramiko) is not installed")

EXT = "ext.test-vm"
PACKER = shutil.which("packer")

#: A template that provisions the VM over SSH (the null builder): it installs ``mytool`` into
#: ``bin_dir`` (first on the VM's PATH), printing the ``tool_version`` it was built with.
TEMPLATE = textwrap.dedent("""\
    variable "sandboxer_ssh_host" { type = string }
    variable "sandboxer_ssh_port" { type = number }
    variable "sandboxer_ssh_username" { type = string }
    variable "sandboxer_ssh_private_key_file" { type = string }
    variable "bin_dir" { type = string }
    variable "tool_version" {
      type    = string
      default = "1"
    }
    variable "pause" {
      type    = number
      default = 0
    }

    source "null" "vm" {
      communicator         = "ssh"
      ssh_host             = var.sandboxer_ssh_host
      ssh_port             = var.sandboxer_ssh_port
      ssh_username         = var.sandboxer_ssh_username
      ssh_private_key_file = var.sandboxer_ssh_private_key_file
    }

    build {
      sources = ["source.null.vm"]
      provisioner "shell-local" {
        inline = ["sleep ${var.pause}"]
      }
      provisioner "shell" {
        inline = [
          "mkdir -p ${var.bin_dir}",
          "printf '#!/bin/sh\\\\necho tool ${var.tool_version}\\\\n' > ${var.bin_dir}/mytool",
          "chmod +x ${var.bin_dir}/mytool",
        ]
      }
    }
    """)


@pytest.fixture(scope="session")
def packer_bin() -> str:
    if PACKER is None:
        pytest.fail("packer is not installed (Debian package packer; tests/setup/debian-packages.txt)",
                    pytrace=False)
    return PACKER


@pytest.fixture
def vm_bin(tmp_path: Path) -> Path:
    """The directory first on the VM's PATH, where the template installs ``mytool``."""
    d = tmp_path / "vm-bin"
    d.mkdir()
    return d


@pytest.fixture
def vm(tmp_path: Path, vm_bin: Path) -> Iterator[SSHD]:
    server = sshd_or_skip(tmp_path / "vm", path_prepend=[str(vm_bin)])
    yield server
    server.stop()


@pytest.fixture
def counting_packer(tmp_path: Path, packer_bin: str) -> Path:
    """A ``packer`` that notes each ``packer build`` in ``builds.log``, then runs the real one."""
    log = tmp_path / "builds.log"
    wrapper = tmp_path / "packer-wrapper" / "packer"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = build ] && echo build >> {log}\nexec {packer_bin} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def builds(tmp_path: Path) -> int:
    log = tmp_path / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "templates" / "tool.pkr.hcl"
    path.parent.mkdir()
    path.write_text(TEMPLATE)
    return path


def write_config(cfg_dir: Path, vm: SSHD, known_hosts: Path, packer: Path, profiles: dict[str, dict[str, Any]],
                 root: Path) -> Path:
    (cfg_dir / "extensions").mkdir(parents=True, exist_ok=True)
    (cfg_dir / "profiles").mkdir(parents=True, exist_ok=True)
    manifest = {"id": EXT, "title": "test", "version": "0.1.0",
                "handler": "sandboxer.extensions.vm_packer:VMPacker",
                "capabilities": {"isolation_levels": ["vm"], "pricing_model": "self-hosted",
                                 "features": ["exec", "snapshots", "list_owned"]},
                "config": {"vms": {"vm0": {**vm.host_config(known_hosts), "workspace_root": str(root)}},
                           "packer": str(packer)}}
    (cfg_dir / "extensions" / f"{EXT}.yaml").write_text(yaml.safe_dump(manifest))
    for slug, body in profiles.items():
        body = {"extension": EXT, "network": {"egress": "internet"}, "inputs": {"defaults": {"vm": "vm0"}}, **body}
        (cfg_dir / "profiles" / f"profile.{slug}.yaml").write_text(yaml.safe_dump({"slug": slug, **body}))
    return cfg_dir


@pytest.fixture
def known_hosts(tmp_path: Path, vm: SSHD) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(vm.known_hosts_line())
    return path


def build_profile(template: Path, vm_bin: Path, **variables: Any) -> dict[str, Any]:
    return {"ready_timeout": 30,
            "options": {"require_commands": ["mytool"], "readiness_command": ["mytool"],
                        "packer": {"template": str(template), "timeout": 60,
                                   "variables": {"bin_dir": str(vm_bin), **variables}}}}


@pytest.fixture
def make_mgr(tmp_path: Path, vm: SSHD, known_hosts: Path, counting_packer: Path) -> Iterator[Any]:
    """``make_mgr(profiles)``: a Manager over a config dir with those profiles (closed, and its
    sandboxes torn down, at the end)."""
    made: list[Manager] = []

    def make(profiles: dict[str, dict[str, Any]], home: Path | None = None, **kw: Any) -> Manager:
        cfg = write_config(tmp_path / f"cfg{len(made)}", vm, known_hosts, counting_packer, profiles,
                           tmp_path / "ws")
        m = Manager(config_dirs=[cfg], home=home or tmp_path / "home", **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        try:
            for sb in m.list():
                m.teardown(sb.id)
        finally:
            m.close()
