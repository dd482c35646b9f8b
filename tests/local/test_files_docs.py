"""docs/files.md's Python examples work as pasted, on ext.local."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "files.md"
FENCE = re.compile(r'^```python title="([^"]+)"\n(.*?)^```\n', re.MULTILINE | re.DOTALL)


def _block(title: str) -> str:
    blocks = dict(FENCE.findall(DOC.read_text(encoding="utf-8")))
    return blocks[title]


def _run(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SANDBOXER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SANDBOXER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})  # noqa: S102 - the doc's own example
    return out.getvalue()


def test_the_python_example(tmp_path, monkeypatch):
    out = _run(_block("example"), tmp_path, monkeypatch).splitlines()
    assert out[:2] == ["hello from a file", "blob.bin file 3000"]
    assert out[2].startswith("gone: ") and "data/blob.bin" in out[2]
    assert out[3:] == ["ready", "terminated"]
    assert (tmp_path / "copy.txt").read_text() == "local report\n"
    assert (tmp_path / "blob.out").read_bytes() == b"\0\1\2" * 1000


def test_the_async_example(tmp_path, monkeypatch):
    assert _run(_block("async example"), tmp_path, monkeypatch) == "['42\\n', '42\\n', '42\\n']\n"
