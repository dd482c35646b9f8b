"""vm-packer's build mode end to end through the Manager: Debian's packer provisions the VM (the null
builder, over SSH to a real sshd), the artifact is recorded, reused, rebuilt, and a failed, timed-out,
interrupted or crashed build leaves nothing recorded and nothing running."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandboxer.cli import cli as main
from sandboxer.errors import ProfileError, ProvisionError, SandboxerError
from sandboxer.state import StateStore
from tests.conftest import run_threads
from tests.packer.conftest import TEMPLATE, build_profile, builds


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def packer_processes(home: Path) -> list[int]:
    """Processes started for a build under ``home`` (their environment names its private dirs)."""
    needle = f"PACKER_CONFIG_DIR={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(needle) for e in env):
                found.append(int(entry))
    return found


def left_in(home: Path) -> list[str]:
    """What builds left under the home's packer directory (their private temp dirs)."""
    root = home / "packer"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_first_create_builds_and_records_second_reuses(make_mgr, template, vm_bin, tmp_path):
    mgr = make_mgr({"tool": build_profile(template, vm_bin)})
    sb = mgr.create(profile="tool")
    assert mgr.exec(sb.id, ["mytool"]).stdout == "tool 1\n"
    assert builds(tmp_path) == 1
    [image] = mgr.state.list_images()
    assert image["state"] == "ready" and image["builder"] == "null" and image["profile"] == "tool"
    assert image["template_sha256"] == sha(template) and image["artifact_id"] == "Null"
    assert [e["kind"] for e in mgr.events(sb.id) if e["kind"].startswith("image_")] == [
        "image_build_started", "image_built"]
    mgr.teardown(sb.id)
    (vm_bin / "mytool").unlink()  # the VM is as Packer left it only as long as nobody undoes it
    (vm_bin / "mytool").write_text("#!/bin/sh\necho tool 1\n")
    (vm_bin / "mytool").chmod(0o755)

    again = mgr.create(profile="tool")
    assert builds(tmp_path) == 1, "the unchanged template and variables were built again"
    assert mgr.state.list_images() == [image]
    assert [e["kind"] for e in mgr.events(again.id) if e["kind"].startswith("image_")] == ["image_reused"]
    assert left_in(tmp_path / "home") == []


