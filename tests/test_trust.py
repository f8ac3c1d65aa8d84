"""Numbers that mean what they say: the sample needs learning, baselines beside the accuracy,
both evaluated models in one numeric form, the merge gap, references that belong to their
rows, the start-of-DPO guard, SFT data order and duplicates, and a push that needs a vetted model."""

import json
import math
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from stack_dpo import pairs
from stack_dpo import sft as sft_trainer
from stack_dpo.evaluate import baselines, preference_accuracy, wilson_interval
from stack_dpo.params import InvalidInput
from stack_dpo.push import unvetted_note, unvetted_reasons
from stages import dpo, evaluate, fetch, merge, prepare, push, sft
from tests.conftest import REPO, inside, make_workspace, writable_copy
from tests.test_oracles import wilson_by_quadratic

SAMPLE = REPO / "data/sample/stack-exchange-paired/data"


def copy_of(trained, tmp_path):
    ws = tmp_path / "ws"
    writable_copy(trained, ws, checkpoints=False)
    return ws


def rule_accuracy(chosen, rejected) -> float:
    """How often a surface score prefers the chosen answer; ties count half (computed here, not
    with the pipeline's own function)."""
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


def test_held_out_pairs_cannot_be_told_apart_by_a_surface_rule():
    held_out = pq.read_table(SAMPLE / "evaluation").to_pylist()
    chosen, rejected = [r["response_j"] for r in held_out], [r["response_k"] for r in held_out]
    assert 0.35 <= rule_accuracy([len(t) for t in chosen], [len(t) for t in rejected]) <= 0.65
    assert 0.35 <= rule_accuracy(["```" in t for t in chosen], ["```" in t for t in rejected]) <= 0.65
    assert sum("```" in t for t in chosen + rejected) > len(held_out)  # prose, often code
    training = {text for split in ("finetune", "rl") for row in pq.read_table(SAMPLE / split).to_pylist()
                for text in (row["response_j"], row["response_k"])}
    repeated = sum(row["response_j"] in training or row["response_k"] in training for row in held_out)
    assert repeated <= 0.02 * len(held_out)


def test_at_least_200_held_out_pairs_pass_the_default_filters(tmp_path):
    ws = make_workspace(tmp_path / "ws", fast=False)
    with inside(ws) as params:
        fetch.run(params)
        metrics = prepare.run(params)
    assert metrics["dpo/eval"]["kept"] >= 200


