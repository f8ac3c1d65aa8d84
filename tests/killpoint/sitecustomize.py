"""Test-only fault injection: with this folder on PYTHONPATH, a process SIGKILLs itself at the
point that STACK_DPO_KILL_POINT names (tests/test_reliability.py), deterministically:

- `after-write:<path>`: at the first file opened after `<path>` was opened for writing
  (trainer_state.json is the last file of a checkpoint, so: right after the checkpoint is saved);
- `before-rename:<path>`: when a crash-safe writer is about to rename its temporary into `<path>`.

It watches Python's audit events (PEP 578), so the code under test carries no hook of its own."""

import os
import signal
import sys

_POINT = os.environ.get("STACK_DPO_KILL_POINT", "")
_KIND, _, _TARGET = _POINT.partition(":")
_written = False


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hook(event: str, args: tuple) -> None:
    global _written
    if _KIND == "after-write" and event == "open":
        path, mode = str(args[0]), args[1]
        if _written and not path.endswith(_TARGET):
            _kill()
        if path.endswith(_TARGET) and isinstance(mode, str) and "w" in mode:
            _written = True
    elif _KIND == "before-rename" and event == "os.rename":
        source, destination = str(args[0]), str(args[1])
        if destination.endswith(_TARGET) and ".tmp-" in source:
            _kill()


if _KIND in ("after-write", "before-rename") and _TARGET:
    sys.addaudithook(_hook)
