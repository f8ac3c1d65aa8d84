"""dpo: Direct Preference Optimization with TRL's DPOTrainer on data/processed/dpo -> models/dpo.

The policy starts from the SFT adapter (base + models/sft, trainable). No reference model is
passed: for a PeftModel, DPOTrainer copies the loaded adapter into a frozen "ref" adapter and
computes the reference log-probs by switching to it, so the reference is the SFT model and
the base weights are held in memory once (the recipe loaded a second full model). models/dpo
is therefore the SFT adapter trained further by DPO: merging it applies both stages.
"""

from __future__ import annotations

from pathlib import Path

from trl import DPOConfig, DPOTrainer

from stages import training
from stages.cli import main
from stages.modeling import load_adapter_model, load_tokenizer
from stages.outputs import load_splits
from stages.params import Params
from stages.paths import CHECKPOINTS, DPO_ADAPTER, DPO_DATA, METRICS, SFT_ADAPTER


def build_trainer(params: Params, checkpoint: Path | None) -> DPOTrainer:
    tokenizer = load_tokenizer(SFT_ADAPTER)
    policy = load_adapter_model(params.model, SFT_ADAPTER, trainable=True)
    policy.config.use_cache = False
    data = load_splits(DPO_DATA)
    config = DPOConfig(
        beta=params.dpo.beta,
        max_length=params.prepare.max_length,  # prepare dropped longer pairs, so nothing is truncated
        **training.trainer_kwargs(params.dpo.train, params.model, CHECKPOINTS / "dpo"),
    )
    return DPOTrainer(
        model=policy,
        ref_model=None,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        callbacks=[training.dvclive_callback("dpo", resume=checkpoint is not None)],
    )


def run(params: Params) -> dict:
    inputs_hash = training.fingerprint(
        [params.model, params.dpo, params.prepare], [DPO_DATA, SFT_ADAPTER, Path(params.model.name_or_path)]
    )
    checkpoint = training.resume_point(CHECKPOINTS / "dpo", inputs_hash)
    trainer = build_trainer(params, checkpoint)
    metrics = {"beta": params.dpo.beta, **training.train(trainer, checkpoint)}
    training.save_adapter(trainer.model, trainer.processing_class, DPO_ADAPTER)
    training.write_metrics(METRICS / "dpo.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run)