def test_images_are_recorded_in_the_managers_own_store(make_mgr, template, vm_bin, tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"  # given as an argument only, not SANDBOXER_STATE_URL
    mgr = make_mgr({"tool": build_profile(template, vm_bin)}, state_url=url)
    sb = mgr.create(profile="tool")
    assert [i["state"] for i in mgr.state.list_images()] == ["ready"]
    assert not (tmp_path / "home" / "state.db").exists()  # nothing went to the home's default store
    mgr.teardown(sb.id)


def test_a_changed_variable_rebuilds(make_mgr, template, vm_bin, tmp_path):
    mgr = make_mgr({"v1": build_profile(template, vm_bin), "v2": build_profile(template, vm_bin, tool_version="2")})
    first = mgr.create(profile="v1")
    second = mgr.create(profile="v2")
    assert mgr.exec(second.id, ["mytool"]).stdout == "tool 2\n"
    assert builds(tmp_path) == 2
    images = mgr.state.list_images()
    assert [i["profile"] for i in images] == ["v1", "v2"]
    assert images[0]["template_sha256"] == images[1]["template_sha256"]
    assert images[0]["variables_sha256"] != images[1]["variables_sha256"]
    mgr.teardown(first.id)


def test_a_failing_build_quotes_packer_and_records_nothing(make_mgr, template, vm_bin, tmp_path):
    template.write_text(TEMPLATE.replace('"chmod +x ${var.bin_dir}/mytool",', '"echo no-such-luck >&2; exit 7",'))
    mgr = make_mgr({"tool": build_profile(template, vm_bin)})
    with pytest.raises(ProvisionError) as err:
        mgr.create(profile="tool")
    msg = str(err.value)
    assert f"packer build of {template} failed" in msg
    assert "Script exited with non-zero exit status: 7" in msg, msg
    assert mgr.state.list_images() == []
    [failed] = mgr.list(all=True)  # the create's record, as any backend's failed create: failed, with why
    assert failed.state.value == "failed" and failed.ready_at is None
    assert f"packer build of {template} failed" in failed.last_error
    assert "Script exited with non-zero exit status: 7" in failed.last_error
    assert [e["kind"] for e in mgr.events(failed.id) if e["kind"].startswith("image_")] == [
        "image_build_started", "image_build_failed"]
    assert left_in(tmp_path / "home") == [] and packer_processes(tmp_path / "home") == []


def test_a_broken_template_is_refused_with_packers_error(make_mgr, template, vm_bin, tmp_path):
    template.write_text(TEMPLATE.replace('source "null" "vm" {', 'source "null" "vm" {{'))
    mgr = make_mgr({"tool": build_profile(template, vm_bin)})
    with pytest.raises(ProfileError) as err:
        mgr.create(profile="tool")
    msg = str(err.value)
    assert f"field 'options.packer.template' (value '{template}')" in msg and "packer inspect" in msg, msg
    assert "Argument or block definition required" in msg or "Invalid" in msg, msg
    assert builds(tmp_path) == 0 and mgr.state.list_images() == []
    [failed] = mgr.list(all=True)  # the create's own record says why
    assert failed.state.value == "failed" and str(template) in failed.last_error
    assert "packer inspect refused it" in failed.last_error


def test_a_build_past_its_deadline_is_killed_and_leaves_nothing(make_mgr, template, vm_bin, tmp_path):
    profile = build_profile(template, vm_bin, pause=60)
    profile["options"]["packer"]["timeout"] = 3
    mgr = make_mgr({"slow": profile})
    t0 = time.monotonic()
    with pytest.raises(ProvisionError, match=r"did not finish within 3s; killed"):
        mgr.create(profile="slow")
    assert time.monotonic() - t0 < 20
    home = tmp_path / "home"
    assert packer_processes(home) == [], "packer (or its provisioner) is still running"
    assert mgr.state.list_images() == [] and left_in(home) == []
    assert not (vm_bin / "mytool").exists()


def test_two_concurrent_creates_build_once(make_mgr, template, vm_bin, tmp_path):
    mgr = make_mgr({"tool": build_profile(template, vm_bin, pause=2)})
    other = make_mgr({"tool": build_profile(template, vm_bin, pause=2)})  # another process's view
    made, errors = [], []
    managers = iter([mgr, other])
    lock = threading.Lock()

    def create() -> None:
        with lock:
            m = next(managers)
        try:
            made.append((m, m.create(profile="tool")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    run_threads(create, 2, timeout=120)
    assert not errors, errors
    assert builds(tmp_path) == 1
    assert len(mgr.state.list_images()) == 1
    for m, sb in made:
        assert m.exec(sb.id, ["mytool"]).stdout == "tool 1\n"


def test_crash_between_build_and_record_leaves_no_artifact(make_mgr, template, vm_bin, tmp_path, monkeypatch):
    mgr = make_mgr({"tool": build_profile(template, vm_bin)})

    def crash(self, *a, **kw):
        raise RuntimeError("crashed between the build and its record")

    monkeypatch.setattr(StateStore, "finish_image_build", crash)
    with pytest.raises(RuntimeError, match="crashed between"):
        mgr.create(profile="tool")
    assert mgr.state.list_images() == [] and left_in(tmp_path / "home") == []
    monkeypatch.undo()
    mgr.create(profile="tool")
    assert builds(tmp_path) == 2 and [i["state"] for i in mgr.state.list_images()] == ["ready"]


def test_a_stale_building_row_is_reaped_by_gc_and_taken_over(make_mgr, template, vm_bin, tmp_path):
    mgr = make_mgr({"tool": build_profile(template, vm_bin)})
    ext = mgr.extension("ext.test-vm")
    build = ext.options(mgr.effective_profile(mgr.profile("tool"), 0)).packer
    state, row = mgr.state.claim_image_build({
        "id": "crashed1", "profile": "tool", "extension": "ext.test-vm", "builder": "null",
        "template": str(template), "template_sha256": sha(template), "variables_sha256": "0" * 64,
        "owner": "gone:1", "deadline_at": time.time() - 1})
    assert state == "claimed" and build.timeout == 60
    (tmp_path / "home" / "packer" / "crashed1").mkdir(parents=True)  # what a crashed build left
    runner = CliRunner()
    res = runner.invoke(main, ["--home", str(tmp_path / "home"), "--config", str(tmp_path / "cfg0"),
                               "images", "gc"])
    assert res.exit_code == 0, res.output
    assert "removed stale build crashed1 (profile tool, owner gone:1)" in res.output
    assert mgr.state.list_images() == [] and left_in(tmp_path / "home") == []


def test_interrupted_build_is_killed_and_leaves_nothing(make_mgr, template, vm_bin, tmp_path):
    mgr = make_mgr({"slow": build_profile(template, vm_bin, pause=60)})
    ext = mgr.extension("ext.test-vm")
    seen: list[str] = []

    def ctrl_c(line: str) -> None:
        seen.append(line)
        if "Running local shell script" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ext.build_image(mgr.profile("slow"), {}, state=mgr.state, on_progress=ctrl_c)
    assert seen, "no progress was streamed"
    home = tmp_path / "home"
    assert packer_processes(home) == [] and mgr.state.list_images() == [] and left_in(home) == []


def test_cli_images_build_then_list(make_mgr, template, vm_bin, tmp_path):
    make_mgr({"tool": build_profile(template, vm_bin)}).close()
    base = ["--home", str(tmp_path / "home"), "--config", str(tmp_path / "cfg0")]
    runner = CliRunner()
    res = runner.invoke(main, [*base, "images", "build", "tool"])
    assert res.exit_code == 0, res.output
    assert "null.vm: Connected to SSH!" in res.output
    assert res.output.rstrip().splitlines()[-1].startswith("built image ")
    again = runner.invoke(main, [*base, "images", "build", "tool"])
    assert again.exit_code == 0 and again.output.startswith("reused image "), again.output
    listed = runner.invoke(main, [*base, "images", "list", "--json"])
    [image] = json.loads(listed.output)
    assert image["profile"] == "tool" and image["state"] == "ready" and image["builder"] == "null"
    table = runner.invoke(main, [*base, "images", "list"])
    assert "tool" in table.output and "null" in table.output and image["id"] in table.output
    assert builds(tmp_path) == 1


def test_cli_images_build_of_a_profile_without_packer(make_mgr, tmp_path):
    make_mgr({"plain": {"options": {"require_commands": ["sh"]}}}).close()
    res = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "--config", str(tmp_path / "cfg0"),
                                    "images", "build", "plain"])
    assert res.exit_code == 65
    assert res.output.strip().splitlines()[-1] == (
        "error: profile 'plain' names no Packer template (options.packer.template); nothing to build")


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("packer,message", [
    ({"template": "/nonexistent/t.pkr.hcl"},
     "field 'options.packer.template' (value '/nonexistent/t.pkr.hcl'): no such file"),
    ({"template": "relative/t.pkr.hcl"},
     "field 'options.packer.template' (value 'relative/t.pkr.hcl'): must be an absolute path (or start with ~/)"),
    ({"template": "{tpl}", "variables": ["a", "b"]},
     "field 'options.packer.variables' (value ['a', 'b']): must be a mapping of variable names to values"),
    ({"template": "{tpl}", "variables": {"sandboxer_ssh_host": "x"}},
     "field 'options.packer.variables': variable 'sandboxer_ssh_host': names starting sandboxer_ are set by "
     "sandboxer from the VM's inventory entry"),
    ({"template": "{tpl}", "variables": {"bin_dir": {"nested": 1}}},
     "field 'options.packer.variables': variable 'bin_dir' (value {'nested': 1}): must be a string, number or "
     "boolean"),
    ({"template": "{tpl}", "timeout": 0}, "field 'options.packer.timeout' (value 0.0): Input should be greater than 0"),
])
def test_bad_packer_options_fail_loading_naming_file_field_value(make_mgr, template, packer, message, tmp_path):
    packer = {k: (str(template) if v == "{tpl}" else v) for k, v in packer.items()}
    with pytest.raises(ProfileError) as err:
        make_mgr({"bad": {"options": {"packer": packer}}})
    msg = str(err.value)
    assert str(tmp_path / "cfg0" / "profiles" / "profile.bad.yaml") in msg and message in msg, msg


def test_a_variable_the_template_does_not_declare_is_refused(make_mgr, template, vm_bin, tmp_path):
    mgr = make_mgr({"tool": build_profile(template, vm_bin, colour="blue")})
    with pytest.raises(ProfileError) as err:
        mgr.create(profile="tool")
    assert str(err.value) == (
        f"profile 'tool': field 'options.packer.variables.colour': template {template} declares no variable "
        "'colour' (it declares: bin_dir, pause, sandboxer_ssh_host, sandboxer_ssh_port, "
        "sandboxer_ssh_private_key_file, sandboxer_ssh_username, tool_version)")
    assert builds(tmp_path) == 0 and mgr.state.list_images() == []
    assert [s.state for s in mgr.list(all=True)] == ["failed"]  # the create's own record says why


def test_a_docker_builder_is_refused_because_nothing_could_be_attached(make_mgr, tmp_path, vm_bin):
    tpl = tmp_path / "templates-d" / "img.json"
    tpl.parent.mkdir()
    tpl.write_text(json.dumps({"builders": [{"type": "docker", "image": "sandboxer-busybox:test", "pull": False,
                                             "commit": True}]}))
    mgr = make_mgr({"img": {"options": {"packer": {"template": str(tpl)}}}})
    with pytest.raises(SandboxerError) as err:
        mgr.create(profile="img")
    assert str(err.value) == (
        f"profile 'img': field 'options.packer.template' (value '{tpl}'): builder 'docker' makes an artifact "
        "vm-packer cannot attach to over SSH (it never starts machines); vm-packer builds with the null "
        "builder, which provisions the VM it then attaches to (docs/backends/vm-packer.md#build-mode)")
    assert builds(tmp_path) == 0 and mgr.state.list_images() == []


CTRL_C_SCRIPT = """
import sys
from sandboxer import Manager
mgr = Manager(config_dirs=[sys.argv[1]], home=sys.argv[2])
print("creating", flush=True)
mgr.create(profile="slow")
"""


def test_ctrl_c_during_create_kills_the_build_and_forgets_it(make_mgr, template, vm_bin, tmp_path):
    import signal
    import subprocess
    import sys

    make_mgr({"slow": build_profile(template, vm_bin, pause=60)}).close()
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path / "cfg0"), str(home)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not packer_processes(home) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert packer_processes(home), "the build never started"
        time.sleep(1)  # well into the build (the shell-local provisioner's sleep)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(10)
    assert "KeyboardInterrupt" in stderr
    assert packer_processes(home) == [], "the build outlived the process that started it"
    store = StateStore(home=home)
    try:
        assert store.list_images() == []
    finally:
        store.close()
    assert left_in(home) == []
