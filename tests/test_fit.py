"""stack_dpo.fit: the memory model against figures it does not compute (Llama-2-7B's published
parameter count, the bytes autograd really saves), and the batches it chooses for Llama-2-7B's
shape on fake 24, 80 and 141 GiB GPUs (torch.cuda patched)."""

import logging
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from stack_dpo import fit
from stack_dpo.experiment import profile_params
from stack_dpo.params import InvalidInput, LaunchParams
from tests.conftest import REPO

# meta-llama/Llama-2-7b-hf's config.json (no download)
LLAMA_2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
GIB = 1024**3


@pytest.fixture
def full():
    return profile_params(REPO / "profiles/llama2-7b.yaml", REPO / "params.yaml")


def fake_gpu(monkeypatch, gib: float):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib * GIB, gib * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake {gib:g} GiB GPU")


def test_the_shape_of_llama_2_7b_is_its_published_parameter_count(full):
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    assert shape.linear_params + shape.other_params == 6_738_415_616  # "7B": 6.74e9 parameters
    assert shape.lora_params == 4_194_304  # PEFT's trainable parameters for r=8 on q_proj and v_proj
    # what stays 16-bit under 4-bit: both embeddings (32000 x 4096 each) and 65 RMSNorm weights
    assert shape.other_params == 2 * 32000 * 4096 + 65 * 4096


def test_weights_and_adapter_cost_what_nf4_and_adamw_cost(full):
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    nf4 = 6_476_005_376 * (4 / 8 + 32 / 8 / 64)  # 4 bits a weight, a float32 absmax per block of 64
    embeddings = 262_410_240 * 2  # bf16
    adapter = 4_194_304 * (2 + 2 + 8)  # bf16 weights and gradients, AdamW's two float32 states
    assert fit.estimate_bytes(shape, full.model, 0, False) == pytest.approx(nf4 + embeddings + adapter, rel=1e-9)


@pytest.mark.parametrize("gib", [24, 80, 141])
def test_the_full_profile_fits_fake_gpus_of_24_80_and_141_gib_keeping_the_global_batch(full, monkeypatch, gib):
    fake_gpu(monkeypatch, gib)
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    for stage, train, tokens, global_batch in (("sft", full.sft.train, 1024, 8), ("dpo", full.dpo.train, 2048, 16)):
        chosen = fit.plan(stage, train, full.launch, full.model, shape, tokens)
        assert chosen.micro_batch * chosen.accumulation == global_batch  # the recipe's global batch, always
        assert chosen.estimated_gib <= gib * fit.HEADROOM - fit.RESERVE_BYTES / GIB
        assert chosen.budget == f"free memory of Fake {gib} GiB GPU" and chosen.budget_gib == gib
        assert not chosen.checkpointing  # a 7B QLoRA step fits without recomputing, even at 24 GiB


def test_a_larger_gpu_never_turns_checkpointing_on_nor_shrinks_the_micro_batch_it_runs_with(full, monkeypatch):
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    for stage, train, tokens in (("sft", full.sft.train, 1024), ("dpo", full.dpo.train, 2048)):
        plans = []
        for gib in (12, 24, 48, 80, 141):
            fake_gpu(monkeypatch, gib)
            chosen = fit.plan(stage, train, full.launch, full.model, shape, tokens)
            plans.append((chosen.checkpointing, chosen.micro_batch))
        assert [on for on, _ in plans] == sorted((on for on, _ in plans), reverse=True), (stage, plans)
        for mode in (True, False):
            micro = [size for on, size in plans if on is mode]
            assert micro == sorted(micro), (stage, plans)
        assert plans[-1][1] > min(size for _, size in plans), (stage, plans)  # more memory is used


def test_checkpointing_is_chosen_only_when_nothing_fits_without_it(full, monkeypatch):
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    without = fit.estimate_bytes(shape, full.model, 1024, False) + fit.RESERVE_BYTES
    fake_gpu(monkeypatch, 0.99 * without / fit.HEADROOM / GIB)  # one packed row without checkpointing: no
    chosen = fit.plan("sft", full.sft.train, full.launch, full.model, shape, 1024)
    assert chosen.checkpointing and chosen.micro_batch * chosen.accumulation == 8


