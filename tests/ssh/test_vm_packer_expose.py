"""ext.vm-packer's exposed ports: forwarded to this machine's 127.0.0.1 by a process of their own,
which outlives the process that created the sandbox and ends with its teardown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sandboxer import forward
from sandboxer.ssh import local_ports_free
from tests.ssh.conftest import write_config
from tests.ssh.test_vm_packer import EXT, HANDLER, echo_port, through, vm_cfg  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("no_host_network_leak")

REPO = Path(__file__).resolve().parents[2]


def cli(cfg: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandboxer", "--config", str(cfg), "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_an_exposed_port_is_reached_after_the_creating_process_is_gone(tmp_path, vm_cfg, echo_port):
    cfg = write_config(tmp_path / "cfg", EXT, HANDLER, vm_cfg, {
        "served": {"extension": EXT, "inputs": {"defaults": {"vm": "vm0"}},
                   "network": {"egress": "internet", "expose": [echo_port]}}})
    home = tmp_path / "home"
    made = cli(cfg, home, "create", "served", "--json")
    assert made.returncode == 0, made.stderr
    import json

    sb = json.loads(made.stdout)
    url = sb["reachability"]["urls"][str(echo_port)]
    local = int(url.rsplit(":", 1)[1])
    assert url == f"http://127.0.0.1:{local}" and local != echo_port
    # the `sandboxer create` process has exited; the forward still carries connections
    assert through(local) == b"PING"
    status = cli(cfg, home, "status", sb["id"], "--json")
    assert json.loads(status.stdout)["reachability"]["urls"] == {str(echo_port): url}
    down = cli(cfg, home, "teardown", sb["id"])
    assert down.returncode == 0, down.stderr
    assert local_ports_free(local), "the forward outlived its sandbox"


def test_a_forwarder_that_cannot_connect_says_why_and_leaves_nothing(tmp_path, vm_cfg):
    """A forward to an SSH host whose key does not match: the start fails naming the host, and no
    process is left."""
    import pytest

    from sandboxer.errors import ProvisionError
    from sandboxer.ssh import SSHHostConfig

    entry = dict(vm_cfg["vms"]["vm0"])
    entry.pop("workspace_root", None)
    wrong = tmp_path / "known_hosts"
    other = yaml.safe_load(yaml.safe_dump(vm_cfg["vms"]["vm1"]))
    # vm0's address and port, with vm1's key in known_hosts: a mismatch
    line = Path(entry["known_hosts"]).read_text().splitlines()
    port0, port1 = entry["port"], other["port"]
    wrong.write_text("\n".join(l.replace(f":{port1}]", f":{port0}]") for l in line if f":{port1}]" in l) + "\n")
    cfg = SSHHostConfig.model_validate({**entry, "known_hosts": str(wrong)})
    before = subprocess.run(["pgrep", "-f", "sandboxer.forward"], capture_output=True, text=True).stdout.split()
    with pytest.raises(ProvisionError, match=r"ext\.test-vm: forwarding ports 22 from vm0: .*host key"):
        forward.start(cfg, [22], 60, backend="ext.test-vm", host="vm0")
    after = subprocess.run(["pgrep", "-f", "sandboxer.forward"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)
