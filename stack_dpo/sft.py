"""The SFT trainer as the sft stage trains it: TRL's SFTTrainer over data/processed/sft with
packing and a new LoRA adapter on the base (QLoRA with the 4-bit profile)."""

from __future__ import annotations

from pathlib import Path

from trl import SFTConfig, SFTTrainer

from stack_dpo import training
from stack_dpo.fit import Plan
from stack_dpo.modeling import load_base_model, load_tokenizer, lora_config
from stack_dpo.outputs import load_splits
from stack_dpo.params import Params
from stack_dpo.paths import SFT_DATA


def sft_config(params: Params, output_dir: Path, fit: Plan) -> SFTConfig:
    return SFTConfig(
        dataset_text_field="text",
        max_length=params.sft.seq_length,
        packing=params.sft.packing,
        packing_strategy=params.sft.packing_strategy,
        **training.trainer_kwargs(params.sft.train, params.model, output_dir, params.track.report_to, fit),
    )


def build_trainer(params: Params, config: SFTConfig, checkpoint: Path | None) -> SFTTrainer:
    model = load_base_model(params.model)
    model.config.use_cache = False
    data = load_splits(SFT_DATA)
    # packing concatenates examples in dataset order: shuffle first (seeded), as the recipe's
    # streaming shuffle does, so a packed sequence is not a run of one site's questions
    data["train"] = data["train"].shuffle(seed=params.sft.train.seed)
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=load_tokenizer(params.model.name_or_path),
        peft_config=lora_config(params.sft.lora),
        callbacks=training.dvclive_callbacks("sft", resume=checkpoint is not None),
    )
