"""Failure classes and the exit codes that carry them to DVC and the Prefect flow.

    2   invalid input: what the user must fix (params, data, model); never retried
    74  a write failed for lack of space (or quota); retried, since space can be freed
    75  a transient fault (network, Hub 5xx/429, timeout) that outlasted the stage's own retries
    1   anything else (a bug, a crash): retried by the flow, reported with its traceback
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

INVALID_INPUT_EXIT = 2
NO_SPACE_EXIT = 74     # EX_IOERR
TRANSIENT_EXIT = 75    # EX_TEMPFAIL
RETRY_DELAYS_S = (2.0, 8.0, 30.0)  # the stage's own retries of a transient fault; STACK_DPO_RETRY_DELAYS_S sets them
NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENETUNREACH,
                  errno.EHOSTUNREACH, errno.ENETDOWN, errno.EPIPE}
log = logging.getLogger("stack_dpo.faults")
T = TypeVar("T")


class TransientError(RuntimeError):
    """A network or service fault that outlasted the stage's own retries: retry later."""


def no_space(exc: BaseException) -> bool:
    """A write that failed because the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(exc))


def transient(exc: BaseException) -> bool:
    """A fault that may pass by itself: no connection, a timeout, a Hub answer of 5xx or 429."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    if isinstance(exc, TimeoutError | ConnectionError) or (isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS):
        return True
    name = type(exc).__name__  # httpx, httpx2, requests and urllib3 name theirs alike
    if any(word in name for word in ("Timeout", "ConnectError", "ConnectionError", "NetworkError", "RemoteProtocol")):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and transient(cause)


class Unreachable(ConnectionError):
    """A service that did not answer, or answered that it cannot serve now (5xx, 429)."""


def retry_delays() -> tuple[float, ...]:
    """The waits between a stage's own attempts: STACK_DPO_RETRY_DELAYS_S (seconds, comma-separated)."""
    value = os.environ.get("STACK_DPO_RETRY_DELAYS_S")
    return tuple(float(part) for part in value.split(",") if part.strip()) if value else RETRY_DELAYS_S


def with_retries(what: str, call: Callable[[], T]) -> T:
    """`call()`, retried with growing delays while it fails transiently; TransientError when
    the faults outlast the retries. Any other failure is raised at once."""
    delays = retry_delays()
    for attempt, delay in enumerate((*delays, None), start=1):
        try:
            return call()
        except Exception as exc:
            if not transient(exc):
                raise
            if delay is None:
                raise TransientError(f"{what}: {type(exc).__name__}: {exc} (after {attempt} attempts)") from exc
            log.warning("%s: %s (attempt %d of %d); retrying in %.0f s", what, type(exc).__name__, attempt,
                        len(delays) + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def describe_no_space(exc: OSError) -> str:
    where = Path(exc.filename) if exc.filename else Path.cwd()
    probe = next((p for p in (where, *where.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(probe).free / 2**30
    return f"no space left on the device writing {where} ({free:.2f} GiB free there); free space and rerun"
