"""sft and dpo under `accelerate launch` with two CPU processes (DDP over gloo): the outputs
load, every step trains on both processes' batches, and only rank 0 writes."""

import json
import subprocess
import sys

import pytest
import torch

from stack_dpo.entrypoint import accelerate_command
from stack_dpo.modeling import load_adapter_model, load_tokenizer
from stack_dpo.params import InvalidInput, LaunchParams
from stages import fetch, prepare
from tests.conftest import FAST, REPO, inside, make_workspace, subprocess_env

pytestmark = pytest.mark.slow


def test_sft_and_dpo_run_on_two_processes_and_write_once(tmp_path):
    ws = make_workspace(tmp_path, {"launch": {"num_processes": 2}})
    with inside(ws) as params:
        fetch.run(params)
        prepare.run(params)
    logs = {}
    for stage in ("sft", "reference", "dpo"):
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=ws, env=subprocess_env(),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        logs[stage] = result.stdout + result.stderr
    steps = FAST["sft"]["train"]["max_steps"]
    for stage in ("sft", "dpo"):
        assert logs[stage].count(f"metrics/{stage}.json: ") == 1  # written once, by rank 0
        metrics = json.loads((ws / f"metrics/{stage}.json").read_text())
        assert metrics["num_processes"] == 2 and metrics["global_step"] == steps
        logged = (ws / f"dvclive/{stage}/plots/metrics/loss.tsv").read_text().splitlines()[1:]
        assert [int(line.split("\t")[0]) for line in logged] == list(range(steps))  # one logger, no duplicate
        checkpoint = ws / f"checkpoints/{stage}/checkpoint-{steps}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= {p.name for p in
                                                                                      checkpoint.iterdir()}
        with inside(ws) as params:
            model = load_adapter_model(params.model, ws / f"models/{stage}")
            tokenizer = load_tokenizer(ws / f"models/{stage}")
            logits = model(**tokenizer(["Question: why?\n\nAnswer: "], return_tensors="pt")).logits
        assert torch.isfinite(logits).all()
    # each optimizer step saw both processes' batches
    state = json.loads((ws / f"checkpoints/sft/checkpoint-{steps}/trainer_state.json").read_text())
    first = next(entry for entry in state["log_history"] if "num_tokens" in entry)
    per_process = params.sft.train.per_device_train_batch_size * params.sft.seq_length
    # more than one process's batch (packed rows are full but for the split's last one)
    assert per_process < first["num_tokens"] <= 2 * per_process


def test_launch_command_and_its_checks(tmp_path):
    command = accelerate_command("stages.sft", LaunchParams(num_processes=2))
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-2:] == ["-m", "stages.sft"]
    assert "--multi_gpu" in command and command[command.index("--num_processes") + 1] == "2"
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n")
    command = accelerate_command("stages.dpo", LaunchParams(num_processes=4, config_file=str(config)))
    assert command[command.index("--config_file") + 1] == str(config) and "--multi_gpu" not in command
    with pytest.raises(InvalidInput, match=r"launch.config_file = 'missing.yaml': no such file"):
        accelerate_command("stages.sft", LaunchParams(num_processes=2, config_file="missing.yaml"))


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed-zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "deploy/accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_machines == 1


AGREE = """
import os, json
from stack_dpo.fit import smallest_over_processes
mine = 1000.0 + 7 * int(os.environ["RANK"])  # each process measured another budget
agreed = smallest_over_processes(mine)
from transformers import TrainingArguments  # the trainer's process group is the one the fit joined
args = TrainingArguments(output_dir=os.environ["OUT"], use_cpu=True)
print("AGREED " + json.dumps({"rank": int(os.environ["RANK"]), "agreed": agreed, "world": args.world_size}))
"""


def test_processes_of_a_launch_plan_for_the_same_budget(tmp_path):
    """Processes that fitted different batches would hang on each other's gradients: they agree on
    the smallest budget, and the trainer then uses the process group the fit joined."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--dynamo_backend", "no", "--multi_gpu", "--mixed_precision", "no", str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(OUT=str(tmp_path), CUDA_VISIBLE_DEVICES=""),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = sorted((json.loads(line.removeprefix("AGREED ")) for line in result.stdout.splitlines()
                    if line.startswith("AGREED ")), key=lambda r: r["rank"])
    assert found == [{"rank": 0, "agreed": 1000.0, "world": 2}, {"rank": 1, "agreed": 1000.0, "world": 2}]
