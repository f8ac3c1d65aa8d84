"""Integration with real parts: `prefect server start` on 127.0.0.1 (SQLite in a temporary
PREFECT_HOME), a process worker, `prefect deploy` of prefect.yaml, deployment runs."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import requests
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.workspace import RUNS, git
from stack_dpo.params import deep_merge
from tests.conftest import FAST, flow_run_logs, make_clone, stage_processes, subprocess_env

pytestmark = pytest.mark.slow
QUICK = deep_merge(FAST, {"evaluate": {"max_pairs": 32}})  # fewer than the 64 evaluation rows it fetches


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """A real Prefect server and a process worker serving the deployments of a fresh clone."""
    tmp = tmp_path_factory.mktemp("prefect")
    repo = make_clone(tmp / "repo")
    port = free_port()
    env = subprocess_env(**{"PREFECT_HOME": str(tmp / "home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "STACK_DPO_REPO": repo.as_uri(), "STACK_DPO_IMAGE": "stack-dpo:test",
           "PWD": str(repo)})
    bin_dir = Path(sys.executable).parent
    server = start([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   env, tmp / "server.log")
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, (tmp / "server.log").read_text()
            time.sleep(0.5)

        def cli(*args: str) -> str:
            done = subprocess.run([str(bin_dir / "prefect"), "--no-prompt", *args], env=env, cwd=repo,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        cli("work-pool", "create", "cpu-pool", "--type", "process")
        cli("work-pool", "create", "gpu-k8s", "--type", "kubernetes",
            "--base-job-template", "deploy/k8s-gpu-job-template.json")
        cli("deploy", "--all")
        worker = start([str(bin_dir / "prefect"), "worker", "start", "--pool", "cpu-pool", "--limit", "1"],
                       env, tmp / "worker.log", cwd=repo)
        # this test process's own client talks to the same server
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield {"repo": repo, "cli": cli, "tmp": tmp}
    finally:
        for proc in (worker, server):
            if proc:
                stop(proc)


def run_deployment(prefect, params: dict) -> UUID:
    out = prefect["cli"]("deployment", "run", "stack-dpo/tiny-cpu", "--params", json.dumps(params))
    return UUID(next(line.split()[-1] for line in out.splitlines() if "UUID" in line))


def wait_for(run_id: UUID, timeout: float = 600):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run stuck in {run.state}"
            time.sleep(1)


def test_deployment_run_completes_with_outputs_and_experiment(prefect):
    repo = prefect["repo"]
    run = wait_for(run_deployment(prefect, {"overrides": QUICK, "experiment": "deployed-quick"}))
    assert run.state.is_completed(), run.state
    workspace = repo / RUNS / "deployed-quick"
    assert (workspace / "models/merged/model.safetensors").is_file()
    assert json.loads((workspace / "metrics/evaluate.json").read_text())["n_pairs"] == 32
    assert git(repo, "status", "--porcelain") == "" and not (repo / "models/merged").exists()
    logs = "\n".join(flow_run_logs(run.id))
    for stage in ("fetch", "prepare", "sft", "reference", "dpo", "merge", "evaluate", "push"):
        assert f"Running stage '{stage}'" in logs  # each stage's own output, streamed into the run log
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout
    names = {rev["name"] for entry in json.loads(shown) for exp in entry.get("experiments") or []
             for rev in exp["revs"]}
    assert "deployed-quick" in names


def test_a_rerun_with_unchanged_inputs_finds_every_stage_up_to_date(prefect):
    started = time.monotonic()
    run = wait_for(run_deployment(prefect, {"overrides": QUICK, "experiment": "deployed-quick"}))
    assert run.state.is_completed(), run.state
    logs = "\n".join(flow_run_logs(run.id))
    assert re.findall(r"Running stage '(\w+)'", logs) == ["sources"]  # always run; it reran nothing else
    assert logs.count("didn't change, skipping") == 8
    assert time.monotonic() - started < 120


def test_cancelled_run_leaves_no_stage_process_and_no_dvc_lock(prefect):
    repo = prefect["repo"]
    params_before = (repo / "params.yaml").read_text()
    run_id = run_deployment(prefect, {"overrides": {**QUICK, "sft": {"train": {"max_steps": 500}}},
                                      "experiment": "cancelled"})
    deadline = time.monotonic() + 300
    while not stage_processes(repo, "sft"):
        assert time.monotonic() < deadline, "sft never started"
        time.sleep(0.5)
    prefect["cli"]("flow-run", "cancel", str(run_id))
    run = wait_for(run_id, timeout=120)
    assert run.state.is_cancelled(), run.state
    time.sleep(1)
    assert stage_processes(repo) == []
    rwlock = json.loads((repo / RUNS / "cancelled/.dvc/tmp/rwlock").read_text())
    assert rwlock == {"write": {}, "read": {}}
    assert (repo / "params.yaml").read_text() == params_before
    # the next run starts cleanly
    run = wait_for(run_deployment(prefect, {"stages": ["fetch", "prepare"], "overrides": QUICK}))
    assert run.state.is_completed(), run.state


def test_gpu_deployment_targets_kubernetes_gpus_with_an_inactive_weekly_schedule(prefect):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("stack-dpo/llama2-7b")
        pool = client.read_work_pool("gpu-k8s")
    assert deployment.work_pool_name == "gpu-k8s"
    assert deployment.parameters["profile"] == "profiles/llama2-7b.yaml"
    assert deployment.job_variables["gpu_count"] == 1
    assert deployment.job_variables["node_selector"] == {"nvidia.com/gpu.present": "true"}
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.active is False
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert container["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "{{ gpu_count }}"}
    steps = [next(iter(step)) for step in deployment.pull_steps]
    assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.run_shell_script",
                     "prefect.deployments.steps.set_working_directory"]
