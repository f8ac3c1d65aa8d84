"""The DPO pairs a run uses, and the reference log-probs stored for them.

The reference stage writes the SFT model's log-probs of the pairs row for row, with a
fingerprint of those pairs and of the SFT adapter (data/processed/reference/fingerprint.json).
Every stage that reads them (dpo, merge) checks both first and refuses log-probs that belong
to other rows or another SFT adapter: matching them by row count alone would train against the
wrong numbers without a word when the rows change and their count does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets

from stack_dpo.outputs import load_splits
from stack_dpo.params import InvalidInput, Params, global_batch
from stack_dpo.paths import DPO_DATA, REFERENCE, SFT_ADAPTER

REFERENCE_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]
FINGERPRINT_FILE = REFERENCE / "fingerprint.json"


def training_pairs(params: Params) -> int:
    """How many pairs the DPO run trains on: steps x the global batch (each pair once)."""
    return params.dpo.train.max_steps * global_batch(params.dpo.train, params.launch)


def load_pairs(params: Params) -> DatasetDict:
    """The eval pairs, and a seeded random sample of the training pairs as large as the run
    uses, so the reference stage computes log-probs only for pairs that will be trained on
    (at full scale the rl split is far larger than 1000 steps x 16 pairs)."""
    pairs = load_splits(DPO_DATA)
    train = pairs["train"].shuffle(seed=params.dpo.train.seed)
    pairs["train"] = train.select(range(min(training_pairs(params), len(train)))).flatten_indices()
    return pairs


def pairs_fingerprint(pairs: Dataset) -> str:
    """sha256 of the pairs' texts, row by row and in order."""
    digest = hashlib.sha256()
    for batch in pairs.select_columns(["prompt", "chosen", "rejected"]).data.table.to_batches():
        for column in batch.columns:
            for text in column.to_pylist():
                digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.hexdigest()


def adapter_fingerprint(adapter_dir: Path = SFT_ADAPTER) -> str:
    """sha256 of the adapter's weights and config."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with (adapter_dir / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def reference_fingerprint(pairs: DatasetDict) -> dict:
    return {"pairs": {split: pairs_fingerprint(data) for split, data in pairs.items()},
            "sft_adapter": adapter_fingerprint()}


def load_reference(pairs: DatasetDict, splits: tuple[str, ...] = ("train", "eval")) -> dict[str, Dataset]:
    """The stored reference log-probs of `pairs[split]` for each split, row for row, after
    checking that they were computed for exactly these pairs and the current SFT adapter."""
    rerun = "rerun the reference stage (dvc repro reference)"
    try:
        stored = json.loads(FINGERPRINT_FILE.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{FINGERPRINT_FILE}: missing, so the stored reference log-probs cannot be matched to "
                           f"their pairs; {rerun}") from None
    if stored.get("sft_adapter") != adapter_fingerprint():
        raise InvalidInput(f"{REFERENCE}: the reference log-probs were computed with another SFT adapter than "
                           f"{SFT_ADAPTER}; {rerun}")
    for split in splits:
        if stored.get("pairs", {}).get(split) != pairs_fingerprint(pairs[split]):
            raise InvalidInput(f"{REFERENCE / split}: the reference log-probs were computed for other pairs than "
                               f"the {len(pairs[split])} {split} pairs this run uses ({DPO_DATA}, dpo.train sizes "
                               f"and seed); {rerun}")
    reference = load_splits(REFERENCE)
    for split in splits:
        if len(reference[split]) != len(pairs[split]):  # the fingerprint matched, so the files were changed
            raise InvalidInput(f"{REFERENCE / split}: {len(reference[split])} rows for the {len(pairs[split])} pairs "
                               f"they were computed for; {rerun}")
    return {split: reference[split] for split in splits}


def with_stored_reference(pairs: DatasetDict) -> DatasetDict:
    """`pairs` with the stored reference log-probs beside each row, checked."""
    reference = load_reference(pairs, tuple(pairs))
    return DatasetDict({split: concatenate_datasets([data, reference[split]], axis=1) for split, data in pairs.items()})
