"""prepare: data/raw -> data/processed/sft/{train,eval} (text) and
data/processed/dpo/{train,eval} (prompt, chosen, rejected), and metrics/prepare.json.

The seed's mapping, exactly (stack_dpo.dataset): prompt = the recipe's template around the
question, chosen = response_j, rejected = response_k, SFT text = prompt + response_j. DPO pairs
are filtered by token counts of the base model's tokenizer, counted the way TRL's DPOTrainer
tokenizes (prompt <= max_prompt_length, prompt + response + EOS <= max_length), so no pair is
truncated in training. Every dropped row is counted by rule (stack_dpo.prepare.DROP_RULES, in
the order they apply) in metrics/prepare.json.

    python -m stages.prepare     (or: dvc repro prepare)
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from stack_dpo.dataset import SPLITS
from stack_dpo.entrypoint import main
from stack_dpo.outputs import atomic_dir, write_json_atomic
from stack_dpo.params import Params
from stack_dpo.paths import DPO_DATA, METRICS, SFT_DATA
from stack_dpo.prepare import (
    TOKENIZATION_SAMPLE,
    check_not_empty,
    check_tokenization,
    num_workers,
    prepare_dpo,
    prepare_sft,
    raw_batches,
    raw_shards,
    sample_pairs,
    tokenizer_and_max_chars,
)

log = logging.getLogger("stages.prepare")


def run(params: Params) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # prepare.num_proc is the one knob for cores
    num_workers(params)  # checked before any work, as is every raw shard's schema:
    for split in SPLITS:
        list(raw_shards(split))
    # loaded once: the workers forked later inherit it (and its max_token_chars)
    tokenizer, _ = tokenizer_and_max_chars(params.model.name_or_path)
    check_tokenization(tokenizer, *sample_pairs(TOKENIZATION_SAMPLE))
    eval_qids = np.unique(
        np.concatenate([b.column("qid").to_numpy(False) for b in raw_batches("evaluation", params.prepare.batch_rows)])
    )
    metrics: dict = {}
    stale = METRICS / "prepare.json"  # outputs and metrics land together (a failure between leaves no metrics)
    with atomic_dir(SFT_DATA, stale) as sft_tmp, atomic_dir(DPO_DATA, stale) as dpo_tmp:
        for name, work in (("sft", lambda: prepare_sft(params, eval_qids, sft_tmp)),
                           ("dpo/train", lambda: prepare_dpo(params, "rl", eval_qids, dpo_tmp / "train")),
                           ("dpo/eval", lambda: prepare_dpo(params, "evaluation", None, dpo_tmp / "eval"))):
            started = time.perf_counter()
            metrics[name] = work()
            log.info("%s: %d rows in %.1f s", name, metrics[name]["input"], time.perf_counter() - started)
        check_not_empty(metrics)
    write_json_atomic(METRICS / "prepare.json", metrics)
    for name, counts in metrics.items():
        log.info("%s: %s", name, counts)
    return metrics


if __name__ == "__main__":
    main(run)

