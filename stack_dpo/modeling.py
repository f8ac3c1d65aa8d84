"""Model and tokenizer loading shared by the stages: one place that knows about dtypes,
4-bit quantization, devices and the tokenizer's missing pad token.

PEFT is imported where it is used, not here: importing it imports bitsandbytes, which at import
logs a notice the stages filter (stack_dpo.entrypoint) only once they run, and prepare (which
needs only the tokenizer) has no use for either."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from stack_dpo.hub import HUB_ID
from stack_dpo.params import InvalidInput, LoraParams, ModelParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checked_source(name_or_path: str | Path) -> str:
    """A local model folder, or something that can be a Hub id; anything else fails clearly."""
    name = str(name_or_path)
    if Path(name).exists():
        if not (Path(name) / "config.json").exists() and not (Path(name) / "adapter_config.json").exists():
            raise InvalidInput(f"model.name_or_path = {name!r}: the folder has no config.json; expected a model "
                               "laid out like a Hub model repo")
        return name
    if not HUB_ID.match(name):
        raise InvalidInput(f"model.name_or_path = {name!r}: no such folder, and not a Hub id like 'owner/name'")
    return name


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(checked_source(name_or_path))
    if tokenizer.eos_token is None:  # every SFT text and DPO answer ends with it, and padding uses it
        raise InvalidInput(f"model.name_or_path = {str(name_or_path)!r}: its tokenizer has no EOS token; expected one "
                           "(eos_token in tokenizer_config.json), which ends every training text")
    if tokenizer.pad_token is None:  # Llama-2 has none; the recipe pads with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(model: ModelParams) -> BitsAndBytesConfig | None:
    """The recipe's QLoRA quantization (NF4 weights, bf16 compute) or None; bitsandbytes runs it
    on CUDA and, more slowly, on the CPU (its CPU backend), so the same path runs in tests."""
    if model.quantization == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def preflight(model: ModelParams, lora: LoraParams | None = None) -> None:
    """What training will need of the model (a model source, a tokenizer with EOS, LoRA targets
    that name modules of the model), checked before a training stage deletes or rewrites
    anything, checkpoints included; stack_dpo.machine checks the machine."""
    checked_source(model.name_or_path)
    load_tokenizer(model.name_or_path)
    if lora is not None:
        check_lora_targets(model, lora)


def check_lora_targets(model: ModelParams, lora: LoraParams) -> None:
    """Every LoRA target must name modules of the base model (PEFT skips a name that matches
    nothing as long as another one matches), checked on the model built on the meta device:
    its config only, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checked_source(model.name_or_path)))
    names = [name for name, _ in skeleton.named_modules()]
    unknown = [t for t in lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise InvalidInput(f"sft.lora.target_modules: {unknown} name no module of {model.name_or_path!r}; "
                           f"expected names of its layers, such as {linear}")


def device_map(quantized: bool = False) -> dict | None:
    """Where from_pretrained puts the weights: under `accelerate launch` each process holds its own
    copy on its own GPU; bitsandbytes quantizes on the CPU only when told to put them there."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"} if quantized else None


def load_base_model(model: ModelParams, *, quantized: bool = True, dtype: torch.dtype | None = None):
    """The base model as configured; `quantized=False` always loads the 16/32-bit weights
    (merging needs them: adapters are never merged into a 4-bit model)."""
    quantization = quantization_config(model) if quantized else None
    loaded = AutoModelForCausalLM.from_pretrained(
        checked_source(model.name_or_path),
        dtype=dtype or DTYPES[model.dtype],
        quantization_config=quantization,
        device_map=device_map(quantization is not None),
    )
    for module in loaded.modules() if quantization is not None else ():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # a bitsandbytes Linear4bit
            # bitsandbytes' CPU backend repacks a layer's weights in place for a faster kernel the
            # first time it runs without gradients: evaluation would then use another kernel than
            # training, and the repacking fails for widths that are not a multiple of the 64-value
            # block (the tiny model's 352). CUDA never takes that path.
            module.support_avx512bf16_for_cpu = False
    return loaded


def load_adapter_model(model: ModelParams, adapter_dir: str | Path, *, trainable: bool = False, **base_kwargs):
    from peft import PeftModel

    base = load_base_model(model, **base_kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def on_device(model):
    """`model` on the device the stages compute on (the GPU of this process, or the CPU)."""
    return model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else model


def load_merged(folder: str | Path, model: ModelParams):
    """A merged model as saved (models/merged), in model.dtype on the device: how evaluate and the
    merge gap compute with it, so both see one numeric form."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[model.dtype], device_map=device_map())


MERGE_PROBES = 8  # random inputs per LoRA layer for the merge check


@torch.no_grad()
def merged_model(model: ModelParams, adapter_dir: str | Path, save_dtype: str):
    """(base + adapter merged in `save_dtype`, on the host; the merge check: max relative
    difference of a LoRA layer's output merged against unmerged).

    The base is loaded in the dtype it is stored in (never 4-bit), on the host, and merged one
    LoRA layer at a time by PEFT in float32: that layer's weight is upcast, the adapter's delta
    added, the result cast to `save_dtype` (every other weight is cast directly). So no float32
    copy of the model is ever held (7B: 13.5 GB of host memory for the float16 base, not 27 GB
    in float32 on a GPU), and the saved weights equal a float32 merge cast to `save_dtype`,
    bit for bit. The check compares each layer with itself unmerged, in float32, on random
    inputs: a layer is a linear map, so any merge error shows."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = AutoModelForCausalLM.from_pretrained(checked_source(model.name_or_path), dtype="auto")
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for layer in [module for module in adapted.modules() if isinstance(module, LoraLayer)]:
        weight = layer.get_base_layer().weight
        weight.data = weight.data.float()
        probes = torch.randn(MERGE_PROBES, layer.in_features, generator=generator)
        unmerged = layer(probes)
        layer.merge(safe_merge=True)
        worst = max(worst, ((layer(probes) - unmerged).abs().max() / unmerged.abs().max()).item())
        weight.data = weight.data.to(DTYPES[save_dtype])
    return cast_weights(adapted.unload(), save_dtype), worst


def cast_weights(model, dtype: str):
    """The model's weights in `dtype`, as saving them in that dtype and loading them gives:
    parameters only, since buffers such as the rotary inv_freq are recomputed on load, not
    rounded (Module.to would round them too, and the two forms would differ)."""
    for param in model.parameters():
        param.data = param.data.to(DTYPES[dtype])
    return model


def lora_config(lora: LoraParams):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def pair_token_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) exactly as TRL's DPOTrainer tokenizes a pair: the prompt
    alone, then prompt + response + EOS, with the response starting where they diverge."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    shared = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        shared += 1
    return full_ids[:shared], full_ids[shared:]


@torch.no_grad()
def response_logps(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int,
                   desc: str | None = None) -> torch.Tensor:
    """Sum of the log-probabilities of each response given its prompt (DPO's log pi(y|x)); with
    `desc`, a progress bar so named."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, unit="batch"):
        pairs = [pair_token_ids(tokenizer, p, r) for p, r in zip(prompts[start : start + batch_size],
                                                                 responses[start : start + batch_size])]
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (p, r) in enumerate(pairs):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            mask[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(r)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = labels[:, 1:].to(device)
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((picked * (targets != -100)).sum(-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def pair_logps(model, tokenizer, pairs, batch_size: int, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen|prompt) and log pi(rejected|prompt) of each pair (progress bars with `desc`)."""
    chosen = response_logps(model, tokenizer, pairs["prompt"], pairs["chosen"], batch_size,
                            desc and f"{desc}: chosen log-probs")
    rejected = response_logps(model, tokenizer, pairs["prompt"], pairs["rejected"], batch_size,
                              desc and f"{desc}: rejected log-probs")
    return chosen, rejected
