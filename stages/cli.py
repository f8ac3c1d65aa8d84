"""The entry point every stage shares: validate params.yaml first, then run the stage.

Bad params or data end the stage with exit code 2 and a line starting with PERMANENT_FAILURE,
which tells the Prefect flow not to retry it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from stages.params import InvalidInput, Params, load_params

PERMANENT_FAILURE = "stack-dpo: invalid input, not retrying:"


def main(run: Callable[[Params], object]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        run(load_params())  # params are validated before any work: nothing is read or written
    except InvalidInput as exc:
        print(f"{PERMANENT_FAILURE} {exc}", file=sys.stderr)
        sys.exit(2)
