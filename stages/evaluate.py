"""evaluate: the final model (models/merged) against the SFT model (base + models/sft) as
reference, on the held-out evaluation split (data/processed/dpo/eval) -> metrics/evaluate.json
and reports/evaluate.md.

rewards = beta * (log pi(y|x) - log pi_sft(y|x)), the implicit DPO reward; accuracy is how often
the chosen answer's reward beats the rejected one's. The two models are loaded one after the
other, so only one is in memory at a time.
"""

from __future__ import annotations

import gc
import logging

import torch
from transformers import AutoModelForCausalLM

from stages.cli import main
from stages.modeling import DTYPES, device_map, load_adapter_model, load_tokenizer, response_logps
from stages.outputs import load_splits, write_json_atomic, write_text_atomic
from stages.params import Params
from stages.paths import DPO_DATA, EVAL_REPORT, MERGED, METRICS, SFT_ADAPTER

log = logging.getLogger("stages.evaluate")


def pair_logps(model, tokenizer, pairs, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = response_logps(model, tokenizer, pairs["prompt"], pairs["chosen"], batch_size)
    rejected = response_logps(model, tokenizer, pairs["prompt"], pairs["rejected"], batch_size)
    return chosen, rejected


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    out = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def report(metrics: dict, samples: list[dict]) -> str:
    lines = ["# Evaluation", "", "Final model (models/merged) against the SFT model as reference, on the held-out",
             "evaluation split.", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items()]
    for i, sample in enumerate(samples, 1):
        lines += ["", f"## Sample {i}", "", "**Prompt**", "", "````text", sample["prompt"].strip(), "````"]
        for name in ("sft", "final"):
            lines += ["", f"**{name} model (greedy)**", "", "````text", sample[name].strip(), "````"]
    return "\n".join(lines) + "\n"


def run(params: Params) -> dict:
    pairs = load_splits(DPO_DATA)["eval"]
    if params.evaluate.max_pairs:
        pairs = pairs.select(range(min(params.evaluate.max_pairs, len(pairs))))
    prompts = pairs["prompt"][: params.evaluate.generations]
    batch = params.evaluate.batch_size
    tokenizer = load_tokenizer(MERGED)

    reference = load_adapter_model(params.model, SFT_ADAPTER)
    ref_chosen, ref_rejected = pair_logps(reference, tokenizer, pairs, batch)
    sft_texts = generate(reference, tokenizer, prompts, params.evaluate.max_new_tokens)
    del reference
    gc.collect()

    final = AutoModelForCausalLM.from_pretrained(MERGED, dtype=DTYPES[params.model.dtype], device_map=device_map())
    chosen, rejected = pair_logps(final, tokenizer, pairs, batch)
    final_texts = generate(final, tokenizer, prompts, params.evaluate.max_new_tokens)

    beta = params.dpo.beta
    rewards_chosen = beta * (chosen - ref_chosen)
    rewards_rejected = beta * (rejected - ref_rejected)
    metrics = {
        "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean().item(),
        "rewards/margins": (rewards_chosen - rewards_rejected).mean().item(),
        "rewards/chosen": rewards_chosen.mean().item(),
        "rewards/rejected": rewards_rejected.mean().item(),
        "n_pairs": len(pairs),
    }
    samples = [{"prompt": p, "sft": s, "final": f} for p, s, f in zip(prompts, sft_texts, final_texts)]
    write_text_atomic(EVAL_REPORT, report(metrics, samples))
    write_json_atomic(METRICS / "evaluate.json", metrics)
    log.info("%s", metrics)
    return metrics


if __name__ == "__main__":
    main(run)
