"""Faults and concurrency through the real `dvc` CLI and Prefect: a stage SIGKILLed at a random
moment reruns to the uninterrupted result, two `dvc repro` on one workspace do not collide, and
two flow runs at once (one sft killed and retried, one pushing with a Hub token) are two
experiments over one DVC cache, the token in no file and no Prefect log."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import psutil
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file

from flows.workspace import RUNS, experiment_ref, git
from stack_dpo.params import deep_merge, flatten
from tests.conftest import (
    DEFAULT_PARAMS,
    FAST,
    REPO,
    flow_run_logs,
    make_clone,
    stage_processes,
    subprocess_env,
    task_run_counts,
)

pytestmark = pytest.mark.slow

# More steps than FAST, so a random kill often lands mid-training and a checkpoint is resumed.
PARAMS = deep_merge(DEFAULT_PARAMS, deep_merge(FAST, {
    "sft": {"train": {"max_steps": 8, "save_steps": 2, "eval_steps": 8}},
    "dpo": {"train": {"max_steps": 8, "save_steps": 2, "eval_steps": 8}},
}))
KILLED_STAGES = ["fetch", "prepare", "sft", "reference", "dpo", "merge"]
OUTPUTS = {
    "fetch": ["data/raw"],
    "prepare": ["data/processed/sft", "data/processed/dpo", "metrics/prepare.json"],
    "sft": ["models/sft", "metrics/sft.json"],
    "reference": ["data/processed/reference", "metrics/reference.json"],
    "dpo": ["models/dpo", "metrics/dpo.json"],
    "merge": ["models/merged"],
}


KILL_POINT_HOOK = Path(__file__).parent / "killpoint"  # its sitecustomize kills at STACK_DPO_KILL_POINT


def dvc_env(kill_point: str = "") -> dict[str, str]:
    """The clone's own code runs (not this checkout's); with a kill point, under the kill hook."""
    if kill_point:
        return subprocess_env(code=KILL_POINT_HOOK, STACK_DPO_KILL_POINT=kill_point)
    return subprocess_env(code=None)


def dvc(root: Path, *args: str, check: bool = True, kill_point: str = "") -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(kill_point),
                            capture_output=True, text=True)
    assert not check or result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def small_clone(root: Path) -> Path:
    clone = make_clone(root)
    (clone / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    return clone


def assert_up_to_date(root: Path, *stages: str) -> None:
    """Nothing to rerun but the sources stage, which DVC always runs (it hashes the local sources)."""
    status = json.loads(dvc(root, "status", "--json", *stages).stdout.strip() or "{}")
    assert {stage: why for stage, why in status.items() if why != ["always changed"]} == {}


def start_dvc(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_stage(root: Path, stage: str, dvc_proc: subprocess.Popen, timeout: float = 120):
    """The stage's process once `dvc_proc` has started it, or None if dvc finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and dvc_proc.poll() is None:
        found = stage_processes(root, stage)
        if found:
            return found[0]
        time.sleep(0.02)
    return None


def stage_lifetime(root: Path, stage: str) -> float:
    """Run one stage through dvc and return how long its own process lived."""
    proc = start_dvc(root, "repro", "--single-item", stage)
    stage_proc = wait_for_stage(root, stage, proc)
    started = time.monotonic()
    out, _ = proc.communicate()
    assert proc.returncode == 0 and stage_proc is not None, out
    return time.monotonic() - started


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    assert found, f"no safetensors in {folder}"
    return found


