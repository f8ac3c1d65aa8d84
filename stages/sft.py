"""sft: supervised fine-tuning of a LoRA adapter (QLoRA with the 4-bit profile) on
data/processed/sft with TRL's SFTTrainer and packing -> models/sft.

    python -m stages.sft     (or: dvc repro sft)
"""

from __future__ import annotations

from pathlib import Path

from trl import SFTConfig, SFTTrainer

from stack_dpo import training
from stack_dpo.entrypoint import main
from stack_dpo.hub import hub_revision
from stack_dpo.modeling import load_base_model, load_tokenizer, lora_config, preflight
from stack_dpo.outputs import load_splits
from stack_dpo.params import Params
from stack_dpo.paths import CHECKPOINTS, METRICS, SFT_ADAPTER, SFT_DATA


def run(params: Params) -> dict:
    preflight(params.model, params.sft.lora)  # a refused run leaves the checkpoints as they were
    training.check_trackers(params.track.report_to)
    inputs_hash = training.fingerprint(  # the params dvc.yaml gives this stage, and its inputs
        "sft", {"model": params.model, "sft": params.sft, "launch": params.launch},
        [SFT_DATA, Path(params.model.name_or_path)])
    config = SFTConfig(
        dataset_text_field="text",
        max_length=params.sft.seq_length,
        packing=params.sft.packing,
        packing_strategy=params.sft.packing_strategy,
        **training.trainer_kwargs(params.sft.train, params.model, CHECKPOINTS / "sft", params.track.report_to),
    )
    checkpoint = training.checkpoint_to_resume(config, CHECKPOINTS / "sft", inputs_hash)
    tokenizer = load_tokenizer(params.model.name_or_path)
    model = load_base_model(params.model)
    model.config.use_cache = False
    data = load_splits(SFT_DATA)
    # packing concatenates examples in dataset order: shuffle first (seeded), as the recipe's
    # streaming shuffle does, so a packed sequence is not a run of one site's questions
    data["train"] = data["train"].shuffle(seed=params.sft.train.seed)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        peft_config=lora_config(params.sft.lora),
        callbacks=training.dvclive_callbacks("sft", resume=checkpoint is not None),
    )
    metrics = {**training.train(trainer, checkpoint),
               "base_model_revision": hub_revision(params.model.name_or_path, "model")}  # None: local or offline
    training.save_adapter(trainer, tokenizer, SFT_ADAPTER, METRICS / "sft.json")
    training.write_metrics(METRICS / "sft.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run, distributed=True)
