"""The recipe's own path, run on a CPU: QLoRA (NF4 weights through bitsandbytes' CPU backend,
bf16 compute and base), activation checkpointing, the paged optimizer, accumulation, float16
save; the full profile's batches fitted by stack_dpo.fit; Liger's kernels patched into the
stages' models; DPO batches grouped by length."""

import json
import math
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from stack_dpo.experiment import profile_params
from stack_dpo.params import InvalidInput
from tests.conftest import FAST, REPO, inside, make_workspace, subprocess_env, writable_copy

MEMORY_CAP_GIB = 0.6  # launch.max_memory_gib: by the memory model, room for 4 of the 8 SFT rows, 2 of 16 DPO pairs


def full_profile_overrides() -> dict:
    """profiles/llama2-7b.yaml's training settings on the bundled data and tiny model, with what a
    CPU cannot do swapped out: Liger (Triton) off, and no GPU required."""
    full = profile_params(REPO / "profiles/llama2-7b.yaml", REPO / "params.yaml")

    def train(section, steps):  # the recipe's checkpointing (auto would fit the tiny model without it)
        return {**section.model_dump(), "use_liger_kernel": False, "gradient_checkpointing": True,
                "max_steps": steps, "warmup_steps": 1, "save_steps": 2, "eval_steps": steps, "logging_steps": 1}

    return {"model": {"quantization": full.model.quantization, "dtype": full.model.dtype},
            "launch": {"device": "auto", "max_memory_gib": MEMORY_CAP_GIB},
            "sft": {"train": train(full.sft.train, 4), "lora": full.sft.lora.model_dump()},
            "dpo": {"beta": full.dpo.beta, "train": train(full.dpo.train, 3)},
            "merge": {"save_dtype": full.merge.save_dtype},
            "fetch": FAST["fetch"], "evaluate": FAST["evaluate"]}


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    from stages import dpo, evaluate, fetch, merge, prepare, reference, sft

    root = make_workspace(tmp_path_factory.mktemp("qlora"), full_profile_overrides())
    with inside(root) as params:
        assert params.model.quantization == "4bit" and params.model.dtype == "bfloat16"
        assert params.sft.train.optim == "paged_adamw_32bit" and params.merge.save_dtype == "float16"
        for stage in (fetch, prepare, sft, reference, dpo, merge, evaluate):
            stage.run(params)
    return root


def metrics(root, stage):
    return json.loads((root / f"metrics/{stage}.json").read_text())


@pytest.mark.slow
def test_the_full_profile_trains_qlora_with_fitted_batches_on_a_cpu(qlora):
    for stage, global_batch in (("sft", 8), ("dpo", 16)):
        fit = metrics(qlora, stage)["fit"]
        assert fit["micro_batch"] * fit["accumulation"] == global_batch and fit["accumulation"] > 1
        assert fit["checkpointing"] is True
        assert fit["budget"] == "launch.max_memory_gib" and fit["estimated_peak_gib"] <= fit["budget_gib"]
        state = json.loads(max((qlora / f"checkpoints/{stage}").glob("checkpoint-*/trainer_state.json")).read_text())
        assert state["train_batch_size"] == fit["micro_batch"]
    # TRL keeps a QLoRA adapter in bf16 (it does so only on a quantized base)
    assert {t.dtype for t in load_file(qlora / "models/sft/adapter_model.safetensors").values()} == {torch.bfloat16}
    start = metrics(qlora, "dpo")["start_check"]  # the stored reference is the SFT model's, in bf16 too
    assert abs(start["loss"] - math.log(2)) <= 0.02 and abs(start["rewards/chosen"]) <= 0.02
    for stage in ("sft", "reference", "dpo", "merge", "evaluate"):
        numbers = []

        def collect(value, numbers=numbers):
            if isinstance(value, dict):
                for item in value.values():
                    collect(item)
            elif isinstance(value, float | int) and not isinstance(value, bool):
                numbers.append(value)

        collect(metrics(qlora, stage))
        assert numbers and all(math.isfinite(n) for n in numbers), stage


@pytest.mark.slow
def test_the_merge_gap_is_measured_against_the_nf4_model_as_trained(qlora):
    """Oracle: transformers, PEFT and bitsandbytes directly (no project code): the NF4 base with
    models/dpo, against models/merged loaded in bf16, on the first held-out pairs."""
    gap = metrics(qlora, "merge")
    tokenizer = AutoTokenizer.from_pretrained(qlora / "models/merged")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(REPO / "data/sample/tiny-llama", quantization_config=nf4,
                                                dtype=torch.bfloat16, device_map={"": "cpu"})
    for module in base.modules():  # as the stages train it (stack_dpo.modeling: no in-place CPU repacking)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    as_trained = PeftModel.from_pretrained(base, qlora / "models/dpo").eval()
    merged = AutoModelForCausalLM.from_pretrained(qlora / "models/merged", dtype=torch.bfloat16).eval()
    import pyarrow.parquet as pq

    rows = pq.read_table(qlora / "data/processed/dpo/eval").slice(0, 4).to_pylist()
    inputs = tokenizer([row["prompt"] + row["chosen"] for row in rows], return_tensors="pt", padding=True)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        diff = (as_trained(**inputs).logits.float() - merged(**inputs).logits.float())[mask].abs()
    assert gap["gap/mean_logit_diff"] == pytest.approx(diff.mean().item(), rel=0.25)
    # NF4 against 16-bit: far above the bf16 rounding of a float32 run's gap (about 0.004)
    assert gap["gap/mean_logit_diff"] > 0.02 and gap["gap/max_logit_diff"] > 0
    assert 0 < gap["max_layer_diff"] <= 1e-4  # the merge itself, in float32


