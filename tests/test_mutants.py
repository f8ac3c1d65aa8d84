"""The planted bugs of `make mutants` still fit the code: each changes a line that exists once,
and each names tests that exist (the bugs themselves are planted by `make mutants`, not here)."""

import pytest

from tests.conftest import REPO
from tests.mutants import MUTANTS


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_fits_the_code(mutant):
    assert (REPO / mutant.file).read_text().count(mutant.old) == 1
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), test
