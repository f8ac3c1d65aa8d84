"""Shared fixtures: throw-away workspaces (params.yaml + the bundled sample) and one tiny
trained chain (fetch -> prepare -> sft -> reference -> dpo -> merge -> evaluate) that the stage
tests read, read-only (a test that writes works on writable_copy(trained, ...))."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stack_dpo.params import deep_merge, load_params

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

# Small enough for seconds per stage, big enough that every stage does real work.
FAST = {
    "fetch": {"max_rows": {"finetune": 300, "rl": 160, "evaluation": 64}},
    "sft": {"train": {"max_steps": 4, "save_steps": 2, "eval_steps": 4, "logging_steps": 1}},
    "dpo": {"train": {"max_steps": 4, "save_steps": 2, "eval_steps": 4, "logging_steps": 1}},
    "evaluate": {"generations": 1, "max_new_tokens": 8},
}


def make_workspace(root: Path, overrides: dict | None = None, fast: bool = True) -> Path:
    """A folder laid out like the repo root for the stages: params.yaml and data/sample."""
    root.mkdir(parents=True, exist_ok=True)
    params = deep_merge(DEFAULT_PARAMS, FAST) if fast else DEFAULT_PARAMS
    params = deep_merge(params, overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "data").mkdir(exist_ok=True)
    if not (root / "data" / "sample").exists():
        (root / "data" / "sample").symlink_to(REPO / "data" / "sample")
    return root


@contextlib.contextmanager
def inside(folder: Path):
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield load_params()
    finally:
        os.chdir(old)


def subprocess_env(code: Path | None = REPO, **extra: str) -> dict[str, str]:
    """The environment of every subprocess a test starts (stages, dvc, prefect, flows): this
    environment's python and CLIs first on PATH, no DVC analytics, and `code` importable (this
    checkout; None for a clone's own code, which python -m finds from the working directory)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(code) if code else "", **extra}


class Raised:
    value: BaseException | None = None


@contextlib.contextmanager
def refused(expected: type[BaseException] | tuple, match: str = ""):
    """pytest.raises(expected, match=match), but another exception fails the test on an assertion
    too: code that went past the refusal it should have made and broke further on has not refused."""
    raised = Raised()
    try:
        yield raised
    except expected as exc:
        raised.value = exc
        assert re.search(match, str(exc)), f"{type(exc).__name__}: {exc} does not match {match!r}"
        return
    except Exception as exc:
        raise AssertionError(f"expected {expected} matching {match!r}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"expected {expected} matching {match!r}; nothing was raised")


@pytest.fixture(scope="session", autouse=True)
def venv_on_path():
    """dvc runs stage commands as `python -m ...`: make that this environment's python."""
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ["DVC_NO_ANALYTICS"] = "1"


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=stack-dpo-tests", "-c", "user.email=tests@localhost", *args],
                   cwd=root, check=True, capture_output=True)


def make_clone(root: Path) -> Path:
    """This checkout's tracked and untracked-but-not-ignored files as a fresh git repo, as a
    clean clone of main would have them (outputs and .venv stay behind)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "clone")
    return root


def stage_processes(root: Path, stage: str = "") -> list:
    """Live `python -m stages.<stage>` processes working in `root` (not other runs on the machine)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline, cwd = proc.info["cmdline"] or [], proc.info["cwd"] or ""
        if any(arg.startswith(f"stages.{stage}") for arg in cmdline) and cwd.startswith(str(root)):
            found.append(proc)
    return found


def flow_run_logs(flow_run_id) -> list[str]:
    """Every log message of a Prefect flow run and its task runs, all pages."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                       offset=len(messages)):
            messages += [log.message for log in page]
    return messages


def task_run_counts(flow_run_id) -> dict[str, int]:
    """How many times each task (stage) of a flow run ran: 2 means it was retried once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.run_count for run in runs}


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path / "ws")


TRAINED_STAGES = ("fetch", "prepare", "sft", "reference", "dpo", "merge", "evaluate")
# `make mutants` builds the trained chain once with the code unchanged and hands it over here:
# a planted bug reruns the chain from the first stage whose code (stack_dpo.layout.code_files) it changed
TRAINED_CACHE = "STACK_DPO_TRAINED_CACHE"