def assert_same(rel: str, ours: Path, reference: Path) -> None:
    """`rel` of `ours` equals the reference's: data to the row; trained weights and training
    metrics within tolerance."""
    a, b = ours / rel, reference / rel
    if rel == "data/processed/reference":  # log-probs (sums of some 500 tokens' log-probs, about -570) of an
        # SFT model that may have resumed: within 0.05 nats each (a wrong pair is off by tens of nats)
        for shard in sorted(b.rglob("*.parquet")):
            mine, theirs = pq.read_table(a / shard.relative_to(b)), pq.read_table(shard)
            for column in theirs.column_names:
                torch.testing.assert_close(torch.tensor(mine.column(column).to_pylist(), dtype=torch.float64),
                                           torch.tensor(theirs.column(column).to_pylist(), dtype=torch.float64),
                                           rtol=0, atol=0.05)
    elif rel == "metrics/reference.json":  # their means, and the pair counts exactly
        assert flatten(json.loads(a.read_text())) == pytest.approx(flatten(json.loads(b.read_text())), rel=0, abs=0.05)
    elif rel.startswith("data/"):
        for shard in sorted(b.rglob("*.parquet")):
            assert pq.read_table(a / shard.relative_to(b)).equals(pq.read_table(shard)), shard
        assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
    elif rel == "metrics/prepare.json":
        assert json.loads(a.read_text()) == json.loads(b.read_text())
    elif rel.startswith("metrics/"):
        mine, theirs = json.loads(a.read_text()), json.loads(b.read_text())
        assert mine["global_step"] == theirs["global_step"]
        for key, value in theirs["eval"].items():
            assert mine["eval"][key] == pytest.approx(value, rel=0.02, abs=0.02), (rel, key)
    else:
        mine, theirs = tensors(a), tensors(b)
        assert mine.keys() == theirs.keys()
        for name, tensor in theirs.items():
            torch.testing.assert_close(mine[name].float(), tensor.float(), rtol=0.02, atol=2e-3, msg=name)


