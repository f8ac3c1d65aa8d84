"""What sft and dpo share: trainer arguments, dvclive logging, checkpoints that resume, and
saving the adapter and the metrics.

Checkpoints live in a DVC `persist` folder (DVC 3 has no checkpoint outputs), so a retried or
re-run stage resumes from the latest complete checkpoint with the framework's own
`resume_from_checkpoint`. A fingerprint of the stage's inputs (params, data, code) is kept
beside them: when the inputs change, the old checkpoints belong to another run and are wiped,
so a new dpo.beta never resumes a run made with the old one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from dvclive import Live
from transformers import AutoConfig, TrainerState
from transformers.integrations import DVCLiveCallback

from stack_dpo import layout
from stack_dpo.compat import load_checkpoint_weights
from stack_dpo.fit import GIB, Plan, model_shape, plan
from stack_dpo.modeling import checked_source
from stack_dpo.outputs import atomic_dir, write_json_atomic
from stack_dpo.params import InvalidInput, ModelParams, Params, TrainingParams
from stack_dpo.paths import DVCLIVE

FINGERPRINT = "inputs.sha256"
KEPT_METRICS = ("loss", "mean_token_accuracy", "rewards/", "logps/")  # the rest is in the dvclive plots
log = logging.getLogger("stack_dpo.training")


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch`, or the only process: the one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def fingerprint(stage: str, params: dict, inputs: list[Path]) -> str:
    """Hash of what a training stage's result depends on, and nothing else: the params it trains
    with ({name: section or value}), the bytes of every file under `inputs`, and its code
    (layout.code_files: its entry point and the library modules it imports, not all of them)."""
    values = {name: value.model_dump() if hasattr(value, "model_dump") else value for name, value in params.items()}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    files = [(str(path), path) for root in inputs
             for path in ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()))]
    files += [(name, layout.ROOT / name) for name in layout.code_files(stage)]
    for name, path in files:
        digest.update(name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was written completely (trainer_state.json is saved last)."""
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume_point(folder: Path, inputs_hash: str) -> Path | None:
    """The checkpoint to resume from, or None after wiping checkpoints made from other inputs."""
    stamp = folder / FINGERPRINT
    if stamp.exists() and stamp.read_text().strip() == inputs_hash:
        checkpoint = latest_checkpoint(folder)
        if checkpoint:
            log.info("resuming from %s (global step %s)", checkpoint, checkpoint.name.split("-")[1])
        return checkpoint
    if folder.exists():
        log.info("%s holds checkpoints of other inputs; starting from scratch", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stamp.write_text(inputs_hash + "\n")
    return None


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(report_to: list[str]) -> None:
    """Each tracker of track.report_to is installed; checked before a training stage does any work."""
    missing = [TRACKER_PACKAGES[name] for name in report_to
               if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        raise InvalidInput(f"track.report_to = {report_to}: {', '.join(missing)} not installed; "
                           f"`pip install {' '.join(missing)}`, or leave it out (dvclive records the run anyway)")


def check_kernels(stage: str, train: TrainingParams) -> None:
    """Liger's kernels are Triton kernels: a CUDA GPU and liger-kernel, checked before any work."""
    if not train.use_liger_kernel:
        return
    if not torch.cuda.is_available():
        raise InvalidInput(f"{stage}.train.use_liger_kernel = true: Liger's Triton kernels run on CUDA GPUs only, and "
                           "this machine has none; set it to false")
    if importlib.util.find_spec("liger_kernel") is None:
        raise InvalidInput(f"{stage}.train.use_liger_kernel = true: liger-kernel is not installed "
                           "(`pip install -c constraints.txt liger-kernel`)")


def fitted(stage: str, train: TrainingParams, params: Params, sequence_tokens: int) -> Plan:
    """The micro-batch, accumulation and checkpointing of a training stage on this device
    (stack_dpo.fit), logged; with launch.max_memory_gib on a GPU, the allocator is held to it,
    so a plan that does not fit fails at once instead of using memory it was not given."""
    config = AutoConfig.from_pretrained(checked_source(params.model.name_or_path))
    chosen = plan(stage, train, params.launch, params.model, model_shape(config, params.sft.lora), sequence_tokens)
    if params.launch.max_memory_gib is not None and torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", 0))
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(params.launch.max_memory_gib * GIB / total, 1.0), device)
    log.info("%s: micro-batch %d x accumulation %d%s, activation checkpointing %s: about %.1f GiB of %.1f GiB (%s)",
             stage, chosen.micro_batch, chosen.accumulation,
             f" x {params.launch.num_processes} processes" if params.launch.num_processes > 1 else "",
             "on" if chosen.checkpointing else "off", chosen.estimated_gib, chosen.budget_gib, chosen.budget)
    return chosen


def trainer_kwargs(train: TrainingParams, model: ModelParams, output_dir: Path, report_to: list[str] | tuple = (),
                   fit: Plan | None = None) -> dict:
    """Keyword arguments for SFTConfig / DPOConfig (both are transformers.TrainingArguments), with
    the batch sizes and checkpointing of `fit` (None: a trainer that only evaluates)."""
    on_gpu = torch.cuda.is_available()
    named = train.model_dump(exclude={"global_batch_size"})  # the schema's fields are named as
    # TrainingArguments names them, but for the recipe's `gradient_checkpointing`, which transformers 5
    # calls (and warns about as) activation_checkpointing
    named.pop("gradient_checkpointing")
    named.update(per_device_train_batch_size=fit.micro_batch if fit else 1,
                 gradient_accumulation_steps=fit.accumulation if fit else 1,
                 activation_checkpointing=fit.checkpointing if fit else False)
    return dict(
        **named,
        output_dir=str(output_dir),
        eval_strategy="steps",
        save_strategy="steps",
        bf16=model.dtype == "bfloat16" or model.quantization == "4bit",  # the CPU has bf16 autocast too
        fp16=on_gpu and model.dtype == "float16",
        report_to=list(report_to) or "none",  # dvclive is attached below with its folder set per stage
        disable_tqdm=False,  # progress bars on stderr
        dataloader_num_workers=0,
        use_cpu=not on_gpu,  # with several processes on CPUs this selects DDP over gloo
        ddp_find_unused_parameters=False,  # every trainable (LoRA) weight is used in each step
    )


def checkpoint_to_resume(config, folder: Path, inputs_hash: str) -> Path | None:
    """resume_point, decided by rank 0 before the other processes look (they only read)."""
    with config.main_process_first(desc="checkpoints"):
        return resume_point(folder, inputs_hash)


def dvclive_callbacks(stage: str, resume: bool) -> list[DVCLiveCallback]:
    """The dvclive logger of dvclive/<stage>, on rank 0 only (Live also cleans its folder when it starts)."""
    if not is_main_process():
        return []
    live = Live(dir=str(DVCLIVE / stage), resume=resume, save_dvc_exp=False, dvcyaml=None)
    return [DVCLiveCallback(live=live)]


def train(trainer, checkpoint: Path | None) -> dict:
    """Train (resuming when a checkpoint is given) and return the summary metrics."""
    if checkpoint is not None and int(checkpoint.name.split("-")[1]) >= trainer.args.max_steps:
        # Killed after its last checkpoint: training is done. (Resuming from it, the trainer
        # would run one step past max_steps.) Take the weights and state from the checkpoint.
        load_checkpoint_weights(trainer, checkpoint)
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        runtime = 0.0
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        runtime = result.metrics.get("train_runtime", 0.0)
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        evaluation = evals[-1]  # the trainer just evaluated the final weights
    else:
        trainer.remove_callback(DVCLiveCallback)  # this extra evaluation goes to the metrics file only
        evaluation = trainer.evaluate()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]

    def summary(entry: dict, prefix: str = "") -> dict:
        return {key.removeprefix(prefix): value for key, value in entry.items()
                if key.removeprefix(prefix).startswith(KEPT_METRICS)}

    return {
        "global_step": trainer.state.global_step,
        "num_processes": trainer.args.world_size,
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else 0,
        "train_runtime_s": round(runtime, 3),
        "train": summary(train_logs[-1] if train_logs else {}),
        "eval": summary(evaluation, "eval_"),
    }


def save_adapter(trainer, tokenizer, out: Path, metrics: Path) -> None:
    """The trained adapter (not TRL's frozen "ref" copy) to `out`, written by rank 0 only, the
    old `metrics` removed first (write_metrics writes the new ones).
    Under FSDP or DeepSpeed ZeRO-3 the weights are sharded: every rank joins in gathering them."""
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not is_main_process():
        return
    with atomic_dir(out, stale=metrics) as tmp:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(tmp, selected_adapters=["default"], state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def write_metrics(path: Path, metrics: dict) -> None:
    if not is_main_process():
        return
    write_json_atomic(path, metrics)
    log.info("%s: %s", path, metrics)