@pytest.mark.slow
def test_the_merged_model_is_saved_as_asked_with_no_detour_through_bf16(qlora):
    base = AutoModelForCausalLM.from_pretrained(REPO / "data/sample/tiny-llama", dtype=torch.float32)
    want = PeftModel.from_pretrained(base, qlora / "models/dpo").merge_and_unload().state_dict()
    saved = load_file(qlora / "models/merged/model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float16}
    assert all(torch.equal(tensor, want[name].to(torch.float16)) for name, tensor in saved.items())
    assert json.loads((qlora / "models/merged/config.json").read_text())["dtype"] == "float16"


LIGER_PROBE = r"""
import json, sys
from collections import Counter
from pathlib import Path
from transformers import TrainerCallback
from transformers.models.llama import modeling_llama
from stack_dpo.dpo import build_trainer as dpo_trainer, dpo_config
from stack_dpo.fit import Plan
from stack_dpo.params import load_params
from stack_dpo.sft import build_trainer as sft_trainer, sft_config

class Look(TrainerCallback):  # training begins after transformers applied the kernels; stop there (no GPU)
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model()
        names = Counter(module._get_name() for module in base.modules())
        print("PROBE " + json.dumps({"modules": names, "rope": modeling_llama.apply_rotary_pos_emb.__module__}))
        sys.exit(0)

params = load_params()
fit = Plan(2, 1, False, 0.0, 0.0, "test")
stage = sys.argv[1]
if stage == "sft":
    trainer = sft_trainer(params, sft_config(params, Path(sys.argv[2]), fit), None)
else:
    trainer = dpo_trainer(params, dpo_config(params, Path(sys.argv[2]), fit), None)
trainer.add_callback(Look())
trainer.train()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_liger_kernels_are_patched_into_the_stages_models_when_asked(qlora, tmp_path, stage):
    """In a subprocess each: Liger's RoPE patch is global to transformers' Llama module."""
    found = {}
    for liger in (True, False):
        ws = tmp_path / f"liger-{liger}"
        shutil.copytree(qlora, ws, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "dvclive"))
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params[stage]["train"]["use_liger_kernel"] = liger
        (ws / "params.yaml").write_text(yaml.safe_dump(params))
        result = subprocess.run([sys.executable, "-c", LIGER_PROBE, stage, str(tmp_path / "out")], cwd=ws,
                                env=subprocess_env(), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        found[liger] = json.loads(result.stdout.split("PROBE ", 1)[1].splitlines()[0])
    layers = 4  # the tiny Llama's
    assert found[True]["modules"].get("LigerRMSNorm") == 2 * layers + 1  # each layer's two norms and the final one
    assert found[True]["modules"].get("LigerSwiGLUMLP") == layers
    assert found[True]["rope"].startswith("liger_kernel")
    assert found[True]["modules"]["Linear4bit"] == found[False]["modules"]["Linear4bit"] > 0  # still QLoRA
    assert "LigerRMSNorm" not in found[False]["modules"] and found[False]["rope"].startswith("transformers")


def test_liger_on_a_machine_without_cuda_is_refused_before_any_work(workspace, monkeypatch):
    from stack_dpo import training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with inside(workspace) as params:
        liger = params.sft.train.model_copy(update={"use_liger_kernel": True})
        with pytest.raises(InvalidInput, match=r"sft.train.use_liger_kernel = true: Liger's Triton kernels run on "
                                               "CUDA GPUs only"):
            training.check_kernels("sft", liger)
        training.check_kernels("sft", params.sft.train)


@pytest.mark.slow
def test_length_grouped_dpo_batches_hold_the_same_pairs_with_less_padding(trained, tmp_path):
    """Every pair once per pass either way; grouped batches pad less (the collator pads a
    batch's chosen and rejected sequences to its longest)."""
    from stack_dpo.dpo import build_trainer, dpo_config
    from stack_dpo.fit import Plan
    from stages import fetch, prepare

    ws = make_workspace(tmp_path / "ws", {"fetch": {"max_rows": {"rl": 400}}, "dpo": {"train": {"max_steps": 40}}})
    writable_copy(trained / "models/sft", ws / "models/sft")  # the policy to start from
    with inside(ws) as params:
        fetch.run(params)
        prepare.run(params)
        seen, padding = {}, {}
        for grouped in (False, True):
            grouping = params.model_copy(update={"dpo": params.dpo.model_copy(update={"group_by_length": grouped})})
            # the reference of these pairs is computed by TRL at start (no reference stage ran here)
            trainer = build_trainer(grouping, dpo_config(grouping, tmp_path / "out", Plan(8, 1, False, 0, 0, "")),
                                    None, with_reference=False)
            rows, pad = Counter(), []
            for batch in trainer.get_train_dataloader():
                mask = batch["attention_mask"]
                pad.append(1 - mask.sum().item() / mask.numel())
                half = len(mask) // 2  # chosen sequences first, then the rejected ones
                for ids, keep in zip(batch["input_ids"][:half], mask[:half]):
                    rows[tuple(ids[keep.bool()].tolist())] += 1
            seen[grouped], padding[grouped] = rows, sum(pad) / len(pad)
    assert sum(seen[False].values()) == len(trainer.train_dataset) == 320  # 40 steps x 8 pairs
    assert seen[True] == seen[False]  # the same pairs, each once
    assert padding[True] < 0.8 * padding[False], padding
