"""merge: models/dpo merged into the 16-bit base -> models/merged (safetensors, tokenizer,
generation config, model card) and metrics/merge.json.

The base is always loaded unquantized, also with the 4-bit profile: LoRA deltas merged into
NF4 weights would be rounded back to 4 bits. A QLoRA adapter was trained on the dequantized
NF4 weights, though, not on the 16-bit ones, so merging it into the 16-bit base adds the
quantization error it never saw (PEFT issue 2105, which recommends merging into the
quantized-then-dequantized weights instead). This project keeps the 16-bit base and measures
what the merge changed: metrics/merge.json holds the merge gap on held-out pairs, the model as
trained (the base as configured, NF4 with the 4-bit profile, + models/dpo) against the merged
model as saved: their preference accuracies (against the stored SFT reference) and their
mean and max logit difference. push refuses a model whose gap exceeds push.max_merge_gap.

The merge itself is done in float32 and checked before anything is saved: the merged model's
logits must match the float32 adapter model's within merge.atol on merge.check_samples pairs.

    python -m stages.merge     (or: dvc repro merge)
"""

from __future__ import annotations

import logging

import pyarrow.parquet as pq
import torch

from stages.card import model_card
from stages.cli import main
from stages.modeling import DTYPES, cast_weights, load_adapter_model, load_tokenizer, merged_model, pair_logps
from stages.outputs import atomic_dir, parquet_files, write_json_atomic
from stages.pairs import load_pairs, load_reference
from stages.params import InvalidInput, Params
from stages.paths import DPO_ADAPTER, DPO_DATA, MERGED, METRICS

log = logging.getLogger("stages.merge")


def sample_inputs(tokenizer, n: int) -> dict[str, torch.Tensor]:
    rows = pq.read_table(parquet_files(DPO_DATA / "eval")[0]).slice(0, n).to_pylist()
    texts = [row["prompt"] + row["chosen"] for row in rows]
    return tokenizer(texts, return_tensors="pt", padding=True)


def merge(params: Params):
    """Returns (merged model in merge.save_dtype, tokenizer, max |logit difference| against the
    float32 adapter model)."""
    tokenizer = load_tokenizer(DPO_ADAPTER)
    merged, max_diff = merged_model(params.model, DPO_ADAPTER, params.merge.save_dtype,
                                    check_inputs=sample_inputs(tokenizer, params.merge.check_samples))
    return merged, tokenizer, max_diff


@torch.no_grad()
def logit_gap(model_a, model_b, tokenizer, texts: list[str], batch_size: int) -> tuple[float, float]:
    """(mean, max) |logit difference| of two models over every token of `texts`."""
    total, count, worst = 0.0, 0, 0.0
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True)
        mask = inputs["attention_mask"].bool()
        logits = [model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.float()[mask.to(model.device)]
                  for model in (model_a, model_b)]
        diff = (logits[0] - logits[1].to(logits[0].device)).abs()
        total, count, worst = total + diff.sum().item(), count + diff.numel(), max(worst, diff.max().item())
    return total / max(count, 1), worst


def merge_gap(params: Params, merged, tokenizer) -> dict:
    """The model as trained against the merged model on the first merge.gap_pairs held-out pairs."""
    held_out = load_pairs(params)
    pairs, reference = held_out["eval"], load_reference(held_out, ("eval",))["eval"]
    n = min(params.merge.gap_pairs or len(pairs), len(pairs))
    pairs, reference = pairs.select(range(n)), reference.select(range(n))
    ref_chosen = torch.tensor(reference["ref_chosen_logps"])
    ref_rejected = torch.tensor(reference["ref_rejected_logps"])
    as_trained = load_adapter_model(params.model, DPO_ADAPTER)  # NF4 + adapter with the 4-bit profile
    merged = cast_weights(merged, params.model.dtype)  # as evaluate loads models/merged
    batch = params.evaluate.batch_size
    accuracy = {}
    for name, model in (("as_trained", as_trained), ("merged", merged)):
        chosen, rejected = pair_logps(model, tokenizer, pairs, batch)
        accuracy[name] = ((chosen - ref_chosen) > (rejected - ref_rejected)).float().mean().item()
    texts = [p + a for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]) for a in (c, r)]
    mean_diff, max_diff = logit_gap(as_trained, merged, tokenizer, texts, batch)
    return {"pairs": n, "accuracy_as_trained": accuracy["as_trained"], "accuracy_merged": accuracy["merged"],
            "accuracy_drop": accuracy["as_trained"] - accuracy["merged"],
            "mean_logit_diff": mean_diff, "max_logit_diff": max_diff}


def run(params: Params) -> dict:
    merged, tokenizer, max_diff = merge(params)
    log.info("max |merged - adapter| logit difference on %d samples: %.2e", params.merge.check_samples, max_diff)
    if not max_diff <= params.merge.atol:  # deterministic: the same inputs fail again, so not retried
        raise InvalidInput(
            f"merge check failed: merged logits differ from the adapter model's by {max_diff:.3e} "
            f"> merge.atol = {params.merge.atol}; models/merged was not written"
        )
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    gap = merge_gap(params, merged, tokenizer)
    log.info("merge gap on %d held-out pairs: %s", gap["pairs"], gap)
    with atomic_dir(MERGED) as tmp:
        merged.to(DTYPES[params.merge.save_dtype]).save_pretrained(tmp, max_shard_size=params.merge.max_shard_size)
        tokenizer.save_pretrained(tmp)
        model_card(params).save(tmp / "README.md")
    metrics = {"max_logit_diff": max_diff, "check_samples": params.merge.check_samples,
               **{f"gap/{key}": value for key, value in gap.items()}}
    write_json_atomic(METRICS / "merge.json", metrics)
    return metrics


if __name__ == "__main__":
    main(run)
