"""sft and dpo: adapters, metrics, the reference model, and resume after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from stack_dpo.dpo import build_trainer, dpo_config
from stack_dpo.modeling import load_adapter_model, load_base_model, load_tokenizer, response_logps
from stages import fetch, prepare
from tests.conftest import REPO, inside, make_workspace, subprocess_env, writable_copy


def test_sft_and_dpo_write_adapters_and_metrics(trained):
    for stage in ("sft", "dpo"):
        adapter = trained / "models" / stage
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (adapter / "adapter_model.safetensors").is_file()
        assert not (adapter / "ref").exists()  # TRL's frozen copy is not saved as an output
        metrics = json.loads((trained / "metrics" / f"{stage}.json").read_text())
        assert metrics["global_step"] == 4 and metrics["resumed_from_step"] == 0
        assert (trained / "checkpoints" / stage / "checkpoint-4" / "trainer_state.json").is_file()
    dpo_metrics = json.loads((trained / "metrics" / "dpo.json").read_text())
    for split in ("train", "eval"):
        rewards = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
        assert rewards <= set(dpo_metrics[split])
    plots = trained / "dvclive" / "dpo" / "plots" / "metrics"
    for name in ("rewards/accuracies", "rewards/margins", "eval/rewards/accuracies", "loss"):
        assert len((plots / f"{name}.tsv").read_text().splitlines()) > 1, name
    assert len((trained / "dvclive/sft/plots/metrics/loss.tsv").read_text().splitlines()) > 1


def test_dpo_reference_is_the_sft_model_without_a_second_base(trained, tmp_path):
    """The reference log-probs dpo trains against are the SFT model's: stored by the reference
    stage, read (not recomputed) by dpo, equal to TRL's own reference pass before and after
    training, while the policy moves; the base weights exist once (no ref_model)."""
    ws = writable_copy(trained, tmp_path / "ws", checkpoints=False)  # a trainer restarts dvclive/dpo
    with inside(ws) as params:
        # pairs in their order (not grouped by length): the first eval batch is the first 4 rows
        params = params.model_copy(update={"dpo": params.dpo.model_copy(update={"group_by_length": False})})
        trainer = build_trainer(params, dpo_config(params, tmp_path / "out"), checkpoint=None)
        trainer.args.max_steps, trainer.args.save_strategy = 3, "no"
        eval_rows = pq.read_table(ws / "data/processed/dpo/eval").slice(0, 4).to_pylist()
        stored = pq.read_table(ws / "data/processed/reference/eval").slice(0, 4)
        prompts = [r["prompt"] for r in eval_rows]
        chosen = [r["chosen"] for r in eval_rows]
        tokenizer = load_tokenizer("models/sft")
        sft_model = load_adapter_model(params.model, "models/sft")
        base_model = load_base_model(params.model)
        expected = response_logps(sft_model, tokenizer, prompts, chosen, 4)
        raw_base = response_logps(base_model, tokenizer, prompts, chosen, 4)

        def reference_logps():  # TRL's own reference pass (the frozen copy of the SFT adapter)
            batch = next(iter(trainer.get_eval_dataloader()))
            ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
            return ref_chosen[:4].float()

        assert trainer.ref_model is None
        stored_chosen = torch.tensor(stored.column("ref_chosen_logps").to_pylist())
        assert torch.allclose(stored_chosen, expected, atol=1e-3)
        assert trainer.eval_dataset["ref_chosen_logps"][:4] == stored.column("ref_chosen_logps").to_pylist()
        assert torch.allclose(reference_logps(), expected, atol=1e-3)
        assert not torch.allclose(expected, raw_base, atol=1e-2)  # SFT really moved away from the base
        trainer.train()
        assert torch.allclose(reference_logps(), expected, atol=1e-3)  # the reference stayed frozen
        policy = response_logps(trainer.model, tokenizer, prompts, chosen, 4)
        assert not torch.allclose(policy, expected, atol=1e-3)  # while the policy trained
        base_in_trainer = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
        assert base_in_trainer == sum(p.numel() for p in base_model.parameters())  # one copy of the base


def _wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


RESUME_STEPS = {"max_steps": 12, "save_steps": 2, "eval_steps": 12, "save_total_limit": 10}


def resume_workspace(root, until: str):
    """A workspace with 12-step training params where every stage before `until` has run."""
    ws = make_workspace(root, {"sft": {"train": RESUME_STEPS}, "dpo": {"train": RESUME_STEPS}})
    with inside(ws) as params:
        fetch.run(params)
        prepare.run(params)
    for before in ("sft", "reference", "dpo")[:("sft", "reference", "dpo").index(until)]:
        subprocess.run([sys.executable, "-m", f"stages.{before}"], cwd=ws, env=subprocess_env(), check=True,
                       capture_output=True)
    return ws


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The adapters of sft and dpo trained without interruption, for the resumed runs to match."""
    ws = resume_workspace(tmp_path_factory.mktemp("uninterrupted"), "dpo")
    subprocess.run([sys.executable, "-m", "stages.dpo"], cwd=ws, env=subprocess_env(), check=True, capture_output=True)
    return ws


