"""dpo: Direct Preference Optimization with TRL's DPOTrainer on data/processed/dpo -> models/dpo.

The policy starts from the SFT adapter (base + models/sft, trainable). No reference model is
loaded: the reference is the SFT model, and its log-probs of the pairs this run uses were
computed once by the reference stage (data/processed/reference), so the base weights are held
in memory once (the recipe loaded a second full model) and a new dpo.beta reuses them.
models/dpo is the SFT adapter trained further by DPO: merging it applies both stages.
"""

from __future__ import annotations

from pathlib import Path

from stack_dpo import training
from stack_dpo.dpo import build_trainer, check_loss_types, check_policy_equals_reference, dpo_config
from stack_dpo.entrypoint import main
from stack_dpo.machine import check_machine
from stack_dpo.modeling import preflight
from stack_dpo.params import Params
from stack_dpo.paths import CHECKPOINTS, DPO_ADAPTER, DPO_DATA, METRICS, REFERENCE, SFT_ADAPTER


def run(params: Params) -> dict:
    check_machine(params)  # a refused run leaves the checkpoints as they were
    preflight(params.model)
    check_loss_types(params)
    training.check_kernels("dpo", params.dpo.train)
    training.check_trackers(params.track.report_to)
    fit = training.fitted("dpo", params.dpo.train, params, 2 * params.prepare.max_length)  # chosen + rejected
    inputs_hash = training.fingerprint(  # the params dvc.yaml gives this stage, and its inputs
        "dpo", {"model": params.model, "dpo": params.dpo, "launch": params.launch,
                "prepare.max_length": params.prepare.max_length},
        [DPO_DATA, REFERENCE, SFT_ADAPTER, Path(params.model.name_or_path)])
    config = dpo_config(params, CHECKPOINTS / "dpo", fit)
    checkpoint = training.checkpoint_to_resume(config, CHECKPOINTS / "dpo", inputs_hash)
    trainer = build_trainer(params, config, checkpoint)
    guard = check_policy_equals_reference(trainer) if checkpoint is None else None
    metrics = {"beta": params.dpo.beta, "start_check": guard, **training.train(trainer, checkpoint),
               "fit": fit.metrics()}
    training.save_adapter(trainer, trainer.processing_class, DPO_ADAPTER, METRICS / "dpo.json")
    training.write_metrics(METRICS / "dpo.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run, distributed=True)

