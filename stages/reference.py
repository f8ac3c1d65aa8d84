"""reference: the DPO reference model's (the SFT model's) log-probs of the chosen and rejected
answers dpo will use -> data/processed/reference/{train,eval}, row for row with pairs.load_pairs
(every eval pair; the seeded sample of training pairs the run's steps will consume), and
fingerprint.json: which pairs and which SFT adapter they belong to (dpo and merge check it).

They depend on the SFT adapter, the pairs, the tokenization and that sample only, so DVC keeps
them while dpo.beta, the learning rate or the schedule change, and dpo reads them instead of
running the reference model again. TRL's DPOTrainer computes them (precompute_ref_log_probs),
exactly as it would inside dpo.

    python -m stages.reference     (or: dvc repro reference)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from stack_dpo.dpo import build_trainer, dpo_config
from stack_dpo.entrypoint import main
from stack_dpo.outputs import atomic_dir, write_json_atomic
from stack_dpo.pairs import FINGERPRINT_FILE, REFERENCE_COLUMNS, load_pairs, reference_fingerprint
from stack_dpo.params import Params
from stack_dpo.paths import METRICS, REFERENCE


def run(params: Params) -> dict:
    datasets.disable_caching()  # TRL would otherwise also keep them in ~/.cache, outside what DVC tracks
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(params, dpo_config(params, Path(scratch)), None, with_reference=False)
    metrics = {}
    with atomic_dir(REFERENCE, stale=METRICS / "reference.json") as tmp:
        for split, data in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
            table = data.select_columns(REFERENCE_COLUMNS).data.table
            (tmp / split).mkdir()
            pq.write_table(table, tmp / split / "part-00000.parquet")
            metrics[split] = {"pairs": table.num_rows,
                              "mean_ref_chosen_logp": float(table.column("ref_chosen_logps").to_numpy().mean()),
                              "mean_ref_rejected_logp": float(table.column("ref_rejected_logps").to_numpy().mean())}
        (tmp / FINGERPRINT_FILE.name).write_text(json.dumps(reference_fingerprint(load_pairs(params)), indent=2) + "\n")
    write_json_atomic(METRICS / "reference.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run)
