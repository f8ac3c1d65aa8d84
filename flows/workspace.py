"""A workspace of its own for each flow run: a git worktree of the checkout that shares its DVC cache.

Why a worktree rather than `dvc exp run --temp` or DVC's queue: the flow runs each stage as a
Prefect task of its own (retries, a GPU slot, a timeout per stage), which needs a workspace that
outlives one `dvc` command; a worktree is also what DVC's queue uses underneath. The run writes
params.yaml, dvc.lock and the outputs there, never in the checkout, so two runs of one checkout
do not touch each other and a killed run leaves the checkout as it was.

The workspace starts from the checkout as it is: its commit, its uncommitted changes (an edited
params.yaml, a dvc.lock of a local `dvc repro`), its checkpoints, and the cached outputs DVC checks
out. It is kept after the run, named after the experiment: a run of the same experiment on the same
checkout state continues in it (a killed run resumes its checkpoints; unchanged inputs rerun
nothing). When the checkout changed, the workspace is reset to the new state first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from stack_dpo.paths import CHECKPOINTS

RUNS = Path(".dvc/tmp/stack-dpo-runs")  # DVC never looks inside .dvc/; git ignores .dvc/tmp
SEED = Path(".dvc/tmp/stack-dpo-seed")  # in a workspace: the checkout state it started from
LINKED_CACHE = "reflink,hardlink,copy"  # outputs checked out into a workspace cost no disk


class WorkspaceBusy(RuntimeError):
    """Another run of the same experiment holds the workspace."""


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`git {' '.join(args)}` in {cwd} failed: {done.stderr.strip()}")
    return done.stdout


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


def check_experiment_name(name: str) -> None:
    """A name DVC can store as a git ref and this module as a folder name; checked before any work."""
    ok = "/" not in name and subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cd/{name}"]).returncode == 0
    if not ok:
        raise ValueError(f"experiment name {name!r} is not valid: use letters, digits, '-', '_' or '.'")


def uncommitted(checkout: Path) -> tuple[list[str], list[str]]:
    """(changed or new, deleted) files of the checkout against its commit; git-ignored files left out."""
    listed = lambda *flags: git(checkout, "ls-files", "-z", *flags).split("\0")  # noqa: E731
    deleted = {path for path in listed("--deleted") if path}
    changed = sorted({path for path in listed("--modified", "--others", "--exclude-standard") if path} - deleted)
    return changed, sorted(deleted)


def untracked_files(path: Path) -> list[str]:
    return [name for name in git(path, "ls-files", "-z", "--others", "--exclude-standard").split("\0") if name]


def checkout_state(checkout: Path) -> str:
    """A digest of what a workspace starts from: the commit and every uncommitted change."""
    digest = hashlib.sha256(git(checkout, "rev-parse", "HEAD").encode())
    changed, deleted = uncommitted(checkout)
    for path in changed:
        digest.update(f"\0{path}\0".encode() + hashlib.sha256((checkout / path).read_bytes()).digest())
    for path in deleted:
        digest.update(f"\0-{path}".encode())
    return digest.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # checkpoints are written once and then only read or deleted
    except OSError:
        shutil.copy2(src, dst)


def _use_checkout_dvc_config(checkout: Path, path: Path) -> None:
    """The checkout's local DVC config as it is now (remotes, credentials), its cache, linked outputs."""
    from dvc.repo import Repo

    config_local = checkout / ".dvc/config.local"
    if config_local.exists():
        shutil.copy2(config_local, path / ".dvc/config.local")
    else:
        (path / ".dvc/config.local").unlink(missing_ok=True)
    with Repo(str(checkout)) as repo:
        cache_dir, cache_type = repo.cache.local_cache_dir, repo.config["cache"].get("type")
    with Repo(str(path)) as repo, repo.config.edit("local") as config:
        config["cache"]["dir"] = cache_dir
        config["cache"]["type"] = cache_type or LINKED_CACHE


def _start_from_checkout(checkout: Path, path: Path, log: Callable[[str], None]) -> None:
    head = git(checkout, "rev-parse", "HEAD").strip()
    if (path / ".git").exists():
        git(path, "checkout", "--quiet", "--force", "--detach", head)
        git(path, "clean", "-fdq")  # leaves git-ignored outputs and checkpoints: DVC and resume decide
    else:
        shutil.rmtree(path, ignore_errors=True)  # a leftover that is no worktree
        git(checkout, "worktree", "prune")
        git(checkout, "worktree", "add", "--quiet", "--detach", str(path), head)
    changed, deleted = uncommitted(checkout)
    for rel in changed:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkout / rel, path / rel)
    for rel in deleted:
        (path / rel).unlink(missing_ok=True)
    _use_checkout_dvc_config(checkout, path)
    # checkpoints are `persist` outputs DVC does not cache: the run sees the checkout's
    shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
    if (checkout / CHECKPOINTS).is_dir():
        shutil.copytree(checkout / CHECKPOINTS, path / CHECKPOINTS, copy_function=_link_or_copy, symlinks=True)
    restored = dvc(path, "checkout")  # outputs missing from the cache are not fatal: their stages rerun
    for line in (restored.stdout + restored.stderr).splitlines():
        log(f"dvc checkout: {line}")


@contextlib.contextmanager
def run_workspace(checkout: Path, name: str, log: Callable[[str], None]) -> Iterator[Path]:
    """The workspace of experiment `name`, started from (or brought up to) the checkout's state,
    held by this run alone while the context lasts."""
    runs = checkout / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f"{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(f"experiment {name!r} is already running in {checkout}") from None
        path = runs / name
        state = checkout_state(checkout)
        seed = path / SEED
        if seed.exists() and seed.read_text() == state:
            log(f"continuing in the run workspace {path}")
            _use_checkout_dvc_config(checkout, path)
        else:
            log(f"starting the run workspace {path} from the checkout")
            seed.unlink(missing_ok=True)  # a reset cut short starts over
            _start_from_checkout(checkout, path, log)
            seed.parent.mkdir(parents=True, exist_ok=True)
            seed.write_text(state)
        yield path


@contextlib.contextmanager
def exclusive(checkout: Path, what: str) -> Iterator[None]:
    """One run at a time of `what` in this checkout (e.g. `dvc exp save`, which writes shared git refs)."""
    (checkout / RUNS).mkdir(parents=True, exist_ok=True)
    with open(checkout / RUNS / f".{what}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def experiment_ref(checkout: Path, name: str) -> str:
    """The git ref DVC stores the experiment `name` of the checkout's commit under."""
    head = git(checkout, "rev-parse", "HEAD").strip()
    return f"refs/exps/{head[:2]}/{head[2:]}/{name}"