def test_nothing_that_fits_is_refused_with_the_figures(full, monkeypatch):
    fake_gpu(monkeypatch, 4)  # the 4-bit weights alone are 3.9 GiB
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    with pytest.raises(InvalidInput, match=r"sft: not even one example per step fits: .* about [\d.]+ GiB .* "
                                           r"[\d.]+ GiB of free memory of Fake 4 GiB GPU \(4.0 GiB\) is usable"):
        fit.plan("sft", full.sft.train, full.launch, full.model, shape, 1024)


def test_numbers_in_the_params_are_kept_and_a_likely_out_of_memory_is_said(full, monkeypatch, caplog):
    fake_gpu(monkeypatch, 16)
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    recipe = full.sft.train.model_copy(update={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                               "global_batch_size": None, "gradient_checkpointing": True})
    chosen = fit.plan("sft", recipe, full.launch, full.model, shape, 1024)
    assert (chosen.micro_batch, chosen.accumulation, chosen.checkpointing) == (4, 2, True)
    no_checkpoints = recipe.model_copy(update={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                               "gradient_checkpointing": False})
    with caplog.at_level(logging.WARNING, logger="stack_dpo.fit"):
        chosen = fit.plan("sft", no_checkpoints, full.launch, full.model, shape, 1024)
    assert (chosen.micro_batch, chosen.accumulation, chosen.checkpointing) == (8, 1, False)
    assert "sft: the batch set in params needs about" in caplog.text and "may run out of memory" in caplog.text


def test_a_memory_cap_is_the_budget_and_processes_split_the_batch(full, monkeypatch):
    shape = fit.model_shape(LLAMA_2_7B, full.sft.lora)
    fake_gpu(monkeypatch, 24)
    on_24 = fit.plan("dpo", full.dpo.train, LaunchParams(), full.model, shape, 2048)
    fake_gpu(monkeypatch, 141)
    capped = fit.plan("dpo", full.dpo.train, LaunchParams(max_memory_gib=24), full.model, shape, 2048)
    assert capped.budget == "launch.max_memory_gib" and capped._replace(budget=on_24.budget) == on_24
    two = fit.plan("dpo", full.dpo.train, LaunchParams(num_processes=2), full.model, shape, 2048)
    assert two.micro_batch * two.accumulation == 8  # each of the two processes takes half the 16 pairs


def saved_bytes_per_token_and_layer(hidden: int, intermediate: int, checkpointing: bool) -> float:
    """What autograd keeps for the backward pass of a QLoRA Llama (NF4, bf16, LoRA on q and v),
    counted with saved-tensor hooks (each storage once), per token and decoder layer: the
    difference between 2 and 4 layers, so what is outside the layers cancels out."""
    counts = []
    for layers in (2, 4):
        config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=hidden // 64)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            LlamaForCausalLM(config).save_pretrained(folder)
            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=nf4,
                                                         device_map={"": "cpu"})
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)  # as TRL keeps QLoRA adapters
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        storages = {}

        def keep(tensor, storages=storages):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model.base_model.model.model(input_ids=torch.randint(0, 512, (2, 256)))  # the backbone: TRL's head apart
        counts.append(sum(storages.values()))
    return (counts[1] - counts[0]) / 2 / (2 * 256)


@pytest.mark.parametrize("hidden, intermediate", [(256, 688), (256, 1376)])
def test_the_activation_coefficients_are_what_autograd_saves(hidden, intermediate):
    measured = saved_bytes_per_token_and_layer(hidden, intermediate, checkpointing=False)
    modelled = fit.ACTIVATION_BYTES_PER_HIDDEN * hidden + fit.ACTIVATION_BYTES_PER_INTERMEDIATE * intermediate
    assert measured == pytest.approx(modelled, rel=0.05)
    assert saved_bytes_per_token_and_layer(hidden, intermediate, checkpointing=True) == \
        pytest.approx(fit.CHECKPOINT_BYTES_PER_HIDDEN * hidden, rel=0.05)  # only each layer's bf16 input
