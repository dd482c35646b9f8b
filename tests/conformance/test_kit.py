"""The conformance kit itself: its command line, its failure messages, its pytest plugin, its packaging.

The backends it judges here are the built-in ext.local and ext.saas-stub; faults are injected at
the extension's seam (one method of the loaded instance replaced) or through the stub's own
``faults`` config, never inside the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from sandboxer import Manager
from sandboxer.testing import STEPS, Conformance, run_conformance

ROOT = Path(__file__).resolve().parents[2]
ALWAYS_PASS = ["provision", "wait_ready", "probe_alive", "snapshot", "teardown", "teardown_again", "probe_gone",
               "list_owned", "gc_orphan", "errors_from_tree", "nothing_left"]


def sbx(*args: str, home: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SANDBOXER_HOME": str(home)}
    env.pop("SANDBOXER_CONFIG", None)
    cmd = [sys.executable, "-m", "sandboxer", *(["--config", str(config)] if config else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


def write(cfg: Path, name: str, data: dict) -> None:
    sub = cfg / ("extensions" if name.startswith("ext.") else "profiles")
    sub.mkdir(parents=True, exist_ok=True)
    (sub / f"{name}.yaml").write_text(yaml.safe_dump(data))


# ----------------------------------------------------------------------- command line


@pytest.mark.parametrize("ext_id,profile", [("ext.local", "local"), ("ext.saas-stub", "saas-stub")])
def test_cli_prints_every_step_and_exits_nonzero_exactly_when_one_fails(tmp_path, ext_id, profile):
    res = sbx("conformance", ext_id, "--json", home=tmp_path / "home")
    report = json.loads(res.stdout)
    assert (report["extension"], report["profile"]) == (ext_id, profile)
    assert [s["name"] for s in report["steps"]] == list(STEPS)
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert [n for n in ALWAYS_PASS if status[n] != "pass"] == [], report
    failed = [s for s in report["steps"] if s["status"] == "fail"]
    assert report["ok"] is (not failed)
    assert res.returncode == (1 if failed else 0), res.stderr

    table = sbx("conformance", ext_id, home=tmp_path / "home2")
    assert table.returncode == res.returncode
    lines = table.stdout.splitlines()
    assert lines[0].strip() == f"{ext_id} (profile {profile})"
    for name in STEPS:
        row = next(ln for ln in lines if ln.startswith(f"│ {name} "))
        assert f"│ {status[name]} " in row, row
    counts = {k: sum(1 for v in status.values() if v == k) for k in ("pass", "fail", "skip")}
    assert lines[-1] == f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
    # the throwaway state store: the user's home never sees the suite's sandboxes
    assert not (tmp_path / "home").exists() or sbx("list", home=tmp_path / "home").stdout.strip() == "no sandboxes"


def test_cli_an_injected_fault_fails_its_step_names_it_and_exits_1(tmp_path):
    cfg = tmp_path / "cfg"
    write(cfg, "ext.saas-stub", {"id": "ext.saas-stub", "override": "config",
                                 "config": {"faults": [{"stage": "snapshot", "error": "fatal", "rate": 1.0}]}})
    res = sbx("conformance", "ext.saas-stub", "--json", home=tmp_path / "home", config=cfg)
    assert res.returncode == 1
    steps = {s["name"]: s for s in json.loads(res.stdout)["steps"]}
    assert (steps["snapshot"]["status"], steps["snapshot"]["detail"]) == (
        "fail", "raised SnapshotError: ext.saas-stub: injected fatal at snapshot")
    assert (steps["restore"]["status"], steps["restore"]["detail"]) == ("skip", "snapshot failed")
    assert steps["nothing_left"]["status"] == "pass"


def test_cli_unknown_extension_is_one_error_line(tmp_path):
    res = sbx("conformance", "ext.nope", home=tmp_path / "home")
    assert (res.returncode, res.stdout) == (78, "")
    assert res.stderr == ("error: extension 'ext.nope' is not defined in this configuration (config dirs: the "
                          "built-ins only); run with the --config (or SANDBOXER_CONFIG) that defines it. "
                          "Nothing was changed.\n")


def test_cli_profile_must_use_the_extension(tmp_path):
    res = sbx("conformance", "ext.local", "--profile", "docker", home=tmp_path / "home")
    assert (res.returncode, res.stdout, res.stderr) == (
        66, "", "error: profile 'docker' does not use ext.local (it uses ext.docker)\n")
    res = sbx("conformance", "ext.local", "--profile", "nope", home=tmp_path / "home")
    assert res.returncode == 66 and res.stderr.startswith("error: unknown profile 'nope'; known profiles: ")
    assert res.stderr.count("\n") == 1


def test_cli_extension_without_a_profile(tmp_path):
    cfg = tmp_path / "cfg"
    stub = yaml.safe_load((ROOT / "extensions" / "ext.saas-stub.yaml").read_text())
    write(cfg, "ext.lonely", {**stub, "id": "ext.lonely"})
    res = sbx("conformance", "ext.lonely", home=tmp_path / "home", config=cfg)
    assert (res.returncode, res.stderr) == (78, "error: no profile uses extension 'ext.lonely'; write one "
                                               "(profiles/profile.<slug>.yaml) or pass --profile\n")


# ------------------------------------------------------------- failure messages (Python API)


@pytest.fixture
def stub(tmp_path):
    cfg = tmp_path / "cfg"
    write(cfg, "profile.quick-stub", {"slug": "quick-stub", "extension": "ext.saas-stub", "ready_timeout": "1s"})
    mgr = Manager(config_dirs=[cfg], home=tmp_path / "home")
    yield mgr, mgr.extension("ext.saas-stub")
    mgr.close()


def test_a_teardown_that_is_not_idempotent_fails_two_steps_with_what_came_back(stub, monkeypatch):
    mgr, ext = stub
    real, gone = ext.teardown, set()

    def teardown(handle):
        if handle.stub_id in gone:
            raise KeyError(handle.stub_id)  # a foreign exception, as a careless backend lets out
        gone.add(handle.stub_id)
        return real(handle)

    monkeypatch.setattr(ext, "teardown", teardown)
    report = run_conformance(mgr, "ext.saas-stub", "quick-stub")
    assert not report.ok
    again = report["teardown_again"]
    assert again.status == "fail" and again.detail.startswith("raised KeyError: 'stub-")
    assert again.message.startswith("ext.saas-stub / teardown_again (a second teardown of the same handle "
                                    "succeeds (idempotent)): raised KeyError")
    tree = report["errors_from_tree"]
    assert tree.status == "fail"
    assert "expected every error to be a sandboxer.errors.SandboxerError" in tree.detail
    assert "teardown raised builtins.KeyError: 'stub-" in tree.detail


def test_list_owned_that_ignores_owner_labels_is_caught_and_both_resources_are_removed(stub, monkeypatch):
    mgr, ext = stub
    real = ext.list_owned
    monkeypatch.setattr(ext, "list_owned", lambda labels: real({}))  # every sandbox, whoever owns it
    suite = Conformance(mgr, "ext.saas-stub", "quick-stub")
    report = suite.run()
    step = report["list_owned"]
    assert step.status == "fail"
    assert step.detail == (f"expected sbx-conf-{suite.run_id}-f (other owner labels "
                           f"{{'sandboxer.owner': 'conformance-foreign-{suite.run_id}'}}) not to be listed, got "
                           f"['sbx-conf-{suite.run_id}-o', 'sbx-conf-{suite.run_id}-f']")
    assert real({}) == []  # the orphan and the foreign resource were torn down all the same


def test_a_hung_wait_ready_fails_at_its_deadline_and_the_suite_goes_on(stub, monkeypatch):
    mgr, ext = stub
    release = threading.Event()
    monkeypatch.setattr(ext, "wait_ready", lambda handle, timeout=60.0: release.wait(60) and {})
    began = time.monotonic()
    try:
        report = run_conformance(mgr, "ext.saas-stub", "quick-stub")
    finally:
        release.set()
    took = time.monotonic() - began
    step = report["wait_ready"]
    assert step.status == "fail" and "ExtensionTimeout" in step.detail, step
    assert step.seconds < 1 + mgr.limits.ready_grace + 2
    assert report["exec_exit_codes"].status == "skip"
    assert report["teardown"].status == "pass" and report["nothing_left"].status == "pass"
    assert took < 60


# ------------------------------------------------------------------------ pytest plugin

AUTHOR_TEST = '''
    import pytest
    from sandboxer.testing import Target

    @pytest.fixture(scope="module")
    def conformance_target(tmp_path_factory):
        return Target.from_config([], "ext.local", home=tmp_path_factory.mktemp("home"))

    def test_conformance(conformance_step):
        conformance_step.check()
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("sand_boxer-*.whl")
    return whl


def test_the_wheel_ships_the_kit_and_registers_the_plugin(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    assert {"sandboxer/testing/__init__.py", "sandboxer/testing/suite.py", "sandboxer/testing/plugin.py"} <= names
    (eps,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = z.read(eps).decode()
    assert "[pytest11]\nsandboxer = sandboxer.testing.plugin\n" in text


def test_an_authors_tests_get_the_plugin_from_the_installed_package(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip puts in site-packages, first on the path
    (tmp_path / "author").mkdir()
    (tmp_path / "author" / "test_my_backend.py").write_text(textwrap.dedent(AUTHOR_TEST))
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PYTEST_PLUGINS", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                          "test_my_backend.py"], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path / "author")
    assert res.returncode == 0, res.stdout + res.stderr
    assert [ln.split("::")[1] for ln in res.stdout.splitlines() if "::" in ln] == [
        f"test_conformance[{name}]" for name in STEPS]
    picked = [f"test_my_backend.py::test_conformance[{name}]" for name in ("provision", "teardown", "list_owned")]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *picked],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path / "author")
    assert res.returncode == 0 and "3 passed" in res.stdout, res.stdout + res.stderr


def test_cli_output_cap_is_checked_against_the_cap_the_config_sets(tmp_path):
    cfg = tmp_path / "cfg"
    write(cfg, "ext.local", {"id": "ext.local", "override": "config", "config": {"max_output_bytes": 4096}})
    right = sbx("conformance", "ext.local", "--output-cap", "4096", "--json", home=tmp_path / "h1", config=cfg)
    steps = {s["name"]: s for s in json.loads(right.stdout)["steps"]}
    assert steps["exec_output_cap"]["status"] == "pass", steps["exec_output_cap"]
    wrong = sbx("conformance", "ext.local", "--output-cap", "8192", "--json", home=tmp_path / "h2", config=cfg)
    assert wrong.returncode == 1
    step = {s["name"]: s for s in json.loads(wrong.stdout)["steps"]}["exec_output_cap"]
    assert (step["status"], step["detail"]) == (
        # 4095: cut on a character boundary
        "fail", "expected the first 8192 bytes of stdout (less at most one split character), got 4095 bytes")
    without = sbx("conformance", "ext.saas-stub", "--json", home=tmp_path / "h3")
    step = {s["name"]: s for s in json.loads(without.stdout)["steps"]}["exec_output_cap"]
    assert step["status"] == "skip" and step["detail"].startswith("no output cap given")