def adapter_weights(ws, stage):
    from safetensors.torch import load_file

    return load_file(ws / "models" / stage / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage, kill_after", [("sft", 4), ("dpo", 4), ("sft", 12)])
def test_killed_training_resumes_from_its_latest_checkpoint(tmp_path, uninterrupted, stage, kill_after):
    """Killed once checkpoint `kill_after` is saved (12: the last one, before the adapter is
    written), the rerun resumes from the latest complete checkpoint, ends at step 12 and gives the
    adapter an uninterrupted run gives (the weights, not only the step count)."""
    ws = resume_workspace(tmp_path, stage)
    cmd = [sys.executable, "-m", f"stages.{stage}"]
    proc = subprocess.Popen(cmd, cwd=ws, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    _wait_for(ws / "checkpoints" / stage / f"checkpoint-{kill_after}" / "trainer_state.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if kill_after < 12:
        assert not (ws / "models" / stage).exists()  # killed: no output at all, not a partial one
    done = sorted(int(p.name.split("-")[1]) for p in (ws / "checkpoints" / stage).glob("checkpoint-*")
                  if (p / "trainer_state.json").exists())
    assert kill_after <= done[-1] <= 12
    rerun = subprocess.run(cmd, cwd=ws, env=subprocess_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from checkpoints/{stage}/checkpoint-{done[-1]} (global step {done[-1]})" in rerun.stderr
    metrics = json.loads((ws / "metrics" / f"{stage}.json").read_text())
    assert metrics["resumed_from_step"] == done[-1] and metrics["global_step"] == 12
    state = json.loads((ws / "checkpoints" / stage / "checkpoint-12" / "trainer_state.json").read_text())
    logged_steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged_steps == sorted(set(logged_steps))  # finished steps were not redone
    assert not (ws / "checkpoints" / stage / "checkpoint-13").exists()  # and none was added past the end
    resumed, reference = adapter_weights(ws, stage), adapter_weights(uninterrupted, stage)
    assert resumed.keys() == reference.keys()
    # Runs agree to float noise (often bitwise; once seen a little past 1e-5); one training
    # step moves a weight by up to about the learning rate (5e-4 to 1e-3), so resuming from
    # a checkpoint's step but not its weights lands orders of magnitude further away.
    worst = max((resumed[name] - weight).abs().max().item() for name, weight in reference.items())
    assert worst < 1e-4, worst


def test_changed_inputs_do_not_resume_old_checkpoints(tmp_path):
    from stack_dpo import training

    folder = tmp_path / "ckpt"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (folder / training.FINGERPRINT).write_text("old\n")
    assert training.resume_point(folder, "new") is None
    assert not (folder / "checkpoint-2").exists()
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-3").mkdir()  # killed while saving: no trainer_state.json
    assert training.resume_point(folder, "new") == folder / "checkpoint-2"


def test_resume_fingerprint_covers_what_training_depends_on_and_nothing_else(tmp_path, monkeypatch):
    """The code the stage imports, its params (launch included) and its inputs: editing the
    model card's code keeps the checkpoints, another process count does not."""
    import shutil

    from stack_dpo import layout, training
    from stack_dpo.params import load_params

    code = tmp_path / "code"
    for package in layout.PACKAGES:
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(layout, "ROOT", code)
    data = tmp_path / "data"
    data.mkdir()
    (data / "part.parquet").write_bytes(b"rows")
    params = load_params(REPO / "params.yaml")

    def stamp(**launch) -> str:
        return training.fingerprint("sft", {"model": params.model, "sft": params.sft,
                                            "launch": params.launch.model_copy(update=launch)}, [data])

    before = stamp()
    assert "stack_dpo/card.py" not in layout.code_files("sft") and "stack_dpo/training.py" in layout.code_files("sft")
    (code / "stack_dpo/card.py").write_text("# the model card changed\n")
    assert stamp() == before
    assert stamp(num_processes=params.launch.num_processes + 1) != before
    (data / "part.parquet").write_bytes(b"other rows")
    after_data = stamp()
    assert after_data != before
    with (code / "stack_dpo/training.py").open("a") as fh:
        fh.write("# the trainer setup changed\n")
    assert stamp() != after_data


def test_sft_resumed_in_process_from_a_checkpoint_lands_on_the_uninterrupted_weights(trained, tmp_path):
    """The quick form of the kill-and-resume tests above: the shared chain's sft ran 4 steps with
    checkpoints at 2 and 4; without checkpoint-4, sft resumes from checkpoint-2 (weights,
    optimizer, RNG) and must end on the same adapter."""
    from safetensors.torch import load_file

    from stages import sft

    ws = writable_copy(trained, tmp_path / "ws")
    shutil.rmtree(ws / "checkpoints/sft/checkpoint-4")
    with inside(ws) as params:
        metrics = sft.run(params)
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    resumed = load_file(ws / "models/sft/adapter_model.safetensors")
    reference = load_file(trained / "models/sft/adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    worst = max((resumed[name] - weight).abs().max().item() for name, weight in reference.items())
    assert worst < 1e-4, worst  # as above: one step moves a weight by about the learning rate


def test_length_grouped_dpo_batches_do_not_depend_on_the_global_rng(trained, tmp_path):
    """The quick form of the dpo kill-and-resume test: the order of length-grouped batches comes
    from dpo.train.seed alone, so a resumed run (which reaches training with another global RNG
    state) trains the same batches."""
    ws = writable_copy(trained, tmp_path / "ws", checkpoints=False)
    with inside(ws) as params:
        assert params.dpo.group_by_length
        trainer = build_trainer(params, dpo_config(params, tmp_path / "out"), checkpoint=None)
        orders = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            orders.append(list(trainer._get_train_sampler()))
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(len(trainer.train_dataset)))
