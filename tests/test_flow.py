"""The Prefect flow over the DVC stages, against Prefect's test harness (a real local API)."""

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import PermanentStageFailure, pipeline, pipeline_stages, release_dead_dvc_locks
from stages.params import ParamsError
from tests.conftest import FAST, make_clone, stage_processes


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_run_counts(state) -> dict[str, int]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return {run.name: run.run_count for run in runs}


def test_stage_order_and_gpu_marks_come_from_dvc_yaml(tmp_path):
    repo = make_clone(tmp_path)
    assert pipeline_stages(repo) == [("sources", False), ("fetch", False), ("prepare", False), ("sft", True),
                                     ("reference", True), ("dpo", True), ("merge", True), ("evaluate", True),
                                     ("push", False)]
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"]["summary"] = {"cmd": "cat metrics/evaluate.json", "deps": ["metrics/evaluate.json"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    names = [name for name, _ in pipeline_stages(repo)]
    assert len(names) == 10 and names.index("summary") > names.index("evaluate")


def test_invalid_overrides_fail_before_any_stage(harness, tmp_path):
    repo = make_clone(tmp_path)
    before = (repo / "params.yaml").read_text()
    with pytest.raises(ParamsError, match=r"dpo\.beta = -1: Input should be greater than 0"):
        pipeline(overrides={"dpo": {"beta": -1}}, workdir=str(repo))
    assert not (repo / "data" / "raw").exists()
    assert (repo / "params.yaml").read_text() == before


@pytest.mark.slow
def test_permanent_failure_is_not_retried(harness, tmp_path):
    repo = make_clone(tmp_path)
    overrides = {**FAST, "prepare": {"max_prompt_length": 5}}  # every pair too long: nothing left
    state = pipeline(overrides=overrides, workdir=str(repo), retries=3, retry_backoff_s=0.1, return_state=True)
    assert state.is_failed()
    with pytest.raises(PermanentStageFailure, match="no rows left for dpo/train"):
        state.result()
    assert task_run_counts(state) == {"sources": 1, "fetch": 1, "prepare": 1}


def _kill_first_sft_after(repo: Path, checkpoint: Path, killed: list[int]) -> None:
    """Fault injection from outside: SIGKILL the sft stage process once its checkpoint exists."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not killed:
        if (checkpoint / "trainer_state.json").exists():
            for proc in stage_processes(repo, "sft"):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_sft_is_retried_and_resumes_from_its_checkpoint(harness, tmp_path):
    repo = make_clone(tmp_path)
    overrides = {**FAST, "sft": {"train": {"max_steps": 12, "save_steps": 2, "eval_steps": 12, "logging_steps": 1,
                                            "save_total_limit": 10}}}
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_first_sft_after,
                               args=(repo, repo / "checkpoints/sft/checkpoint-4", killed))
    watcher.start()
    state = pipeline(overrides=overrides, experiment="resumed", workdir=str(repo), retries=2, retry_backoff_s=0.1,
                     return_state=True)
    watcher.join()
    assert killed, "the sft stage was never killed"
    assert state.is_completed(), state
    counts = task_run_counts(state)
    assert counts["sft"] == 2 and all(n == 1 for name, n in counts.items() if name != "sft"), counts
    sft = json.loads((repo / "metrics/sft.json").read_text())
    assert sft["resumed_from_step"] >= 4 and sft["global_step"] == 12
    state_file = json.loads((repo / "checkpoints/sft/checkpoint-12/trainer_state.json").read_text())
    steps = [entry["step"] for entry in state_file["log_history"] if "loss" in entry]
    assert steps == sorted(set(steps))  # no step trained twice
    assert json.loads((repo / "metrics/evaluate.json").read_text())["n_pairs"] > 0
    assert (repo / "params.yaml").read_text() == (make_clone(tmp_path / "pristine") / "params.yaml").read_text()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
        artifacts = client.read_artifacts()
    summary = next(a for a in artifacts if a.key == "stack-dpo-run").data
    assert "`sft.train.max_steps` = `12`" in summary and "rewards/accuracies" in summary
    assert "## Data dropped by prepare, by reason" in summary and "| dpo/train | 160 |" in summary
    assert "baseline/sft_accuracy" in summary and "not pushed" in summary


def test_locks_of_killed_dvc_processes_are_released(tmp_path):
    lock_dir = tmp_path / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True)
    dead = psutil.Popen(["true"])
    dead.wait()
    alive = {"pid": psutil.Process().pid, "cmd": "dvc repro"}
    (lock_dir / "rwlock").write_text(json.dumps({
        "write": {"/w/models/dpo": {"pid": dead.pid, "cmd": "dvc repro"}, "/w/models/sft": alive},
        "read": {"/w/params.yaml": [{"pid": dead.pid, "cmd": "dvc repro"}, alive]},
    }))
    assert release_dead_dvc_locks(tmp_path) == 2
    assert json.loads((lock_dir / "rwlock").read_text()) == {
        "write": {"/w/models/sft": alive}, "read": {"/w/params.yaml": [alive]}}


def test_stage_timeout_kills_the_stage_and_leaves_no_lock(harness, tmp_path):
    repo = make_clone(tmp_path)
    state = pipeline(workdir=str(repo), stages=["fetch"], stage_timeout_s=1.5, retries=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="timed out|TimeoutError|exceeded timeout"):
        state.result()
    time.sleep(0.5)
    assert stage_processes(repo) == []
    rwlock = repo / ".dvc/tmp/rwlock"
    assert not rwlock.exists() or json.loads(rwlock.read_text()) == {"write": {}, "read": {}}
