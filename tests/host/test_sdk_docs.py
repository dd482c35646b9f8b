"""docs/extension-sdk.md's tutorial works as pasted.

Its files are the fenced blocks with a ``title="scratch/..."`` info string; its commands are the
block titled ``commands``. They are written to a tmp dir, the package is pip-installed into a
throwaway target dir (as conftest.py installs the example), and the commands run in bash, in a
minimal environment with a tmp home, through the ``sandboxer`` command line: the handler is found
through its entry point, its manifest and profile through the ``sandboxer.config`` entry point,
and it runs out of process.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "extension-sdk.md"
FENCE = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```\n', re.MULTILINE | re.DOTALL)
PIP_LINE = "pip install -e ./scratch"


def _blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for _lang, title, body in FENCE.findall(DOC.read_text(encoding="utf-8")):
        assert title not in blocks, f"{DOC}: two blocks titled {title!r}"
        blocks[title] = body
    return blocks


def test_the_tutorial_names_every_file_it_needs() -> None:
    blocks = _blocks()
    assert {t for t in blocks if t != "commands"} == {
        "scratch/pyproject.toml", "scratch/scratch_backend/__init__.py", "scratch/scratch_backend/backend.py",
        "scratch/scratch_backend/config/extensions/ext.scratch.yaml",
        "scratch/scratch_backend/config/profiles/profile.scratch.yaml"}
    assert blocks["commands"].splitlines()[0] == PIP_LINE


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory) -> tuple[Path, Path, str]:  # type: ignore[no-untyped-def]
    """(the tutorial's source dir, the install target, its commands after the pip line)."""
    src = tmp_path_factory.mktemp("tutorial")
    blocks = _blocks()
    commands = blocks.pop("commands")
    for title, body in blocks.items():
        path = src / title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    site = tmp_path_factory.mktemp("tutorial-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src / "scratch")], check=True, timeout=240, cwd=site)
    first, _, rest = commands.partition("\n")
    assert first == PIP_LINE
    return src, site, rest


def test_the_tutorial_runs_as_pasted(tutorial, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, site, commands = tutorial
    assert (site / "scratch_backend" / "config" / "profiles" / "profile.scratch.yaml").is_file()  # shipped
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "sandboxer"  # the console script, bound to this interpreter
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m sandboxer "$@"\n')
    shim.chmod(0o755)
    home = tmp_path / "home"
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "SANDBOXER_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], capture_output=True, text=True, env=env,
                         cwd=src, timeout=280)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    out = run.stdout
    assert re.search(r"^ok: \d+ extensions, \d+ profiles$", out, re.MULTILINE), out
    assert "ext.scratch" in out  # extensions list: found through the sandboxer.config entry point
    assert "hello from scratch\n" in out  # the profile's option, written by provision
    sid = re.search(r"^(sb-[0-9a-f]+) terminated$", out, re.MULTILINE)  # teardown's line
    assert sid, out
    # out of process: the sandbox lives in the worker's private home
    assert f"running in {home}/extension-host/ext.scratch/home/scratch/{sid.group(1)}\n" in out
    assert not (home / "extension-host" / "ext.scratch" / "home" / "scratch" / sid.group(1)).exists()
    summary = re.search(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", out, re.MULTILINE)
    assert summary and summary.group(2) == "0" and int(summary.group(1)) > 15, out


# Dotted names the doc mentions in backticks (`sandboxer.x.y`) must exist.
DOTTED = re.compile(r"`(sandboxer(?:\.\w+)+)")
# ...except those that name no Python object: an entry-point group and the tags the manager sets.
NOT_PYTHON = {"sandboxer.config", "sandboxer.sandbox_id", "sandboxer.consumer", "sandboxer.profile"}


def test_every_dotted_name_in_the_doc_exists() -> None:
    missing = []
    for name in sorted(set(DOTTED.findall(DOC.read_text(encoding="utf-8"))) - NOT_PYTHON):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"{DOC} names what does not exist: {missing}"
