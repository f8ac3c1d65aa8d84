"""The whole pipeline through the real `dvc` CLI, in a temporary clone of this checkout."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import git, make_clone

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": ""}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return make_clone(tmp_path_factory.mktemp("clone"))


def test_dvc_repro_runs_the_whole_pipeline_and_learns_the_preference(clone):
    out = sh(["dvc", "repro"], clone)
    assert stages_run(out) == ["fetch", "prepare", "sft", "dpo", "merge", "evaluate", "push"]
    metrics = json.loads((clone / "metrics/evaluate.json").read_text())
    assert metrics["rewards/accuracies"] >= 0.8, metrics
    assert metrics["rewards/margins"] > 0 and metrics["n_pairs"] >= 200
    assert (clone / "models/merged/model.safetensors").is_file()
    assert json.loads((clone / "reports/push.json").read_text())["pushed"] is False
    shown = sh(["dvc", "metrics", "show", "--json"], clone)
    assert "rewards/accuracies" in shown


def test_second_repro_runs_nothing(clone):
    out = sh(["dvc", "repro"], clone)
    assert stages_run(out) == []
    assert "Data and pipelines are up to date." in out


def test_changing_beta_reruns_dpo_and_what_follows_only(clone):
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "baseline run")
    out = sh(["dvc", "exp", "run", "--name", "beta-0.3", "-S", "dpo.beta=0.3"], clone)
    assert stages_run(out) == ["dpo", "merge", "evaluate", "push"]
    assert json.loads((clone / "metrics/dpo.json").read_text())["beta"] == 0.3
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=clone, capture_output=True, text=True, check=True)
    table = json.loads(shown.stdout)
    runs = {rev["name"]: rev["data"] for entry in table for exp in entry.get("experiments") or []
            for rev in exp["revs"]}
    params = runs["beta-0.3"]["params"]["params.yaml"]["data"]
    metrics = runs["beta-0.3"]["metrics"]["metrics/evaluate.json"]["data"]
    assert params["dpo"]["beta"] == 0.3
    assert metrics["rewards/accuracies"] >= 0.5 and metrics["n_pairs"] >= 200
    plots = sh(["dvc", "plots", "show", "--json"], clone)
    assert "DPO reward accuracy" in plots
