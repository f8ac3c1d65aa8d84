"""Merging models/dpo into the 16-bit base, with the check of the merge and the merge gap: the
model as trained (the base as configured, NF4 with the 4-bit profile, + the adapter) against the
merged model as saved, on held-out pairs (PEFT issue 2105: a QLoRA adapter never saw the 16-bit
weights it is merged into)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from stack_dpo.modeling import load_adapter_model, load_merged, load_tokenizer, merged_model, pair_logps
from stack_dpo.outputs import load_splits
from stack_dpo.pairs import load_reference
from stack_dpo.params import Params
from stack_dpo.paths import DPO_ADAPTER, DPO_DATA

log = logging.getLogger("stack_dpo.merge")


def merge(params: Params):
    """Returns (merged model in merge.save_dtype on the host, tokenizer, the merge check: max
    relative difference of a LoRA layer's output merged against unmerged)."""
    merged, max_diff = merged_model(params.model, DPO_ADAPTER, params.merge.save_dtype)
    return merged, load_tokenizer(DPO_ADAPTER), max_diff


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


def merge_gap(params: Params, merged_dir: Path, tokenizer) -> dict:
    """The model as trained against the merged model as saved in `merged_dir` (loaded as evaluate
    loads models/merged) on the first merge.gap_pairs held-out pairs."""
    pairs = load_splits(DPO_DATA)["eval"]
    reference = load_reference({"eval": pairs}, ("eval",))["eval"]
    n = min(params.merge.gap_pairs or len(pairs), len(pairs))
    pairs, reference = pairs.select(range(n)), reference.select(range(n))
    ref_chosen = torch.tensor(reference["ref_chosen_logps"])
    ref_rejected = torch.tensor(reference["ref_rejected_logps"])
    as_trained = load_adapter_model(params.model, DPO_ADAPTER)  # NF4 + adapter with the 4-bit profile
    merged = load_merged(merged_dir, params.model)
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
