"""The entry point every stage shares: validate params.yaml first, then run the stage."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from stages.params import Params, ParamsError, load_params


def main(run: Callable[[Params], object]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        params = load_params()
    except ParamsError as exc:  # before any work: nothing is read or written
        sys.exit(str(exc))
    run(params)
