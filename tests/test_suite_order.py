"""The suite does not lean on the order of its files: `make test` (so CI) runs them in a seeded
shuffled order (STACK_DPO_TEST_ORDER, shown in pytest's header; tests/conftest.py), so the suite
passing there is that proof. This checks, inside such a run, that the order really is shuffled."""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import SHUFFLE_SEED


def test_the_test_files_run_in_a_seeded_shuffled_order(request):
    seed = os.environ.get(SHUFFLE_SEED, "")
    files = list(dict.fromkeys(str(item.path) for item in request.session.items))
    if not seed or len(files) < 3:
        pytest.skip(f"run with {SHUFFLE_SEED} set and several test files (make test does)")
    collected = sorted(files)
    expected = collected[:]
    random.Random(seed).shuffle(expected)
    assert files == expected and files != collected