def code_digest(stage: str) -> str:
    from stack_dpo import layout

    digest = hashlib.sha256()
    for name in layout.code_files(stage):
        digest.update(name.encode() + b"\0" + (layout.ROOT / name).read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def recording_param_reads(params):
    """The params keys read while the block runs (`sft.train.max_steps`; a whole section when it
    is dumped or copied): {"uses": keys, "checks": keys read only inside stack_dpo.machine's
    check_machine, which refuses a run but never changes its outputs}. Section's attribute
    access is watched on `params`' tree (in this process: forked workers are not seen)."""
    from stack_dpo.params import Section

    where: dict[int, str] = {}

    def index(section, prefix: str) -> None:
        where[id(section)] = prefix
        for name in type(section).model_fields:
            value = object.__getattribute__(section, name)
            if isinstance(value, Section):
                index(value, f"{prefix}{name}.")

    index(params, "")
    reads: dict[str, set[str]] = {"uses": set(), "checks": set()}
    plain = Section.__getattribute__

    def in_machine_check() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_name == "check_machine" and frame.f_code.co_filename.endswith("machine.py"):
                return True
            frame = frame.f_back
        return False

    def watched(self, name):
        value = plain(self, name)
        prefix = where.get(id(self))
        key = None
        if prefix is not None:
            if name in type(self).model_fields and not isinstance(value, Section):
                key = prefix + name
            elif name in ("model_dump", "model_dump_json", "model_copy") and prefix:
                key = prefix.rstrip(".")
        if key is not None:
            reads["checks" if in_machine_check() else "uses"].add(key)
        return value

    Section.__getattribute__ = watched
    try:
        yield reads
    finally:
        Section.__getattribute__ = plain
        reads["checks"] -= reads["uses"]


def build_trained(root: Path, reuse: Path | None = None) -> Path:
    """The trained chain in root/ws; root/built.json keeps each stage's code digest and the
    params keys it read. With `reuse` (another build_trained root), its stages are copied up
    to the first whose code differs here, and that one and the rest run again."""
    import importlib

    ws, start, built = root / "ws", 0, {"code": {}, "reads": {}}
    if reuse is not None:
        built = json.loads((reuse / "built.json").read_text())
        while start < len(TRAINED_STAGES) and built["code"].get(TRAINED_STAGES[start]) == code_digest(
                TRAINED_STAGES[start]):
            start += 1
        shutil.copytree(reuse / "ws", ws, symlinks=True)
        for stage in TRAINED_STAGES[start:]:  # retrained from scratch, not resumed
            for folder in ("checkpoints", "dvclive"):
                shutil.rmtree(ws / folder / stage, ignore_errors=True)
    make_workspace(ws, {"prepare": {"num_proc": 1}})  # in this process, where the params reads are seen
    with inside(ws) as params:
        for stage in TRAINED_STAGES[start:]:
            with recording_param_reads(params) as reads:
                importlib.import_module(f"stages.{stage}").run(params)
            built["code"][stage] = code_digest(stage)
            built["reads"][stage] = {kind: sorted(keys) for kind, keys in reads.items()}
    (root / "built.json").write_text(json.dumps(built, indent=1))
    return ws


def tree_digest(root: Path) -> str:
    """sha256 of every file's path and bytes under root (symlinks not followed)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def set_writable(root: Path, writable: bool) -> None:
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o200 if writable else mode & ~0o222)
    root.chmod(root.stat().st_mode | 0o200 if writable else root.stat().st_mode & ~0o222)


def writable_copy(trained: Path, dest: Path, checkpoints: bool = True) -> Path:
    """A copy of the shared trained workspace that a test may change."""
    shutil.copytree(trained, dest, symlinks=True, ignore=None if checkpoints else shutil.ignore_patterns("checkpoints"))
    set_writable(dest, True)
    return dest


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A workspace where every stage up to evaluate has run once on FAST params. Read-only: its
    files lose their write bits, and at the end of the session its bytes must be as built."""
    cache = os.environ.get(TRAINED_CACHE)
    root = build_trained(tmp_path_factory.mktemp("trained"), Path(cache) if cache else None)
    built = tree_digest(root)
    set_writable(root, False)
    yield root
    set_writable(root, True)  # pytest removes it later
    assert tree_digest(root) == built, "a test changed the shared trained workspace (use writable_copy)"


def shuffled_files(items: list, seed: str) -> list:
    """The tests in a seeded random order of their files, each file's tests in their order."""
    files = sorted({str(item.path) for item in items})  # the order depends on the seed and the files only
    random.Random(seed).shuffle(files)
    rank = {path: i for i, path in enumerate(files)}
    return sorted(items, key=lambda item: rank[str(item.path)])  # stable: a file's own order is kept


SHUFFLE_SEED = "STACK_DPO_TEST_ORDER"  # a seed: the files run in that shuffled order ("" keeps pytest's)


def pytest_collection_modifyitems(session, config, items):
    seed = os.environ.get(SHUFFLE_SEED, "")
    if seed:
        items[:] = shuffled_files(items, seed)


def pytest_report_header(config):
    seed = os.environ.get(SHUFFLE_SEED, "")
    return f"test files in the order of {SHUFFLE_SEED}={seed}" if seed else None
