import json

import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stack_dpo.modeling import load_adapter_model, load_tokenizer
from stack_dpo.params import InvalidInput
from stages import merge, push
from tests.conftest import inside, writable_copy


def test_merged_model_is_16_bit_and_matches_the_adapter_model(trained):
    merged_dir = trained / "models" / "merged"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (merged_dir / name).is_file(), name
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    with inside(trained) as params:
        tokenizer = load_tokenizer(merged_dir)
        adapter_model = load_adapter_model(params.model, "models/dpo")
        rows = pq.read_table("data/processed/dpo/eval").slice(0, 4).to_pylist()
        inputs = tokenizer([row["prompt"] + row["chosen"] for row in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            want = adapter_model(**inputs).logits
            got = merged.float()(**inputs).logits
        mask = inputs["attention_mask"].bool()
        # bf16 rounding of the saved weights only: far below the logits' own spread
        assert (got - want)[mask].abs().max() < 0.1 * want[mask].std()
        check = json.loads((trained / "metrics" / "merge.json").read_text())
        assert check["max_layer_diff"] > 0  # measured (merge refuses to write above merge.rtol; the merged
        # weights are checked bit for bit against PEFT's own merge in the next test)


def test_merged_weights_are_a_float32_merge_cast_once_to_the_saved_dtype(trained, tmp_path):
    """Oracle: PEFT's own merge of the whole model in float32, cast straight to merge.save_dtype
    (float16 here, with model.dtype bfloat16: a detour through bf16 would lose 3 mantissa bits)."""
    ws = tmp_path / "ws"
    writable_copy(trained, ws, checkpoints=False)
    with inside(ws) as params:
        half = params.model_copy(update={"merge": params.merge.model_copy(update={"save_dtype": "float16"}),
                                         "model": params.model.model_copy(update={"dtype": "bfloat16"})})
        merge.run(half)
        base = AutoModelForCausalLM.from_pretrained(params.model.name_or_path, dtype=torch.float32)
        want = PeftModel.from_pretrained(base, "models/dpo").merge_and_unload().state_dict()
    saved = load_file(ws / "models/merged/model.safetensors")
    assert set(saved) == set(want) and {tensor.dtype for tensor in saved.values()} == {torch.float16}
    for name, tensor in saved.items():
        assert torch.equal(tensor, want[name].to(torch.float16)), name
    merged_layers = [name for name in saved if "q_proj" in name or "v_proj" in name]
    assert any(not torch.equal(saved[name], want[name].to(torch.bfloat16).to(torch.float16))
               for name in merged_layers)  # the test can tell the two roundings apart


def test_merge_fails_beyond_tolerance_and_keeps_the_previous_output(trained, monkeypatch):
    before = (trained / "models/merged/model.safetensors").read_bytes()
    with inside(trained) as params:
        strict = params.model_copy(update={"merge": params.merge.model_copy(update={"rtol": 1e-12})})
        real_merge = merge.merge
        monkeypatch.setattr(merge, "merge", lambda p: (*real_merge(p)[:2], 1e-3))  # a merge that drifted
        with pytest.raises(InvalidInput, match=r"merge check failed: .* by 1.000e-03 \(relative\) > merge.rtol = "
                                               "1e-12"):
            merge.run(strict)
    assert (trained / "models/merged/model.safetensors").read_bytes() == before


def test_evaluate_metrics_agree_with_the_dpo_trainer(trained):
    metrics = json.loads((trained / "metrics/evaluate.json").read_text())
    trainer_eval = json.loads((trained / "metrics/dpo.json").read_text())["eval"]
    assert {"rewards/accuracies", "rewards/margins", "n_pairs"} <= set(metrics)
    assert metrics["n_pairs"] == json.loads((trained / "metrics/prepare.json").read_text())["dpo/eval"]["kept"]
    # Independent scoring of the merged model against the SFT reference reproduces TRL's eval
    # (up to the bf16 rounding of the merged weights).
    assert metrics["rewards/margins"] == pytest.approx(trainer_eval["rewards/margins"], rel=0.05, abs=2e-3)
    assert abs(metrics["rewards/accuracies"] - trainer_eval["rewards/accuracies"]) <= 0.05
    report = (trained / "reports/evaluate.md").read_text()
    assert f"**{metrics['rewards/accuracies']:.3f}** (95% interval" in report
    assert f"| baseline: the longer answer wins | {metrics['baseline/length_accuracy']:.3f} |" in report


def test_the_report_shows_distinct_questions_with_both_answers_and_both_models_side_by_side(trained, tmp_path):
    from stack_dpo.outputs import load_splits
    from stages import evaluate

    ws = tmp_path / "ws"
    writable_copy(trained, ws, checkpoints=False)
    with inside(ws) as params:
        more = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"generations": 3})})
        evaluate.run(more)
        pairs = load_splits("data/processed/dpo")["eval"]
    report = (ws / "reports/evaluate.md").read_text()
    sections = report.split("\n## Question ")[1:]
    assert len(sections) == 3
    prompts = [section.split("````text\n", 1)[1].split("\n````", 1)[0] for section in sections]
    assert len(set(prompts)) == 3  # three different questions, not one question's three pairs
    by_prompt = {}
    for row in pairs:
        by_prompt.setdefault(row["prompt"].strip(), row)
    for prompt, section in zip(prompts, sections):
        pair = by_prompt[prompt]
        assert f"**Chosen answer** (preferred in the data)\n\n````text\n{pair['chosen'].strip()}\n````" in section
        assert f"**Rejected answer**\n\n````text\n{pair['rejected'].strip()}\n````" in section
        assert "| SFT model | final model |\n| --- | --- |\n| " in section


def test_push_disabled_records_why(trained, tmp_path):
    ws = writable_copy(trained, tmp_path / "ws", checkpoints=False)
    with inside(ws) as params:
        record = push.run(params)
    assert record["pushed"] is False and "push.enabled is false" in record["reason"]
    assert json.loads((ws / "reports/push.json").read_text()) == record


def test_push_enabled_without_repo_fails_clearly(trained):
    with inside(trained) as params:
        enabled = params.model_copy(update={"push": params.push.model_copy(update={"enabled": True})})
        with pytest.raises(ValueError, match=r"push.repo_id = ''; expected 'owner/name'"):
            push.run(enabled)


def test_merge_loads_the_16_bit_base_even_with_the_4bit_profile(trained, monkeypatch):
    """Any 4-bit load fails (patched), so a merge that succeeds with model.quantization = 4bit
    never asked for the quantized base."""
    from stack_dpo import modeling

    def no_4bit(model):
        raise AssertionError("a 4-bit model was asked for")

    monkeypatch.setattr(modeling, "quantization_config", no_4bit)
    with inside(trained) as params:
        qlora = params.model_copy(update={"model": params.model.model_copy(update={"quantization": "4bit"})})
        with pytest.raises(AssertionError, match="a 4-bit model was asked for"):
            load_adapter_model(qlora.model, "models/dpo")  # the training path would quantize
        merged, _, max_diff = merge.merge(qlora)
    assert max_diff <= params.merge.rtol  # merged in float32: a 16-bit merge misses this by far
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())  # then cast to merge.save_dtype
    assert not any("4bit" in type(module).__name__ for module in merged.modules())
