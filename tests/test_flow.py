"""The Prefect flow over the DVC stages, against Prefect's test harness (a real local API)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import PermanentStageFailure, pipeline, pipeline_stages, release_dead_dvc_locks
from flows.workspace import RUNS, git
from stack_dpo.params import InvalidInput, ParamsError, deep_merge
from tests.conftest import (
    DEFAULT_PARAMS,
    FAST,
    flow_run_logs,
    make_clone,
    refused,
    stage_processes,
    subprocess_env,
    task_run_counts,
)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


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


def test_invalid_overrides_fail_before_any_stage(harness, tmp_path, monkeypatch):
    repo = make_clone(tmp_path)
    before = (repo / "params.yaml").read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine, GPU hosts too
    with pytest.raises(InvalidInput, match="launch.device = 'cuda': this machine has no CUDA GPU"):
        pipeline(profile="profiles/llama2-7b.yaml", workdir=str(repo))
    with pytest.raises(ParamsError, match=r"dpo\.beta = -1: Input should be greater than 0"):
        pipeline(overrides={"dpo": {"beta": -1}}, workdir=str(repo))
    with pytest.raises(ValueError, match="experiment name 'a b' is not valid"):
        pipeline(experiment="a b", workdir=str(repo))
    assert not (repo / "data" / "raw").exists() and not (repo / RUNS).exists()
    assert (repo / "params.yaml").read_text() == before


@pytest.mark.slow
def test_permanent_failure_is_not_retried(harness, tmp_path):
    repo = make_clone(tmp_path)
    overrides = {**FAST, "prepare": {"max_prompt_length": 5}}  # every pair too long: nothing left
    state = pipeline(overrides=overrides, workdir=str(repo), retries=1, retry_backoff_s=0.1, return_state=True)
    assert state.is_failed()
    with refused(PermanentStageFailure, match="no rows left for dpo/train"):
        state.result()
    assert task_run_counts(state.state_details.flow_run_id) == {"sources": 1, "fetch": 1, "prepare": 1}


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
    state = pipeline(workdir=str(repo), stages=["fetch"], stage_timeout_s=1.5, retries=0, experiment="timeout",
                     return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="timed out|TimeoutError|exceeded timeout"):
        state.result()
    time.sleep(0.5)
    assert stage_processes(repo) == []
    rwlock = repo / RUNS / "timeout/.dvc/tmp/rwlock"
    assert not rwlock.exists() or json.loads(rwlock.read_text()) == {"write": {}, "read": {}}


def dvc_cli(repo: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def flow_run(repo: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """The flow in a process of its own (as a worker starts it), against this module's Prefect API."""
    script = ("import json, sys\nfrom flows.pipeline import pipeline\n"
              "pipeline(workdir=sys.argv[1], **json.loads(sys.argv[2]))\n")
    env = subprocess_env(PREFECT_API_URL=PREFECT_API_URL.value(), **(env or {}))
    return subprocess.Popen([sys.executable, "-c", script, str(repo), json.dumps(kwargs)], cwd=repo, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_flow_pushes_what_it_ran_to_the_dvc_remote_and_fails_when_the_push_fails(harness, tmp_path):
    repo = make_clone(tmp_path / "ws")
    remote = tmp_path / "remote"
    dvc_cli(repo, "remote", "add", "--local", "-d", "storage", str(remote))
    state = pipeline(workdir=str(repo), stages=["fetch"], overrides=FAST, experiment="pushed", return_state=True)
    assert state.is_completed(), state
    outs = yaml.safe_load((repo / RUNS / "pushed/dvc.lock").read_text())["stages"]["fetch"]["outs"]
    raw = next(out for out in outs if out["path"] == "data/raw")
    assert (remote / "files/md5" / raw["md5"][:2] / raw["md5"][2:]).is_file()  # its .dir listing, and below its files
    assert len(list((remote / "files/md5").rglob("*"))) > raw["nfiles"]
    # a remote that cannot be written: the run fails and says why, instead of looking done
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    dvc_cli(repo, "remote", "modify", "--local", "storage", "url", str(blocker / "remote"))
    state = pipeline(workdir=str(repo), stages=["fetch"], overrides=FAST, experiment="pushed", return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="dvc push failed"):
        state.result()


RECORD_STAGE = """
import json, os, sys, time, yaml
from prefect.client.orchestration import get_client
started = time.time()
with get_client(sync_client=True) as client:  # the GPU slots taken while this stage runs
    held = client.read_global_concurrency_limit_by_name("gpu").active_slots
time.sleep(float(sys.argv[2]))
beta = yaml.safe_load(open("params.yaml"))["dpo"]["beta"]
open(sys.argv[1] + ".json", "w").write(json.dumps({"beta_seen": beta}))
with open(os.environ["INTERVALS"], "a") as fh:
    fh.write(json.dumps([os.getcwd(), sys.argv[1], started, time.time(), held]) + "\\n")
"""


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show` of the checkout: each experiment's name -> its params and metrics."""
    shown = json.loads(dvc_cli(repo, "exp", "show", "--json"))
    return {rev["name"]: rev["data"] for entry in shown for exp in entry.get("experiments") or []
            for rev in exp["revs"]}


@pytest.mark.slow
def test_two_runs_in_one_checkout_keep_their_own_params_and_hold_the_gpu_slot_one_at_a_time(harness, tmp_path):
    """Two flow runs at once in one checkout, with different overrides, each a CPU stage and then
    a GPU stage (`meta: {gpu: true}`) of 3 s: both complete, each is its own experiment, the
    checkout is untouched, each GPU stage runs while the one GPU slot is taken (read from the
    Prefect server inside the stage: whether the two runs happen to meet does not decide it),
    and their GPU stages never overlap."""
    intervals = tmp_path / "intervals.jsonl"
    repo = make_clone(tmp_path / "ws")
    (repo / "record.py").write_text(RECORD_STAGE)  # uncommitted changes: the runs see them too
    (repo / "dvc.lock").unlink()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "cpu": {"cmd": "python record.py cpu 0", "params": ["dpo.beta"], "outs": ["cpu.json"]},
        "gpu": {"cmd": "python record.py gpu 3", "deps": ["cpu.json"], "params": ["dpo.beta"],
                "metrics": [{"gpu.json": {"cache": False}}], "meta": {"gpu": True}},
    }}))
    before = {path: (repo / path).read_bytes() for path in ("params.yaml", "dvc.yaml", "record.py")}
    betas = {"beta-low": 0.05, "beta-high": 0.4}
    runs = [flow_run(repo, {"INTERVALS": str(intervals)}, gpu_slots=1, experiment=name,
                     overrides={"dpo": {"beta": beta}}) for name, beta in betas.items()]
    for run in runs:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out[-3000:]
    records = [json.loads(line) for line in intervals.read_text().splitlines()]
    gpu = sorted((start, end) for _, stage, start, end, _ in records if stage == "gpu")
    assert len(gpu) == 2 and len(records) == 4
    assert [held for _, stage, *_, held in records if stage == "gpu"] == [1, 1], records
    assert gpu[0][1] <= gpu[1][0], f"GPU stages overlapped: {gpu}"
    assert {cwd for cwd, *_ in records} == {str(repo / RUNS / name) for name in betas}
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
    shown = experiments(repo)
    for name, beta in betas.items():
        assert shown[name]["params"]["params.yaml"]["data"]["dpo"]["beta"] == beta
        assert shown[name]["metrics"]["gpu.json"]["data"] == {"beta_seen": beta}
    assert {path: (repo / path).read_bytes() for path in before} == before
    assert not (repo / "cpu.json").exists() and not (repo / "gpu.json").exists() and not (repo / "dvc.lock").exists()


@pytest.mark.slow
def test_a_stage_that_meets_a_busy_dvc_lock_is_retried_until_it_runs(harness, tmp_path):
    repo = make_clone(tmp_path / "ws")
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(DEFAULT_PARAMS, FAST), sort_keys=False))
    assert pipeline(workdir=str(repo), stages=["fetch"], experiment="busy", return_state=True).is_completed()
    run = repo / RUNS / "busy"  # the next run of experiment `busy` continues in this workspace
    # another `dvc repro` there reads data/raw (prepare) while the flow wants to rewrite it (fetch)
    other = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "--force", "prepare"], cwd=run,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not stage_processes(run, "prepare"):
        assert time.monotonic() < deadline and other.poll() is None, other.communicate()[0]
        time.sleep(0.05)
    state = pipeline(workdir=str(repo), stages=["fetch"], experiment="busy", retries=8, retry_backoff_s=1,
                     retry_jitter_factor=0, return_state=True)
    assert other.wait() == 0
    assert state.is_completed(), state
    assert task_run_counts(state.state_details.flow_run_id)["fetch"] >= 2  # the first try met the lock and was retried
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert any("is busy, it is being blocked by" in message for message in logs)


@pytest.mark.slow
def test_sigterm_of_the_flow_process_kills_the_stage_process_group(harness, tmp_path):
    """A Prefect worker stops a run by SIGTERM to the flow process alone: the stage's dvc and
    python processes must die with it and leave no DVC lock."""
    repo = make_clone(tmp_path / "ws")
    run = flow_run(repo, overrides={**FAST, "sft": {"train": {"max_steps": 500}}}, experiment="sigterm")
    deadline = time.monotonic() + 300
    while not stage_processes(repo, "sft"):
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()[0][-3000:]
        time.sleep(0.2)
    group = [p for p in psutil.process_iter(["cwd"]) if (p.info["cwd"] or "").startswith(str(repo))
             and p.pid != run.pid]
    assert group and all(os.getpgid(p.pid) != run.pid for p in group)  # they are in a group of their own
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=60)
    assert run.returncode != 0, out[-3000:]
    gone, alive = psutil.wait_procs(group, timeout=15)
    assert alive == [], [p.cmdline() for p in alive]
    assert stage_processes(repo) == []
    assert json.loads((repo / RUNS / "sigterm/.dvc/tmp/rwlock").read_text()) == {"write": {}, "read": {}}
    assert git(repo, "status", "--porcelain") == ""
