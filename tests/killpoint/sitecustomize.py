"""Test-only fault injection: with this folder on PYTHONPATH, a process SIGKILLs itself at the
point that STACK_DPO_KILL_POINT names (tests/test_reliability.py), deterministically:

- `after-write:<path>`: at the first file opened after `<path>` was opened for writing
  (trainer_state.json is the last file of a checkpoint, so: right after the checkpoint is saved);
- `before-rename:<path>`: when a crash-safe writer is about to rename its temporary into `<path>`;

or, with STACK_DPO_KILL_POINT=`no-space:<text>`, it fails every folder it makes and every file it
opens for writing whose path contains `<text>` with ENOSPC, as a full disk does
(tests/test_bad_inputs.py).

It watches Python's audit events (PEP 578), so the code under test carries no hook of its own."""

import errno
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
    elif _KIND == "no-space" and event in ("open", "os.mkdir") and _TARGET in str(args[0]):
        mode, flags = (args[1], args[2]) if event == "open" else ("w", 0)
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
    elif _KIND == "before-rename" and event == "os.rename":
        source, destination = str(args[0]), str(args[1])
        if destination.endswith(_TARGET) and ".tmp-" in source:
            _kill()


if _KIND in ("after-write", "before-rename", "no-space") and _TARGET:
    sys.addaudithook(_hook)
