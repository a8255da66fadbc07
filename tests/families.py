"""Which model families a test run drives through engines: ``OPRM_TEST_FAMILIES`` (a comma-separated list;
unset means all). A CI leg that leaves a family to the other leg shows its tests as skipped, with why."""

import os

import pytest


def families(*names: str) -> list:
    """Fixture params for ``names``: the families outside ``OPRM_TEST_FAMILIES`` are skipped."""
    chosen = os.environ.get("OPRM_TEST_FAMILIES")
    if not chosen:
        return list(names)
    kept = set(chosen.split(","))
    skip = pytest.mark.skip(reason=f"OPRM_TEST_FAMILIES={chosen}: this family's engine tests run on the other CI leg")
    return [name if name in kept else pytest.param(name, marks=skip) for name in names]
