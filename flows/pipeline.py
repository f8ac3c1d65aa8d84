"""The Prefect flow over the DVC pipeline: Prefect schedules, retries and observes; DVC stays
the record of what ran with what.

The stages and their order come from dvc.yaml (DVC's own graph), never from a list kept here.
Each run works in a workspace of its own (flows/workspace.py) and is saved as a DVC experiment.
Each stage is a task that runs `dvc repro --single-item <stage>` in its own process group and
streams its output into the run logger. Cancellation, a task timeout or a worker's SIGTERM
(Prefect raises TerminationSignal in the flow process) kill the whole group, and DVC's
read/write locks of the killed processes are released, so the next run starts cleanly.
A retried sft or dpo resumes from its latest checkpoint (the stages do that themselves).
Invalid params or data fail at once: params are validated before any stage runs, and a stage
that reports a permanent failure is not retried.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import networkx as nx
import psutil
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff
from ruamel.yaml import YAML

from flows.workspace import check_experiment_name, dvc, exclusive, experiment_ref, git, run_workspace, untracked_files
from stack_dpo.experiment import check_machine
from stack_dpo.faults import INVALID_INPUT_EXIT
from stack_dpo.outputs import write_text_atomic
from stack_dpo.params import PARAMS_FILE, deep_merge, flatten, read_yaml, validate
from stack_dpo.paths import MERGED, METRICS, PUSH_REPORT

GPU_LIMIT = "gpu"  # the Prefect global concurrency limit GPU stages hold a slot of
KILL_GRACE_S = 10
STAGE_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")  # DVC's line for a failed stage command


class StageFailed(RuntimeError):
    """A stage exited non-zero; retrying may help (a killed worker, a lost node, a flaky disk)."""


class PermanentStageFailure(RuntimeError):
    """Invalid params or data: retrying cannot help."""


def pipeline_stages(workdir: Path) -> list[tuple[str, bool]]:
    """(name, uses_gpu) of every dvc.yaml stage, upstream first; `meta: {gpu: true}` marks GPU stages."""
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = reversed(list(nx.topological_sort(graph)))
        return [(stage.name, bool((stage.meta or {}).get("gpu"))) for stage in order]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group, SIGKILL what is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def release_dead_dvc_locks(workdir: Path) -> int:
    """Drop the read/write locks that killed dvc processes left in .dvc/tmp/rwlock."""
    from dvc.lock import make_lock

    lock_dir = workdir / ".dvc" / "tmp"
    path = lock_dir / "rwlock"
    if not path.exists():
        return 0
    with make_lock(str(lock_dir / "rwlock.lock"), tmp_dir=str(lock_dir)):
        lock = json.loads(path.read_text() or "{}")
        alive = lambda info: psutil.pid_exists(info["pid"])  # noqa: E731
        before = len(lock.get("write", {})) + sum(map(len, lock.get("read", {}).values()))
        lock["write"] = {p: info for p, info in lock.get("write", {}).items() if alive(info)}
        lock["read"] = {p: kept for p, infos in lock.get("read", {}).items() if (kept := list(filter(alive, infos)))}
        after = len(lock["write"]) + sum(map(len, lock["read"].values()))
        write_text_atomic(path, json.dumps(lock))
    return before - after


def run_dvc(args: list[str], workdir: Path, log_line) -> tuple[int, list[str]]:
    """Run `dvc ARGS` in its own process group, passing each output line to `log_line`.
    Whatever interrupts the wait (cancellation, timeout, SIGTERM) kills the group first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "--wait-for-lock", *args], cwd=workdir, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )
    lines: list[str] = []
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                # short waits keep the thread in Python, so Prefect's timeout can interrupt it
                if not selector.select(timeout=0.5):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line.rstrip())
                log_line(lines[-1])
        return proc.wait(), lines
    except BaseException:
        _kill_group(proc)
        release_dead_dvc_locks(workdir)
        raise


def _retry_unless_permanent(task, task_run, state) -> bool:
    try:
        state.result()
    except PermanentStageFailure:
        return False
    except Exception:
        return True
    return True


@task(task_run_name="{stage}", retry_condition_fn=_retry_unless_permanent)
def run_stage(stage: str, workdir: str, uses_gpu: bool) -> None:
    logger = get_run_logger()
    slot = concurrency(GPU_LIMIT, occupy=1, strict=True) if uses_gpu else contextlib.nullcontext()
    with slot:
        returncode, lines = run_dvc(["repro", "--single-item", stage], Path(workdir), logger.info)
    if returncode != 0:
        # the stage's own exit code (stack_dpo.faults), as DVC reports it, decides the retry
        exit_codes = [int(found) for line in lines for found in STAGE_EXIT.findall(line)]
        reason = next((line for line in reversed(lines) if line.startswith("stack-dpo: ")), " | ".join(lines[-3:]))
        if exit_codes and exit_codes[-1] == INVALID_INPUT_EXIT:
            raise PermanentStageFailure(f"stage {stage}: {reason}")
        raise StageFailed(f"stage {stage}: `dvc repro --single-item {stage}` exited {returncode}"
                          + (f" (the stage exited {exit_codes[-1]})" if exit_codes else "") + f": {reason}")


def ensure_gpu_limit(slots: int) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run made it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


def params_with_overrides(checkout: Path, overrides: dict) -> str:
    """The checkout's params.yaml with `overrides` merged in (comments kept), validated with the
    stages' schema and checked against this machine (a GPU where the params ask for one, access to
    the base, disk): invalid params fail here, before any stage or workspace. The flow's process
    stays off the GPU (no CUDA context held beside the stages); each GPU stage checks it first."""
    original = (checkout / PARAMS_FILE).read_text()
    params = validate(deep_merge(read_yaml(checkout / PARAMS_FILE), overrides), f"{PARAMS_FILE} + flow overrides")
    check_machine(params, probe_gpu=False)
    if not overrides:
        return original
    rt = YAML()
    data = rt.load(original)

    def merge(node, changes):
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            else:
                node[key] = value

    merge(data, overrides)
    buffer = io.StringIO()
    rt.dump(data, buffer)
    return buffer.getvalue()


