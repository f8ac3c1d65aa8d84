"""evaluate: the final model (models/merged) against the SFT model as reference, on the
held-out evaluation split (data/processed/dpo/eval) -> metrics/evaluate.json and
reports/evaluate.md.

rewards = beta * (log pi(y|x) - log pi_sft(y|x)), the implicit DPO reward; accuracy is how often
the chosen answer's reward beats the rejected one's, with a 95% Wilson interval. Beside it, the
baselines it must beat: the longer answer preferred (baseline/length_accuracy), the answer with
a code block preferred (baseline/code_block_accuracy) and the SFT model's own preference,
log pi_sft(chosen) > log pi_sft(rejected) (baseline/sft_accuracy); ties count half.

Both models are in one numeric form: the reference is the SFT adapter merged into the same
16-bit base the way merge built models/merged (never the NF4 base of a 4-bit run against the
merged 16-bit model), so an untrained DPO adapter scores rewards of exactly 0. They are loaded
one after the other, so only one is in memory at a time.

    python -m stages.evaluate     (or: dvc repro evaluate)
"""

from __future__ import annotations

import gc
import logging
import math

import torch
from transformers import AutoModelForCausalLM

from stages.cli import main
from stages.modeling import DTYPES, cast_weights, device_map, load_tokenizer, merged_model, pair_logps
from stages.outputs import load_splits, write_json_atomic, write_text_atomic
from stages.params import Params
from stages.paths import DPO_DATA, EVAL_REPORT, MERGED, METRICS, SFT_ADAPTER

log = logging.getLogger("stages.evaluate")
CODE_BLOCK = "```"


def preference_accuracy(chosen_scores, rejected_scores) -> float:
    """How often the chosen answer scores higher; a tie counts half."""
    chosen = torch.as_tensor(chosen_scores, dtype=torch.float64)
    rejected = torch.as_tensor(rejected_scores, dtype=torch.float64)
    return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion measured on n pairs."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def baselines(pairs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> dict:
    """The accuracies a surface rule or the SFT model alone reaches on these pairs."""
    def has_code(texts):
        return [CODE_BLOCK in text for text in texts]

    return {
        "baseline/length_accuracy": preference_accuracy([len(t) for t in pairs["chosen"]],
                                                        [len(t) for t in pairs["rejected"]]),
        "baseline/code_block_accuracy": preference_accuracy(has_code(pairs["chosen"]), has_code(pairs["rejected"])),
        "baseline/sft_accuracy": preference_accuracy(ref_chosen, ref_rejected),
    }


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
             "evaluation split, with the baselines the accuracy must beat.", "", "| metric | value |",
             "| --- | --- |"]
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

    reference, _ = merged_model(params.model, SFT_ADAPTER, params.merge.save_dtype)
    reference = cast_weights(reference, params.model.dtype)  # as models/merged is loaded below
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
    accuracy = (rewards_chosen > rewards_rejected).float().mean().item()
    low, high = wilson_interval(accuracy, len(pairs))
    metrics = {
        "rewards/accuracies": accuracy,
        "rewards/accuracies_ci95_low": low,
        "rewards/accuracies_ci95_high": high,
        "rewards/margins": (rewards_chosen - rewards_rejected).mean().item(),
        "rewards/chosen": rewards_chosen.mean().item(),
        "rewards/rejected": rewards_rejected.mean().item(),
        **baselines(pairs, ref_chosen, ref_rejected),
        "n_pairs": len(pairs),
    }
    samples = [{"prompt": p, "sft": s, "final": f} for p, s, f in zip(prompts, sft_texts, final_texts)]
    write_text_atomic(EVAL_REPORT, report(metrics, samples))
    write_json_atomic(METRICS / "evaluate.json", metrics)
    log.info("%s", metrics)
    return metrics


if __name__ == "__main__":
    main(run)
