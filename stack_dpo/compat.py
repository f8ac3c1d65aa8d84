"""The private TRL and transformers methods this project relies on, each used here and nowhere
else. A release that renames one or changes its arguments fails at import with a message that
names it (and tests/test_compat.py fails), instead of silently taking another code path:

- `DPOTrainer._precompute_ref_logps(dataset, name, batch_size)`: TRL's one hook where the
  reference log-probs of a split are computed; StoredReferenceDPOTrainer overrides it to read
  them from the data instead (the reference stage wrote them).
- `Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)`: loads a checkpoint's
  weights into the model; used to finish a run killed after its last checkpoint, where
  `train(resume_from_checkpoint=...)` would train one step past max_steps.
- `DPOTrainer._set_signature_columns_if_needed()`: the columns the trainer keeps for its collator;
  StoredReferenceDPOTrainer adds the `length` column that transformers' length-grouped sampler
  reads (DPOTrainer would drop it as unused, and its tokenized pairs have no `input_ids` for the
  sampler to measure).
- `Trainer._get_train_sampler(train_dataset=None)`: StoredReferenceDPOTrainer builds the
  length-grouped sampler with a generator seeded from the run's seed. transformers builds it
  without one, so its order comes from the global RNG when training starts, which a fresh run
  and a resumed one reach in different states: a resumed run would train other batches.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
import transformers
import trl
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOTrainer

from stack_dpo.pairs import REFERENCE_COLUMNS

RELIED_ON = {
    (DPOTrainer, "_precompute_ref_logps"): ["self", "dataset", "name", "batch_size"],
    (Trainer, "_load_from_checkpoint"): ["self", "resume_from_checkpoint", "model"],
    (DPOTrainer, "_set_signature_columns_if_needed"): ["self"],
    (Trainer, "_get_train_sampler"): ["self", "train_dataset"],
}


def check_private_api() -> None:
    for (owner, name), expected in RELIED_ON.items():
        method = getattr(owner, name, None)
        found = list(inspect.signature(method).parameters) if method else None
        if found != expected:
            raise ImportError(
                f"{owner.__module__}.{owner.__name__}.{name} is {'gone' if method is None else f'now {found}'} "
                f"(transformers {transformers.__version__}, trl {trl.__version__}); stack-dpo relies on it with "
                f"arguments {expected}: install the versions pinned in pyproject.toml or update stack_dpo/compat.py")


check_private_api()


def pair_lengths(batch: dict, column: str) -> dict:
    """Each pair's padded length: the collator pads its chosen and rejected sequences to the longest.
    (A module function, so that datasets can hash it for its cache fingerprint.)"""
    pairs = zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
    return {column: [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in pairs]}


class StoredReferenceDPOTrainer(DPOTrainer):
    """Reads the reference log-probs stored beside the pairs instead of computing them again; with
    `train_sampling_strategy="group_by_length"`, batches pairs of similar length (transformers'
    LengthGroupedSampler: each pair once, in a seeded random order of groups)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # tokenizes the pairs
        if self.args.train_sampling_strategy == "group_by_length":
            self.train_dataset = self._with_lengths(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_lengths(self.eval_dataset)

    def _with_lengths(self, dataset):
        return dataset.map(pair_lengths, batched=True, fn_kwargs={"column": self.args.length_column_name},
                           desc="Measuring pair lengths")

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=dataset[self.args.length_column_name],
                                    generator=torch.Generator().manual_seed(seed))  # the same order when resumed

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.train_sampling_strategy == "group_by_length":
            self._signature_columns = [*self._signature_columns, self.args.length_column_name]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if set(REFERENCE_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def trl_loss_types() -> list[str]:
    """The DPO loss types the installed TRL computes, read from DPOTrainer._compute_loss (TRL
    keeps no list of them); tests/test_compat.py fails if none are found."""
    return sorted(set(re.findall(r'loss_type == "(\w+)"', inspect.getsource(DPOTrainer._compute_loss))))


def load_checkpoint_weights(trainer: Trainer, checkpoint: Path) -> None:
    """The weights of `checkpoint` into the trainer's model (the adapter, for a PEFT model)."""
    trainer._load_from_checkpoint(str(checkpoint))
