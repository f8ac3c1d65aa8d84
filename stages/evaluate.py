"""evaluate: the final model (models/merged) against the SFT model as reference, on the
held-out evaluation split (data/processed/dpo/eval) -> metrics/evaluate.json,
reports/evaluate.md and metrics/evaluate_pairs.parquet: the four log-probs of each pair (final
model and reference, chosen and rejected), from which every figure of metrics/evaluate.json is
computed (`stack-dpo verify` recomputes them).

rewards = beta * (log pi(y|x) - log pi_sft(y|x)), the implicit DPO reward; accuracy is how often
the chosen answer's reward beats the rejected one's, with a 95% Wilson interval. Beside it, the
baselines it must beat: the longer answer preferred (baseline/length_accuracy), the answer with
a code block preferred (baseline/code_block_accuracy) and the SFT model's own preference,
log pi_sft(chosen) > log pi_sft(rejected) (baseline/sft_accuracy); ties count half.

Both models are in one numeric form: the reference is the SFT adapter merged into the same
16-bit base the way merge built models/merged (never the NF4 base of a 4-bit run against the
merged 16-bit model), so an untrained DPO adapter scores rewards of exactly 0. Both compute in
model.dtype on the device, one after the other: only one is there at a time (7B in bf16: 13.5 GB).

    python -m stages.evaluate     (or: dvc repro evaluate)
"""

from __future__ import annotations

import gc
import logging

from stack_dpo.entrypoint import main
from stack_dpo.evaluate import distinct_samples, generate, held_out_pairs, metrics_from_scores, report, scores_table
from stack_dpo.modeling import cast_weights, load_merged, load_tokenizer, merged_model, on_device, pair_logps
from stack_dpo.outputs import write_json_atomic, write_parquet_atomic, write_text_atomic
from stack_dpo.params import Params
from stack_dpo.paths import EVAL_REPORT, EVAL_SCORES, MERGED, METRICS, SFT_ADAPTER

log = logging.getLogger("stages.evaluate")


def run(params: Params) -> dict:
    pairs = held_out_pairs(params)
    samples = distinct_samples(pairs, params.evaluate.generations)
    prompts = [sample["prompt"] for sample in samples]
    batch = params.evaluate.batch_size
    tokenizer = load_tokenizer(MERGED)

    reference, _ = merged_model(params.model, SFT_ADAPTER, params.merge.save_dtype)  # on the host
    reference = on_device(cast_weights(reference, params.model.dtype))  # as models/merged is loaded below
    ref_chosen, ref_rejected = pair_logps(reference, tokenizer, pairs, batch, desc="SFT model")
    sft_texts = generate(reference, tokenizer, prompts, params.evaluate.max_new_tokens)
    del reference
    gc.collect()

    final = load_merged(MERGED, params.model)
    chosen, rejected = pair_logps(final, tokenizer, pairs, batch, desc="final model")
    final_texts = generate(final, tokenizer, prompts, params.evaluate.max_new_tokens)

    scores = scores_table(chosen, rejected, ref_chosen, ref_rejected)
    metrics = metrics_from_scores(scores, pairs, params.dpo.beta)
    for sample, sft_text, final_text in zip(samples, sft_texts, final_texts):
        sample.update(sft=sft_text, final=final_text)
    # the old metrics go first: a failure between the writes below leaves no metrics (dvc reruns
    # evaluate), never old metrics beside new per-pair log-probs
    (METRICS / "evaluate.json").unlink(missing_ok=True)
    write_text_atomic(EVAL_REPORT, report(metrics, samples, params.dpo.beta, params.evaluate.max_new_tokens))
    write_parquet_atomic(EVAL_SCORES, scores)
    write_json_atomic(METRICS / "evaluate.json", metrics)
    log.info("%s", metrics)
    return metrics


if __name__ == "__main__":
    main(run)

