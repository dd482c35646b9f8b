"""Every built-in backend passes the conformance kit: one test per (backend, step).

The backends and their components are set up in conftest.py; the steps are the kit's own
(sandboxer.testing.STEPS), through its pytest plugin's fixtures.
"""


def test_conformance(conformance_step):
    conformance_step.check()
