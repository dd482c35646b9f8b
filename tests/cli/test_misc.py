"""Durations, cost estimate's TTL warning, shell completion."""

from __future__ import annotations

import json

import pytest

from sandboxer import durations


@pytest.mark.parametrize("text, seconds", [("1h30m", 5400), ("90s", 90), ("10m", 600), ("2d", 172800),
                                           ("500ms", 0.5), ("1.5h", 5400), ("1m30s", 90), (" 2h ", 7200)])
def test_durations(text, seconds):
    assert durations.parse_flag(text, "--ttl") == seconds


@pytest.mark.parametrize("text, message", [
    ("30", "--timeout: '30' has no unit; write 30s"),
    ("1x", "--timeout: '1x' is not a duration (e.g. 90s, 10m, 1h30m, 2d)"),
    ("30m1h", "--timeout: '30m1h' is not a duration (e.g. 90s, 10m, 1h30m, 2d)"),
    ("-5m", "--timeout: duration must not be negative: '-5m'"),
])
def test_bad_durations_name_the_flag(text, message):
    with pytest.raises(ValueError) as exc:
        durations.parse_flag(text, "--timeout")
    assert str(exc.value) == message


def test_yaml_and_the_api_still_take_seconds():
    from sandboxer.models import parse_duration

    assert parse_duration(90) == parse_duration("90") == 90 and parse_duration("1h30m") == 5400


def test_cost_estimate_warns_past_the_profiles_maximum_ttl(sbx):
    p = sbx("cost", "estimate", "saas-stub", "--duration", "6h", "--json", check=0)
    assert p.stderr == ("warning: 6h is over profile 'saas-stub''s maximum TTL of 4h: one sandbox cannot live "
                        "that long (quoted anyway)\n")
    assert json.loads(p.stdout)[0]["duration_s"] == 6 * 3600
    assert sbx("cost", "estimate", "saas-stub", "--duration", "1h30m", check=0).stderr == ""


def test_shell_completion_script_is_produced(sbx):
    p = sbx(env={"_SANDBOXER_COMPLETE": "bash_source"}, check=0)
    assert "_sandboxer_completion()" in p.stdout and "complete -o nosort -F _sandboxer_completion sandboxer" in p.stdout
    p = sbx(env={"_SANDBOXER_COMPLETE": "bash_complete", "COMP_WORDS": "sandboxer tea", "COMP_CWORD": "1"}, check=0)
    assert "teardown" in p.stdout


def test_docs_table_of_exit_codes_is_the_clis():
    from pathlib import Path

    from sandboxer.cli_errors import TABLE

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    section = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()]
    assert [int(r) for r in rows] == [code for code, _ in TABLE]


def test_a_lazy_name_that_is_also_a_submodule_is_the_name():
    """`from sandboxer.trust import verify` is the function even when another lazy name of the
    submodule `sandboxer.trust.verify` loaded it first (importing a submodule sets the package's attribute)."""
    import subprocess
    import sys

    code = ("from sandboxer.trust import sign_bundle\nfrom sandboxer.trust import verify\n"
            "import inspect; print(inspect.isfunction(verify))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
