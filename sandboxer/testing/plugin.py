"""The pytest plugin of the conformance kit: one test item per step of the contract suite.

Registered through the ``pytest11`` entry point ``sandboxer``, so an extension author's
tests get it once sand-boxer is installed. The author provides a module- (or wider-)
scoped ``conformance_target`` fixture returning a :class:`~sandboxer.testing.Target`, and
one test::

    def test_conformance(conformance_step):
        conformance_step.check()

The suite runs once per target (``conformance_report``); each item then passes, skips with
the step's reason, or fails with its message.
"""

from __future__ import annotations

from typing import Any

import pytest

from sandboxer.testing.suite import FAIL, SKIP, STEPS, Report, StepResult, Target


class Step:
    """One step's result, as a test sees it."""

    def __init__(self, result: StepResult, report: Report):
        self.result = result
        self.report = report

    def check(self) -> None:
        """Pass, ``pytest.skip`` with the step's reason, or ``pytest.fail`` with its message."""
        if self.result.status == SKIP:
            pytest.skip(self.result.message)
        if self.result.status == FAIL:
            pytest.fail(self.result.message, pytrace=False)


@pytest.fixture(scope="module")
def conformance_report(conformance_target: Target) -> Report:
    """The suite's report for ``conformance_target`` (run once per target)."""
    if not isinstance(conformance_target, Target):
        raise TypeError(f"conformance_target must return a sandboxer.testing.Target, got {conformance_target!r}")
    return conformance_target.run()


@pytest.fixture(params=list(STEPS))
def conformance_step(request: Any, conformance_report: Report) -> Step:
    """One step of the suite (the test is parametrised over every step, by name)."""
    return Step(conformance_report[request.param], conformance_report)
