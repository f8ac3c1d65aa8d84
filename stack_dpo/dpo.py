"""The DPO trainer as the dpo stage trains it and the reference stage computes its log-probs
with (one setup, so the two cannot drift apart), and the check run before the first step."""

from __future__ import annotations

import math
from pathlib import Path

import trl
from transformers.integrations import DVCLiveCallback
from trl import DPOConfig

from stack_dpo import training
from stack_dpo.compat import StoredReferenceDPOTrainer, trl_loss_types
from stack_dpo.fit import Plan
from stack_dpo.modeling import load_adapter_model, load_tokenizer
from stack_dpo.pairs import load_pairs, with_stored_reference
from stack_dpo.params import InvalidInput, Params
from stack_dpo.paths import REFERENCE, SFT_ADAPTER

GUARD_PAIRS = 16        # eval pairs scored before the first step of a fresh run
GUARD_TOLERANCE = 0.02  # |loss - ln 2| and |mean reward| allowed there (numeric noise only)


def build_trainer(params: Params, config: DPOConfig, checkpoint: Path | None, with_reference: bool = True):
    """The DPO trainer; without `with_reference` it computes the reference log-probs itself at start."""
    tokenizer = load_tokenizer(SFT_ADAPTER)
    policy = load_adapter_model(params.model, SFT_ADAPTER, trainable=True)
    policy.config.use_cache = False
    pairs = load_pairs(params)
    if with_reference:
        pairs = with_stored_reference(pairs)
    return StoredReferenceDPOTrainer(
        model=policy,
        ref_model=None,  # TRL switches to a frozen copy of the SFT adapter for any reference it computes
        args=config,
        train_dataset=pairs["train"],
        eval_dataset=pairs["eval"],
        processing_class=tokenizer,
        callbacks=training.dvclive_callbacks("dpo", resume=checkpoint is not None) if with_reference else [],
    )


def dpo_config(params: Params, output_dir: Path, fit: Plan | None = None) -> DPOConfig:
    """DPOTrainer's settings; without `fit` (the reference stage, which only computes log-probs)
    the training batch sizes are placeholders."""
    return DPOConfig(
        beta=params.dpo.beta,
        loss_type=list(params.dpo.loss_type),
        loss_weights=params.dpo.loss_weights,
        max_length=params.prepare.max_length,  # prepare dropped longer pairs, so nothing is truncated
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=params.reference.batch_size,
        train_sampling_strategy="group_by_length" if params.dpo.group_by_length else "random",
        **training.trainer_kwargs(params.dpo.train, params.model, output_dir, params.track.report_to, fit),
    )


def check_loss_types(params: Params) -> None:
    """dpo.loss_type names losses the installed TRL computes; checked before any work."""
    known = trl_loss_types()
    unknown = [name for name in params.dpo.loss_type if name not in known]
    if unknown:
        raise InvalidInput(f"dpo.loss_type: {unknown} are not DPO losses of the installed TRL {trl.__version__}; "
                           f"expected some of {known}")


def check_policy_equals_reference(trainer) -> dict:
    """Before the first step of a fresh run the policy is the SFT model, so on any pairs the
    rewards are 0 (and the recipe's sigmoid loss is ln 2). Anything else means the stored
    reference is not the SFT model's or does not belong to these rows: stop before training on it."""
    live = trainer.pop_callback(DVCLiveCallback)  # a check, not a point of the training curves
    pairs = trainer.eval_dataset.select(range(min(GUARD_PAIRS, len(trainer.eval_dataset))))
    trainer.evaluate(eval_dataset=pairs)
    found = trainer.state.log_history.pop()  # nor of the trainer's history; TRL's metrics are logged, not returned
    if live is not None:
        trainer.add_callback(live)
    guard = {key: found[f"eval_{key}"] for key in ("loss", "rewards/chosen", "rewards/rejected")}
    sigmoid = trainer.args.loss_type == ["sigmoid"]  # other losses start elsewhere (hinge at 1, ipo at 1/(4 beta^2))
    if (sigmoid and abs(guard["loss"] - math.log(2)) > GUARD_TOLERANCE
            or max(abs(guard["rewards/chosen"]), abs(guard["rewards/rejected"])) > GUARD_TOLERANCE):
        raise InvalidInput(
            f"dpo: before training, where the policy is the SFT model, the loss on {len(pairs)} eval pairs is "
            f"{guard['loss']:.4f} (expected ln 2 = 0.6931) and the mean rewards are {guard['rewards/chosen']:.4f} / "
            f"{guard['rewards/rejected']:.4f} (expected 0): the stored reference log-probs ({REFERENCE}) are not the "
            f"SFT model's ({SFT_ADAPTER}) or do not belong to these rows; rerun `dvc repro reference`")
    return guard
