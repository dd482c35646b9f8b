"""The ``pool:`` field of a profile (errors name the file and the field), the reserved consumer,
and the ``sandboxer pool`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from sandboxer.errors import ProfileError
from sandboxer.loader import load_catalog
from sandboxer.models import SandboxCreateRequest
from tests.pools.conftest import write_pooled


@pytest.mark.parametrize("pool, field, why", [
    ("{size: -1}", "pool.size", "greater than or equal to 0"),
    ("{size: 101}", "pool.size", "less than or equal to 100"),
    ("{size: two}", "pool.size", "integer"),
    ("{size: 2, max_age: soon}", "pool.max_age", "not a duration"),
    ("{size: 2, max_age: 5s}", "pool.max_age", "between 10s and 1d"),
    ("{size: 2, max_age: 2d}", "pool.max_age", "between 10s and 1d"),
    ("{size: 2, warm: true}", "pool.warm", "unknown field"),
    ("{max_age: 5m}", "pool.size", "Field required"),
])
def test_a_bad_pool_names_the_file_and_field(cfg, pool, field, why):  # type: ignore[no-untyped-def]
    path = cfg.write("profile.bad.yaml", f"slug: bad\nextension: ext.local\npool: {pool}\n")
    with pytest.raises(ProfileError) as err:
        load_catalog([cfg.root])
    assert str(path) in str(err.value) and f"field {field!r}" in str(err.value) and why in str(err.value)


def test_a_pool_needs_a_value_for_every_required_input(cfg):  # type: ignore[no-untyped-def]
    path = cfg.write("profile.bad.yaml", "slug: bad\nextension: ext.local\ninputs: {required: [repo]}\n"
                                         "pool: {size: 1}\n")
    with pytest.raises(ProfileError, match="input 'repo' is required and has no default") as err:
        load_catalog([cfg.root])
    assert str(path) in str(err.value) and "field 'pool'" in str(err.value)
    cfg.write("profile.bad.yaml", "slug: bad\nextension: ext.local\ninputs: {required: [repo]}\npool: {size: 0}\n")
    assert load_catalog([cfg.root]).profiles["bad"].pool.size == 0  # size 0: no pool, nothing to refuse


def test_the_pool_consumer_is_reserved():
    with pytest.raises(ValidationError, match="reserved for the sandboxes of warm pools"):
        SandboxCreateRequest(profile="local", consumer="sandboxer.pool")


def test_pool_commands(cfg, home):  # type: ignore[no-untyped-def]
    write_pooled(cfg, size=2)
    env = {**os.environ, "SANDBOXER_HOME": str(home), "SANDBOXER_CONFIG": str(cfg.root)}

    def run(*args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "sandboxer", *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
        return p

    made = json.loads(run("pool", "fill", "--json").stdout)["made"]["warm"]
    assert len(made) == 2
    assert json.loads(run("pool", "status", "--json").stdout) == [
        {"profile": "warm", "size": 2, "max_age": "5m", "ready": 2, "provisioning": 0}]
    assert json.loads(run("list", "--json").stdout) == []
    assert sorted(s["id"] for s in json.loads(run("list", "--pooled", "--json").stdout)) == sorted(made)
    sb = json.loads(run("create", "warm", "--consumer", "ci", "--json").stdout)
    assert sb["id"] in made and sb["consumer"] == "ci"
    assert run("exec", sb["id"], "--", "echo", "hi").stdout == "hi\n"
    assert "warm: created 1" in run("pool", "fill").stdout
    run("teardown", sb["id"])
    drained = json.loads(run("pool", "drain", "--json").stdout)["removed"]["warm"]
    assert len(drained) == 2 and sb["id"] not in drained
    assert json.loads(run("list", "--pooled", "--json").stdout) == []
    assert "unknown profile" in run("pool", "drain", "nope", check=66).stderr
