"""dpo: Direct Preference Optimization with TRL's DPOTrainer on data/processed/dpo -> models/dpo.

The policy starts from the SFT adapter (base + models/sft, trainable). No reference model is
loaded: the reference is the SFT model, and its log-probs of the pairs this run uses were
computed once by the reference stage (data/processed/reference), so the base weights are held
in memory once (the recipe loaded a second full model) and a new dpo.beta reuses them.
models/dpo is the SFT adapter trained further by DPO: merging it applies both stages.
"""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict, concatenate_datasets
from trl import DPOConfig, DPOTrainer

from stages import training
from stages.cli import main
from stages.modeling import load_adapter_model, load_tokenizer
from stages.outputs import load_splits
from stages.params import InvalidInput, Params
from stages.paths import CHECKPOINTS, DPO_ADAPTER, DPO_DATA, METRICS, REFERENCE, SFT_ADAPTER

REFERENCE_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]


class StoredReferenceDPOTrainer(DPOTrainer):
    """Reads the reference log-probs stored beside the pairs instead of computing them again."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if set(REFERENCE_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def training_pairs(params: Params) -> int:
    """How many pairs the DPO run trains on: steps x the global batch (each pair once)."""
    train = params.dpo.train
    return (train.max_steps * train.per_device_train_batch_size * train.gradient_accumulation_steps
            * params.launch.num_processes)


def load_pairs(params: Params, with_reference: bool) -> DatasetDict:
    """The eval pairs, and a seeded random sample of the training pairs as large as the run
    uses, so the reference stage computes log-probs only for pairs that will be trained on
    (at full scale the rl split is far larger than 1000 steps x 16 pairs)."""
    pairs = load_splits(DPO_DATA)
    train = pairs["train"].shuffle(seed=params.dpo.train.seed)
    pairs["train"] = train.select(range(min(training_pairs(params), len(train)))).flatten_indices()
    if not with_reference:
        return pairs
    reference = load_splits(REFERENCE)
    for split in pairs:
        if len(reference[split]) != len(pairs[split]):
            raise InvalidInput(f"{REFERENCE / split}: {len(reference[split])} rows for the {len(pairs[split])} pairs "
                               f"of {DPO_DATA / split}; rerun the reference stage (dvc repro reference)")
        pairs[split] = concatenate_datasets([pairs[split], reference[split]], axis=1)
    return pairs


def build_trainer(params: Params, config: DPOConfig, checkpoint: Path | None, with_reference: bool = True):
    """The DPO trainer; without `with_reference` it computes the reference log-probs itself at start."""
    tokenizer = load_tokenizer(SFT_ADAPTER)
    policy = load_adapter_model(params.model, SFT_ADAPTER, trainable=True)
    policy.config.use_cache = False
    return StoredReferenceDPOTrainer(
        model=policy,
        ref_model=None,  # TRL switches to a frozen copy of the SFT adapter for any reference it computes
        args=config,
        train_dataset=(data := load_pairs(params, with_reference))["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        callbacks=training.dvclive_callbacks("dpo", resume=checkpoint is not None) if with_reference else [],
    )


def dpo_config(params: Params, output_dir: Path) -> DPOConfig:
    return DPOConfig(
        beta=params.dpo.beta,
        max_length=params.prepare.max_length,  # prepare dropped longer pairs, so nothing is truncated
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=params.reference.batch_size,
        **training.trainer_kwargs(params.dpo.train, params.model, output_dir),
    )


def run(params: Params) -> dict:
    inputs_hash = training.fingerprint(
        [params.model, params.dpo, params.prepare], [DPO_DATA, REFERENCE, SFT_ADAPTER, Path(params.model.name_or_path)]
    )
    config = dpo_config(params, CHECKPOINTS / "dpo")
    checkpoint = training.checkpoint_to_resume(config, CHECKPOINTS / "dpo", inputs_hash)
    trainer = build_trainer(params, config, checkpoint)
    metrics = {"beta": params.dpo.beta, **training.train(trainer, checkpoint)}
    training.save_adapter(trainer, trainer.processing_class, DPO_ADAPTER)
    training.write_metrics(METRICS / "dpo.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run, distributed=True)
