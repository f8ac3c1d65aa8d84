"""Shared fixtures: throw-away workspaces (params.yaml + the bundled sample) and one tiny
trained chain (fetch -> prepare -> sft -> dpo -> merge -> evaluate) that the stage tests read."""

from __future__ import annotations

import contextlib
import os
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A workspace where every stage up to evaluate has run once on FAST params."""
    from stages import dpo, evaluate, fetch, merge, prepare, reference, sft

    root = make_workspace(tmp_path_factory.mktemp("trained"))
    with inside(root) as params:
        for stage in (fetch, prepare, sft, reference, dpo, merge, evaluate):
            stage.run(params)
    return root
