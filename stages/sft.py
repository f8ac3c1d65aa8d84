"""sft: supervised fine-tuning of a LoRA adapter (QLoRA with the 4-bit profile) on
data/processed/sft with TRL's SFTTrainer and packing -> models/sft.

    python -m stages.sft     (or: dvc repro sft)
"""

from __future__ import annotations

from pathlib import Path

from stack_dpo import training
from stack_dpo.entrypoint import main
from stack_dpo.hub import hub_revision
from stack_dpo.machine import check_machine
from stack_dpo.modeling import preflight
from stack_dpo.params import Params
from stack_dpo.paths import CHECKPOINTS, METRICS, SFT_ADAPTER, SFT_DATA
from stack_dpo.sft import build_trainer, sft_config


def run(params: Params) -> dict:
    check_machine(params)  # a refused run leaves the checkpoints as they were
    preflight(params.model, params.sft.lora)
    training.check_kernels("sft", params.sft.train)
    training.check_trackers(params.track.report_to)
    fit = training.fitted("sft", params.sft.train, params, params.sft.seq_length)
    inputs_hash = training.fingerprint(  # the params dvc.yaml gives this stage, and its inputs
        "sft", {"model": params.model, "sft": params.sft, "launch": params.launch},
        [SFT_DATA, Path(params.model.name_or_path)])
    config = sft_config(params, CHECKPOINTS / "sft", fit)
    checkpoint = training.checkpoint_to_resume(config, CHECKPOINTS / "sft", inputs_hash)
    trainer = build_trainer(params, config, checkpoint)
    metrics = {**training.train(trainer, checkpoint), "fit": fit.metrics(),
               "base_model_revision": hub_revision(params.model.name_or_path, "model")}  # None: local or offline
    training.save_adapter(trainer, trainer.processing_class, SFT_ADAPTER, METRICS / "sft.json")
    training.write_metrics(METRICS / "sft.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run, distributed=True)
