"""What evaluate computes besides the log-probs (stack_dpo.modeling.pair_logps): the preference
accuracy with its Wilson interval, the baselines it must beat (longer answer, code block, the
SFT model alone), greedy generations and the markdown report."""

from __future__ import annotations

import logging
import math

import pyarrow as pa
import torch

from stack_dpo.dataset import generation_prompt
from stack_dpo.outputs import load_splits
from stack_dpo.params import Params
from stack_dpo.paths import DPO_DATA

log = logging.getLogger("stack_dpo.evaluate")
CODE_BLOCK = "```"


def held_out_pairs(params: Params):
    """The pairs evaluate scores: the evaluation split, its first evaluate.max_pairs when set."""
    pairs = load_splits(DPO_DATA)["eval"]
    if params.evaluate.max_pairs:
        pairs = pairs.select(range(min(params.evaluate.max_pairs, len(pairs))))
    return pairs


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


# metrics/evaluate_pairs.parquet: one row per held-out pair, in the order of data/processed/dpo/eval
SCORE_COLUMNS = ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]


def scores_table(chosen, rejected, ref_chosen, ref_rejected) -> pa.Table:
    """The per-pair log-probs of the final model and the reference (float64: the metrics are
    computed from exactly these numbers, so anyone can recompute them)."""
    columns = {"pair": pa.array(range(len(chosen)), pa.int64())}
    for name, values in zip(SCORE_COLUMNS, (chosen, rejected, ref_chosen, ref_rejected)):
        columns[name] = pa.array(torch.as_tensor(values, dtype=torch.float64).tolist(), pa.float64())
    return pa.table(columns)


def metrics_from_scores(scores: pa.Table, pairs, beta: float) -> dict:
    """metrics/evaluate.json from the per-pair log-probs and the pairs' texts. rewards =
    beta * (log pi - log pi_sft); a pair counts as preferred when the chosen reward is strictly
    higher (as TRL counts it, so equal rewards, an untrained policy's, score 0)."""
    logps = {name: torch.tensor(scores.column(name).to_pylist(), dtype=torch.float64) for name in SCORE_COLUMNS}
    rewards_chosen = beta * (logps["chosen_logps"] - logps["ref_chosen_logps"])
    rewards_rejected = beta * (logps["rejected_logps"] - logps["ref_rejected_logps"])
    accuracy = (rewards_chosen > rewards_rejected).double().mean().item()
    low, high = wilson_interval(accuracy, len(pairs))
    return {
        "rewards/accuracies": accuracy,
        "rewards/accuracies_ci95_low": low,
        "rewards/accuracies_ci95_high": high,
        "rewards/margins": (rewards_chosen - rewards_rejected).mean().item(),
        "rewards/chosen": rewards_chosen.mean().item(),
        "rewards/rejected": rewards_rejected.mean().item(),
        **baselines(pairs, logps["ref_chosen_logps"], logps["ref_rejected_logps"]),
        "n_pairs": len(pairs),
    }


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, **sampling) -> list[str]:
    """Each prompt's answer, greedy unless `sampling` (do_sample=True, temperature, top_p) says otherwise."""
    out = []
    for prompt in prompts:
        inputs = tokenizer(generation_prompt(prompt), return_tensors="pt").to(model.device)
        # max_length, not max_new_tokens: the model's generation config sets max_length already,
        # and transformers warns when both are given
        ids = model.generate(**inputs, max_length=inputs["input_ids"].shape[1] + max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **({"do_sample": False} | sampling))
        out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def distinct_samples(pairs, n: int) -> list[dict]:
    """The first pair of each of the first `n` distinct prompts (a question has up to three pairs)."""
    samples, seen = [], set()
    for row in pairs:
        if len(samples) == n:
            break
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            samples.append({key: row[key] for key in ("prompt", "chosen", "rejected")})
    return samples


BASELINES = [("baseline/length_accuracy", "the longer answer wins"),
             ("baseline/code_block_accuracy", "the answer with a code block wins"),
             ("baseline/sft_accuracy", "the SFT model's own preference (log-prob)")]


def unbeaten_baselines(metrics: dict) -> list[str]:
    """The baselines (by name) the held-out accuracy does not beat."""
    return [name for key, name in BASELINES if not metrics["rewards/accuracies"] > metrics[key]]


def table_cell(text: str) -> str:
    """Text for one cell of a markdown table."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(nothing)"


def report(metrics: dict, samples: list[dict], beta: float, max_new_tokens: int) -> str:
    """reports/evaluate.md: the accuracy beside its baselines, then held-out questions with their
    chosen and rejected answers and the two models' generations side by side."""
    accuracy = metrics["rewards/accuracies"]
    beaten = unbeaten_baselines(metrics)
    lines = ["# Evaluation", "",
             f"The final model (models/merged) against the SFT model as the reference, on {metrics['n_pairs']} "
             "held-out pairs (the evaluation split). An answer's reward is beta x (log-prob under the final model - "
             f"log-prob under the SFT model), beta = {beta}; the accuracy is how often the chosen answer's reward "
             "beats the rejected one's. It means something only beside the baselines below, which need no training.",
             "", "| | accuracy |", "| --- | --- |",
             f"| **final model against the SFT model** | **{accuracy:.3f}** (95% interval "
             f"{metrics['rewards/accuracies_ci95_low']:.3f}-{metrics['rewards/accuracies_ci95_high']:.3f}) |"]
    lines += [f"| baseline: {name} | {metrics[key]:.3f} |" for key, name in BASELINES]
    lines += ["", ("It beats every baseline." if not beaten else f"It does **not** beat: {', '.join(beaten)}."),
              f"Mean reward margin (chosen - rejected): {metrics['rewards/margins']:.3f}; mean rewards: chosen "
              f"{metrics['rewards/chosen']:.3f}, rejected {metrics['rewards/rejected']:.3f}."]
    for i, sample in enumerate(samples, 1):
        lines += ["", f"## Question {i}", "", "````text", sample["prompt"].strip(), "````", "",
                  "**Chosen answer** (preferred in the data)", "", "````text", sample["chosen"].strip(), "````", "",
                  "**Rejected answer**", "", "````text", sample["rejected"].strip(), "````", "",
                  f"**Generations** (greedy, at most {max_new_tokens} new tokens)", "",
                  "| SFT model | final model |", "| --- | --- |",
                  f"| {table_cell(sample['sft'])} | {table_cell(sample['final'])} |"]
    return "\n".join(lines) + "\n"
