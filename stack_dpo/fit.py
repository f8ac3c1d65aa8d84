"""Fitting a training stage to its device: the micro-batch, gradient accumulation and activation
checkpointing that `auto` batch sizes leave open, chosen from a memory model of the base and the
memory the device has, so that the global batch stays what the params say.

The memory model of one process (DDP: each holds the whole model):
- weights: the decoder's linear layers in 4 bits (NF4, plus a float32 scale per block of 64) or
  in model.dtype; embeddings, norms and the LM head (bitsandbytes leaves it unquantized) in
  model.dtype;
- LoRA: weights, gradients and AdamW's two float32 states (TRL keeps QLoRA adapters in bf16);
- activations kept for the backward pass, per token and decoder layer: ACTIVATION_BYTES_PER_HIDDEN
  bytes per hidden unit plus ACTIVATION_BYTES_PER_INTERMEDIATE per MLP unit, or with activation
  checkpointing only the layer's 16-bit input (2 bytes per hidden unit), plus one layer's worth
  while the backward pass recomputes it and works on it. The coefficients were measured by
  counting the bytes autograd saves in a QLoRA Llama (tests/test_fit.py measures them again);
  no term grows with the square of the length (SDPA keeps no attention matrix);
- TRL's LM head: per-token log-probs in tiles of 4096 tokens x 32768 vocabulary entries, never
  the whole logits.
A plan uses at most HEADROOM of the budget, less a fixed reserve (CUDA context, cuBLAS workspace,
allocator fragmentation). The choice: without checkpointing if any micro-batch fits (recomputing
the forward pass costs a QLoRA step about half again), the largest micro-batch that fits.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from stack_dpo.params import AUTO, InvalidInput, LaunchParams, LoraParams, ModelParams, TrainingParams, global_batch

GIB = 1024**3
ACTIVATION_BYTES_PER_HIDDEN = 18.3
ACTIVATION_BYTES_PER_INTERMEDIATE = 6.0
CHECKPOINT_BYTES_PER_HIDDEN = 2.0
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob's tiles
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64
LORA_BYTES_PER_PARAM = {True: 2 + 2 + 8, False: 4 + 4 + 8}  # quantized base: bf16 adapter; else float32
HEADROOM, RESERVE_BYTES = 0.9, 0.5 * GIB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

log = logging.getLogger("stack_dpo.fit")


class ModelShape(NamedTuple):
    """What the memory model needs to know of a causal LM."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    linear_params: int  # in the decoder's linear layers (what 4-bit quantizes)
    other_params: int   # embeddings, norms, LM head
    lora_params: int    # of the adapter on the given LoRA targets


class Plan(NamedTuple):
    micro_batch: int
    accumulation: int
    checkpointing: bool
    estimated_gib: float
    budget_gib: float
    budget: str  # where the budget comes from

    def metrics(self) -> dict:
        return {"micro_batch": self.micro_batch, "accumulation": self.accumulation,
                "checkpointing": self.checkpointing, "estimated_peak_gib": round(self.estimated_gib, 3),
                "budget_gib": round(self.budget_gib, 3), "budget": self.budget}


