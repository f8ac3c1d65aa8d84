"""sft: supervised fine-tuning of a LoRA adapter (QLoRA with the 4-bit profile) on
data/processed/sft with TRL's SFTTrainer and packing -> models/sft.

    python -m stages.sft     (or: dvc repro sft)
"""

from __future__ import annotations

from pathlib import Path

from trl import SFTConfig, SFTTrainer

from stages import training
from stages.cli import main
from stages.hub import hub_revision
from stages.modeling import load_base_model, load_tokenizer, lora_config, preflight
from stages.outputs import load_splits
from stages.params import Params
from stages.paths import CHECKPOINTS, METRICS, SFT_ADAPTER, SFT_DATA


def run(params: Params) -> dict:
    preflight(params.model)  # a refused run leaves the checkpoints as they were
    inputs_hash = training.fingerprint([params.model, params.sft], [SFT_DATA, Path(params.model.name_or_path)])
    config = SFTConfig(
        dataset_text_field="text",
        max_length=params.sft.seq_length,
        packing=params.sft.packing,
        packing_strategy=params.sft.packing_strategy,
        **training.trainer_kwargs(params.sft.train, params.model, CHECKPOINTS / "sft"),
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
    training.save_adapter(trainer, tokenizer, SFT_ADAPTER)
    training.write_metrics(METRICS / "sft.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run, distributed=True)
