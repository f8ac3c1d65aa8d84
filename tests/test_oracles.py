"""Every reported number recomputed by an oracle that shares no code with stack_dpo: plain
Python over the files a run wrote (metrics/evaluate_pairs.parquet, the pairs, params.yaml), and
transformers + PEFT + tokenizers where a model is needed. Nothing here imports the project."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, subprocess_env

STACK_DPO = str(Path(sys.executable).parent / "stack-dpo")


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def ties_half(chosen, rejected) -> float:
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)) / len(chosen)


def wilson_by_quadratic(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval as the two roots p of (p_hat - p)^2 = z^2 p (1 - p) / n."""
    p_hat = successes / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def expected_figures(ws: Path) -> dict:
    """metrics/evaluate.json as its definitions say, from the per-pair log-probs and the texts."""
    beta = yaml.safe_load((ws / "params.yaml").read_text())["dpo"]["beta"]
    scores = rows(ws / "metrics/evaluate_pairs.parquet")
    pairs = rows(ws / "data/processed/dpo/eval")
    assert [s["pair"] for s in scores] == list(range(len(pairs)))  # one row per held-out pair, in order
    chosen = [beta * (s["chosen_logps"] - s["ref_chosen_logps"]) for s in scores]
    rejected = [beta * (s["rejected_logps"] - s["ref_rejected_logps"]) for s in scores]
    n = len(pairs)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / n  # a tie is not a win (TRL's count)
    low, high = wilson_by_quadratic(accuracy * n, n)
    return {
        "n_pairs": n,
        "rewards/accuracies": accuracy,
        "rewards/accuracies_ci95_low": low,
        "rewards/accuracies_ci95_high": high,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "rewards/chosen": sum(chosen) / n,
        "rewards/rejected": sum(rejected) / n,
        "baseline/length_accuracy": ties_half([len(p["chosen"]) for p in pairs], [len(p["rejected"]) for p in pairs]),
        "baseline/code_block_accuracy": ties_half(["```" in p["chosen"] for p in pairs],
                                                  ["```" in p["rejected"] for p in pairs]),
        "baseline/sft_accuracy": ties_half([s["ref_chosen_logps"] for s in scores],
                                           [s["ref_rejected_logps"] for s in scores]),
    }


