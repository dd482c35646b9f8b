"""The conformance kit: one contract suite, run the same way against any backend.

Use it three ways:

* ``sandboxer conformance EXTENSION [--profile P]`` prints a table of steps and exits
  non-zero on any failure;
* from Python, :func:`run_conformance` (or :class:`Conformance`) returns a :class:`Report`;
* from pytest, the plugin :mod:`sandboxer.testing.plugin` (registered through the
  ``pytest11`` entry point, so installing sand-boxer is enough) gives one test per step
  once you provide a ``conformance_target`` fixture (docs/conformance.md).

This package imports no pytest; only :mod:`sandboxer.testing.plugin` does.
"""

from sandboxer.testing.suite import (
    FAIL,
    PASS,
    SKIP,
    STEPS,
    Conformance,
    Report,
    StepResult,
    Target,
    default_profile,
    run_conformance,
)
from sandboxer.testing.requests import request

__all__ = ["FAIL", "PASS", "SKIP", "STEPS", "Conformance", "Report", "StepResult", "default_profile",
           "request", "run_conformance", "Target"]

