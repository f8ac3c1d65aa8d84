"""What evaluate computes besides the log-probs (stack_dpo.modeling.pair_logps): the preference
accuracy with its Wilson interval, the baselines it must beat (longer answer, code block, the
SFT model alone), greedy generations and the markdown report."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("stack_dpo.evaluate")
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
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, **sampling) -> list[str]:
    """Each prompt's answer, greedy unless `sampling` (do_sample=True, temperature, top_p) says otherwise."""
    out = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        # max_length, not max_new_tokens: the model's generation config sets max_length already,
        # and transformers warns when both are given
        ids = model.generate(**inputs, max_length=inputs["input_ids"].shape[1] + max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **({"do_sample": False} | sampling))
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