def test_baselines_and_interval_are_computed_as_defined():
    assert preference_accuracy([3, 1, 2, 2], [1, 3, 2, 0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    low, high = wilson_interval(0.9, 100)  # the textbook Wilson interval of 90/100
    assert (low, high) == pytest.approx((0.8256, 0.9448), abs=1e-4)
    # each rule has its own answer on these four pairs (by hand: length 1, 0, 1/2, 0; code block
    # 1, 1/2, 0, 1; SFT log-prob 1, 0, 1, 1), so a rule reading the wrong column or comparing a
    # column with itself (all ties: 1/2) fails
    rows = {"chosen": ["a long answer with ```code```", "tiny", "abc", "```x```"],
            "rejected": ["short", "a much longer rejected answer", "```", "no code here"]}
    got = baselines(rows, torch.tensor([-1.0, -5.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -3.0, -4.0]))
    assert got == {"baseline/length_accuracy": pytest.approx(1.5 / 4),
                   "baseline/code_block_accuracy": pytest.approx(2.5 / 4),
                   "baseline/sft_accuracy": pytest.approx(3 / 4)}


def test_evaluate_reports_the_baselines_of_its_pairs(trained):
    metrics = json.loads((trained / "metrics/evaluate.json").read_text())
    held_out = pq.read_table(trained / "data/processed/dpo/eval").to_pylist()
    assert metrics["n_pairs"] == len(held_out)
    lengths = ([len(r["chosen"]) for r in held_out], [len(r["rejected"]) for r in held_out])
    assert metrics["baseline/length_accuracy"] == pytest.approx(rule_accuracy(*lengths))
    # the SFT model's own preference: close to what the stored (float32) reference log-probs say
    stored = pq.read_table(trained / "data/processed/reference/eval").to_pydict()
    assert metrics["baseline/sft_accuracy"] == pytest.approx(
        rule_accuracy(stored["ref_chosen_logps"], stored["ref_rejected_logps"]), abs=0.05)
    n, accuracy = metrics["n_pairs"], metrics["rewards/accuracies"]
    assert (metrics["rewards/accuracies_ci95_low"], metrics["rewards/accuracies_ci95_high"]) == pytest.approx(
        wilson_by_quadratic(accuracy * n, n))  # tests/test_oracles.py's own Wilson interval
    report = (trained / "reports/evaluate.md").read_text()
    assert f"| baseline: the longer answer wins | {metrics['baseline/length_accuracy']:.3f} |" in report
    assert f"| baseline: the SFT model's own preference (log-prob) | {metrics['baseline/sft_accuracy']:.3f} |" \
        in report


def test_an_untrained_dpo_adapter_scores_exactly_zero(trained, tmp_path):
    """The reference is built the way the merged model is (same base, dtype, merge, cast), so a
    DPO adapter equal to the SFT adapter gives rewards of exactly 0 on every pair."""
    ws = copy_of(trained, tmp_path)
    shutil.rmtree(ws / "models/dpo")
    shutil.copytree(ws / "models/sft", ws / "models/dpo")
    with inside(ws) as params:
        merge.run(params)
        metrics = evaluate.run(params)
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0 and metrics["rewards/margins"] == 0
    assert metrics["rewards/accuracies"] == 0  # no pair's chosen reward beats its rejected one


def test_evaluate_never_loads_a_4bit_model(trained, tmp_path, monkeypatch):
    """With the 4-bit profile, any 4-bit load fails (patched): evaluate succeeding shows that
    both models it compares are the 16-bit merged form, with the same metrics."""
    from stack_dpo import modeling

    def no_4bit(model):
        raise AssertionError("a 4-bit model was asked for")

    monkeypatch.setattr(modeling, "quantization_config", no_4bit)
    ws = copy_of(trained, tmp_path)
    with inside(ws) as params:
        qlora = params.model_copy(update={"model": params.model.model_copy(update={"quantization": "4bit"})})
        metrics = evaluate.run(qlora)
    assert metrics == json.loads((trained / "metrics/evaluate.json").read_text())


def test_merge_records_the_gap_between_the_model_as_trained_and_the_merged_one(trained):
    gap = json.loads((trained / "metrics/merge.json").read_text())
    dpo_eval = json.loads((trained / "metrics/dpo.json").read_text())["eval"]
    assert gap["gap/pairs"] == json.loads((trained / "metrics/evaluate.json").read_text())["n_pairs"]
    # as trained, against the stored reference: what TRL's own evaluation measured
    assert gap["gap/accuracy_as_trained"] == pytest.approx(dpo_eval["rewards/accuracies"], abs=0.02)
    # recomputed with transformers and PEFT: tests/test_oracles.py
    assert 0 < gap["gap/mean_logit_diff"] <= gap["gap/max_logit_diff"] < 1  # bf16 rounding only


def test_a_reference_of_other_rows_with_the_same_count_is_refused(trained, tmp_path):
    ws = copy_of(trained, tmp_path)
    shard = next((ws / "data/processed/dpo/eval").glob("*.parquet"))
    table = pq.read_table(shard)
    swapped = table.set_column(1, "chosen", table.column("rejected")).set_column(2, "rejected", table.column("chosen"))
    pq.write_table(swapped, shard)  # same count, other rows
    with inside(ws) as params, pytest.raises(InvalidInput, match=r"reference/eval: the reference log-probs were "
                                                                    r"computed for other pairs"):
        pairs.with_stored_reference(pairs.load_pairs(params))
    with inside(ws) as params, pytest.raises(InvalidInput, match="computed for other pairs"):
        merge.run(params)  # every stage that reads them checks


def test_a_reference_of_another_sft_adapter_is_refused(trained, tmp_path):
    ws = copy_of(trained, tmp_path)
    config = ws / "models/sft/adapter_config.json"
    config.write_text(config.read_text() + "\n")  # another adapter, as far as the bytes tell
    with inside(ws) as params, pytest.raises(InvalidInput, match="computed with another SFT adapter"):
        dpo.run(params)


def test_dpo_stops_when_the_stored_reference_is_not_the_sft_models(trained, tmp_path):
    """Log-probs with an intact fingerprint that are not the SFT model's (here shifted by 5
    nats): the start-of-run guard sees loss != ln 2 and stops before any training step."""
    ws = copy_of(trained, tmp_path)
    for split in ("train", "eval"):
        shard = ws / f"data/processed/reference/{split}/part-00000.parquet"
        table = pq.read_table(shard)
        column = table.schema.get_field_index("ref_chosen_logps")
        shifted = pc.add(table.column(column), pa.scalar(5.0, table.schema.field(column).type))
        pq.write_table(table.set_column(column, "ref_chosen_logps", shifted), shard)
    before = (ws / "models/dpo/adapter_model.safetensors").read_bytes()
    with inside(ws) as params, pytest.raises(InvalidInput, match=r"loss on \d+ eval pairs is .* \(expected ln 2"):
        dpo.run(params)
    assert (ws / "models/dpo/adapter_model.safetensors").read_bytes() == before


def test_a_fresh_dpo_run_starts_at_ln2(trained):
    start = json.loads((trained / "metrics/dpo.json").read_text())["start_check"]
    assert start["loss"] == pytest.approx(math.log(2), abs=0.02)
    assert abs(start["rewards/chosen"]) < 0.02 and abs(start["rewards/rejected"]) < 0.02


def test_sft_drops_identical_texts_and_shuffles_before_packing(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws", {"fetch": {"max_rows": {"finetune": 120}}})
    with inside(ws) as params:
        fetch.run(params)
        raw = ws / "data/raw/finetune"
        shard = next(raw.glob("*.parquet"))
        table = pq.read_table(shard)
        pq.write_table(pa.concat_tables([table, table.slice(0, 7)]), shard)  # 7 texts twice
        metrics = prepare.run(params)
        assert metrics["sft"]["dropped"]["duplicate_text"] == 7
        assert metrics["sft"]["train"] + metrics["sft"]["eval"] == 120

        seen = []

        class Stop(Exception):
            pass

        def recording_trainer(**kwargs):
            seen.append(kwargs["train_dataset"]["text"])
            raise Stop

        monkeypatch.setattr(sft_trainer, "SFTTrainer", recording_trainer)
        for _ in range(2):
            with pytest.raises(Stop):
                sft.run(params)
    in_file = pq.read_table(ws / "data/processed/sft/train").column("text").to_pylist()
    assert seen[0] != in_file and sorted(seen[0]) == sorted(in_file)  # shuffled, nothing lost
    assert seen[0] == seen[1]  # seeded


def test_prepare_refuses_a_tokenizer_that_adds_a_second_eos(tmp_path):
    model = tmp_path / "tiny-llama-eos"
    shutil.copytree(REPO / "data/sample/tiny-llama", model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["post_processor"]["single"].append({"SpecialToken": {"id": "</s>", "type_id": 0}})
    spec["post_processor"]["special_tokens"]["</s>"] = {"id": "</s>", "ids": [2], "tokens": ["</s>"]}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    ws = make_workspace(tmp_path / "ws", {"model": {"name_or_path": str(model)}})
    with inside(ws) as params:
        fetch.run(params)
        with pytest.raises(InvalidInput, match=r"tokenization contract on 64 of 64 sample pairs \(a doubled EOS\)"):
            prepare.run(params)
    assert not (ws / "data/processed").exists()


def test_push_refuses_a_model_that_does_not_beat_its_baselines(trained, tmp_path):
    ws = copy_of(trained, tmp_path)
    metrics = json.loads((ws / "metrics/evaluate.json").read_text())
    metrics["baseline/length_accuracy"] = metrics["rewards/accuracies"]  # a tie does not beat it
    (ws / "metrics/evaluate.json").write_text(json.dumps(metrics))
    gap = json.loads((ws / "metrics/merge.json").read_text())
    gap["gap/accuracy_drop"] = 0.5
    (ws / "metrics/merge.json").write_text(json.dumps(gap))
    with inside(ws) as params:
        enabled = params.model_copy(update={"push": params.push.model_copy(
            update={"enabled": True, "repo_id": "alice/tiny-dpo"})})
        with pytest.raises(InvalidInput, match=r"push refused: held-out accuracy .* does not beat "
                                               r"baseline/length_accuracy .*merging lost 0.500 .*allow_unvetted"):
            push.run(enabled)
        reasons = unvetted_reasons(enabled, metrics, gap)
    assert len(reasons) == 2 and "Warning: pushed although" in unvetted_note(reasons)