def test_wilson_oracle_matches_the_published_table():
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (score interval)
    assert wilson_by_quadratic(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_by_quadratic(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_by_quadratic(1, 29) == pytest.approx((0.0061, 0.1718), abs=1e-4)


def test_every_evaluate_figure_recomputed_from_the_per_pair_log_probs(trained):
    recorded = json.loads((trained / "metrics/evaluate.json").read_text())
    expected = expected_figures(trained)
    assert set(recorded) == set(expected)
    for key, value in expected.items():
        assert recorded[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # the figures are not degenerate on this run: the interval is a real one around a real accuracy
    assert 0 < expected["rewards/accuracies_ci95_low"] < expected["rewards/accuracies"]
    assert expected["rewards/accuracies"] < expected["rewards/accuracies_ci95_high"] < 1


def test_stack_dpo_verify_prints_the_recomputed_figures_and_fails_on_a_changed_one(trained, tmp_path):
    done = subprocess.run([STACK_DPO, "verify"], cwd=trained, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    printed = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:] if line.strip()
               and not line.startswith("from ")}
    for key, value in expected_figures(trained).items():
        assert float(printed[key][1]) == pytest.approx(value, abs=1e-6), key
        assert "DIFFERS" not in printed[key]
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("params.yaml", "metrics/evaluate_pairs.parquet", "data/processed/dpo"):
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-r", str(trained / name), str(ws / name)], check=True)
    metrics = json.loads((trained / "metrics/evaluate.json").read_text())
    (ws / "metrics/evaluate.json").write_text(json.dumps({**metrics, "rewards/margins": metrics["rewards/margins"]
                                                          + 1e-3}))
    done = subprocess.run([STACK_DPO, "verify"], cwd=ws, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 1 and "rewards/margins" in done.stderr
    assert [line for line in done.stdout.splitlines() if "DIFFERS" in line][0].startswith("rewards/margins")


def response_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log pi(response | prompt): the response's tokens are those of prompt + response + EOS after
    the longest common prefix with the prompt's own tokens; one sequence, no padding."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(prompt_ids))
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logprobs[i - 1, full_ids[i]].item() for i in range(start, len(full_ids)))


def models_as_evaluated(ws: Path):
    """(final, reference) as evaluate defines them, built with transformers and PEFT directly:
    models/merged in model.dtype; the SFT adapter merged in float32 into the base, its weights
    cast to merge.save_dtype, then to model.dtype (as saving and loading would: buffers such as
    the rotary frequencies are not weights and keep float32)."""
    params = yaml.safe_load((ws / "params.yaml").read_text())
    dtype, saved = getattr(torch, params["model"]["dtype"]), getattr(torch, params["merge"]["save_dtype"])
    final = AutoModelForCausalLM.from_pretrained(ws / "models/merged", dtype=dtype).eval()
    base = AutoModelForCausalLM.from_pretrained(REPO / "data/sample/tiny-llama", dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, ws / "models/sft").merge_and_unload().eval()
    for weight in reference.parameters():
        weight.data = weight.data.to(saved).to(dtype)
    return final, reference


def test_the_per_pair_log_probs_are_the_two_models_own(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained / "models/merged")
    final, reference = models_as_evaluated(trained)
    scores = rows(trained / "metrics/evaluate_pairs.parquet")
    pairs = rows(trained / "data/processed/dpo/eval")
    for i in range(0, len(pairs), max(1, len(pairs) // 6)):  # six pairs across the split
        pair, score = pairs[i], scores[i]
        for name, model, column in (("final", final, ""), ("reference", reference, "ref_")):
            for side in ("chosen", "rejected"):
                want = response_logp(model, tokenizer, pair["prompt"], pair[side])
                assert score[f"{column}{side}_logps"] == pytest.approx(want, abs=2e-3), (i, name, side)


def test_the_merge_gap_recomputed_with_transformers_and_peft(trained):
    """metrics/merge.json: the model as trained (base + models/dpo, unmerged) against
    models/merged on the held-out pairs, against the stored SFT reference log-probs."""
    params = yaml.safe_load((trained / "params.yaml").read_text())
    assert params["model"]["quantization"] == "none"  # the 4-bit gap: tests/test_qlora.py
    gap = json.loads((trained / "metrics/merge.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(trained / "models/merged")
    dtype = getattr(torch, params["model"]["dtype"])
    base = AutoModelForCausalLM.from_pretrained(REPO / "data/sample/tiny-llama", dtype=dtype)
    as_trained = PeftModel.from_pretrained(base, trained / "models/dpo").eval()
    merged = AutoModelForCausalLM.from_pretrained(trained / "models/merged", dtype=dtype).eval()
    pairs = rows(trained / "data/processed/dpo/eval")
    reference = rows(trained / "data/processed/reference/eval")
    n = min(params["merge"]["gap_pairs"] or len(pairs), len(pairs))
    assert gap["gap/pairs"] == n
    diffs = []
    wins = {"as_trained": 0, "merged": 0}
    for pair, ref in zip(pairs[:n], reference[:n]):
        for answer in ("chosen", "rejected"):
            ids = torch.tensor([tokenizer(pair["prompt"] + pair[answer])["input_ids"]])
            with torch.no_grad():
                diffs.append((as_trained(ids).logits.float() - merged(ids).logits.float()).abs().flatten())
        for name, model in (("as_trained", as_trained), ("merged", merged)):
            chosen = response_logp(model, tokenizer, pair["prompt"], pair["chosen"]) - ref["ref_chosen_logps"]
            rejected = response_logp(model, tokenizer, pair["prompt"], pair["rejected"]) - ref["ref_rejected_logps"]
            wins[name] += chosen > rejected
    every = torch.cat(diffs)
    assert gap["gap/mean_logit_diff"] == pytest.approx(every.mean().item(), rel=1e-3)
    assert gap["gap/max_logit_diff"] == pytest.approx(every.max().item(), rel=1e-3)
    # a pair within float noise of a tie may fall either way: one pair of slack
    for name in wins:
        assert abs(gap[f"gap/accuracy_{name}"] - wins[name] / n) <= 1 / n + 1e-9, name
    assert gap["gap/accuracy_drop"] == pytest.approx(gap["gap/accuracy_as_trained"] - gap["gap/accuracy_merged"])


def question_of(text: str) -> str:
    """The question of a prompt or an SFT text (`Question: {question}\n\nAnswer: ...`)."""
    assert text.startswith("Question: ")
    return text[len("Question: "):].split("\n\nAnswer: ", 1)[0]


@pytest.mark.parametrize("shard_rows, batch_rows", [(7, 5), (1000, 10_000)])
def test_held_out_questions_never_reach_a_training_split(tmp_path, shard_rows, batch_rows):
    """Five evaluation rows planted in both training splits (with other answers), however the
    raw splits are sharded and batched: the held-out questions reach no training split, the
    planted rows are dropped by name, and no question is in both SFT splits."""
    from stages import fetch, prepare
    from tests.conftest import inside, make_workspace

    ws = make_workspace(tmp_path / "ws", {"fetch": {"shard_rows": shard_rows}, "prepare": {"batch_rows": batch_rows}})
    with inside(ws) as params:
        fetch.run(params)
        planted = pq.read_table(ws / "data/raw/evaluation").slice(10, 5)
        for split in ("finetune", "rl"):
            other = pq.read_table(ws / f"data/raw/{split}").slice(0, 5)
            with_other_answers = planted.set_column(planted.schema.get_field_index("response_j"), "response_j",
                                                    other.column("response_j"))
            pq.write_table(with_other_answers.cast(pq.read_schema(next((ws / f"data/raw/{split}").glob("*.parquet")))),
                           ws / f"data/raw/{split}/planted.parquet")
        metrics = prepare.run(params)
    held_out = {question_of(row["prompt"]) for row in rows(ws / "data/processed/dpo/eval")}
    assert set(planted.column("question").to_pylist()) <= held_out
    dpo_train = {question_of(row["prompt"]) for row in rows(ws / "data/processed/dpo/train")}
    sft = {split: {question_of(row["text"]) for row in rows(ws / f"data/processed/sft/{split}")}
           for split in ("train", "eval")}
    assert not held_out & dpo_train and not held_out & sft["train"] and not held_out & sft["eval"]
    assert not sft["train"] & sft["eval"]  # the SFT eval split is by question too
    assert metrics["dpo/train"]["dropped"]["qid_in_evaluation"] == 5
    assert metrics["sft"]["dropped"]["qid_in_evaluation"] == 5


def test_a_dpo_run_trains_on_steps_x_global_batch_pairs_and_their_tokens(trained, tmp_path, monkeypatch):
    """3 steps x micro-batch 2 x accumulation 2 = 12 pairs, each once: counted at the model's
    input (a forward hook), their tokens recounted with the tokenizer from the pairs' texts."""
    from stack_dpo import dpo as dpo_library
    from stages import dpo, reference
    from tests.conftest import inside, writable_copy

    ws = writable_copy(trained, tmp_path / "ws", checkpoints=False)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["dpo"]["train"].update(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                  save_steps=3, eval_steps=3)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    seen = {"sequences": 0, "tokens": 0, "texts": []}
    tokenizer = AutoTokenizer.from_pretrained(ws / "models/sft")

    def count(module, args, kwargs):
        if torch.is_grad_enabled():  # a training step (evaluation runs without gradients)
            seen["sequences"] += kwargs["input_ids"].shape[0]
            seen["tokens"] += int(kwargs["attention_mask"].sum())
            seen["texts"] += [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(kwargs["input_ids"],
                                                                                       kwargs["attention_mask"])]

    loading = dpo_library.load_adapter_model

    def hooked(*args, **kwargs):
        model = loading(*args, **kwargs)
        model.register_forward_pre_hook(count, with_kwargs=True)
        return model

    monkeypatch.setattr(dpo_library, "load_adapter_model", hooked)
    with inside(ws) as loaded:
        reference.run(loaded)
        metrics = dpo.run(loaded)
    assert metrics["global_step"] == 3
    assert seen["sequences"] == 2 * 12  # each pair is a chosen and a rejected sequence
    # which 12: the seeded sample of the training pairs (datasets' shuffle with dpo.train.seed)
    from datasets import Dataset

    pairs = Dataset.from_list(rows(ws / "data/processed/dpo/train")).shuffle(seed=params["dpo"]["train"]["seed"])
    sample = pairs.select(range(12))
    texts = [row["prompt"] + row[side] + tokenizer.eos_token for row in sample for side in ("chosen", "rejected")]
    assert seen["tokens"] == sum(len(tokenizer(text)["input_ids"]) for text in texts)
    assert sorted(seen["texts"]) == sorted(tokenizer.decode(tokenizer(text)["input_ids"]) for text in texts)


@pytest.mark.parametrize("steps, micro, accumulation, processes, global_batch", [
    (3, 2, 2, 1, None), (2, 3, 1, 2, None), (1, 1, 4, 2, None), (2, "auto", "auto", 2, 6)])
def test_the_training_sample_is_steps_x_the_global_batch(tmp_path, steps, micro, accumulation, processes,
                                                         global_batch):
    """How many pairs the reference stage scores and dpo trains on, against the definition:
    max_steps x micro-batch x accumulation x processes (or x global_batch_size with `auto`)."""
    import pyarrow as pa

    from stack_dpo.pairs import load_pairs
    from stack_dpo.params import validate
    from tests.conftest import DEFAULT_PARAMS, inside

    for split, n in (("train", 100), ("eval", 10)):  # distinct pairs, as prepare writes them
        (tmp_path / f"data/processed/dpo/{split}").mkdir(parents=True)
        pq.write_table(pa.table({"prompt": [f"Question: {split} {i}\n\nAnswer: " for i in range(n)],
                                 "chosen": ["yes"] * n, "rejected": ["no"] * n}),
                       tmp_path / f"data/processed/dpo/{split}/part-00000.parquet")
    raw = copy.deepcopy(DEFAULT_PARAMS)
    raw["launch"] = {**raw.get("launch", {}), "num_processes": processes}
    raw["dpo"]["train"].update(max_steps=steps, per_device_train_batch_size=micro,
                               gradient_accumulation_steps=accumulation, global_batch_size=global_batch)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with inside(tmp_path) as params:
        assert params == validate(raw)
        sample = load_pairs(params)["train"]
    want = steps * (global_batch or micro * accumulation * processes)
    assert len(sample) == want
    assert len({(row["prompt"], row["chosen"]) for row in sample}) == want  # each pair once


def test_the_pipelines_log_probs_match_the_oracles_on_the_base_model():
    """stack_dpo.modeling.response_logps (batched, padded) against response_logp above (one
    sequence at a time) on the bundled model: the function behind every stored log-prob."""
    from stack_dpo.modeling import load_tokenizer, response_logps

    tokenizer = load_tokenizer(REPO / "data/sample/tiny-llama")  # the pipeline's: its pad token set
    model = AutoModelForCausalLM.from_pretrained(REPO / "data/sample/tiny-llama", dtype=torch.float32).eval()
    rows = pq.read_table(REPO / "data/sample/stack-exchange-paired/data/evaluation").slice(0, 3).to_pylist()
    prompts = ["Question: " + row["question"] + "\n\nAnswer: " for row in rows]
    answers = [row["response_j"][:300] for row in rows]  # of different lengths: padding in the batch
    got = response_logps(model, tokenizer, prompts, answers, batch_size=3)
    want = [response_logp(model, tokenizer, prompt, answer) for prompt, answer in zip(prompts, answers)]
    assert got.tolist() == pytest.approx(want, abs=1e-3)


def test_the_pairs_fingerprint_changes_with_any_text_of_any_pair():
    """What ties stored reference log-probs to their rows (stack_dpo.pairs): swapping a pair's
    answers, editing one character anywhere or reordering rows gives another fingerprint."""
    from datasets import Dataset

    from stack_dpo.pairs import pairs_fingerprint

    rows = [{"prompt": f"Question: q{i}\n\nAnswer: ", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(4)]
    base = pairs_fingerprint(Dataset.from_list(rows))
    variants = [
        [rows[0], {**rows[1], "chosen": rows[1]["rejected"], "rejected": rows[1]["chosen"]}, *rows[2:]],
        [*rows[:3], {**rows[3], "rejected": "bad 3!"}],
        [*rows[:3], {**rows[3], "chosen": "good 3."}],
        [rows[1], rows[0], *rows[2:]],
    ]
    found = {pairs_fingerprint(Dataset.from_list(variant)) for variant in variants}
    assert base == pairs_fingerprint(Dataset.from_list(rows)) and base not in found and len(found) == 4