def merged_model_hash(workspace: Path) -> str | None:
    """The DVC cache hash of models/merged as the run's dvc.lock records it."""
    lock = workspace / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
    outs = stages.get("merge", {}).get("outs", [])
    return next((out.get("md5") for out in outs if out["path"] == MERGED.as_posix()), None)


def run_summary(workspace: Path, overrides: dict, experiment: str, commit: str | None) -> str:
    def read(path: Path) -> dict:
        return json.loads((workspace / path).read_text()) if (workspace / path).exists() else {}

    evaluation, prepare, push = read(METRICS / "evaluate.json"), read(METRICS / "prepare.json"), read(PUSH_REPORT)
    lines = [f"# stack-dpo run `{experiment}`", "", "## Params that differ from params.yaml"]
    lines += [f"- `{key}` = `{value}`" for key, value in flatten(overrides).items()] or ["- none (the default)"]
    lines += ["", "## Evaluation (held-out split, against the SFT model)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {value:.4g} |" for key, value in evaluation.items()]
    lines += ["", "## Data dropped by prepare, by reason", "", "| output | input | kept | dropped |",
              "| --- | --- | --- | --- |"]
    for name, counts in prepare.items():
        dropped = ", ".join(f"{reason}: {n}" for reason, n in counts["dropped"].items() if n) or "none"
        lines.append(f"| {name} | {counts['input']} | {counts['kept']} | {dropped} |")
    lines += ["", "## Where the results are", "",
              f"- DVC experiment `{experiment}`" + (f", commit `{commit}`" if commit else "")
              + f": `dvc exp show`, and `dvc exp apply {experiment}` to bring its params and outputs into a checkout"]
    merged = merged_model_hash(workspace)
    if merged:
        lines.append(f"- merged model: `{MERGED}` in the DVC cache as `{merged}`")
    if push.get("pushed"):
        lines.append(f"- Hub: `{push['repo_id']}` @ `{push['revision']}`, commit `{push['commit']}`")
    else:
        lines.append(f"- not pushed: {push.get('reason', 'push did not run')}")
    lines.append(f"- run workspace (kept; a rerun of `{experiment}` continues there): `{workspace}`")
    return "\n".join(lines) + "\n"


@flow(name="stack-dpo", log_prints=True)
def pipeline(
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    stages: list[str] | None = None,
    experiment: str | None = None,
    workdir: str = ".",
    retries: int = 2,
    retry_backoff_s: float = 10.0,
    retry_jitter_factor: float = 0.5,
    stage_timeout_s: float | None = None,
    gpu_slots: int = 1,
) -> dict:
    """Run the DVC stages (all, or `stages`) with the checkout's params.yaml changed by a `profile`
    file (e.g. profiles/llama2-7b.yaml) and then by `overrides` (nested, like params.yaml), in a
    workspace of the run's own (flows/workspace.py), and record the run as the DVC experiment
    `experiment` (the flow run's name when None). The checkout in `workdir` is never written."""
    logger = get_run_logger()
    checkout = Path(workdir).resolve()
    experiment = experiment or flow_run.get_name()
    check_experiment_name(experiment)
    overrides = deep_merge((read_yaml(checkout / profile) or {}) if profile else {}, overrides or {})
    params = params_with_overrides(checkout, overrides)  # invalid params fail here, before any stage
    order = pipeline_stages(checkout)
    unknown = set(stages or []) - {name for name, _ in order}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; dvc.yaml has {[n for n, _ in order]}")
    ensure_gpu_limit(gpu_slots)
    stage_task = run_stage.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s),
        retry_jitter_factor=retry_jitter_factor,
        timeout_seconds=stage_timeout_s,
    )
    with run_workspace(checkout, experiment, logger.info) as workspace:
        write_text_atomic(workspace / PARAMS_FILE, params)
        started = time.monotonic()
        for name, uses_gpu in order:
            if stages is None or name in stages:
                stage_task(name, str(workspace), uses_gpu)
        logger.info("stages finished in %.1f s", time.monotonic() - started)
        # a partial run records and pushes the stages it ran (the others' outputs may be missing)
        ran = [name for name, _ in order if stages is not None and name in stages]
        untracked = [arg for path in untracked_files(workspace) for arg in ("--include-untracked", path)]
        with exclusive(checkout, "exp-save"):  # experiments of all workspaces share the checkout's git refs
            saved = run_dvc(["exp", "save", "--force", "--name", experiment, *untracked, *ran], workspace,
                            logger.info)
        if saved[0] != 0:
            raise RuntimeError(f"dvc exp save failed: {saved[1][-3:]}")
        commit = git(checkout, "rev-parse", "--verify", "--quiet", experiment_ref(checkout, experiment)).strip()
        remotes = dvc(workspace, "remote", "list").stdout
        if remotes.strip():
            pushed = run_dvc(["push", *ran], workspace, logger.info)
            if pushed[0] != 0:  # the outputs are not on the remote: the run must not look done
                raise RuntimeError(f"dvc push failed: {' | '.join(pushed[1][-3:])}")
        create_markdown_artifact(run_summary(workspace, overrides, experiment, commit), key="stack-dpo-run",
                                 description="params, metrics, drops and where the results are")
        evaluation = workspace / METRICS / "evaluate.json"
        return json.loads(evaluation.read_text()) if evaluation.exists() else {}
