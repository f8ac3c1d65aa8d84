"""The `stack-dpo` command (generate, check, show) and `--help` of every stage entry point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stack_dpo.params import InvalidInput, validate
from tests.conftest import DEFAULT_PARAMS, REPO, make_clone, subprocess_env, writable_copy
from tests.test_oracles import expected_figures

STACK_DPO = str(Path(sys.executable).parent / "stack-dpo")  # the installed console script
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([STACK_DPO, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True)


@pytest.mark.parametrize("command", [[], ["generate"], ["check"], ["show"]])
def test_every_command_has_help(tmp_path, command):
    done = cli(tmp_path, *command, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: stack-dpo {' '.join(command)}".rstrip()), done
    assert list(tmp_path.iterdir()) == []


def test_stage_help_prints_usage_and_runs_nothing(tmp_path):
    # all at once: each pays for importing torch and transformers before it can print
    helps = {stage: subprocess.Popen([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=tmp_path,
                                     env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for stage in STAGES}
    for stage, proc in helps.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.startswith(f"usage: python -m stages.{stage} [-h]"), err
        assert f"{stage}:" in out and "params.yaml" in out  # its docstring, and where settings live
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


def test_generate_answers_as_evaluate_did_in_the_recipes_prompt_format(trained):
    """The report's first sample: the final model's greedy answer to a held-out prompt."""
    from stack_dpo.evaluate import table_cell

    report = (trained / "reports/evaluate.md").read_text()
    prompt = report.split("## Question 1\n\n````text\n", 1)[1].split("\n````", 1)[0]
    generations = report.split("| SFT model | final model |\n| --- | --- |\n", 1)[1].split("\n", 1)[0]
    question = prompt.removeprefix("Question: ").removesuffix("\n\nAnswer:")
    max_new_tokens = yaml.safe_load((trained / "params.yaml").read_text())["evaluate"]["max_new_tokens"]
    done = cli(trained, "generate", "--max-new-tokens", str(max_new_tokens), question)
    assert done.returncode == 0, done.stderr
    assert generations.endswith(f" | {table_cell(done.stdout)} |")
    sampled = [cli(trained, "generate", "--max-new-tokens", "16", "--sample", "--seed", str(seed), question).stdout
               for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded sampling


def test_check_runs_the_preflight_and_names_what_is_wrong(tmp_path):
    repo = make_clone(tmp_path / "repo")
    done = cli(repo, "check")
    assert done.returncode == 0 and "params.yaml: valid" in done.stdout, done.stderr
    assert "sft: micro-batch 8 x accumulation 1, activation checkpointing off" in done.stdout  # the fit, said
    assert "disk: " in done.stdout and "GiB free for models/merged" in done.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sft"]["lora"]["target_modules"] = ["q_proj", "v_prj"]
    params["dpo"]["loss_type"] = "ipo"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    done = cli(repo, "check")
    assert done.returncode == 1 and "sft.lora.target_modules: ['v_prj'] name no module" in done.stderr
    params["sft"]["lora"]["target_modules"] = ["q_proj"]
    params["dpo"]["loss_type"] = ["sigmoid", "dpop"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    done = cli(repo, "check")
    assert done.returncode == 1 and "dpo.loss_type: ['dpop'] are not DPO losses of the installed TRL" in done.stderr
    assert "ipo" in done.stderr and "hinge" in done.stderr  # what it may be instead


def test_show_lists_each_experiment_with_its_params_accuracy_and_baselines(tmp_path):
    repo = make_clone(tmp_path / "repo")
    # a pipeline of only the metrics `show` reads, so that saving an experiment needs no outputs
    (repo / "dvc.lock").unlink()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "true", "params": ["dpo.beta"], "metrics": [{"metrics/evaluate.json": {"cache": False}}]}}}))
    for name, beta, accuracy in (("low-beta", 0.05, 0.61), ("high-beta", 0.4, 0.83)):
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["dpo"]["beta"] = beta
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        metrics = json.loads((repo / "metrics/evaluate.json").read_text())
        (repo / "metrics/evaluate.json").write_text(json.dumps({**metrics, "rewards/accuracies": accuracy}))
        saved = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "--name", name], cwd=repo,
                               env=subprocess_env(), capture_output=True, text=True)
        assert saved.returncode == 0, saved.stderr
    done = cli(repo, "show")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.split("\n\n")[0].splitlines()
    assert header.split()[:4] == ["experiment", "beta", "loss", "sft"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["low-beta"][1:3] == ["0.05", "sigmoid"] and "0.61" in by_name["low-beta"]
    assert by_name["high-beta"][1:3] == ["0.4", "sigmoid"] and "0.83" in by_name["high-beta"]
    baseline = json.loads((repo / "metrics/evaluate.json").read_text())["baseline/length_accuracy"]
    assert f"{baseline:.3g}" in by_name["high-beta"]


def test_loss_type_takes_one_or_several_with_a_weight_each():
    base = DEFAULT_PARAMS
    one = validate({**base, "dpo": {**base["dpo"], "loss_type": "ipo"}})
    assert one.dpo.loss_type == ["ipo"]
    mixed = validate({**base, "dpo": {**base["dpo"], "loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]}})
    assert mixed.dpo.loss_weights == [0.8, 0.2]
    with pytest.raises(ValueError, match="loss_weights has 1 weights for 2 loss types"):
        validate({**base, "dpo": {**base["dpo"], "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}})


def test_a_dpo_run_with_another_loss_trains_it_and_the_card_names_it(trained, tmp_path):
    from stages import dpo, merge
    from tests.conftest import inside

    ws = tmp_path / "ws"
    writable_copy(trained, ws, checkpoints=False)
    with inside(ws) as params:
        ipo = params.model_copy(update={"dpo": params.dpo.model_copy(update={"loss_type": ["ipo"]})})
        metrics = dpo.run(ipo)
        merge.run(ipo)
    beta = params.dpo.beta
    # IPO's loss at the start, where the rewards are 0: (0 - 1/(2 beta))^2; the recipe's would be ln 2
    assert metrics["start_check"]["loss"] == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-3)
    assert "loss ipo" in (ws / "models/merged/README.md").read_text()


def test_summary_says_how_the_run_did_against_its_baselines_and_what_next(trained):
    done = cli(trained, "summary")
    metrics = json.loads((trained / "metrics/evaluate.json").read_text())
    assert done.returncode == 0, done.stderr
    first, where, next_ = done.stdout.splitlines()
    assert first.startswith(f"held-out preference accuracy {metrics['rewards/accuracies']:.3f} (95% interval")
    assert f"the longer answer wins {metrics['baseline/length_accuracy']:.3f}" in first
    assert first.endswith("beats every one.") == all(metrics["rewards/accuracies"] > metrics[key] for key in
                                                      ("baseline/length_accuracy", "baseline/code_block_accuracy",
                                                       "baseline/sft_accuracy"))
    assert where.startswith("the model: models/merged") and next_.startswith("next: ")


def test_an_experiment_tracker_is_optional_and_a_missing_one_is_named(trained, tmp_path):
    import importlib.util

    from stages import sft
    from tests.conftest import inside

    missing = next((name for name in ("wandb", "mlflow", "tensorboard") if importlib.util.find_spec(name) is None),
                   None)
    if missing is None:
        pytest.skip("every tracker is installed here")
    ws = tmp_path / "ws"
    writable_copy(trained, ws)
    before = {p: p.read_bytes() for p in sorted((ws / "checkpoints").rglob("*")) if p.is_file()}
    with inside(ws) as params:
        assert params.track.report_to == []  # off by default
        tracked = params.model_copy(update={"track": params.track.model_copy(update={"report_to": [missing]})})
        with pytest.raises(InvalidInput, match=rf"track.report_to = \['{missing}'\]: {missing} not installed"):
            sft.run(tracked)
    assert {p: p.read_bytes() for p in sorted((ws / "checkpoints").rglob("*")) if p.is_file()} == before
    with pytest.raises(ValueError, match="report_to"):
        validate({**DEFAULT_PARAMS, "track": {"report_to": ["comet"]}})


@pytest.mark.slow
def test_a_beta_sweep_through_the_dvc_queue_is_compared_by_stack_dpo_show(tmp_path):
    from stack_dpo.params import deep_merge
    from tests.conftest import FAST, git

    repo = make_clone(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(DEFAULT_PARAMS, FAST), sort_keys=False))
    git(repo, "commit", "-qam", "the fast params as the baseline")

    def dvc(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=subprocess_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    dvc("exp", "run", "--queue", "-S", "dpo.beta=0.05,0.3")  # the README's sweep: one experiment per value
    dvc("exp", "run", "--run-all", "-j", "1")
    done = cli(repo, "show")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.split("\n\n")[0].splitlines()[1:]]
    swept = {row[1]: row for row in rows if row[0] != "workspace" and row[1] in ("0.05", "0.3")}
    assert set(swept) == {"0.05", "0.3"}, done.stdout
    for beta, row in swept.items():  # each experiment's own evaluation, recomputed from its files
        dvc("exp", "apply", row[0])
        assert yaml.safe_load((repo / "params.yaml").read_text())["dpo"]["beta"] == float(beta)
        expected = expected_figures(repo)
        assert row[7] == f"{expected['rewards/accuracies']:.3g}" and row[-1] == f"{expected['rewards/margins']:.3g}"
