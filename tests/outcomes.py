"""A pytest plugin for tests/mutants.py (`-p tests.outcomes`): with STACK_DPO_OUTCOMES set, one
JSON line per test phase (setup, call, teardown) and per failed collection: the test, the
phase, its outcome and the type of the exception that failed it, so that a planted bug counts
as caught only when a chosen test fails on an assertion, not on an error in setup, import or
collection."""

from __future__ import annotations

import json
import os

import pytest

OUTCOMES = "STACK_DPO_OUTCOMES"


def _record(**fields) -> None:
    path = os.environ.get(OUTCOMES)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(fields) + "\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _record(test=item.nodeid, when=call.when, outcome=report.outcome,
            exception=call.excinfo.typename if call.excinfo is not None else None)
    return report


def pytest_collectreport(report):
    if report.failed:
        _record(test=report.nodeid, when="collect", outcome="failed", exception=None)