def model_shape(config, lora: LoraParams) -> ModelShape:
    """The shape of the model `config` describes, counted on the model built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    head = skeleton.get_output_embeddings()
    linear = lora_params = 0
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            if any(name == t or name.endswith(f".{t}") for t in lora.target_modules):
                lora_params += lora.r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in skeleton.parameters())
    return ModelShape(layers=config.num_hidden_layers, hidden=config.hidden_size,
                      intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
                      vocab=config.vocab_size, linear_params=linear, other_params=total - linear,
                      lora_params=lora_params)


def estimate_bytes(shape: ModelShape, model: ModelParams, tokens: int, checkpointing: bool) -> float:
    """Peak memory of one training step over `tokens` tokens (a micro-batch), by the model above."""
    quantized = model.quantization == "4bit"
    dtype_bytes = DTYPE_BYTES[model.dtype]
    weights = shape.linear_params * (NF4_BYTES_PER_WEIGHT if quantized else dtype_bytes)
    weights += shape.other_params * dtype_bytes
    adapter = shape.lora_params * LORA_BYTES_PER_PARAM[quantized]
    per_layer = ACTIVATION_BYTES_PER_HIDDEN * shape.hidden + ACTIVATION_BYTES_PER_INTERMEDIATE * shape.intermediate
    kept = CHECKPOINT_BYTES_PER_HIDDEN * shape.hidden if checkpointing else per_layer
    activations = tokens * (shape.layers * kept + 2 * per_layer if checkpointing else shape.layers * kept + per_layer)
    head = min(tokens, HEAD_TILE_TOKENS) * min(shape.vocab, HEAD_TILE_VOCAB) * 8 + tokens * shape.hidden * 8
    return weights + adapter + activations + head


def budget(launch: LaunchParams) -> tuple[float, str]:
    """(bytes one process may use, where that figure comes from); under `accelerate launch` the
    smallest over the processes, so that all of them take the same plan."""
    if launch.max_memory_gib is not None:
        return launch.max_memory_gib * GIB, "launch.max_memory_gib"
    if torch.cuda.is_available():  # each process has a GPU of its own (entrypoint checks the count)
        device = int(os.environ.get("LOCAL_RANK", 0))
        free = smallest_over_processes(torch.cuda.mem_get_info(device)[0])
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    import psutil

    return smallest_over_processes(psutil.virtual_memory().available / launch.num_processes), "available host memory"


def smallest_over_processes(value: float) -> float:
    """The smallest `value` of the processes of an `accelerate launch` (the value itself alone):
    processes that chose different accumulations would wait on each other's gradients forever.
    It joins the process group the launcher described, with the backend accelerate would choose
    (NCCL on GPUs, gloo on CPUs); the trainer then finds it there."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return value
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    tensor = torch.tensor([value], dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.item()


def plan(stage: str, train: TrainingParams, launch: LaunchParams, model: ModelParams, shape: ModelShape,
         sequence_tokens: int) -> Plan:
    """The micro-batch, accumulation and checkpointing of `stage`, whose examples are at most
    `sequence_tokens` long (a packed SFT row, or a DPO pair's chosen and rejected sequences).
    Numbers set in the params are kept (and only estimated); `auto` ones are fitted."""
    total, source = budget(launch)
    usable = max(total * HEADROOM - RESERVE_BYTES, 0.0)
    per_process = global_batch(train, launch) // launch.num_processes
    fixed = train.per_device_train_batch_size != AUTO
    sizes = [train.per_device_train_batch_size] if fixed else [m for m in range(per_process, 0, -1)
                                                               if per_process % m == 0]
    options = [False, True] if train.gradient_checkpointing == AUTO else [train.gradient_checkpointing]

    def planned(micro: int, checkpointing: bool, need: float) -> Plan:
        accumulation = train.gradient_accumulation_steps if fixed else per_process // micro
        return Plan(micro, accumulation, checkpointing, need / GIB, total / GIB, source)

    for checkpointing in options:
        for micro in sizes:
            need = estimate_bytes(shape, model, micro * sequence_tokens, checkpointing)
            if need <= usable:
                return planned(micro, checkpointing, need)
    if fixed:  # the user's numbers stand; say that they may not fit
        log.warning("%s: the batch set in params needs about %.1f GiB by the memory model (stack_dpo/fit.py), more "
                    "than the %.1f GiB usable of %s (%.1f GiB); it may run out of memory (per_device_train_batch_"
                    "size: auto fits it)", stage, need / GIB, usable / GIB, source, total / GIB)
        return planned(sizes[0], options[-1], need)
    smallest = estimate_bytes(shape, model, sequence_tokens, True) / GIB
    raise InvalidInput(f"{stage}: not even one example per step fits: with activation checkpointing it needs about "
                       f"{smallest:.1f} GiB by the memory model (stack_dpo/fit.py), and {usable / GIB:.1f} GiB of "
                       f"{source} ({total / GIB:.1f} GiB) is usable; use a device with more memory, 4-bit "
                       "quantization or shorter sequences")
