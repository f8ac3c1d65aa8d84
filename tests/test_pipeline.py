"""The whole pipeline through the real `dvc` CLI, in a temporary clone of this checkout."""

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import git, make_clone, subprocess_env

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=subprocess_env(code=None), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return make_clone(tmp_path_factory.mktemp("clone"))


def test_dvc_repro_runs_the_whole_pipeline_and_learns_the_preference(clone):
    out = sh(["dvc", "repro"], clone)
    assert stages_run(out) == ["sources", "fetch", "prepare", "sft", "reference", "dpo", "merge", "evaluate", "push"]
    # what the user sees: progress, the prompt's closing space said once, no warnings
    assert all(f"prepare {split}: 100%" in out for split in ("finetune", "rl", "evaluation"))
    assert out.count("closing whitespace joins the answer's first token") == 1
    assert not [line for line in out.splitlines() if "warn" in line.lower()]
    metrics = json.loads((clone / "metrics/evaluate.json").read_text())
    # real learning, beside the baselines it must beat (the default's promise, README)
    assert metrics["rewards/accuracies"] >= 0.70, metrics
    assert metrics["rewards/accuracies"] >= metrics["baseline/length_accuracy"] + 0.15, metrics
    assert metrics["rewards/accuracies"] >= metrics["baseline/sft_accuracy"] + 0.05, metrics
    assert metrics["rewards/margins"] > 0 and metrics["n_pairs"] >= 200
    assert (clone / "models/merged/model.safetensors").is_file()
    assert json.loads((clone / "reports/push.json").read_text())["pushed"] is False
    shown = sh(["dvc", "metrics", "show", "--json"], clone)
    assert "rewards/accuracies" in shown


def test_second_repro_runs_nothing_but_the_source_check(clone):
    out = sh(["dvc", "repro"], clone)
    assert stages_run(out) == ["sources"]  # always run: it hashes the local sources (cached by file stat)
    assert all(f"Stage '{stage}' didn't change, skipping" in out for stage in ("fetch", "prepare", "dpo", "push"))


def test_changing_beta_reruns_dpo_and_what_follows_only(clone):
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "baseline run")
    out = sh(["dvc", "exp", "run", "--name", "beta-0.3", "-S", "dpo.beta=0.3"], clone)
    assert stages_run(out) == ["sources", "dpo", "merge", "evaluate", "push"]  # the reference log-probs are reused
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


def test_push_experiment_publishes_with_lineage_and_leaks_no_token(clone, tmp_path):
    """`dvc exp run` with push on: only push reruns, the card names the experiment, the
    git commit and dvc.lock's hashes, and the token is nowhere in the workspace."""
    from huggingface_hub import ModelCard, snapshot_download

    from tests.hub_server import FakeHub

    token = "hf_" + secrets.token_hex(16)  # made here, so no file of the clone can hold it by accident
    hub = FakeHub(tokens={token: "alice"}).start()
    try:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token,
               "HF_HOME": str(tmp_path / "hf-home")}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            out = sh(["dvc", "exp", "run", "--name", "published", "-S", "push.enabled=true",
                      "-S", "push.repo_id=alice/stack-dpo-e2e"], clone)
        finally:
            for key, value in old.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        assert stages_run(out) == ["sources", "push"]
        record = json.loads((clone / "reports/push.json").read_text())
        assert record["pushed"] and record["repo_id"] == "alice/stack-dpo-e2e"
        local = snapshot_download("alice/stack-dpo-e2e", endpoint=hub.url, token=token,
                                  cache_dir=tmp_path / "cache")
        card = ModelCard.load(os.path.join(local, "README.md")).text
        lock = (clone / "dvc.lock").read_text()
        merged_md5 = next(line.split()[-1] for line in lock.split("path: models/merged")[1].splitlines()
                          if "md5:" in line)
        assert "DVC experiment: `published`" in card and merged_md5 in card
        assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                              text=True).stdout.strip() in card
        commit = hub.commits[record["commit"]]
        assert commit.title == "stack-dpo: published (models/merged)"
        assert token not in out
        for path in clone.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert token.encode() not in path.read_bytes(), path
    finally:
        hub.stop()


def test_a_changed_file_in_a_local_source_outside_the_repo_reruns_what_reads_it(tmp_path):
    """data.source and model.name_or_path pointing at folders elsewhere on disk: editing a
    parquet shard reruns fetch, editing a model file reruns prepare; untouched, nothing reruns."""
    import pyarrow.parquet as pq
    import yaml

    from tests.conftest import REPO

    repo = make_clone(tmp_path / "clone")
    mirror, model = tmp_path / "mirror", tmp_path / "model"
    shutil.copytree(REPO / "data/sample/stack-exchange-paired", mirror)
    shutil.copytree(REPO / "data/sample/tiny-llama", model)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"], params["model"]["name_or_path"] = str(mirror), str(model)
    params["fetch"]["max_rows"] = {"finetune": 200, "rl": 100, "evaluation": 50}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    assert stages_run(sh(["dvc", "repro", "prepare"], repo)) == ["sources", "fetch", "prepare"]
    assert stages_run(sh(["dvc", "repro", "prepare"], repo)) == ["sources"]
    shard = sorted((mirror / "data/rl").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)  # one row less in the mirror
    assert stages_run(sh(["dvc", "repro", "prepare"], repo)) == ["sources", "fetch", "prepare"]
    config = model / "generation_config.json"
    config.write_text(config.read_text().replace('"temperature": 0.6', '"temperature": 0.7'))
    assert stages_run(sh(["dvc", "repro", "prepare"], repo)) == ["sources", "prepare"]
    recorded = json.loads((repo / "data/sources/model.json").read_text())
    assert recorded["local"] and set(recorded["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
