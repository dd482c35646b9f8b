"""The one exec convention (sandboxer/execution.py): argv checks, whole UTF-8 characters across
chunks, the output cap and its flag, exit 124 at the deadline; and the CLI's ``exec`` through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: Multi-byte characters of every UTF-8 length: 2 (é), 3 (€, 漢), 4 (emoji).
MIXED = "é€漢😀"


@pytest.fixture
def sbx(home, cfg):
    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}

    def run(*args, check=None):
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, env=env, timeout=120)
        if check is not None:
            assert p.returncode == check, (p.returncode, p.stdout[-300:], p.stderr[-300:])
        return p

    return run


def test_cli_exec_streams_multibyte_characters_whole(sbx):
    sb = json.loads(sbx("create", "local", "--json", check=0).stdout)
    try:
        script = ("import sys; sys.stdout.write('é' * 200000); sys.stdout.flush(); "
                  f"sys.stderr.write({MIXED!r} * 50000)")
        p = sbx("exec", sb["id"], "--", "python3", "-c", script, check=0)
        out, err = p.stdout.decode("utf-8"), p.stderr.decode("utf-8")
        assert "\ufffd" not in out and "\ufffd" not in err
        assert out == "é" * 200000
        assert err == MIXED * 50000
    finally:
        sbx("teardown", sb["id"], check=0)
