"""The template digest (sandboxer/extensions/vm_packer_digest.py): every file Packer reads for a build
counts, so changing a provisioner's script or a directory template's file rebuilds; end to end through
the Manager with Debian's packer for a JSON template's script."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sandboxer.errors import ProfileError
from sandboxer.extensions.vm_packer_digest import referenced_files, template_digest
from tests.packer.conftest import TEMPLATE, builds

JSON_TEMPLATE = {
    "variables": {"sandboxer_ssh_host": "", "sandboxer_ssh_port": "", "sandboxer_ssh_username": "",
                  "sandboxer_ssh_private_key_file": "", "bin_dir": ""},
    "builders": [{"type": "null", "communicator": "ssh", "ssh_host": "{{user `sandboxer_ssh_host`}}",
                  "ssh_port": "{{user `sandboxer_ssh_port`}}", "ssh_username": "{{user `sandboxer_ssh_username`}}",
                  "ssh_private_key_file": "{{user `sandboxer_ssh_private_key_file`}}"}],
    "provisioners": [{"type": "shell", "script": "install-tool.sh",
                      "environment_vars": ["BIN_DIR={{user `bin_dir`}}"]}],
}
SCRIPT = "#!/bin/sh\nset -e\nmkdir -p \"$BIN_DIR\"\nprintf '#!/bin/sh\\necho tool {v}\\n' > \"$BIN_DIR/mytool\"\n" \
         "chmod +x \"$BIN_DIR/mytool\"\n"


def test_a_file_naming_nothing_has_its_own_sha256(tmp_path):
    tpl = tmp_path / "t.pkr.hcl"
    tpl.write_text(TEMPLATE)
    assert template_digest(tpl) == hashlib.sha256(tpl.read_bytes()).hexdigest()


def test_json_provisioners_script_scripts_and_source_count(tmp_path):
    tpl = tmp_path / "t.json"
    (tmp_path / "a.sh").write_text("a")
    (tmp_path / "b.sh").write_text("b")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "conf").write_text("c")
    tpl.write_text(json.dumps({"builders": [{"type": "null"}], "provisioners": [
        {"type": "shell", "script": "a.sh"}, {"type": "shell", "scripts": ["b.sh", str(tmp_path / "a.sh")]},
        {"type": "file", "source": "files", "destination": "/etc/x"},
        {"type": "shell", "script": "{{user `dir`}}/unfollowed.sh"}]}))
    assert set(referenced_files(tpl)) == {"a.sh", "b.sh", str(tmp_path / "a.sh"), "files"}
    before = template_digest(tpl)
    for changed in (tmp_path / "a.sh", tmp_path / "b.sh", tmp_path / "files" / "conf"):
        old = changed.read_text()
        changed.write_text(old + "!")
        assert template_digest(tpl) != before, f"changing {changed} did not change the digest"
        changed.write_text(old)
        assert template_digest(tpl) == before
    (tmp_path / "files" / "new").write_text("n")
    assert template_digest(tpl) != before, "a file added under a copied directory did not count"


def test_a_missing_referenced_file_counts_as_missing(tmp_path):
    tpl = tmp_path / "t.json"
    tpl.write_text(json.dumps({"builders": [{"type": "null"}], "provisioners": [{"type": "shell", "script": "x.sh"}]}))
    missing = template_digest(tpl)
    (tmp_path / "x.sh").write_text("echo")
    assert template_digest(tpl) != missing


def test_a_directory_template_counts_each_packer_file_and_hcl_references(tmp_path):
    d = tmp_path / "tpl"
    d.mkdir()
    (d / "main.pkr.hcl").write_text('build {\n  provisioner "shell" {\n    script = "${path.root}/s.sh"\n  }\n'
                                    '  provisioner "shell" {\n    scripts = ["t.sh",\n      "u.sh"]\n  }\n'
                                    '  provisioner "file" {\n    source = "conf.txt"\n    destination = "/x"\n  }\n}\n')
    (d / "vars.pkr.hcl").write_text('variable "v" { type = string }\n')
    (d / "dev.pkrvars.hcl").write_text('v = "1"\n')
    (d / "README.md").write_text("not read by packer")
    for name in ("s.sh", "t.sh", "u.sh", "conf.txt"):
        (d / name).write_text(name)
    assert referenced_files(d) == ["${path.root}/s.sh", "conf.txt", "t.sh", "u.sh"]
    before = template_digest(d)
    for name in ("main.pkr.hcl", "vars.pkr.hcl", "dev.pkrvars.hcl", "s.sh", "t.sh", "u.sh", "conf.txt"):
        old = (d / name).read_text()
        (d / name).write_text(old + "\n# changed")
        assert template_digest(d) != before, f"changing {name} did not change the digest"
        (d / name).write_text(old)
    (d / "README.md").write_text("still not read by packer")
    assert template_digest(d) == before
    (d / "extra.pkr.hcl").write_text("")
    assert template_digest(d) != before, "a new .pkr.hcl file did not count"


def test_a_directory_without_packer_files_is_refused_at_load(make_mgr, tmp_path):
    empty = tmp_path / "empty-tpl"
    empty.mkdir()
    with pytest.raises(ProfileError) as err:
        make_mgr({"bad": {"options": {"packer": {"template": str(empty)}}}})
    assert (f"field 'options.packer.template' (value '{empty}'): a directory template must hold .pkr.hcl "
            "(or .pkr.json) files; this one has none") in str(err.value)


def built_once(make_mgr, template: Path, vm_bin: Path, tmp_path: Path):
    """A Manager whose profile ``tool`` builds ``template``, after one create (built, torn down)."""
    profile = {"ready_timeout": 30, "options": {"require_commands": ["mytool"], "packer": {
        "template": str(template), "timeout": 60, "variables": {"bin_dir": str(vm_bin)}}}}
    mgr = make_mgr({"tool": profile})
    first = mgr.create(profile="tool")
    assert mgr.exec(first.id, ["mytool"]).stdout == "tool 1\n" and builds(tmp_path) == 1
    mgr.teardown(first.id)
    return mgr


def test_changing_a_provisioner_script_rebuilds_on_the_next_create(make_mgr, vm_bin, tmp_path):
    d = tmp_path / "json-tpl"
    d.mkdir()
    tpl = d / "tool.json"
    tpl.write_text(json.dumps(JSON_TEMPLATE))
    script = d / "install-tool.sh"
    script.write_text(SCRIPT.replace("{v}", "1"))
    mgr = built_once(make_mgr, tpl, vm_bin, tmp_path)
    again = mgr.create(profile="tool")
    assert builds(tmp_path) == 1, "an unchanged template and script were built again"
    mgr.teardown(again.id)

    script.write_text(SCRIPT.replace("{v}", "2"))  # the template file itself is unchanged
    second = mgr.create(profile="tool")
    assert builds(tmp_path) == 2, "a changed provisioner script did not rebuild"
    assert mgr.exec(second.id, ["mytool"]).stdout == "tool 2\n"
    images = mgr.state.list_images()
    assert len(images) == 2 and images[0]["template_sha256"] != images[1]["template_sha256"]
    assert images[0]["variables_sha256"] == images[1]["variables_sha256"]


def test_a_directory_template_builds_and_a_change_to_one_of_its_files_rebuilds(make_mgr, vm_bin, tmp_path):
    d = tmp_path / "dir-tpl"
    d.mkdir()
    split = TEMPLATE.index('source "null"')
    (d / "variables.pkr.hcl").write_text(TEMPLATE[:split])
    (d / "build.pkr.hcl").write_text(TEMPLATE[split:])
    mgr = built_once(make_mgr, d, vm_bin, tmp_path)
    (d / "variables.pkr.hcl").write_text(TEMPLATE[:split].replace('default = "1"', 'default = "3"'))
    second = mgr.create(profile="tool")
    assert builds(tmp_path) == 2 and mgr.exec(second.id, ["mytool"]).stdout == "tool 3\n"
    assert [i["template"] for i in mgr.state.list_images()] == [str(d), str(d)]