def leftovers(root: Path) -> list[Path]:
    """Temporaries of the crash-safe writer (`.name.tmp-PID-…`, `.name.old-PID`) left in the outputs."""
    return [p for folder in ("data", "models", "metrics") for pattern in (".*.tmp-*", ".*.old-*")
            for p in (root / folder).rglob(pattern)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A clone that ran every stage once, and how long each stage's process lived."""
    clone = small_clone(tmp_path_factory.mktemp("uninterrupted"))
    lifetimes = {stage: stage_lifetime(clone, stage) for stage in [*KILLED_STAGES, "evaluate"]}
    return clone, lifetimes


MAX_DRAWS = 6


def assert_rerun_matches(clone: Path, reference: Path, stage: str, force: bool = False) -> None:
    """After a kill: DVC sees `stage` as not done, what output exists is whole, and a rerun
    cleans the temporaries and gives the uninterrupted run's outputs. (A kill that lands after
    the stage wrote everything, while the interpreter shuts down, may leave it done: then its
    outputs must already be the uninterrupted run's, as dvc.lock records them.)"""
    if stage not in json.loads(dvc(clone, "status", "--json", stage).stdout):
        for rel in OUTPUTS[stage]:
            assert_same(rel, clone, reference)
        return
    for rel in OUTPUTS[stage]:
        if (clone / rel).exists() and not rel.startswith("metrics/"):
            assert_same(rel, clone, reference)
    # the rerun must prove the stage itself recovers, not that DVC can restore a finished run: after
    # a missed draw the run cache holds the stage's result (--no-run-cache), and dvc.lock records it
    # with its outputs in the cache, so DVC would check them out instead of running (`force`)
    rerun = dvc(clone, "repro", "--single-item", "--no-run-cache", *(["--force"] if force else []), stage).stdout
    assert "Running stage" in rerun, rerun
    assert leftovers(clone) == []
    for rel in OUTPUTS[stage]:
        assert_same(rel, clone, reference)
    assert_up_to_date(clone, stage)


def test_each_stage_killed_at_a_random_moment_reruns_to_the_uninterrupted_result(uninterrupted, tmp_path):
    reference, lifetimes = uninterrupted
    clone = small_clone(tmp_path / "killed")
    # from the OS: in-process stages seed Python's `random` (transformers.set_seed), which made every
    # run of the suite draw the same moments
    seed = int(os.environ.get("STACK_DPO_KILL_SEED", secrets.randbelow(1 << 30)))
    rng = random.Random(seed)
    print(f"kill moments from seed {seed} (set STACK_DPO_KILL_SEED to replay)")
    for stage in KILLED_STAGES:
        for attempt in range(MAX_DRAWS):  # a kill that misses (the stage already exited) is drawn again
            delay = rng.uniform(0, lifetimes[stage])
            # after a miss the stage is up to date: --force runs it again for the next draw
            proc = start_dvc(clone, "repro", "--single-item", *(["--force"] if attempt else []), stage)
            stage_proc = wait_for_stage(clone, stage, proc)
            time.sleep(delay)
            try:
                killed = stage_proc is not None and stage_proc.status() != psutil.STATUS_ZOMBIE
                if killed:
                    stage_proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                killed = False
            out, _ = proc.communicate()
            print(f"{stage}: SIGKILL at {delay:.2f}s of {lifetimes[stage]:.2f}s, killed={killed}")
            if killed:
                break
            assert proc.returncode == 0, out
        assert killed, f"{stage}: {MAX_DRAWS} kill moments all missed the stage's process"
        # DVC must not take the interrupted stage as done, and nothing is half-written
        assert proc.returncode != 0, out
        assert_rerun_matches(clone, reference, stage, force=attempt > 0)
    dvc(clone, "repro", "--single-item", "evaluate")
    ours, theirs = (json.loads((root / "metrics/evaluate.json").read_text()) for root in (clone, reference))
    assert ours["n_pairs"] == theirs["n_pairs"]
    assert ours["rewards/accuracies"] == pytest.approx(theirs["rewards/accuracies"], abs=0.05)
    assert ours["rewards/margins"] == pytest.approx(theirs["rewards/margins"], rel=0.05, abs=0.01)
    # the deterministic stages recorded the very same outputs as the uninterrupted run
    lock, reference_lock = (yaml.safe_load((root / "dvc.lock").read_text())["stages"] for root in (clone, reference))
    for stage in ("fetch", "prepare"):
        assert lock[stage]["outs"] == reference_lock[stage]["outs"]


# Fixed kill points, one per kind of state a kill can leave: temporaries of the crash-safe writer
# before its rename, a checkpoint mid-run (resumed), and the last checkpoint before the adapter
# is written (finished from it). PARAMS trains 8 steps and saves every 2.
KILL_POINTS = {
    "prepare": ("before-rename:data/processed/sft", 0),
    "sft": ("after-write:checkpoints/sft/checkpoint-2/trainer_state.json", 2),
    "dpo": ("after-write:checkpoints/dpo/checkpoint-8/trainer_state.json", 8),
    "merge": ("before-rename:models/merged", 0),
}


def test_each_stage_killed_at_a_fixed_point_reruns_to_the_uninterrupted_result(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    clone = small_clone(tmp_path / "killed")
    for stage in ["fetch", *KILLED_STAGES[1:]]:
        if stage not in KILL_POINTS:
            dvc(clone, "repro", "--single-item", stage)
            continue
        point, resumed_from = KILL_POINTS[stage]
        killed = dvc(clone, "repro", "--single-item", stage, check=False, kill_point=point)
        assert killed.returncode != 0, killed.stdout
        assert re.search(r"(killed|SIGKILL|-9)", killed.stdout + killed.stderr, re.I), killed.stderr
        kind, _, target = point.partition(":")
        if kind == "before-rename":  # the writer's temporary is there, its target not yet
            assert not (clone / target).exists() and leftovers(clone), (target, leftovers(clone))
        else:  # the checkpoint is complete and the stage's output is not written
            assert (clone / target).is_file() and not (clone / OUTPUTS[stage][0]).exists()
        assert_rerun_matches(clone, reference, stage)
        if resumed_from:
            assert json.loads((clone / f"metrics/{stage}.json").read_text())["resumed_from_step"] == resumed_from


def test_two_dvc_repro_on_one_workspace(tmp_path):
    """DVC holds a read/write lock on each running stage's deps and outs: a second `dvc repro`
    that reaches a stage whose paths the first holds fails at once, naming the process holding
    them, and touches nothing; the first completes and the workspace is consistent.
    (`dvc --wait-for-lock` waits for the repo lock only; the flow retries such a stage with backoff.)"""
    clone = small_clone(tmp_path / "ws")
    first = start_dvc(clone, "repro", "sft")  # the stages up to sft: enough for the second to meet its locks
    assert wait_for_stage(clone, "sft", first) is not None
    second = dvc(clone, "repro", check=False)
    message = second.stderr + second.stdout
    assert second.returncode != 0
    # DVC locks a stage before it checks whether it changed, so the second stops at the first
    # stage whose paths the running one holds (prepare: sft reads data/processed/sft)
    assert re.search(r"failed to reproduce '\w+': '.+' is busy, it is being blocked by:", message), message
    assert f"(PID {first.pid}): " in message and " repro" in message
    assert "Running stage" not in message
    first_out, _ = first.communicate()
    assert first.returncode == 0, first_out
    assert re.findall(r"Running stage '(\w+)'", dvc(clone, "repro", "sft").stdout) == ["sources"]
    assert_up_to_date(clone, "sft")
    assert json.loads((clone / "metrics/sft.json").read_text())["global_step"] == PARAMS["sft"]["train"]["max_steps"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


FLOW_RUN = """
import json, sys
from flows.pipeline import pipeline
state = pipeline(workdir=sys.argv[1], experiment=sys.argv[2], overrides=json.loads(sys.argv[3]), retry_backoff_s=1,
                 return_state=True)
print("FLOW_RUN_ID", state.state_details.flow_run_id)
state.result()
"""


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def kill_sft_once_after(workspace: Path, checkpoint: Path, killed: list[int]) -> None:
    """Fault injection from outside: SIGKILL the sft stage process of one run workspace once its
    checkpoint exists."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not killed:
        if (checkpoint / "trainer_state.json").exists():
            for proc in stage_processes(workspace, "sft"):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_flows(harness, tmp_path_factory):
    """Two flow runs at once in one checkout with an uncommitted params.yaml, each its own
    experiment (dpo.beta), with a freshly made Hub token in their environment; one pushes to a
    local Hub with it, the other has its sft stage killed once mid-training."""
    from tests.hub_server import FakeHub

    token = "hf_" + secrets.token_hex(16)  # made here, so nothing can hold it by accident
    hub = FakeHub(tokens={token: "alice"}).start()
    root = tmp_path_factory.mktemp("two-flows")
    clone = small_clone(root / "ws")
    before = {path: (clone / path).read_bytes() for path in ("params.yaml", "dvc.lock")}
    status_before = git(clone, "status", "--porcelain")
    betas = {"beta-low": 0.05, "beta-high": 0.4}
    env = subprocess_env(PREFECT_API_URL=PREFECT_API_URL.value(), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1",
                         HF_TOKEN=token, HF_HOME=str(root / "hf-home"))
    overrides = {name: {"dpo": {"beta": beta}} for name, beta in betas.items()}
    overrides["beta-high"]["push"] = {"enabled": True, "repo_id": "alice/beta-high"}  # one push is enough
    killed: list[int] = []
    killed_run = clone / RUNS / "beta-low"
    watcher = threading.Thread(target=kill_sft_once_after,
                               args=(killed_run, killed_run / "checkpoints/sft/checkpoint-4", killed))
    watcher.start()
    runs = [subprocess.Popen([sys.executable, "-c", FLOW_RUN, str(clone), name, json.dumps(overrides[name])],
                             cwd=clone, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for name in betas]
    try:
        outputs = [run.communicate(timeout=900)[0] for run in runs]
    finally:
        hub.stop()
        watcher.join()
    for run, out in zip(runs, outputs):
        assert run.returncode == 0, out[-3000:]
    run_ids = [next(line.split()[-1] for line in out.splitlines() if line.startswith("FLOW_RUN_ID")) for out in outputs]
    yield {"clone": clone, "before": before, "status_before": status_before, "betas": betas, "hub": hub,
           "token": token, "outputs": outputs, "run_ids": dict(zip(betas, run_ids)), "killed": killed}


def test_two_flow_runs_at_once_in_one_checkout_are_two_experiments_over_one_dvc_cache(two_flows):
    clone, betas = two_flows["clone"], two_flows["betas"]
    # the checkout is as it was: its uncommitted params.yaml too, and no outputs
    assert {path: (clone / path).read_bytes() for path in two_flows["before"]} == two_flows["before"]
    assert git(clone, "status", "--porcelain") == two_flows["status_before"]
    assert not (clone / "models/merged").exists()
    shown = {rev["name"]: rev["data"] for entry in json.loads(dvc(clone, "exp", "show", "--json").stdout)
             for exp in entry.get("experiments") or [] for rev in exp["revs"]}
    workspaces = {name: clone / RUNS / name for name in betas}
    for name, beta in betas.items():
        assert shown[name]["params"]["params.yaml"]["data"]["dpo"]["beta"] == beta
        evaluation = json.loads((workspaces[name] / "metrics/evaluate.json").read_text())
        assert shown[name]["metrics"]["metrics/evaluate.json"]["data"] == evaluation and evaluation["n_pairs"] > 0
        assert_up_to_date(workspaces[name])
        assert json.loads((workspaces[name] / "reports/push.json").read_text())["pushed"] is (name == "beta-high")
    assert two_flows["hub"].commit_count("alice/beta-high") >= 1
    cache = clone / ".dvc/cache"
    locks = {name: yaml.safe_load((ws / "dvc.lock").read_text())["stages"] for name, ws in workspaces.items()}
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cached_outs = {out for stage in dvc_yaml.values() for out in stage.get("outs", []) if isinstance(out, str)}
    assert {"data/raw", "data/processed/dpo", "models/sft", "models/merged"} <= cached_outs
    for lock in locks.values():
        for stage in lock.values():
            for out in stage.get("outs", []):
                if out["path"] in cached_outs:
                    assert (cache / "files/md5" / out["md5"][:2] / out["md5"][2:]).is_file(), out
    for stage in ("fetch", "prepare"):  # deterministic stages: the same objects, stored once
        assert locks["beta-low"][stage]["outs"] == locks["beta-high"][stage]["outs"]
    assert locks["beta-low"]["merge"]["outs"] != locks["beta-high"]["merge"]["outs"]
    objects = [p for p in (cache / "files/md5").rglob("*") if p.is_file()]
    assert objects and all(md5(p) == p.parent.name + p.name.removesuffix(".dir") for p in objects)
    # an experiment's outputs come back from the shared cache into the checkout when asked for
    dvc(clone, "exp", "apply", "beta-high")
    assert (clone / "models/merged/model.safetensors").is_file()
    assert yaml.safe_load((clone / "params.yaml").read_text())["dpo"]["beta"] == 0.4


def test_hub_token_reaches_no_file_and_no_prefect_log(two_flows):
    token, clone = two_flows["token"], two_flows["clone"]
    records = list(two_flows["outputs"])  # what the flow processes printed
    logs = {flow_run_id: "\n".join(flow_run_logs(flow_run_id)) for flow_run_id in two_flows["run_ids"].values()}
    assert all("Running stage 'push'" in text for text in logs.values())
    assert any("alice/beta-high" in text for text in logs.values())  # the pushing run logged its push
    with get_client(sync_client=True) as client:
        for flow_run_id, text in logs.items():
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            records += [text, client.read_flow_run(flow_run_id).model_dump_json(),
                        *(run.model_dump_json() for run in task_runs)]
        records += [artifact.model_dump_json() for artifact in client.read_artifacts()]
    assert not [record for record in records if token in record]
    for path in clone.rglob("*"):  # both run workspaces, the checkout and its DVC cache
        if path.is_file() and not path.is_symlink():
            assert token.encode() not in path.read_bytes(), path


def test_a_killed_sft_is_retried_once_and_resumes_from_its_checkpoint(two_flows):
    clone, flow_run_id = two_flows["clone"], two_flows["run_ids"]["beta-low"]
    assert two_flows["killed"], "the sft stage was never killed"
    counts = task_run_counts(flow_run_id)
    assert counts["sft"] == 2 and all(n == 1 for name, n in counts.items() if name != "sft"), counts
    assert task_run_counts(two_flows["run_ids"]["beta-high"])["sft"] == 1  # the other run's sft was left alone
    run = clone / RUNS / "beta-low"
    steps = PARAMS["sft"]["train"]["max_steps"]
    sft = json.loads((run / "metrics/sft.json").read_text())
    assert 4 <= sft["resumed_from_step"] < steps and sft["global_step"] == steps
    state = json.loads((run / f"checkpoints/sft/checkpoint-{steps}/trainer_state.json").read_text())
    logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged == sorted(set(logged))  # no step trained twice
    # one log line per retry, naming the stage and how it failed, with no traceback
    retries = [message for message in flow_run_logs(flow_run_id) if "Retry " in message]
    assert len(retries) == 1 and "\n" not in retries[0], retries
    assert "stage sft: `dvc repro --single-item sft` exited" in retries[0] and "Retry 1/2 will start" in retries[0]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
        artifacts = client.read_artifacts()
    summary = next(a for a in artifacts if a.key == "stack-dpo-run" and a.flow_run_id == UUID(flow_run_id)).data
    assert "`dpo.beta` = `0.05`" in summary and "rewards/accuracies" in summary
    assert "## Data dropped by prepare, by reason" in summary and "| dpo/train | 160 |" in summary
    assert "baseline/sft_accuracy" in summary and "not pushed" in summary
    # it points at what stays: the experiment and its commit, the merged model's hash in the DVC cache
    commit = git(clone, "rev-parse", experiment_ref(clone, "beta-low")).strip()
    lock = yaml.safe_load(git(clone, "show", f"{commit}:dvc.lock"))["stages"]
    merged = next(out["md5"] for out in lock["merge"]["outs"] if out["path"] == "models/merged")
    assert f"DVC experiment `beta-low`, commit `{commit}`" in summary and f"`{merged}`" in summary
